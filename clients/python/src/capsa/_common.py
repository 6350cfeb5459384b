"""What the sync and async clients share: requests, limits, channel options, retry policy.
Only the I/O differs between `Capsa` and `AsyncCapsa`."""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from google.protobuf import duration_pb2

from .errors import InvalidArgument, ProtocolError
from .proto.common.v1 import execution_pb2, files_pb2, process_pb2
from .proto.session.v1 import session_pb2
from .types import EgressPolicy, ExecutionResult, SessionStatus, _duration

# The contract's limits (shared/capsa-proto/src/limits.rs): file data moves in chunks of at
# most 1 MiB, and every message (a result, a figure) fits in 8 MiB, past grpc's default 4.
MAX_CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 << 20

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Notices a dead connection under a long, silent execute or transfer.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
]

# The server's default execute timeout; the call's deadline is the execute's timeout plus
# the client's request_timeout, so the guest's own timeout always fires first.
DEFAULT_EXECUTE_TIMEOUT = 60.0

# Calls repeated on UNAVAILABLE: reads, and DeleteSession (deleting an ended session returns
# it unchanged). Never Execute, CreateSession, UploadFile, ExtendSession or the other writes:
# a first attempt the client saw fail may have taken effect. Nor DeleteSnapshot: a repeat
# of one that took effect would be NOT_FOUND.
SAFE_TO_RETRY = frozenset(
    {
        "GetSession",
        "ListSessions",
        "DeleteSession",
        "GetUsage",
        "GetTenantUsage",
        "DownloadFile",
        "ListFiles",
        "GetFileInfo",
        "GetEgressPolicy",
        "ListProcesses",
        "GetSnapshot",
        "ListSnapshots",
        "WaitProcess",
    }
)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for UNAVAILABLE on calls safe to repeat.
    `attempts` counts the first try; 1 disables retries."""

    attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    multiplier: float = 2.0

    def delays(self, method: str) -> Iterator[float]:
        if method not in SAFE_TO_RETRY:
            return
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(ceiling * self.multiplier, self.max_backoff)


LANGUAGES = {
    "python": execution_pb2.LANGUAGE_PYTHON,
    "shell": execution_pb2.LANGUAGE_SHELL,
    "bash": execution_pb2.LANGUAGE_SHELL,
}


def seconds_arg(name: str, value: float | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    if value <= 0:
        raise InvalidArgument(f"{name} must be positive, got {value}")
    return _duration(value)


def create_request(
    *,
    template: str | None,
    lifetime: float | None,
    vcpus: int | None,
    memory_mib: int | None,
    env: Mapping[str, str] | None,
    metadata: Mapping[str, str] | None,
    egress: EgressPolicy | None,
    auto_suspend: bool = False,
    auto_resume: bool = False,
    snapshot_id: str | None = None,
) -> session_pb2.CreateSessionRequest:
    if snapshot_id is not None and (not isinstance(snapshot_id, str) or not snapshot_id):
        raise InvalidArgument(f"snapshot_id must be a non-empty string, got {snapshot_id!r}")
    req = session_pb2.CreateSessionRequest(
        template=template or "",
        vcpus=vcpus or 0,
        memory_mib=memory_mib or 0,
        env=dict(env or {}),
        metadata=dict(metadata or {}),
        auto_suspend=auto_suspend,
        auto_resume=auto_resume,
        snapshot_id=snapshot_id or "",
    )
    life = seconds_arg("lifetime", lifetime)
    if life is not None:
        req.lifetime.CopyFrom(life)
    if egress is not None:
        req.egress.CopyFrom(egress._to_proto())
    return req


def snapshot_request(
    session_id: str, name: str, metadata: Mapping[str, str] | None
) -> session_pb2.SnapshotSessionRequest:
    return session_pb2.SnapshotSessionRequest(
        session_id=session_id, name=name, metadata=dict(metadata or {})
    )


def fork_request(
    session_id: str, count: int, lifetime: float | None, metadata: Mapping[str, str] | None
) -> session_pb2.ForkSessionRequest:
    # `count` is checked by the server (1 to 8), which names the field.
    req = session_pb2.ForkSessionRequest(
        session_id=session_id, count=count, metadata=dict(metadata or {})
    )
    life = seconds_arg("lifetime", lifetime)
    if life is not None:
        req.lifetime.CopyFrom(life)
    return req


def execute_request(
    session_id: str,
    code: str,
    *,
    language: str,
    timeout: float | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    max_output_bytes: int | None,
) -> session_pb2.ExecuteRequest:
    lang = LANGUAGES.get(language)
    if lang is None:
        raise InvalidArgument(f"language must be one of {sorted(LANGUAGES)}, got {language!r}")
    req = session_pb2.ExecuteRequest(
        session_id=session_id,
        code=code,
        language=lang,
        env=dict(env or {}),
        cwd=cwd or "",
        max_output_bytes=max_output_bytes or 0,
    )
    t = seconds_arg("timeout", timeout)
    if t is not None:
        req.timeout.CopyFrom(t)
    return req


SIGNALS = {
    "TERM": process_pb2.SIGNAL_TERM,
    "KILL": process_pb2.SIGNAL_KILL,
    "INT": process_pb2.SIGNAL_INT,
    "HUP": process_pb2.SIGNAL_HUP,
}

# WaitProcess's wait when none is given (the server's default).
DEFAULT_WAIT_TIMEOUT = 60.0


def start_process_request(
    session_id: str,
    command: str,
    args: list[str] | tuple[str, ...],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    keep_stdin_open: bool,
    output_buffer_bytes: int | None,
) -> session_pb2.StartProcessRequest:
    spec = process_pb2.ProcessSpec(
        command=command,
        args=list(args),
        env=dict(env or {}),
        cwd=cwd or "",
        stdin=stdin or b"",
        keep_stdin_open=keep_stdin_open,
        output_buffer_bytes=output_buffer_bytes or 0,
    )
    return session_pb2.StartProcessRequest(session_id=session_id, spec=spec)


def signal_request(session_id: str, process_id: str, signal: str) -> session_pb2.SignalProcessRequest:
    number = SIGNALS.get(signal.upper().removeprefix("SIG"))
    if number is None:
        raise InvalidArgument(f"signal must be one of {sorted(SIGNALS)}, got {signal!r}")
    return session_pb2.SignalProcessRequest(
        session_id=session_id, process_id=process_id, signal=number
    )


def wait_request(
    session_id: str, process_id: str, timeout: float | None
) -> session_pb2.WaitProcessRequest:
    req = session_pb2.WaitProcessRequest(session_id=session_id, process_id=process_id)
    t = seconds_arg("timeout", timeout)
    if t is not None:
        req.timeout.CopyFrom(t)
    return req


def execute_deadline(timeout: float | None, request_timeout: float | None, default: float) -> float:
    if request_timeout is not None:
        return request_timeout
    return (timeout or DEFAULT_EXECUTE_TIMEOUT) + default


def upload_header(
    session_id: str, remote: str, *, mode: int | None, overwrite: bool, size: int | None
) -> session_pb2.UploadFileRequest:
    file = files_pb2.UploadHeader(path=remote, mode=mode or 0, no_overwrite=not overwrite)
    # The server rejects an upload that ends with another count: a cancelled upload is then
    # never taken for a finished one.
    if size is not None:
        file.size = size
    return session_pb2.UploadFileRequest(
        header=session_pb2.UploadFileHeader(session_id=session_id, file=file)
    )


def data_part(chunk: bytes) -> session_pb2.UploadFileRequest:
    return session_pb2.UploadFileRequest(data=chunk)


def list_sessions_request(
    status: SessionStatus | None,
    metadata: Mapping[str, str] | None,
    page_size: int,
    page_token: str,
) -> session_pb2.ListSessionsRequest:
    return session_pb2.ListSessionsRequest(
        page_size=page_size,
        page_token=page_token,
        status=f"SESSION_STATUS_{status.name}"
        if status is not None
        else "SESSION_STATUS_UNSPECIFIED",
        metadata=dict(metadata or {}),
    )


def list_snapshots_request(page_size: int, page_token: str) -> session_pb2.ListSnapshotsRequest:
    return session_pb2.ListSnapshotsRequest(page_size=page_size, page_token=page_token)


def finish(result: ExecutionResult) -> ExecutionResult:
    if result.completion is None:
        raise ProtocolError("the execute stream ended without a completion event")
    return result


class DownloadCheck:
    """Checks a download's messages: the file's info first, then data adding up to its size."""

    def __init__(self) -> None:
        self.info: files_pb2.FileInfo | None = None
        self.received = 0

    def data(self, msg: session_pb2.DownloadFileResponse) -> bytes | None:
        """The data to write for `msg`, or None for the leading info message."""
        part = msg.WhichOneof("part")
        if self.info is None:
            if part != "info":
                raise ProtocolError("the download did not start with the file's info")
            self.info = msg.info
            return None
        if part != "data":
            raise ProtocolError("unexpected message in the download")
        self.received += len(msg.data)
        return msg.data

    def done(self) -> files_pb2.FileInfo:
        if self.info is None:
            raise ProtocolError("the download ended before the file's info")
        if self.received != self.info.size:
            raise ProtocolError(
                f"the download ended after {self.received} of {self.info.size} bytes"
            )
        return self.info


def local_size(f: object) -> int | None:
    """Bytes left to read in a file object, when it can tell."""
    try:
        st = os.fstat(f.fileno())  # type: ignore[attr-defined]
        if not stat.S_ISREG(st.st_mode):
            return None  # a pipe or socket: its size is not known ahead
        return int(st.st_size - f.tell())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass
    try:
        pos = f.seek(0, os.SEEK_CUR)  # type: ignore[attr-defined]
        end = f.seek(0, os.SEEK_END)  # type: ignore[attr-defined]
        f.seek(pos)  # type: ignore[attr-defined]
        return int(end - pos)
    except (AttributeError, OSError, ValueError):
        return None
