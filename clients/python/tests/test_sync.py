"""`Capsa` against the real stack: one session for the module (VM boots are slow)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest

import capsa
from capsa import Capsa, CompletionStatus, SessionStatus, Stdout

# The code waits for this file, which the test writes only once it has the first chunk: the
# execute cannot finish unless output streamed before it completed.
LIVE = """\
import os, time
print('started', flush=True)
deadline = time.time() + 120
while not os.path.exists('/tmp/go-sync') and time.time() < deadline:
    time.sleep(0.05)
print('finished' if os.path.exists('/tmp/go-sync') else 'gave up')
"""


def test_state_persists_between_calls(vm: Capsa):
    r = vm.execute("x = 42")
    assert r.ok, r
    r = vm.execute("print(x)")
    assert r.stdout == "42\n"
    assert r.exit_code == 0 and r.status is CompletionStatus.OK
    assert r.wall_time > 0 and r.cpu_time >= 0
    assert vm.execute("x + 1").text == "43"


def test_output_streams_before_the_code_completes(vm: Capsa):
    events = []
    for ev in vm.stream(LIVE):
        events.append(ev)
        if isinstance(ev, Stdout) and b"started" in ev.data:
            vm.write_file("/tmp/go-sync", b"")
    out = b"".join(e.data for e in events if isinstance(e, Stdout))
    assert out == b"started\nfinished\n", events
    assert isinstance(events[-1], capsa.Completion) and events[-1].status is CompletionStatus.OK


def test_leaving_a_stream_early_interrupts_the_code(vm: Capsa):
    for ev in vm.stream("import time\nprint('tick', flush=True)\ntime.sleep(600)"):
        if isinstance(ev, Stdout):
            break
    # The kernel is free again (the sleep was interrupted) and kept its state.
    r = vm.execute("print('after', x)", timeout=120)
    assert r.stdout == "after 42\n", r


def test_errors_in_the_code_are_results_and_keep_the_state(vm: Capsa):
    vm.execute("y = 7")
    r = vm.execute("1 / 0")
    assert r.status is CompletionStatus.ERROR and not r.ok
    assert r.exit_code == 1
    assert r.error is not None and r.error.name == "ZeroDivisionError"
    assert any("ZeroDivisionError" in line for line in r.error.traceback)
    assert vm.execute("print(y)").stdout == "7\n"


def test_a_timeout_stops_the_code_and_keeps_the_state(vm: Capsa):
    vm.execute("t = 'kept'")
    r = vm.execute("while True: pass", timeout=2)
    assert r.status is CompletionStatus.TIMEOUT, r
    assert r.completion is not None and r.completion.message
    r = vm.execute("print(t)")
    assert r.stdout == "kept\n"
    assert r.completion is not None and not r.completion.state_lost


def test_a_passed_request_deadline_is_deadline_exceeded(vm: Capsa):
    with pytest.raises(capsa.DeadlineExceeded) as e:
        vm.execute("import time\ntime.sleep(600)", request_timeout=3)
    assert isinstance(e.value, TimeoutError)
    # The deadline cancelled the call, which interrupted the sleep.
    assert vm.execute("print('free')", timeout=120).stdout == "free\n"


def test_shell_has_its_own_persistent_kernel(vm: Capsa):
    r = vm.execute("cd /tmp && export GREETING=hi", language="shell")
    assert r.ok, r
    r = vm.execute("pwd; echo $GREETING; f() { return 3; }; f", language="shell")
    assert r.stdout == "/tmp\nhi\n"
    assert r.exit_code == 3 and r.status is CompletionStatus.ERROR
    r = vm.execute("echo oops >&2", language="bash", env={"A": "b"})
    assert r.stderr == "oops\n"


def test_upload_and_download_round_trip_1_mib(vm: Capsa, tmp_path: Path):
    data = os.urandom(1 << 20)
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    up = vm.upload(local, "/root/data.bin")
    assert up.sha256 == hashlib.sha256(data).hexdigest()
    assert up.info.size == len(data) and up.info.path == "/root/data.bin"
    # The VM sees the same bytes.
    r = vm.execute(
        "import hashlib\nprint(hashlib.sha256(open('/root/data.bin','rb').read()).hexdigest())"
    )
    assert r.stdout.strip() == up.sha256
    back = tmp_path / "back.bin"
    info = vm.download("/root/data.bin", back)
    assert info.size == len(data)
    assert back.read_bytes() == data


def test_files_of_several_chunks_and_the_file_calls(vm: Capsa, tmp_path: Path):
    data = os.urandom(5 * (1 << 20) // 2)  # 2.5 chunks
    vm.mkdir("/root/tree/sub")
    vm.write_file("/root/tree/sub/big.bin", data, mode=0o600)
    assert vm.read_file("/root/tree/sub/big.bin") == data
    st = vm.stat("/root/tree/sub/big.bin")
    assert st.type is capsa.FileType.REGULAR and st.size == len(data) and st.mode == 0o600
    assert st.modify_time is not None
    assert [f.name for f in vm.list_files("/root/tree")] == ["sub"]
    with pytest.raises(capsa.AlreadyExists):
        vm.write_file("/root/tree/sub/big.bin", b"x", overwrite=False)
    vm.rm("/root/tree", recursive=True)
    with pytest.raises(capsa.NotFound):
        vm.stat("/root/tree")
    # A failed download leaves no partial file behind.
    with pytest.raises(capsa.NotFound):
        vm.download("/root/tree/sub/big.bin", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_info_usage_extend_and_listing(vm: Capsa):
    info = vm.info()
    assert info.id == vm.session_id and info.status is SessionStatus.ACTIVE
    assert vm.is_active()
    assert info.expire_time is not None and info.create_time is not None
    extended = vm.extend(600)
    assert extended.expire_time is not None
    assert extended.expire_time - info.expire_time >= dt.timedelta(seconds=599)
    usage = vm.usage()
    assert usage.uptime >= 0 and usage.memory_used_bytes >= 0
    assert vm.session_id in [s.id for s in vm.list_sessions(status=SessionStatus.ACTIVE)]
    tenant = vm.tenant_usage()
    assert tenant.active_sessions >= 1 and tenant.total_sessions >= 1


def test_egress_policy_can_be_read_and_replaced(vm: Capsa):
    assert isinstance(vm.get_egress(), capsa.EgressPolicy)
    policy = capsa.EgressPolicy(allowed_domains=("example.com",), allow_http=False)
    # The server fills in what was left unset (HTTPS is allowed unless said otherwise).
    in_force = dataclasses.replace(policy, allow_https=True)
    assert vm.update_egress(policy) == in_force
    assert vm.get_egress() == in_force
    with pytest.raises(capsa.InvalidArgument, match="egress.allowed_cidrs"):
        vm.update_egress(capsa.EgressPolicy(allowed_cidrs=("not-a-network",)))


def test_api_errors_are_typed_exceptions(vm: Capsa, stack):
    with Capsa.attach("no-such-session", stack.api_key, stack.endpoint) as other:
        with pytest.raises(capsa.NotFound):
            other.info()
        assert not other.is_active()
    # Another tenant cannot see this session.
    with Capsa.attach(vm.session_id, stack.other_api_key, stack.endpoint) as other:
        with pytest.raises(capsa.NotFound):
            other.execute("print(1)")
    with Capsa.attach(vm.session_id, "not-a-key", stack.endpoint) as bad:
        with pytest.raises(capsa.AuthenticationError):
            bad.info()
    # Rejected before anything is created.
    with pytest.raises(capsa.InvalidArgument, match="vcpus"):
        with Capsa(stack.api_key, stack.endpoint, vcpus=99):
            pass


def test_the_environment_supplies_endpoint_and_key(stack, monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPSA_ENDPOINT", stack.endpoint)
    monkeypatch.setenv("CAPSA_API_KEY", stack.api_key)
    with Capsa.attach("no-such-session") as vm, pytest.raises(capsa.NotFound):
        vm.info()
    # And so does .capsa/dev.env in the current directory, as up.sh writes it.
    monkeypatch.delenv("CAPSA_ENDPOINT")
    monkeypatch.delenv("CAPSA_API_KEY")
    (tmp_path / ".capsa").mkdir()
    (tmp_path / ".capsa" / "dev.env").write_text(
        f"CAPSA_ENDPOINT={stack.endpoint}\nCAPSA_API_KEY={stack.api_key}\n"
    )
    with Capsa.attach("no-such-session") as vm, pytest.raises(capsa.NotFound):
        vm.info()


def test_background_processes_keep_running_and_keep_their_output(vm: Capsa, stack):
    import time

    p = vm.start_process(
        "sh", ["-c", "echo out; echo err >&2; read line; echo got $line; sleep 1000"],
        keep_stdin_open=True,
    )
    assert p.id.startswith("p-") and p.running and p.kind is capsa.ProcessKind.BACKGROUND
    # A call in between: the process runs outside the kernels.
    assert vm.execute("print(1)").stdout == "1\n"
    vm.write_stdin(p.id, b"hello\n", close=True)
    deadline = time.monotonic() + 60
    while b"got hello" not in b"".join(
        e.data for e in vm.process_output(p.id, follow=False) if isinstance(e, capsa.ProcessOutput)
    ):
        assert time.monotonic() < deadline, "the process never echoed its stdin"
        time.sleep(0.2)
    events = list(vm.process_output(p.id, follow=False))
    outs = [e for e in events if isinstance(e, capsa.ProcessOutput)]
    assert b"".join(e.data for e in outs if e.stream == "stdout") == b"out\ngot hello\n"
    assert b"".join(e.data for e in outs if e.stream == "stderr") == b"err\n"
    # Offsets count stdout and stderr together (in the order the agent read the two pipes):
    # catching up from one gets exactly what followed it.
    everything = b"".join(e.data for e in outs)
    assert [e.offset for e in outs] == [sum(len(x.data) for x in outs[:i]) for i in range(len(outs))]
    tail = [e for e in vm.process_output(p.id, from_offset=4, follow=False)]
    assert b"".join(e.data for e in tail if isinstance(e, capsa.ProcessOutput)) == everything[4:]
    assert p.id in [q.id for q in vm.list_processes() if q.running]
    while vm.usage().processes_running < 1:
        assert time.monotonic() < deadline, "usage never counted the process"
        time.sleep(1)
    ended = vm.signal_process(p.id, "KILL")
    assert ended.id == p.id
    done = vm.wait_process(p.id, timeout=30)
    assert done.state is capsa.ProcessState.EXITED and done.signal == 9 and done.exit_code == -1
    last = list(vm.process_output(p.id, from_offset=done.output_offset, follow=True))
    assert last == [capsa.ProcessExit(exit_code=-1, signal=9)]


def test_process_calls_check_their_input_and_the_tenant(vm: Capsa, stack):
    with pytest.raises(capsa.InvalidArgument, match="command"):
        vm.start_process("")
    with pytest.raises(capsa.InvalidArgument, match="signal"):
        vm.signal_process("p-1", "STOP")
    with pytest.raises(capsa.NotFound):
        vm.wait_process("p-999999", timeout=1)
    quick = vm.start_process("true")
    assert vm.wait_process(quick.id, timeout=60).exit_code == 0
    # Another tenant sees neither the session nor its processes.
    with Capsa.attach(vm.session_id, stack.other_api_key, stack.endpoint) as other:
        with pytest.raises(capsa.NotFound):
            other.list_processes()
        with pytest.raises(capsa.NotFound):
            other.signal_process(quick.id, "KILL")


def test_a_snapshot_starts_new_sessions_and_forks_go_their_own_ways(vm: Capsa, stack):
    # Last in the module: it snapshots the module's session (which runs on) and forks it,
    # so that it boots no VM of its own (three restores: one template, two forks).
    assert vm.execute("snap_x = 41").ok
    vm.write_file("/root/snap.txt", b"saved\n")
    snap = vm.snapshot("base", metadata={"suite": "python"})
    assert snap.id.startswith("snap-") and snap.status is capsa.SnapshotStatus.READY
    assert (snap.name, snap.session_id) == ("base", vm.session_id)
    assert snap.metadata == {"suite": "python"}
    assert snap.size_bytes > 0 and snap.create_time is not None
    assert snap.id in [s.id for s in vm.list_snapshots()]
    tenant = vm.tenant_usage()
    assert tenant.snapshots >= 1 and tenant.snapshot_bytes >= snap.size_bytes
    assert tenant.snapshot_limit >= tenant.snapshots and tenant.snapshot_bytes_limit > 0

    # A template: a new session starts with what the snapshot had.
    with Capsa(stack.api_key, stack.endpoint, snapshot_id=snap.id) as template:
        assert template.info().source_snapshot_id == snap.id
        r = template.execute("print(snap_x, open('/root/snap.txt').read().strip())")
        assert r.stdout == "41 saved\n", r

    # Two forks of the running session, each owning its session and independent.
    forks = vm.fork(2)
    with contextlib.ExitStack() as closing:
        for f in forks:
            closing.enter_context(f)
        assert len(forks) == 2
        a, b = forks
        assert a.session_id != b.session_id
        assert {a.info().parent_session_id, b.info().parent_session_id} == {vm.session_id}
        assert a.execute("print(snap_x)").stdout == "41\n"
        assert a.execute("snap_x = 1").ok
        assert b.execute("print(snap_x)").stdout == "41\n"
        assert a.execute("print(snap_x)").stdout == "1\n"
    assert vm.execute("print(snap_x)").stdout == "41\n"
    # Leaving the block ended them; the parent runs on.
    with Capsa.attach(a.session_id, stack.api_key, stack.endpoint) as ended:
        assert ended.info().status is SessionStatus.TERMINATED
    assert vm.is_active()

    deleted = vm.delete_snapshot(snap.id)
    assert deleted.id == snap.id
    with pytest.raises(capsa.NotFound):
        vm.get_snapshot(snap.id)
    assert snap.id not in [s.id for s in vm.list_snapshots()]
