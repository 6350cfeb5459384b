"""What the client returns: plain dataclasses converted from the generated messages (which
stay reachable as `capsa.proto.*`). Durations are float seconds, timestamps are aware UTC
datetimes (None when unset), enums are `str` enums."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import Enum

from google.protobuf import duration_pb2, timestamp_pb2

from .proto.common.v1 import egress_pb2, execution_pb2, files_pb2, process_pb2, usage_pb2
from .proto.session.v1 import session_pb2


def _seconds(d: duration_pb2.Duration) -> float:
    return float(d.seconds + d.nanos / 1e9)


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _time(msg: object, name: str) -> _dt.datetime | None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    when: _dt.datetime = ts.ToDatetime(tzinfo=_dt.timezone.utc)
    return when


class SessionStatus(str, Enum):
    UNSPECIFIED = "unspecified"
    CREATING = "creating"
    ACTIVE = "active"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"


class SnapshotStatus(str, Enum):
    UNSPECIFIED = "unspecified"
    CREATING = "creating"
    READY = "ready"


class EndReason(str, Enum):
    NONE = "none"
    DELETED = "deleted"
    EXPIRED = "expired"
    VM_FAILED = "vm_failed"
    CREATE_FAILED = "create_failed"


class CompletionStatus(str, Enum):
    UNSPECIFIED = "unspecified"
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    KERNEL_DIED = "kernel_died"


class FileType(str, Enum):
    UNSPECIFIED = "unspecified"
    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


# Proto enum values are in the same order as the members above.
def _enum(cls: type[Enum], value: int) -> Enum:
    members = list(cls)
    return members[value] if 0 <= value < len(members) else members[0]


@dataclass(frozen=True)
class EgressPolicy:
    """What a session's VM may reach (see `capsa.common.v1.EgressPolicy` in proto/)."""

    deny_all: bool = False
    allow_package_managers: bool = False
    allow_http: bool | None = None
    allow_https: bool | None = None
    allowed_domains: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()

    def _to_proto(self) -> egress_pb2.EgressPolicy:
        msg = egress_pb2.EgressPolicy(
            deny_all=self.deny_all,
            allow_package_managers=self.allow_package_managers,
            allowed_domains=list(self.allowed_domains),
            allowed_cidrs=list(self.allowed_cidrs),
        )
        if self.allow_http is not None:
            msg.allow_http = self.allow_http
        if self.allow_https is not None:
            msg.allow_https = self.allow_https
        return msg

    @classmethod
    def _from_proto(cls, msg: egress_pb2.EgressPolicy) -> EgressPolicy:
        return cls(
            deny_all=msg.deny_all,
            allow_package_managers=msg.allow_package_managers,
            allow_http=msg.allow_http if msg.HasField("allow_http") else None,
            allow_https=msg.allow_https if msg.HasField("allow_https") else None,
            allowed_domains=tuple(msg.allowed_domains),
            allowed_cidrs=tuple(msg.allowed_cidrs),
        )


@dataclass(frozen=True)
class Session:
    id: str
    status: SessionStatus
    end_reason: EndReason
    end_message: str
    template: str
    vcpus: int
    memory_mib: int
    metadata: dict[str, str]
    # Names of the env variables set at creation; values are never returned.
    env_names: list[str]
    create_time: _dt.datetime | None
    expire_time: _dt.datetime | None
    last_active_time: _dt.datetime | None
    end_time: _dt.datetime | None
    node_id: str
    vm_id: str
    egress: EgressPolicy | None
    auto_suspend: bool = False
    auto_resume: bool = False
    suspend_time: _dt.datetime | None = None
    # While suspended: bytes its snapshot takes on its node's disk.
    snapshot_bytes: int = 0
    # The snapshot it was created from (`Capsa(snapshot_id=...)`), if any.
    source_snapshot_id: str = ""
    # The session it was forked from (`fork()`), if any.
    parent_session_id: str = ""

    @property
    def is_active(self) -> bool:
        return self.status is SessionStatus.ACTIVE

    @classmethod
    def _from_proto(cls, s: session_pb2.Session) -> Session:
        return cls(
            id=s.id,
            status=_enum(SessionStatus, s.status),  # type: ignore[arg-type]
            end_reason=_enum(EndReason, s.end_reason),  # type: ignore[arg-type]
            end_message=s.end_message,
            template=s.template,
            vcpus=s.vcpus,
            memory_mib=s.memory_mib,
            metadata=dict(s.metadata),
            env_names=list(s.env_names),
            create_time=_time(s, "create_time"),
            expire_time=_time(s, "expire_time"),
            last_active_time=_time(s, "last_active_time"),
            end_time=_time(s, "end_time"),
            node_id=s.node_id,
            vm_id=s.vm_id,
            egress=EgressPolicy._from_proto(s.egress) if s.HasField("egress") else None,
            auto_suspend=s.auto_suspend,
            auto_resume=s.auto_resume,
            suspend_time=_time(s, "suspend_time"),
            snapshot_bytes=s.snapshot_bytes,
            source_snapshot_id=s.source_snapshot_id,
            parent_session_id=s.parent_session_id,
        )


