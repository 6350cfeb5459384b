"""The exceptions the client raises. gRPC status codes map onto them in one place,
`from_rpc_error`; code that runs and fails in the VM is not an
exception but a result (`ExecutionResult.status`, `.error`)."""

from __future__ import annotations

import grpc


class CapsaError(Exception):
    """Base of every error this package raises. `code` is the gRPC status code, when the
    error came from the API; `details` is the server's message."""

    code: grpc.StatusCode | None
    details: str

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details if code is None else f"{code.name}: {details}")
        self.code = code
        self.details = details


class ConfigurationError(CapsaError):
    """No endpoint or API key could be found, or one of them is malformed."""


class ProtocolError(CapsaError):
    """The server broke the contract (e.g. a download that did not start with the file's
    info, or ended short of its size)."""


class AuthenticationError(CapsaError):
    """UNAUTHENTICATED: the API key is missing, unknown or revoked."""


class PermissionDenied(CapsaError):
    """PERMISSION_DENIED."""


class NotFound(CapsaError):
    """NOT_FOUND: no such session for this key's tenant (another tenant's is NOT_FOUND
    too), or no such file in the VM."""


class InvalidArgument(CapsaError, ValueError):
    """INVALID_ARGUMENT or OUT_OF_RANGE: the message names the offending field."""


class AlreadyExists(CapsaError):
    """ALREADY_EXISTS, e.g. an upload with `overwrite=False` onto an existing file."""


class FailedPrecondition(CapsaError):
    """FAILED_PRECONDITION, e.g. a call on a session that has ended."""


class ResourceExhausted(CapsaError):
    """RESOURCE_EXHAUSTED: a tenant limit (sessions, create rate, open streams) or no room
    for the VM."""


class Unavailable(CapsaError, ConnectionError):
    """UNAVAILABLE: the server or a node behind it cannot be reached right now. Calls that
    are safe to repeat were already retried with backoff before this is raised."""


class DeadlineExceeded(CapsaError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline (`request_timeout`) passed, or the server gave
    up on a client that stopped reading. (Code that outruns its own `timeout` in the VM is
    not an error: its result has status `TIMEOUT`.)"""


Timeout = DeadlineExceeded


class Cancelled(CapsaError):
    """CANCELLED: the call was cancelled."""


class ServerError(CapsaError):
    """INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ABORTED or an unexpected code."""


_BY_CODE: dict[grpc.StatusCode, type[CapsaError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(e: grpc.RpcError) -> CapsaError:
    """The exception for a failed gRPC call (sync or `grpc.aio`)."""
    # Only errors of a finished call carry a code and details.
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    return _BY_CODE.get(code, ServerError)(details, code)
