"""`Capsa`: one session, synchronously."""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import grpc

from . import _common as c
from ._config import Target, resolve
from .errors import CapsaError, NotFound, from_rpc_error
from .proto.session.v1 import session_pb2, session_pb2_grpc
from .types import (
    EgressPolicy,
    Event,
    ExecutionResult,
    FileInfo,
    Process,
    ProcessEvent,
    Session,
    SessionStatus,
    Snapshot,
    TenantUsage,
    UploadResult,
    Usage,
    _event,
    _process_event,
)

T = TypeVar("T")

# A local file: a path, or a binary file object to read from.
Source = c.PathLike | IO[bytes]


class Capsa:
    """A client of the Capsa API bound to one session.

    ```python
    with Capsa() as vm:             # creates a session; leaving the block ends it
        vm.execute("x = 42")
        print(vm.execute("print(x)").stdout)
    ```

    `api_key` / `endpoint` default to `CAPSA_API_KEY` / `CAPSA_ENDPOINT`, else to
    `.capsa/dev.env` in the current directory. The session is created by `start()`, by
    entering the `with` block, or by the first call that needs it; `close()` (or leaving the
    block) ends a session this object created. `Capsa.attach(session_id)` works on an
    existing session and leaves it running on close (end it with `kill()`).

    `lifetime` (seconds), `vcpus`, `memory_mib`, `env`, `metadata`, `egress` and `template`
    are the new session's settings; `snapshot_id` starts it from a snapshot of the tenant's
    (`snapshot()`) instead of a fresh VM, with that snapshot's template, vcpus and memory.
    `request_timeout` bounds each unary call (seconds; an execute gets its own `timeout` plus
    this), `create_timeout` bounds session creation, `snapshot()` and `fork()` (a cold VM
    boot can take a while), `retry` tunes the backoff on UNAVAILABLE.
    """

    def __init__(
        self,
        api_key: str | None = None,
        endpoint: str | None = None,
        *,
        lifetime: float | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        egress: EgressPolicy | None = None,
        template: str | None = None,
        auto_suspend: bool = False,
        auto_resume: bool = False,
        snapshot_id: str | None = None,
        request_timeout: float = 60.0,
        create_timeout: float = 300.0,
        retry: c.RetryPolicy | None = None,
    ) -> None:
        # Built first so that bad settings fail before anything is connected.
        self._create = c.create_request(
            template=template,
            lifetime=lifetime,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            metadata=metadata,
            egress=egress,
            auto_suspend=auto_suspend,
            auto_resume=auto_resume,
            snapshot_id=snapshot_id,
        )
        self._connect(resolve(endpoint, api_key), request_timeout, create_timeout, retry)

    def _connect(
        self,
        target: Target,
        request_timeout: float,
        create_timeout: float,
        retry: c.RetryPolicy | None,
    ) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {target.api_key}"),)
        self._channel = (
            grpc.secure_channel(
                target.address, grpc.ssl_channel_credentials(), options=c.CHANNEL_OPTIONS
            )
            if target.secure
            else grpc.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        )
        self._stub = session_pb2_grpc.SessionServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._request_timeout = request_timeout
        self._create_timeout = create_timeout
        self._retry = retry or c.RetryPolicy()
        self._session_id: str | None = None
        # Whether this object created the session, and so ends it on close.
        self._owned = False
        self._closed = False

    def _sibling(self, session_id: str) -> Capsa:
        """A client that owns `session_id` (one this client's call created), with this
        client's endpoint, key and options on a channel of its own: closing either leaves the
        other working."""
        vm = type(self).__new__(type(self))
        vm._create = self._create
        vm._connect(self._target, self._request_timeout, self._create_timeout, self._retry)
        vm._session_id = session_id
        vm._owned = True
        return vm

    @classmethod
    def attach(
        cls, session_id: str, api_key: str | None = None, endpoint: str | None = None, **kwargs: Any
    ) -> Capsa:
        """A client of an existing session. Closing it leaves the session running."""
        vm = cls(api_key, endpoint, **kwargs)
        vm._session_id = session_id
        return vm

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Capsa:
        if self._session_id is None:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CapsaError as e:
            # Do not hide the exception that left the block.
            warnings.warn(f"capsa: could not end session {self._session_id}: {e}", stacklevel=2)

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"capsa: session {self._session_id} was never closed; it runs until its "
                "lifetime ends (use `with Capsa() as vm:` or call close())",
                ResourceWarning,
                stacklevel=2,
            )

    def start(self) -> Session:
        """Creates the session (claims a warm VM) and returns once it is ACTIVE."""
        if self._session_id is not None:
            raise CapsaError(f"this client already has session {self._session_id}")
        resp = self._unary("CreateSession", self._create, timeout=self._create_timeout)
        self._session_id = resp.session.id
        self._owned = True
        return Session._from_proto(resp.session)

    @property
    def session_id(self) -> str | None:
        """The session's id; None before `start()` (or the first call) created it."""
        return self._session_id

    def _sid(self) -> str:
        if self._session_id is None:
            self.start()
        assert self._session_id is not None
        return self._session_id

    def close(self) -> None:
        """Ends the session if this object created it, then closes the connection."""
        if self._closed:
            return
        try:
            if self._owned:
                self.kill()
        finally:
            self._closed = True
            self._channel.close()

    def kill(self) -> Session:
        """Ends the session and destroys its VM (ending an ended session is a no-op)."""
        if self._session_id is None:
            raise CapsaError("this client has no session to end")
        req = session_pb2.DeleteSessionRequest(session_id=self._session_id)
        resp = self._unary("DeleteSession", req)
        self._owned = False
        return Session._from_proto(resp.session)

    def info(self) -> Session:
        resp = self._unary("GetSession", session_pb2.GetSessionRequest(session_id=self._sid()))
        return Session._from_proto(resp.session)

    def is_active(self) -> bool:
        """True while the session is ACTIVE; False once it ended or is gone."""
        try:
            return self.info().status is SessionStatus.ACTIVE
        except NotFound:
            return False

    def suspend(self) -> Session:
        """Saves the session's VM (memory, processes, files) to its node's disk and stops
        it: SUSPENDED, billing no cpu or memory, until `resume()`."""
        req = session_pb2.SuspendSessionRequest(session_id=self._sid())
        return Session._from_proto(self._unary("SuspendSession", req).session)

    def resume(self) -> Session:
        """Brings a SUSPENDED session back with everything it had; ACTIVE again."""
        req = session_pb2.ResumeSessionRequest(session_id=self._sid())
        return Session._from_proto(self._unary("ResumeSession", req).session)

    def extend(self, seconds: float) -> Session:
        """Pushes the session's deadline `seconds` further out (total at most 24 h)."""
        req = session_pb2.ExtendSessionRequest(session_id=self._sid())
        req.extend_by.CopyFrom(c.seconds_arg("seconds", seconds))
        return Session._from_proto(self._unary("ExtendSession", req).session)

    def usage(self) -> Usage:
        resp = self._unary("GetUsage", session_pb2.GetUsageRequest(session_id=self._sid()))
        return Usage._from_proto(resp.usage)

    # --- snapshots and forks ---------------------------------------------------------

    def snapshot(self, name: str, *, metadata: Mapping[str, str] | None = None) -> Snapshot:
        """Saves the ACTIVE session's state (memory, processes, files, installed packages) as
        a snapshot of the tenant's named `name`; the session runs on (paused while its state
        is written). `Capsa(snapshot_id=snapshot.id)` starts new sessions from it; it stays
        until `delete_snapshot()`. Bounded by `create_timeout`."""
        req = c.snapshot_request(self._sid(), name, metadata)
        resp = self._unary("SnapshotSession", req, timeout=self._create_timeout)
        return Snapshot._from_proto(resp.snapshot)

    def fork(
        self,
        count: int = 1,
        *,
        lifetime: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[Capsa]:
        """Starts `count` (1 to 8) new sessions from the ACTIVE session's state at this
        moment, each on its own VM and independent afterwards; all are created or none is.
        `lifetime` and `metadata` default to this session's. Returns a client for each, with
        this client's endpoint, key and options, that owns its session: closing it (or
        leaving its `with` block) ends the session. Bounded by `create_timeout`."""
        req = c.fork_request(self._sid(), count, lifetime, metadata)
        resp = self._unary("ForkSession", req, timeout=self._create_timeout)
        return [self._sibling(s.id) for s in resp.sessions]

    # --- execute ---------------------------------------------------------------------

    def stream(
        self,
        code: str,
        *,
        language: str = "python",
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output_bytes: int | None = None,
        request_timeout: float | None = None,
    ) -> Iterator[Event]:
        """Runs `code` and yields its events as the VM produces them, ending with a
        `Completion`. Leaving the loop early cancels the call, which interrupts the code.
        `timeout` (seconds, default 60) is enforced in the VM; `request_timeout` overrides the
        call's deadline."""
        req = c.execute_request(
            self._sid(),
            code,
            language=language,
            timeout=timeout,
            env=env,
            cwd=cwd,
            max_output_bytes=max_output_bytes,
        )
        deadline = c.execute_deadline(timeout, request_timeout, self._request_timeout)
        call = self._stub.Execute(req, metadata=self._metadata, timeout=deadline)
        try:
            for msg in call:
                ev = _event(msg.event)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    def execute(
        self,
        code: str,
        *,
        language: str = "python",
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output_bytes: int | None = None,
        request_timeout: float | None = None,
    ) -> ExecutionResult:
        """Runs `code` in the session's persistent interpreter (`language="shell"` for bash)
        and returns everything it produced. Code that fails is a result with `ok` False."""
        result = ExecutionResult()
        for ev in self.stream(
            code,
            language=language,
            timeout=timeout,
            env=env,
            cwd=cwd,
            max_output_bytes=max_output_bytes,
            request_timeout=request_timeout,
        ):
            result._add(ev)
        return c.finish(result)

    # --- background processes --------------------------------------------------------

    def start_process(
        self,
        command: str,
        args: list[str] | tuple[str, ...] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        keep_stdin_open: bool = False,
        output_buffer_bytes: int | None = None,
    ) -> Process:
        """Starts `command` in the background and returns at once. It keeps running between
        calls and after this client goes away; the session's end kills it. Its stdout and
        stderr are kept in a ring of `output_buffer_bytes` (default 1 MiB) for
        `process_output`. `stdin` is written first; it is then closed unless
        `keep_stdin_open` (then use `write_stdin`)."""
        req = c.start_process_request(
            self._sid(),
            command,
            args,
            env=env,
            cwd=cwd,
            stdin=stdin,
            keep_stdin_open=keep_stdin_open,
            output_buffer_bytes=output_buffer_bytes,
        )
        return Process._from_proto(self._unary("StartProcess", req).process)

    def list_processes(self) -> list[Process]:
        """The session's processes and terminals, running and recently exited."""
        resp = self._unary("ListProcesses", session_pb2.ListProcessesRequest(session_id=self._sid()))
        return [Process._from_proto(p) for p in resp.processes]

    def wait_process(self, process_id: str, *, timeout: float | None = None) -> Process:
        """Waits for the process to exit (at most `timeout` seconds, default 60, at most
        300; then `DeadlineExceeded`) and returns it, with its exit code."""
        req = c.wait_request(self._sid(), process_id, timeout)
        deadline = (timeout or c.DEFAULT_WAIT_TIMEOUT) + self._request_timeout
        return Process._from_proto(self._unary("WaitProcess", req, timeout=deadline).process)

    def signal_process(self, process_id: str, signal: str = "TERM") -> Process:
        """Sends TERM, KILL, INT or HUP to the process's group."""
        req = c.signal_request(self._sid(), process_id, signal)
        return Process._from_proto(self._unary("SignalProcess", req).process)

    def write_stdin(self, process_id: str, data: bytes = b"", *, close: bool = False) -> None:
        """Writes `data` (at most 1 MiB) to the process's stdin; `close` sends EOF after it."""
        req = session_pb2.WriteStdinRequest(
            session_id=self._sid(), process_id=process_id, data=data, close=close
        )
        self._unary("WriteStdin", req)

    def process_output(
        self, process_id: str, *, from_offset: int = 0, follow: bool = True
    ) -> Iterator[ProcessEvent]:
        """The process's output from `from_offset`: what its ring still holds (an
        `OutputDropped` first if older output is gone), then, with `follow`, new output until
        it exits (a `ProcessExit` last). To catch up after a disconnect, pass the offset
        after the last byte received."""
        req = session_pb2.AttachProcessRequest(
            session_id=self._sid(), process_id=process_id, from_offset=from_offset, follow=follow
        )
        call = self._stub.AttachProcess(req, metadata=self._metadata)
        try:
            for msg in call:
                ev = _process_event(msg.event)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    # --- files -----------------------------------------------------------------------

    def upload(
        self, local: Source, remote: str, *, mode: int | None = None, overwrite: bool = True
    ) -> UploadResult:
        """Writes a local file (a path or a binary file object) to `remote` in the VM, in
        chunks of at most 1 MiB. Parent directories are created."""
        if isinstance(local, (str, os.PathLike)):
            with open(local, "rb") as f:
                return self._upload(f, remote, mode, overwrite)
        return self._upload(local, remote, mode, overwrite)

    def write_file(
        self, remote: str, data: bytes, *, mode: int | None = None, overwrite: bool = True
    ) -> UploadResult:
        return self._upload(io.BytesIO(data), remote, mode, overwrite)

    def _upload(self, f: IO[bytes], remote: str, mode: int | None, overwrite: bool) -> UploadResult:
        header = c.upload_header(
            self._sid(), remote, mode=mode, overwrite=overwrite, size=c.local_size(f)
        )

        def parts() -> Iterator[session_pb2.UploadFileRequest]:
            yield header
            while chunk := f.read(c.MAX_CHUNK_BYTES):
                yield c.data_part(chunk)

        # Not retried: the stream is consumed as it is sent. No deadline: a large file takes
        # as long as it takes; keepalives notice a dead connection.
        resp = self._unary("UploadFile", parts(), no_deadline=True)
        return UploadResult(info=FileInfo._from_proto(resp.result.info), sha256=resp.result.sha256)

    def download(self, remote: str, local: c.PathLike) -> FileInfo:
        """Reads `remote` from the VM into the local path `local` (removed again if the
        download fails)."""
        path = Path(local)
        try:
            with open(path, "wb") as f:
                return self._download(remote, f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def read_file(self, remote: str) -> bytes:
        buf = io.BytesIO()
        self._download(remote, buf)
        return buf.getvalue()

    def _download(self, remote: str, sink: IO[bytes]) -> FileInfo:
        req = session_pb2.DownloadFileRequest(session_id=self._sid(), path=remote)

        def once() -> FileInfo:
            # A repeat starts over.
            sink.seek(0)
            sink.truncate()
            check = c.DownloadCheck()
            for msg in self._stub.DownloadFile(req, metadata=self._metadata):
                data = check.data(msg)
                if data is not None:
                    sink.write(data)
            return FileInfo._from_proto(check.done())

        return self._with_retry("DownloadFile", once)

    def list_files(self, path: str) -> list[FileInfo]:
        resp = self._unary(
            "ListFiles", session_pb2.ListFilesRequest(session_id=self._sid(), path=path)
        )
        return [FileInfo._from_proto(f) for f in resp.files]

    def stat(self, path: str) -> FileInfo:
        resp = self._unary(
            "GetFileInfo", session_pb2.GetFileInfoRequest(session_id=self._sid(), path=path)
        )
        return FileInfo._from_proto(resp.info)

    def mkdir(self, path: str, *, mode: int | None = None) -> FileInfo:
        """Creates a directory and its parents."""
        req = session_pb2.MakeDirectoryRequest(session_id=self._sid(), path=path, mode=mode or 0)
        return FileInfo._from_proto(self._unary("MakeDirectory", req).info)

    def rm(self, path: str, *, recursive: bool = False) -> None:
        req = session_pb2.RemoveFileRequest(session_id=self._sid(), path=path, recursive=recursive)
        self._unary("RemoveFile", req)

    # --- egress ----------------------------------------------------------------------

    def get_egress(self) -> EgressPolicy:
        resp = self._unary(
            "GetEgressPolicy", session_pb2.GetEgressPolicyRequest(session_id=self._sid())
        )
        return EgressPolicy._from_proto(resp.egress)

    def update_egress(self, policy: EgressPolicy) -> EgressPolicy:
        """Replaces the session's egress policy (in force within 1 s)."""
        req = session_pb2.UpdateEgressPolicyRequest(
            session_id=self._sid(), egress=policy._to_proto()
        )
        return EgressPolicy._from_proto(self._unary("UpdateEgressPolicy", req).egress)

    # --- tenant-wide -----------------------------------------------------------------

    def list_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
    ) -> Iterator[Session]:
        """The tenant's sessions, newest first, fetched page by page."""
        token = ""
        while True:
            req = c.list_sessions_request(status, metadata, page_size, token)
            resp = self._unary("ListSessions", req)
            for s in resp.sessions:
                yield Session._from_proto(s)
            token = resp.next_page_token
            if not token:
                return

    def tenant_usage(self) -> TenantUsage:
        """Resource use summed over the tenant, its session counts, and its snapshots with
        their quota."""
        resp = self._unary("GetTenantUsage", session_pb2.GetTenantUsageRequest())
        return TenantUsage._from_proto(resp)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        req = session_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)
        return Snapshot._from_proto(self._unary("GetSnapshot", req).snapshot)

    def list_snapshots(self, *, page_size: int = 100) -> Iterator[Snapshot]:
        """The tenant's snapshots, newest first, fetched page by page."""
        token = ""
        while True:
            resp = self._unary("ListSnapshots", c.list_snapshots_request(page_size, token))
            for s in resp.snapshots:
                yield Snapshot._from_proto(s)
            token = resp.next_page_token
            if not token:
                return

    def delete_snapshot(self, snapshot_id: str) -> Snapshot:
        """Removes the snapshot and its files, and returns it as it was. Sessions created
        from it are not affected."""
        req = session_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        return Snapshot._from_proto(self._unary("DeleteSnapshot", req).snapshot)

    # --- plumbing --------------------------------------------------------------------

    def _unary(
        self, method: str, request: Any, *, timeout: float | None = None, no_deadline: bool = False
    ) -> Any:
        """One unary (or client-streaming) call with the retry policy; `timeout` overrides
        request_timeout."""
        deadline = None if no_deadline else timeout or self._request_timeout
        call = getattr(self._stub, method)
        return self._with_retry(
            method, lambda: call(request, metadata=self._metadata, timeout=deadline)
        )

    def _with_retry(self, method: str, attempt: Callable[[], T]) -> T:
        delays = self._retry.delays(method)
        while True:
            try:
                return attempt()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    delay = next(delays, None)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise from_rpc_error(e) from e