@dataclass(frozen=True)
class Snapshot:
    """A tenant's saved session state (`snapshot()`): new sessions start from it with
    `Capsa(snapshot_id=...)`. It lives on the disk of the node that ran the session, and
    sessions created from it run there."""

    id: str
    # The name given at `snapshot()` (names need not be unique).
    name: str
    status: SnapshotStatus
    # The session it was taken of.
    session_id: str
    template: str
    vcpus: int
    memory_mib: int
    # Bytes on its node's disk, once READY.
    size_bytes: int
    create_time: _dt.datetime | None
    node_id: str
    metadata: dict[str, str]

    @property
    def is_ready(self) -> bool:
        return self.status is SnapshotStatus.READY

    @classmethod
    def _from_proto(cls, s: session_pb2.Snapshot) -> Snapshot:
        return cls(
            id=s.id,
            name=s.name,
            status=_enum(SnapshotStatus, s.status),  # type: ignore[arg-type]
            session_id=s.session_id,
            template=s.template,
            vcpus=s.vcpus,
            memory_mib=s.memory_mib,
            size_bytes=s.size_bytes,
            create_time=_time(s, "create_time"),
            node_id=s.node_id,
            metadata=dict(s.metadata),
        )


@dataclass(frozen=True)
class Usage:
    """Resource use of a session (or the sum over a tenant's sessions)."""

    cpu_time: float
    memory_used_bytes: int
    memory_peak_bytes: int
    vmm_resident_bytes: int
    vmm_resident_peak_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    uptime: float
    sample_time: _dt.datetime | None
    # Background processes running and terminals open at sample_time.
    processes_running: int = 0
    terminals_open: int = 0

    @classmethod
    def _from_proto(cls, u: usage_pb2.Usage) -> Usage:
        return cls(
            cpu_time=_seconds(u.cpu_time),
            memory_used_bytes=u.memory_used_bytes,
            memory_peak_bytes=u.memory_peak_bytes,
            vmm_resident_bytes=u.vmm_resident_bytes,
            vmm_resident_peak_bytes=u.vmm_resident_peak_bytes,
            network_rx_bytes=u.network_rx_bytes,
            network_tx_bytes=u.network_tx_bytes,
            disk_read_bytes=u.disk_read_bytes,
            disk_write_bytes=u.disk_write_bytes,
            uptime=_seconds(u.uptime),
            sample_time=_time(u, "sample_time"),
            processes_running=u.processes_running,
            terminals_open=u.terminals_open,
        )


@dataclass(frozen=True)
class TenantUsage:
    tenant_id: str
    total: Usage
    active_sessions: int
    total_sessions: int
    # The tenant's snapshots now: how many, and bytes on disk.
    snapshots: int = 0
    snapshot_bytes: int = 0
    # Its snapshot quota: at most `snapshot_limit` snapshots and `snapshot_bytes_limit` bytes.
    snapshot_limit: int = 0
    snapshot_bytes_limit: int = 0
    # Snapshot storage used so far, the bill's measure: GiB held x seconds held, over its
    # snapshots and its suspended sessions' snapshots.
    snapshot_gib_seconds: float = 0.0

    @classmethod
    def _from_proto(cls, t: session_pb2.GetTenantUsageResponse) -> TenantUsage:
        return cls(
            tenant_id=t.tenant_id,
            total=Usage._from_proto(t.total),
            active_sessions=t.active_sessions,
            total_sessions=t.total_sessions,
            snapshots=t.snapshots,
            snapshot_bytes=t.snapshot_bytes,
            snapshot_limit=t.snapshot_limit,
            snapshot_bytes_limit=t.snapshot_bytes_limit,
            snapshot_gib_seconds=t.snapshot_gib_seconds,
        )


