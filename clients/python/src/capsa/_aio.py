"""`AsyncCapsa`: one session, with asyncio (grpc.aio). The same API as `Capsa`, awaited."""

from __future__ import annotations

import asyncio
import io
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
import grpc.aio

from . import _common as c
from ._client import Source, T
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


class AsyncCapsa:
    """A client of the Capsa API bound to one session, for asyncio.

    ```python
    async with AsyncCapsa() as vm:
        await vm.execute("x = 42")
        async for ev in vm.stream("print(x)"):
            ...
    ```

    Arguments, configuration and session ownership as for `Capsa`; `await close()` (or
    leaving the `async with` block) ends a session this object created.
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
            grpc.aio.secure_channel(
                target.address, grpc.ssl_channel_credentials(), options=c.CHANNEL_OPTIONS
            )
            if target.secure
            else grpc.aio.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        )
        self._stub = session_pb2_grpc.SessionServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._request_timeout = request_timeout
        self._create_timeout = create_timeout
        self._retry = retry or c.RetryPolicy()
        self._session_id: str | None = None
        self._owned = False
        self._closed = False

    def _sibling(self, session_id: str) -> AsyncCapsa:
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
        cls,
        session_id: str,
        api_key: str | None = None,
        endpoint: str | None = None,
        **kwargs: Any,
    ) -> AsyncCapsa:
        """A client of an existing session. Closing it leaves the session running."""
        vm = cls(api_key, endpoint, **kwargs)
        vm._session_id = session_id
        return vm

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncCapsa:
        if self._session_id is None:
            try:
                await self.start()
            except BaseException:
                await self.close()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except CapsaError as e:
            warnings.warn(f"capsa: could not end session {self._session_id}: {e}", stacklevel=2)

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"capsa: session {self._session_id} was never closed; it runs until its "
                "lifetime ends (use `async with AsyncCapsa() as vm:` or await close())",
                ResourceWarning,
                stacklevel=2,
            )

    async def start(self) -> Session:
        """Creates the session (claims a warm VM) and returns once it is ACTIVE."""
        if self._session_id is not None:
            raise CapsaError(f"this client already has session {self._session_id}")
        resp = await self._unary("CreateSession", self._create, timeout=self._create_timeout)
        self._session_id = resp.session.id
        self._owned = True
        return Session._from_proto(resp.session)

    @property
    def session_id(self) -> str | None:
        """The session's id; None before `start()` (or the first call) created it."""
        return self._session_id

    async def _sid(self) -> str:
        if self._session_id is None:
            await self.start()
        assert self._session_id is not None
        return self._session_id

    async def close(self) -> None:
        """Ends the session if this object created it, then closes the connection."""
        if self._closed:
            return
        try:
            if self._owned:
                await self.kill()
        finally:
            self._closed = True
            await self._channel.close()

    async def kill(self) -> Session:
        """Ends the session and destroys its VM (ending an ended session is a no-op)."""
        if self._session_id is None:
            raise CapsaError("this client has no session to end")
        req = session_pb2.DeleteSessionRequest(session_id=self._session_id)
        resp = await self._unary("DeleteSession", req)
        self._owned = False
        return Session._from_proto(resp.session)

    async def info(self) -> Session:
        req = session_pb2.GetSessionRequest(session_id=await self._sid())
        return Session._from_proto((await self._unary("GetSession", req)).session)

    async def is_active(self) -> bool:
        """True while the session is ACTIVE; False once it ended or is gone."""
        try:
            return (await self.info()).status is SessionStatus.ACTIVE
        except NotFound:
            return False

    async def suspend(self) -> Session:
        """Saves the session's VM (memory, processes, files) to its node's disk and stops
        it: SUSPENDED, billing no cpu or memory, until `resume()`."""
        req = session_pb2.SuspendSessionRequest(session_id=await self._sid())
        return Session._from_proto((await self._unary("SuspendSession", req)).session)

    async def resume(self) -> Session:
        """Brings a SUSPENDED session back with everything it had; ACTIVE again."""
        req = session_pb2.ResumeSessionRequest(session_id=await self._sid())
        return Session._from_proto((await self._unary("ResumeSession", req)).session)

    async def extend(self, seconds: float) -> Session:
        """Pushes the session's deadline `seconds` further out (total at most 24 h)."""
        req = session_pb2.ExtendSessionRequest(session_id=await self._sid())
        req.extend_by.CopyFrom(c.seconds_arg("seconds", seconds))
        return Session._from_proto((await self._unary("ExtendSession", req)).session)

    async def usage(self) -> Usage:
        req = session_pb2.GetUsageRequest(session_id=await self._sid())
        return Usage._from_proto((await self._unary("GetUsage", req)).usage)

    # --- snapshots and forks ---------------------------------------------------------

    async def snapshot(self, name: str, *, metadata: Mapping[str, str] | None = None) -> Snapshot:
        """Saves the ACTIVE session's state as a snapshot of the tenant's named `name`; the
        session runs on (see `Capsa.snapshot`). Bounded by `create_timeout`."""
        req = c.snapshot_request(await self._sid(), name, metadata)
        resp = await self._unary("SnapshotSession", req, timeout=self._create_timeout)
        return Snapshot._from_proto(resp.snapshot)

    async def fork(
        self,
        count: int = 1,
        *,
        lifetime: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[AsyncCapsa]:
        """Starts `count` (1 to 8) new sessions from the ACTIVE session's state at this
        moment (see `Capsa.fork`). Returns a client for each that owns its session: `await
        close()` (or leaving its `async with` block) ends it. Bounded by `create_timeout`."""
        req = c.fork_request(await self._sid(), count, lifetime, metadata)
        resp = await self._unary("ForkSession", req, timeout=self._create_timeout)
        return [self._sibling(s.id) for s in resp.sessions]

    # --- execute ---------------------------------------------------------------------

    async def stream(
        self,
        code: str,
        *,
        language: str = "python",
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output_bytes: int | None = None,
        request_timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Runs `code` and yields its events as the VM produces them, ending with a
        `Completion`. Leaving the loop early cancels the call, which interrupts the code."""
        req = c.execute_request(
            await self._sid(),
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
            async for msg in call:
                ev = _event(msg.event)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    async def execute(
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
        """Runs `code` in the session's persistent interpreter and returns everything it
        produced. Code that fails is a result with `ok` False."""
        result = ExecutionResult()
        async for ev in self.stream(
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

    async def start_process(
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
        """Starts `command` in the background and returns at once (see
        `Capsa.start_process`)."""
        req = c.start_process_request(
            await self._sid(),
            command,
            args,
            env=env,
            cwd=cwd,
            stdin=stdin,
            keep_stdin_open=keep_stdin_open,
            output_buffer_bytes=output_buffer_bytes,
        )
        return Process._from_proto((await self._unary("StartProcess", req)).process)

    async def list_processes(self) -> list[Process]:
        req = session_pb2.ListProcessesRequest(session_id=await self._sid())
        return [Process._from_proto(p) for p in (await self._unary("ListProcesses", req)).processes]

    async def wait_process(self, process_id: str, *, timeout: float | None = None) -> Process:
        """Waits for the process to exit (at most `timeout` seconds, default 60)."""
        req = c.wait_request(await self._sid(), process_id, timeout)
        deadline = (timeout or c.DEFAULT_WAIT_TIMEOUT) + self._request_timeout
        resp = await self._unary("WaitProcess", req, timeout=deadline)
        return Process._from_proto(resp.process)

    async def signal_process(self, process_id: str, signal: str = "TERM") -> Process:
        req = c.signal_request(await self._sid(), process_id, signal)
        return Process._from_proto((await self._unary("SignalProcess", req)).process)

    async def write_stdin(self, process_id: str, data: bytes = b"", *, close: bool = False) -> None:
        req = session_pb2.WriteStdinRequest(
            session_id=await self._sid(), process_id=process_id, data=data, close=close
        )
        await self._unary("WriteStdin", req)

    async def process_output(
        self, process_id: str, *, from_offset: int = 0, follow: bool = True
    ) -> AsyncIterator[ProcessEvent]:
        """The process's output from `from_offset` (see `Capsa.process_output`)."""
        req = session_pb2.AttachProcessRequest(
            session_id=await self._sid(),
            process_id=process_id,
            from_offset=from_offset,
            follow=follow,
        )
        call = self._stub.AttachProcess(req, metadata=self._metadata)
        try:
            async for msg in call:
                ev = _process_event(msg.event)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    # --- files -----------------------------------------------------------------------

    async def upload(
        self, local: Source, remote: str, *, mode: int | None = None, overwrite: bool = True
    ) -> UploadResult:
        """Writes a local file (a path or a binary file object) to `remote` in the VM, in
        chunks of at most 1 MiB. Local reads run in a worker thread."""
        if isinstance(local, (str, os.PathLike)):
            f = await asyncio.to_thread(open, local, "rb")
            try:
                return await self._upload(f, remote, mode, overwrite)
            finally:
                f.close()
        return await self._upload(local, remote, mode, overwrite)

    async def write_file(
        self, remote: str, data: bytes, *, mode: int | None = None, overwrite: bool = True
    ) -> UploadResult:
        return await self._upload(io.BytesIO(data), remote, mode, overwrite)

    async def _upload(
        self, f: IO[bytes], remote: str, mode: int | None, overwrite: bool
    ) -> UploadResult:
        header = c.upload_header(
            await self._sid(), remote, mode=mode, overwrite=overwrite, size=c.local_size(f)
        )

        async def parts() -> AsyncIterator[session_pb2.UploadFileRequest]:
            yield header
            while chunk := await asyncio.to_thread(f.read, c.MAX_CHUNK_BYTES):
                yield c.data_part(chunk)

        resp = await self._unary("UploadFile", parts(), no_deadline=True)
        return UploadResult(info=FileInfo._from_proto(resp.result.info), sha256=resp.result.sha256)

    async def download(self, remote: str, local: c.PathLike) -> FileInfo:
        """Reads `remote` from the VM into the local path `local` (removed again if the
        download fails). Local writes run in a worker thread."""
        path = Path(local)
        f = await asyncio.to_thread(open, path, "wb")
        try:
            with f:
                return await self._download(remote, f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    async def read_file(self, remote: str) -> bytes:
        buf = io.BytesIO()
        await self._download(remote, buf)
        return buf.getvalue()

    async def _download(self, remote: str, sink: IO[bytes]) -> FileInfo:
        req = session_pb2.DownloadFileRequest(session_id=await self._sid(), path=remote)

        async def once() -> FileInfo:
            sink.seek(0)
            sink.truncate()
            check = c.DownloadCheck()
            async for msg in self._stub.DownloadFile(req, metadata=self._metadata):
                data = check.data(msg)
                if data is not None:
                    await asyncio.to_thread(sink.write, data)
            return FileInfo._from_proto(check.done())

        return await self._with_retry("DownloadFile", once)

    async def list_files(self, path: str) -> list[FileInfo]:
        req = session_pb2.ListFilesRequest(session_id=await self._sid(), path=path)
        return [FileInfo._from_proto(f) for f in (await self._unary("ListFiles", req)).files]

    async def stat(self, path: str) -> FileInfo:
        req = session_pb2.GetFileInfoRequest(session_id=await self._sid(), path=path)
        return FileInfo._from_proto((await self._unary("GetFileInfo", req)).info)

    async def mkdir(self, path: str, *, mode: int | None = None) -> FileInfo:
        """Creates a directory and its parents."""
        req = session_pb2.MakeDirectoryRequest(
            session_id=await self._sid(), path=path, mode=mode or 0
        )
        return FileInfo._from_proto((await self._unary("MakeDirectory", req)).info)

    async def rm(self, path: str, *, recursive: bool = False) -> None:
        req = session_pb2.RemoveFileRequest(
            session_id=await self._sid(), path=path, recursive=recursive
        )
        await self._unary("RemoveFile", req)

    # --- egress ----------------------------------------------------------------------

    async def get_egress(self) -> EgressPolicy:
        req = session_pb2.GetEgressPolicyRequest(session_id=await self._sid())
        return EgressPolicy._from_proto((await self._unary("GetEgressPolicy", req)).egress)

    async def update_egress(self, policy: EgressPolicy) -> EgressPolicy:
        """Replaces the session's egress policy (in force within 1 s)."""
        req = session_pb2.UpdateEgressPolicyRequest(
            session_id=await self._sid(), egress=policy._to_proto()
        )
        return EgressPolicy._from_proto((await self._unary("UpdateEgressPolicy", req)).egress)

    # --- tenant-wide -----------------------------------------------------------------

    async def list_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Session]:
        """The tenant's sessions, newest first, fetched page by page."""
        token = ""
        while True:
            req = c.list_sessions_request(status, metadata, page_size, token)
            resp = await self._unary("ListSessions", req)
            for s in resp.sessions:
                yield Session._from_proto(s)
            token = resp.next_page_token
            if not token:
                return

    async def tenant_usage(self) -> TenantUsage:
        """Resource use summed over the tenant, its session counts, and its snapshots with
        their quota."""
        resp = await self._unary("GetTenantUsage", session_pb2.GetTenantUsageRequest())
        return TenantUsage._from_proto(resp)

    async def get_snapshot(self, snapshot_id: str) -> Snapshot:
        req = session_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)
        return Snapshot._from_proto((await self._unary("GetSnapshot", req)).snapshot)

    async def list_snapshots(self, *, page_size: int = 100) -> AsyncIterator[Snapshot]:
        """The tenant's snapshots, newest first, fetched page by page."""
        token = ""
        while True:
            req = c.list_snapshots_request(page_size, token)
            resp = await self._unary("ListSnapshots", req)
            for s in resp.snapshots:
                yield Snapshot._from_proto(s)
            token = resp.next_page_token
            if not token:
                return

    async def delete_snapshot(self, snapshot_id: str) -> Snapshot:
        """Removes the snapshot and its files, and returns it as it was. Sessions created
        from it are not affected."""
        req = session_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        return Snapshot._from_proto((await self._unary("DeleteSnapshot", req)).snapshot)

    # --- plumbing --------------------------------------------------------------------

    async def _unary(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        no_deadline: bool = False,
    ) -> Any:
        deadline = None if no_deadline else timeout or self._request_timeout
        call = getattr(self._stub, method)
        return await self._with_retry(
            method, lambda: call(request, metadata=self._metadata, timeout=deadline)
        )

    async def _with_retry(self, method: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delays = self._retry.delays(method)
        while True:
            try:
                return await attempt()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    delay = next(delays, None)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise from_rpc_error(e) from e
