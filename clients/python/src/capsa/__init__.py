"""Python client for Capsa: persistent code-execution sessions inside real microVMs.

```python
from capsa import Capsa

with Capsa() as vm:                      # CAPSA_ENDPOINT / CAPSA_API_KEY, or .capsa/dev.env
    vm.execute("x = 42")
    print(vm.execute("print(x)").stdout)  # 42
```

`AsyncCapsa` is the asyncio twin. The generated gRPC code is in `capsa.proto`.
"""

from ._aio import AsyncCapsa
from ._client import Capsa
from ._common import MAX_CHUNK_BYTES, RetryPolicy
from .errors import (
    AlreadyExists,
    AuthenticationError,
    Cancelled,
    CapsaError,
    ConfigurationError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    ServerError,
    Timeout,
    Unavailable,
)
from .types import (
    Completion,
    CompletionStatus,
    DisplayData,
    EgressPolicy,
    EndReason,
    Event,
    ExecuteError,
    ExecutionResult,
    FileInfo,
    FileType,
    OutputDropped,
    Process,
    ProcessEvent,
    ProcessExit,
    ProcessKind,
    ProcessOutput,
    ProcessState,
    ResultData,
    Session,
    SessionStatus,
    Snapshot,
    SnapshotStatus,
    Stderr,
    Stdout,
    TenantUsage,
    UploadResult,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "MAX_CHUNK_BYTES",
    "AlreadyExists",
    "AsyncCapsa",
    "AuthenticationError",
    "Cancelled",
    "Capsa",
    "CapsaError",
    "Completion",
    "CompletionStatus",
    "ConfigurationError",
    "DeadlineExceeded",
    "DisplayData",
    "EgressPolicy",
    "EndReason",
    "Event",
    "ExecuteError",
    "ExecutionResult",
    "FailedPrecondition",
    "FileInfo",
    "FileType",
    "InvalidArgument",
    "NotFound",
    "OutputDropped",
    "PermissionDenied",
    "Process",
    "ProcessEvent",
    "ProcessExit",
    "ProcessKind",
    "ProcessOutput",
    "ProcessState",
    "ProtocolError",
    "ResourceExhausted",
    "ResultData",
    "RetryPolicy",
    "ServerError",
    "Session",
    "SessionStatus",
    "Snapshot",
    "SnapshotStatus",
    "Stderr",
    "Stdout",
    "TenantUsage",
    "Timeout",
    "Unavailable",
    "UploadResult",
    "Usage",
]