@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    type: FileType
    size: int
    mode: int
    modify_time: _dt.datetime | None

    @classmethod
    def _from_proto(cls, f: files_pb2.FileInfo) -> FileInfo:
        return cls(
            path=f.path,
            name=f.name,
            type=_enum(FileType, f.type),  # type: ignore[arg-type]
            size=f.size,
            mode=f.mode,
            modify_time=_time(f, "modify_time"),
        )


@dataclass(frozen=True)
class UploadResult:
    info: FileInfo
    # sha256 (hex) of the bytes the server received.
    sha256: str


# Execute events, in the order the guest produced them.


@dataclass(frozen=True)
class Stdout:
    """Raw bytes as the program wrote them (a chunk may end inside a UTF-8 sequence)."""

    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Stderr:
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class DisplayData:
    """Rich output keyed by MIME type, e.g. `image/png` from a matplotlib figure."""

    data: dict[str, bytes]


@dataclass(frozen=True)
class ResultData:
    """The value of a trailing expression keyed by MIME type (`text/plain` always there)."""

    data: dict[str, bytes]

    @property
    def text(self) -> str:
        return self.data.get("text/plain", b"").decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ExecuteError:
    """An uncaught exception (Python)."""

    name: str
    value: str
    traceback: list[str]


@dataclass(frozen=True)
class Completion:
    """The last event of every execute."""

    status: CompletionStatus
    # Shell: the code's exit status. Python: 0, or 1 after an exception.
    exit_code: int
    wall_time: float
    cpu_time: float
    interpreter_time: float
    # The kernel was restarted: variables and imports are gone.
    state_lost: bool
    output_truncated: bool
    output_bytes: int
    # Detail for TIMEOUT, INTERRUPTED and KERNEL_DIED.
    message: str


Event = Stdout | Stderr | DisplayData | ResultData | ExecuteError | Completion


def _event(msg: execution_pb2.ExecuteEvent) -> Event | None:
    kind = msg.WhichOneof("event")
    if kind == "stdout":
        return Stdout(msg.stdout.data)
    if kind == "stderr":
        return Stderr(msg.stderr.data)
    if kind == "display":
        return DisplayData(dict(msg.display.data))
    if kind == "result":
        return ResultData(dict(msg.result.data))
    if kind == "error":
        e = msg.error
        return ExecuteError(e.name, e.value, list(e.traceback))
    if kind == "completion":
        c = msg.completion
        return Completion(
            status=_enum(CompletionStatus, c.status),  # type: ignore[arg-type]
            exit_code=c.exit_code,
            wall_time=_seconds(c.wall_time),
            cpu_time=_seconds(c.cpu_time),
            interpreter_time=_seconds(c.interpreter_time),
            state_lost=c.state_lost,
            output_truncated=c.output_truncated,
            output_bytes=c.output_bytes,
            message=c.message,
        )
    # An event kind newer than this client: skipped, as proto3 readers skip unknown fields.
    return None


