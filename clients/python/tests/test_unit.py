"""What needs no server: configuration, error mapping, the retry policy, result assembly."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest

import capsa
from capsa import _common, _config, errors
from capsa._client import Capsa
from capsa._common import create_request
from capsa.proto.common.v1 import execution_pb2
from capsa.proto.session.v1 import session_pb2
from capsa.types import ExecutionResult, SessionStatus, _enum, _event


def test_dev_env_lines_are_read_like_the_cli_reads_them():
    env = _config.parse_dev_env(
        "# written by up.sh\n\nCAPSA_ENDPOINT=http://127.0.0.1:50051\n"
        "export CAPSA_API_KEY=\"ck_123\"\nOTHER='x=y'\nnot a pair\n"
    )
    assert env == {
        "CAPSA_ENDPOINT": "http://127.0.0.1:50051",
        "CAPSA_API_KEY": "ck_123",
        "OTHER": "x=y",
    }


def test_arguments_then_environment_then_the_cwd_dev_env(tmp_path: Path):
    (tmp_path / ".capsa").mkdir()
    (tmp_path / ".capsa" / "dev.env").write_text(
        "CAPSA_ENDPOINT=http://file:1\nCAPSA_API_KEY=file-key\n"
    )
    t = _config.resolve(None, None, environ={}, cwd=tmp_path)
    assert (t.address, t.secure, t.api_key) == ("file:1", False, "file-key")
    t = _config.resolve(None, None, environ={"CAPSA_API_KEY": "env-key"}, cwd=tmp_path)
    assert (t.address, t.api_key) == ("file:1", "env-key")
    t = _config.resolve(
        "https://arg:443", "arg-key", environ={"CAPSA_API_KEY": "env-key"}, cwd=tmp_path
    )
    assert (t.address, t.secure, t.api_key) == ("arg:443", True, "arg-key")
    # The key never shows in a repr.
    assert "arg-key" not in repr(t)


def test_a_parent_directory_dev_env_is_never_read(tmp_path: Path):
    (tmp_path / ".capsa").mkdir()
    (tmp_path / ".capsa" / "dev.env").write_text("CAPSA_ENDPOINT=http://evil:1\nCAPSA_API_KEY=k\n")
    child = tmp_path / "child"
    child.mkdir()
    with pytest.raises(capsa.ConfigurationError, match="no endpoint"):
        _config.resolve(None, None, environ={}, cwd=child)


@pytest.mark.parametrize(
    "endpoint, message",
    [("ftp://h:1", "scheme"), ("http://h:1/path", "host:port"), ("http://", "host:port")],
)
def test_malformed_endpoints_are_refused(endpoint: str, message: str):
    with pytest.raises(capsa.ConfigurationError, match=message):
        _config.resolve(endpoint, "k", environ={})


def test_a_key_that_cannot_be_a_header_is_refused():
    with pytest.raises(capsa.ConfigurationError, match="header"):
        _config.resolve("h:1", "bad\nkey", environ={})


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "boom") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.UNAUTHENTICATED, capsa.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, capsa.PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, capsa.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, capsa.InvalidArgument),
        (grpc.StatusCode.ALREADY_EXISTS, capsa.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, capsa.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, capsa.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, capsa.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, capsa.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, capsa.Cancelled),
        (grpc.StatusCode.INTERNAL, capsa.ServerError),
    ],
)
def test_grpc_codes_map_to_exceptions(code: grpc.StatusCode, cls: type):
    e = errors.from_rpc_error(FakeRpcError(code, "session abc not found"))
    assert type(e) is cls and isinstance(e, capsa.CapsaError)
    assert e.code == code and e.details == "session abc not found"
    assert code.name in str(e)


def test_the_builtin_families_catch_them_too():
    assert issubclass(capsa.DeadlineExceeded, TimeoutError)
    assert capsa.Timeout is capsa.DeadlineExceeded
    assert issubclass(capsa.Unavailable, ConnectionError)
    assert issubclass(capsa.InvalidArgument, ValueError)


def _client(attempts: int = 4) -> Capsa:
    # Never connects: the calls below replace the transport.
    retry = capsa.RetryPolicy(attempts=attempts, initial_backoff=0.001, max_backoff=0.002)
    return Capsa("k", "127.0.0.1:1", retry=retry)


def _flaky(failures: int, code: grpc.StatusCode):
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) <= failures:
            raise FakeRpcError(code)
        return "ok"

    return attempt, calls


def test_unavailable_is_retried_only_for_calls_safe_to_repeat():
    vm = _client()
    for method in ("GetSession", "DownloadFile", "GetUsage", "ListSessions", "GetEgressPolicy"):
        attempt, calls = _flaky(3, grpc.StatusCode.UNAVAILABLE)
        assert vm._with_retry(method, attempt) == "ok" and len(calls) == 4, method
    for method in ("Execute", "CreateSession", "UploadFile", "ExtendSession"):
        attempt, calls = _flaky(1, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(capsa.Unavailable):
            vm._with_retry(method, attempt)
        assert len(calls) == 1, method
    vm.close()


def test_retries_stop_after_the_policy_attempts_and_other_codes_are_not_retried():
    vm = _client(attempts=3)
    attempt, calls = _flaky(10, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(capsa.Unavailable):
        vm._with_retry("GetSession", attempt)
    assert len(calls) == 3
    attempt, calls = _flaky(1, grpc.StatusCode.INTERNAL)
    with pytest.raises(capsa.ServerError):
        vm._with_retry("GetSession", attempt)
    assert len(calls) == 1
    vm.close()


def test_the_async_client_retries_by_the_same_rule():
    async def run() -> tuple[int, int]:
        vm = capsa.AsyncCapsa(
            "k", "127.0.0.1:1", retry=capsa.RetryPolicy(initial_backoff=0.001, max_backoff=0.002)
        )
        counts = []
        for method in ("GetSession", "Execute"):
            calls = []

            async def attempt(calls: list[int] = calls) -> str:
                calls.append(1)
                if len(calls) <= 2:
                    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
                return "ok"

            try:
                await vm._with_retry(method, attempt)
            except capsa.Unavailable:
                pass
            counts.append(len(calls))
        await vm.close()
        return counts[0], counts[1]

    assert asyncio.run(run()) == (3, 1)


def test_backoff_grows_and_is_capped():
    policy = capsa.RetryPolicy(attempts=6, initial_backoff=1.0, max_backoff=3.0, multiplier=2.0)
    delays = list(policy.delays("GetSession"))
    assert len(delays) == 5
    ceilings = [1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert list(policy.delays("Execute")) == []


def test_bad_arguments_fail_before_any_call():
    with pytest.raises(capsa.InvalidArgument, match="lifetime"):
        Capsa("k", "127.0.0.1:1", lifetime=-1)
    vm = Capsa.attach("s", "k", "127.0.0.1:1")
    with pytest.raises(capsa.InvalidArgument, match="language"):
        vm.execute("1", language="cobol")
    vm.close()


def test_events_are_collected_into_a_result():
    E = execution_pb2
    events = [
        E.ExecuteEvent(stdout=E.OutputChunk(data=b"4")),
        E.ExecuteEvent(stdout=E.OutputChunk(data=b"2\n\xc3")),
        E.ExecuteEvent(stdout=E.OutputChunk(data=b"\xa9\n")),
        E.ExecuteEvent(stderr=E.OutputChunk(data=b"warn\n")),
        E.ExecuteEvent(result=E.ExecuteResult(data={"text/plain": b"42"})),
        E.ExecuteEvent(error=E.ExecuteError(name="ValueError", value="v", traceback=["t"])),
        E.ExecuteEvent(
            completion=E.Completion(status=E.COMPLETION_STATUS_ERROR, exit_code=1, output_bytes=12)
        ),
    ]
    result = ExecutionResult()
    for msg in events:
        ev = _event(msg)
        assert ev is not None
        result._add(ev)
    # A UTF-8 sequence split across chunks is whole in the collected text.
    assert result.stdout == "42\n\u00e9\n"
    assert result.stderr == "warn\n"
    assert result.text == "42"
    assert result.error == capsa.ExecuteError("ValueError", "v", ["t"])
    assert result.status is capsa.CompletionStatus.ERROR and not result.ok
    assert result.exit_code == 1


def test_a_stream_without_completion_is_a_protocol_error():
    with pytest.raises(capsa.ProtocolError):
        _common.finish(ExecutionResult())


def test_process_requests_are_built_and_checked_locally():
    from capsa.proto.common.v1 import process_pb2
    from capsa.types import _process_event

    req = _common.start_process_request(
        "s-1", "ls", ["-l"], env={"A": "1"}, cwd="/tmp", stdin=b"x",
        keep_stdin_open=True, output_buffer_bytes=4096,
    )
    assert req.session_id == "s-1" and req.spec.command == "ls" and list(req.spec.args) == ["-l"]
    assert req.spec.keep_stdin_open and req.spec.output_buffer_bytes == 4096
    assert _common.signal_request("s", "p-1", "sigint").signal == process_pb2.SIGNAL_INT
    with pytest.raises(capsa.InvalidArgument, match="signal"):
        _common.signal_request("s", "p-1", "STOP")
    with pytest.raises(capsa.InvalidArgument, match="timeout"):
        _common.wait_request("s", "p-1", 0)
    dropped = process_pb2.ProcessEvent(dropped=process_pb2.OutputDropped(from_offset=0, to_offset=9))
    assert _process_event(dropped) == capsa.OutputDropped(from_offset=0, to_offset=9)
    chunk = process_pb2.ProcessOutputChunk(stream=process_pb2.OUTPUT_STREAM_STDERR, offset=3, data=b"e")
    assert _process_event(process_pb2.ProcessEvent(output=chunk)) == capsa.ProcessOutput("stderr", 3, b"e")


def test_session_status_members_follow_the_proto_enum() -> None:
    # `_enum` maps by position: every proto value must land on the member of its name.
    for value in session_pb2.SessionStatus.values():
        name = session_pb2.SessionStatus.Name(value).removeprefix("SESSION_STATUS_")
        assert _enum(SessionStatus, value).name == name


def test_create_request_carries_auto_suspend_and_auto_resume() -> None:
    req = create_request(
        template=None,
        lifetime=None,
        vcpus=None,
        memory_mib=None,
        env=None,
        metadata=None,
        egress=None,
        auto_suspend=True,
        auto_resume=True,
    )
    assert req.auto_suspend and req.auto_resume


# --- snapshots and forks ---------------------------------------------------------------


class FakeStub:
    """Stands in for the generated stub: each method answers from `answers` (a response, or
    a list of them in turn) and records (method, request, timeout)."""

    def __init__(self, answers: dict, is_async: bool = False) -> None:
        self.answers = {m: list(a) if isinstance(a, list) else [a] for m, a in answers.items()}
        self.calls: list[tuple[str, object, float | None]] = []
        self.is_async = is_async

    def __getattr__(self, method: str):
        def call(request, metadata=None, timeout=None):
            assert metadata == (("authorization", "Bearer k"),)
            self.calls.append((method, request, timeout))
            return self.answers[method].pop(0)

        async def acall(request, metadata=None, timeout=None):
            return call(request, metadata, timeout)

        return acall if self.is_async else call


def _snapshot_pb(**kwargs) -> session_pb2.Snapshot:
    fields: dict[str, object] = {
        "id": "snap-" + "ab" * 16,
        "name": "base",
        "status": session_pb2.SNAPSHOT_STATUS_READY,
        "session_id": "s-1",
        "template": "default",
        "vcpus": 2,
        "memory_mib": 1024,
        "size_bytes": 123456789,
        "node_id": "node-a",
        "metadata": {"team": "ml"},
    }
    return session_pb2.Snapshot(**{**fields, **kwargs})


def test_snapshots_are_converted_from_the_proto() -> None:
    msg = _snapshot_pb()
    msg.create_time.FromSeconds(1_700_000_000)
    snap = capsa.Snapshot._from_proto(msg)
    assert snap == capsa.Snapshot(
        id="snap-" + "ab" * 16,
        name="base",
        status=capsa.SnapshotStatus.READY,
        session_id="s-1",
        template="default",
        vcpus=2,
        memory_mib=1024,
        size_bytes=123456789,
        create_time=dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc),
        node_id="node-a",
        metadata={"team": "ml"},
    )
    assert snap.is_ready
    creating = capsa.Snapshot._from_proto(_snapshot_pb(status=session_pb2.SNAPSHOT_STATUS_CREATING))
    assert creating.status is capsa.SnapshotStatus.CREATING and not creating.is_ready
    assert creating.create_time is None
    # A status newer than this client reads as UNSPECIFIED.
    assert _enum(capsa.SnapshotStatus, 99) is capsa.SnapshotStatus.UNSPECIFIED


def test_snapshot_status_members_follow_the_proto_enum() -> None:
    for value in session_pb2.SnapshotStatus.values():
        name = session_pb2.SnapshotStatus.Name(value).removeprefix("SNAPSHOT_STATUS_")
        assert _enum(capsa.SnapshotStatus, value).name == name


def test_sessions_say_which_snapshot_or_session_they_came_from() -> None:
    s = capsa.Session._from_proto(
        session_pb2.Session(id="s-2", source_snapshot_id="snap-1", parent_session_id="s-1")
    )
    assert (s.source_snapshot_id, s.parent_session_id) == ("snap-1", "s-1")
    plain = capsa.Session._from_proto(session_pb2.Session(id="s-3"))
    assert (plain.source_snapshot_id, plain.parent_session_id) == ("", "")


def test_tenant_usage_carries_the_snapshot_quota() -> None:
    resp = session_pb2.GetTenantUsageResponse(
        tenant_id="t",
        active_sessions=2,
        total_sessions=5,
        snapshots=3,
        snapshot_bytes=3 << 30,
        snapshot_limit=20,
        snapshot_bytes_limit=10 << 30,
        snapshot_gib_seconds=1.5,
    )
    usage = capsa.TenantUsage._from_proto(resp)
    assert (usage.tenant_id, usage.active_sessions, usage.total_sessions) == ("t", 2, 5)
    assert (usage.snapshots, usage.snapshot_bytes) == (3, 3 << 30)
    assert (usage.snapshot_limit, usage.snapshot_bytes_limit) == (20, 10 << 30)
    assert usage.snapshot_gib_seconds == 1.5
    # The fields before snapshots still make one.
    old = capsa.TenantUsage("t", usage.total, 0, 0)
    assert old.snapshots == 0 and old.snapshot_gib_seconds == 0.0


def test_create_request_carries_a_snapshot_id_and_refuses_an_empty_one() -> None:
    names = ("template", "lifetime", "vcpus", "memory_mib", "env", "metadata", "egress")
    args: dict[str, None] = dict.fromkeys(names)
    assert create_request(**args, snapshot_id="snap-1").snapshot_id == "snap-1"
    assert create_request(**args).snapshot_id == ""
    for bad in ("", 7):
        with pytest.raises(capsa.InvalidArgument, match="snapshot_id"):
            create_request(**args, snapshot_id=bad)
    # Before anything is connected.
    with pytest.raises(capsa.InvalidArgument, match="snapshot_id"):
        Capsa("k", "127.0.0.1:1", snapshot_id="")
    with pytest.raises(capsa.InvalidArgument, match="snapshot_id"):
        capsa.AsyncCapsa("k", "127.0.0.1:1", snapshot_id="")


def test_snapshot_and_fork_requests_are_built_locally() -> None:
    req = _common.snapshot_request("s-1", "base", {"a": "b"})
    assert (req.session_id, req.name, dict(req.metadata)) == ("s-1", "base", {"a": "b"})
    fork = _common.fork_request("s-1", 3, None, None)
    assert (fork.session_id, fork.count) == ("s-1", 3)
    assert not fork.HasField("lifetime") and not fork.metadata
    fork = _common.fork_request("s-1", 1, 90.5, {"k": "v"})
    assert (fork.lifetime.seconds, fork.lifetime.nanos) == (90, 500_000_000)
    assert dict(fork.metadata) == {"k": "v"}
    with pytest.raises(capsa.InvalidArgument, match="lifetime"):
        _common.fork_request("s-1", 1, 0, None)
    page = _common.list_snapshots_request(10, "snap-x")
    assert (page.page_size, page.page_token) == (10, "snap-x")


def test_snapshot_reads_are_retried_and_snapshot_writes_are_not() -> None:
    vm = _client()
    for method in ("GetSnapshot", "ListSnapshots"):
        attempt, calls = _flaky(3, grpc.StatusCode.UNAVAILABLE)
        assert vm._with_retry(method, attempt) == "ok" and len(calls) == 4, method
    for method in ("SnapshotSession", "ForkSession", "DeleteSnapshot"):
        attempt, calls = _flaky(1, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(capsa.Unavailable):
            vm._with_retry(method, attempt)
        assert len(calls) == 1, method
    vm.close()


def test_snapshot_calls_and_a_fork_owning_its_sessions() -> None:
    vm = Capsa.attach("s-1", "k", "127.0.0.1:1", request_timeout=7, create_timeout=99)
    snap = _snapshot_pb()
    other = _snapshot_pb(id="snap-" + "cd" * 16)
    vm._stub = FakeStub(
        {
            "SnapshotSession": session_pb2.SnapshotSessionResponse(snapshot=snap),
            "GetSnapshot": session_pb2.GetSnapshotResponse(snapshot=snap),
            "ListSnapshots": [
                session_pb2.ListSnapshotsResponse(snapshots=[snap], next_page_token="p2"),
                session_pb2.ListSnapshotsResponse(snapshots=[other]),
            ],
            "DeleteSnapshot": session_pb2.DeleteSnapshotResponse(snapshot=snap),
            "ForkSession": session_pb2.ForkSessionResponse(
                sessions=[
                    session_pb2.Session(id="s-2", parent_session_id="s-1"),
                    session_pb2.Session(id="s-3", parent_session_id="s-1"),
                ]
            ),
        }
    )
    stub = vm._stub
    made = vm.snapshot("base", metadata={"team": "ml"})
    assert made.id == snap.id and made.is_ready
    method, req, timeout = stub.calls[-1]
    assert (method, req.session_id, req.name, timeout) == ("SnapshotSession", "s-1", "base", 99)
    assert vm.get_snapshot(snap.id) == made
    assert [s.id for s in vm.list_snapshots(page_size=1)] == [snap.id, other.id]
    assert [c[1].page_token for c in stub.calls if c[0] == "ListSnapshots"] == ["", "p2"]
    assert vm.delete_snapshot(snap.id) == made

    forks = vm.fork(2, lifetime=60)
    method, req, timeout = stub.calls[-1]
    assert (method, req.session_id, req.count, timeout) == ("ForkSession", "s-1", 2, 99)
    assert req.lifetime.seconds == 60
    assert [f.session_id for f in forks] == ["s-2", "s-3"]
    for f in forks:
        # Owned like a started session, with this client's settings on its own channel.
        assert f._owned and not f._closed and type(f) is Capsa
        assert f._channel is not vm._channel and f._target == vm._target
        assert (f._request_timeout, f._create_timeout, f._retry) == (7, 99, vm._retry)
    assert forks[0]._channel is not forks[1]._channel
    # Closing one ends its session (and only its).
    for f in forks:
        f._stub = FakeStub(
            {"DeleteSession": session_pb2.DeleteSessionResponse(session=session_pb2.Session())}
        )
        with f:
            pass
        assert f._closed and not f._owned
        assert [(m, r.session_id) for m, r, _ in f._stub.calls] == [("DeleteSession", f.session_id)]
    # The parent was attached: closing it ends nothing.
    vm.close()
    assert [m for m, _, _ in stub.calls].count("DeleteSession") == 0


def test_the_async_client_snapshots_and_forks_alike() -> None:
    async def run() -> None:
        vm = capsa.AsyncCapsa.attach("s-1", "k", "127.0.0.1:1", create_timeout=99)
        snap = _snapshot_pb()
        vm._stub = FakeStub(
            {
                "SnapshotSession": session_pb2.SnapshotSessionResponse(snapshot=snap),
                "ListSnapshots": session_pb2.ListSnapshotsResponse(snapshots=[snap]),
                "DeleteSnapshot": session_pb2.DeleteSnapshotResponse(snapshot=snap),
                "GetTenantUsage": session_pb2.GetTenantUsageResponse(snapshots=1),
                "ForkSession": session_pb2.ForkSessionResponse(
                    sessions=[session_pb2.Session(id="s-2")]
                ),
            },
            is_async=True,
        )
        assert (await vm.snapshot("base")).id == snap.id
        assert vm._stub.calls[-1][2] == 99
        assert [s.id async for s in vm.list_snapshots()] == [snap.id]
        assert (await vm.delete_snapshot(snap.id)).id == snap.id
        assert (await vm.tenant_usage()).snapshots == 1
        (child,) = await vm.fork()
        assert vm._stub.calls[-1][1].count == 1
        assert type(child) is capsa.AsyncCapsa and child._owned
        assert child.session_id == "s-2" and child._channel is not vm._channel
        child._stub = FakeStub(
            {"DeleteSession": session_pb2.DeleteSessionResponse(session=session_pb2.Session())},
            is_async=True,
        )
        async with child:
            pass
        assert child._closed and [m for m, _, _ in child._stub.calls] == ["DeleteSession"]
        await vm.close()

    asyncio.run(run())
