"""What needs no server: configuration, error mapping, the retry policy, result assembly."""

from __future__ import annotations

import asyncio
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