@dataclass
class ExecutionResult:
    """Everything one execute produced, collected from its events. Code that fails in the
    VM is a result, not an exception: see `status`, `ok`, `error`, `exit_code`."""

    results: list[ResultData] = field(default_factory=list)
    displays: list[DisplayData] = field(default_factory=list)
    error: ExecuteError | None = None
    completion: Completion | None = None
    _stdout: bytearray = field(default_factory=bytearray, repr=False)
    _stderr: bytearray = field(default_factory=bytearray, repr=False)

    def __repr__(self) -> str:
        return (
            f"ExecutionResult(status={self.status.value!r}, exit_code={self.exit_code}, "
            f"stdout={self.stdout!r}, stderr={self.stderr!r}, error={self.error!r}, "
            f"results={len(self.results)}, displays={len(self.displays)})"
        )

    @property
    def stdout_bytes(self) -> bytes:
        return bytes(self._stdout)

    @property
    def stderr_bytes(self) -> bytes:
        return bytes(self._stderr)

    @property
    def stdout(self) -> str:
        return self._stdout.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", errors="replace")

    @property
    def status(self) -> CompletionStatus:
        return self.completion.status if self.completion else CompletionStatus.UNSPECIFIED

    @property
    def ok(self) -> bool:
        return self.status is CompletionStatus.OK

    @property
    def exit_code(self) -> int:
        return self.completion.exit_code if self.completion else -1

    @property
    def wall_time(self) -> float:
        return self.completion.wall_time if self.completion else 0.0

    @property
    def cpu_time(self) -> float:
        return self.completion.cpu_time if self.completion else 0.0

    @property
    def text(self) -> str | None:
        """`text/plain` of the last trailing-expression value, like a notebook's `Out`."""
        return self.results[-1].text if self.results else None

    def _add(self, ev: Event) -> None:
        if isinstance(ev, Stdout):
            self._stdout += ev.data
        elif isinstance(ev, Stderr):
            self._stderr += ev.data
        elif isinstance(ev, ResultData):
            self.results.append(ev)
        elif isinstance(ev, DisplayData):
            self.displays.append(ev)
        elif isinstance(ev, ExecuteError):
            self.error = ev
        else:
            self.completion = ev


# --- processes -------------------------------------------------------------------------


class ProcessState(str, Enum):
    UNSPECIFIED = "unspecified"
    RUNNING = "running"
    EXITED = "exited"


class ProcessKind(str, Enum):
    UNSPECIFIED = "unspecified"
    BACKGROUND = "background"
    TERMINAL = "terminal"


@dataclass(frozen=True)
class Process:
    """A background process (or a terminal) of the session."""

    id: str
    kind: ProcessKind
    pid: int
    command: str
    args: list[str]
    state: ProcessState
    # Set once EXITED: the exit code, or -1 when a signal ended it (then `signal` is set).
    exit_code: int
    signal: int
    start_time: _dt.datetime | None
    end_time: _dt.datetime | None
    # Bytes of stdout and stderr written so far: the offset of the next output byte.
    output_offset: int
    stdin_open: bool

    @property
    def running(self) -> bool:
        return self.state is ProcessState.RUNNING

    @classmethod
    def _from_proto(cls, p: process_pb2.ProcessInfo) -> Process:
        return cls(
            id=p.process_id,
            kind=_enum(ProcessKind, p.kind),  # type: ignore[arg-type]
            pid=p.pid,
            command=p.command,
            args=list(p.args),
            state=_enum(ProcessState, p.state),  # type: ignore[arg-type]
            exit_code=p.exit_code,
            signal=p.signal,
            start_time=_time(p, "start_time"),
            end_time=_time(p, "end_time"),
            output_offset=p.output_offset,
            stdin_open=p.stdin_open,
        )


@dataclass(frozen=True)
class ProcessOutput:
    """Output of a background process: `stream` is "stdout" or "stderr"; `offset` is where
    `data` starts among all the bytes the process wrote to either."""

    stream: str
    offset: int
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class OutputDropped:
    """The process's output ring no longer held [from_offset, to_offset)."""

    from_offset: int
    to_offset: int


@dataclass(frozen=True)
class ProcessExit:
    """The last event of a process's output: its exit code (-1 when a signal ended it)."""

    exit_code: int
    signal: int


ProcessEvent = ProcessOutput | OutputDropped | ProcessExit


def _process_event(msg: process_pb2.ProcessEvent) -> ProcessEvent | None:
    kind = msg.WhichOneof("event")
    if kind == "output":
        stream = "stderr" if msg.output.stream == process_pb2.OUTPUT_STREAM_STDERR else "stdout"
        return ProcessOutput(stream=stream, offset=msg.output.offset, data=bytes(msg.output.data))
    if kind == "dropped":
        return OutputDropped(from_offset=msg.dropped.from_offset, to_offset=msg.dropped.to_offset)
    if kind == "exit":
        return ProcessExit(exit_code=msg.exit.exit_code, signal=msg.exit.signal)
    return None
