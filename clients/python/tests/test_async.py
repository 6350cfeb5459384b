"""`AsyncCapsa` against the real stack."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import capsa
from capsa import AsyncCapsa, CompletionStatus, SessionStatus, Stdout

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIVE = """\
import os, time
print('started', flush=True)
deadline = time.time() + 120
while not os.path.exists('/tmp/go-async') and time.time() < deadline:
    time.sleep(0.05)
print('finished' if os.path.exists('/tmp/go-async') else 'gave up')
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def avm(stack) -> AsyncIterator[AsyncCapsa]:
    async with AsyncCapsa(stack.api_key, stack.endpoint, lifetime=1800) as vm:
        yield vm


async def test_state_persists_between_calls(avm: AsyncCapsa):
    assert (await avm.execute("x = 42")).ok
    r = await avm.execute("print(x)")
    assert r.stdout == "42\n" and r.exit_code == 0
    assert r.wall_time > 0 and r.cpu_time >= 0


async def test_output_streams_before_the_code_completes(avm: AsyncCapsa):
    events = []
    async for ev in avm.stream(LIVE):
        events.append(ev)
        if isinstance(ev, Stdout) and b"started" in ev.data:
            await avm.write_file("/tmp/go-async", b"")
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"started\nfinished\n"
    assert isinstance(events[-1], capsa.Completion)


async def test_a_timeout_stops_the_code_and_keeps_the_state(avm: AsyncCapsa):
    await avm.execute("t = 'kept'")
    r = await avm.execute("while True: pass", timeout=2)
    assert r.status is CompletionStatus.TIMEOUT, r
    assert (await avm.execute("print(t)")).stdout == "kept\n"


async def test_concurrent_calls_share_one_client(avm: AsyncCapsa):
    # One channel carries several calls at once; Python and shell have a kernel each.
    py, sh, info = await asyncio.gather(
        avm.execute("import time; time.sleep(1); print('py')"),
        avm.execute("echo sh", language="shell"),
        avm.info(),
    )
    assert (py.stdout, sh.stdout, info.status) == ("py\n", "sh\n", SessionStatus.ACTIVE)


async def test_upload_and_download_round_trip_1_mib(avm: AsyncCapsa, tmp_path: Path):
    data = os.urandom(1 << 20)
    (tmp_path / "data.bin").write_bytes(data)
    up = await avm.upload(tmp_path / "data.bin", "/root/adata.bin")
    assert up.sha256 == hashlib.sha256(data).hexdigest() and up.info.size == len(data)
    info = await avm.download("/root/adata.bin", tmp_path / "back.bin")
    assert info.size == len(data)
    assert (tmp_path / "back.bin").read_bytes() == data
    await avm.mkdir("/root/adir")
    assert [f.name for f in await avm.list_files("/root/adir")] == []
    await avm.rm("/root/adir")
    with pytest.raises(capsa.NotFound):
        await avm.stat("/root/adir")


async def test_info_usage_extend(avm: AsyncCapsa):
    info = await avm.info()
    assert info.status is SessionStatus.ACTIVE and await avm.is_active()
    later = await avm.extend(60)
    assert later.expire_time is not None and info.expire_time is not None
    assert later.expire_time > info.expire_time
    assert (await avm.usage()).uptime >= 0
    assert avm.session_id in [s.id async for s in avm.list_sessions()]


async def test_api_errors_are_typed_exceptions(avm: AsyncCapsa, stack):
    async with AsyncCapsa.attach("no-such-session", stack.api_key, stack.endpoint) as other:
        with pytest.raises(capsa.NotFound):
            await other.info()
    async with AsyncCapsa.attach(avm.session_id, "not-a-key", stack.endpoint) as bad:
        with pytest.raises(capsa.AuthenticationError):
            await bad.execute("1")
    with pytest.raises(capsa.DeadlineExceeded):
        await avm.execute("import time\ntime.sleep(600)", request_timeout=3)
    assert (await avm.execute("print('free')", timeout=120)).stdout == "free\n"


async def test_leaving_the_block_ends_the_session(stack):
    async with AsyncCapsa(stack.api_key, stack.endpoint) as vm:
        sid = vm.session_id
        assert sid is not None
        assert (await vm.execute("print('in')")).stdout == "in\n"
    # Seen by a second, independent client.
    async with AsyncCapsa.attach(sid, stack.api_key, stack.endpoint) as other:
        info = await other.info()
        assert info.status is SessionStatus.TERMINATED, info
        assert info.end_reason is capsa.EndReason.DELETED
        assert not await other.is_active()


async def test_background_process_round_trip(avm: AsyncCapsa):
    p = await avm.start_process("python3", ["-c", "import sys; print(sys.stdin.read().upper())"], stdin=b"abc")
    done = await avm.wait_process(p.id, timeout=120)
    assert done.exit_code == 0 and not done.running
    events = [e async for e in avm.process_output(p.id)]
    out = b"".join(e.data for e in events if isinstance(e, capsa.ProcessOutput))
    assert out == b"ABC\n"
    assert isinstance(events[-1], capsa.ProcessExit) and events[-1].exit_code == 0
    assert p.id in [q.id for q in await avm.list_processes()]


async def test_snapshot_and_fork(avm: AsyncCapsa, stack):
    # One restore: a single fork of the module's session.
    await avm.execute("fork_y = 'parent'")
    snap = await avm.snapshot("async-base")
    assert snap.status is capsa.SnapshotStatus.READY and snap.session_id == avm.session_id
    assert snap.id in [s.id async for s in avm.list_snapshots()]
    assert (await avm.delete_snapshot(snap.id)).id == snap.id
    with pytest.raises(capsa.NotFound):
        await avm.get_snapshot(snap.id)

    (child,) = await avm.fork(1)
    async with child:
        assert (await child.info()).parent_session_id == avm.session_id
        assert (await child.execute("print(fork_y)")).stdout == "parent\n"
        assert (await child.execute("fork_y = 'child'")).ok
    assert (await avm.execute("print(fork_y)")).stdout == "parent\n"
    async with AsyncCapsa.attach(child.session_id, stack.api_key, stack.endpoint) as ended:
        assert (await ended.info()).status is SessionStatus.TERMINATED
