"""The official `instavm` SDK, unchanged, against the gateway: the seed's session flows.
Tests run in file order (after test_bad_input.py) and share one session (conftest's `vm`);
the last one kills it."""

import hashlib
import json
import os

import pytest
import requests
from instavm import InstaVM


def test_state_persists_between_executes(vm):
    first = vm.execute("x = 42")
    assert first["success"] is True, first
    r = vm.execute("print(x)")
    assert r["stdout"] == "42\n"
    assert r["output"] == "42\n"
    assert r["exit_code"] == 0
    assert r["execution_time"] > 0
    assert r["cpu_time"] >= 0
    assert r["error"] is None


def test_trailing_expression_and_exception(vm):
    r = vm.execute("x * 2")
    assert r["output"] == "84\n"
    assert r["results"][0]["text/plain"] == "84"
    r = vm.execute("1 / 0")
    assert r["success"] is False
    assert r["status"] == "error"
    assert r["error"]["name"] == "ZeroDivisionError"
    assert r["exit_code"] == 1


def test_env_given_at_creation_reaches_the_kernel(vm):
    r = vm.execute("import os; print(os.environ['GREETING'])")
    assert r["stdout"] == "hello from env\n"


def test_bash(vm):
    # `(exit 3)`: a bare `exit` would end the session's persistent bash kernel.
    r = vm.execute("echo $((6 * 7)); uname -s; (exit 3)", language="bash")
    assert r["stdout"] == "42\nLinux\n"
    assert r["exit_code"] == 3


def test_execute_timeout_is_reported_not_raised(vm, endpoint, api_key):
    # Through requests: the SDK uses an execute's timeout as its HTTP timeout too, so it
    # gives up on the response at the moment the VM stops the code.
    resp = requests.post(
        f"{endpoint}/execute",
        json={"session_id": vm.session_id, "command": "import time; time.sleep(30)", "timeout": 2},
        headers={"X-API-Key": api_key},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["status"] == "timeout", r
    assert r["success"] is False
    # The kernel survives a timeout: state is still there.
    assert vm.execute("print(x)")["stdout"] == "42\n"


def test_session_info_status_and_usage(vm):
    info = vm.get_session_info()
    assert info["session_id"] == vm.session_id
    assert info["status"] == "active"
    assert info["vcpu_count"] == 1
    assert info["memory_mb"] == 512
    assert info["metadata"] == {"suite": "gateway"}
    assert info["env_names"] == ["GREETING"]
    status = vm.get_session_status()
    assert status["vm_status"] == "active"
    assert status["vm_alive"] is True
    assert vm.is_session_active() is True
    usage = vm.get_usage()
    for field in ("cpu_time", "memory_used", "network_io"):
        assert field in usage, usage
    assert usage["session_id"] == vm.session_id
    assert usage["cpu_time"] > 0


def test_upload_then_download_one_mib(vm, tmp_path):
    data = os.urandom(1 << 20)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    up = vm.upload_file(str(src), "/tmp/gateway/blob.bin")
    assert up["size"] == len(data)
    assert up["sha256"] == hashlib.sha256(data).hexdigest()
    out = tmp_path / "back.bin"
    down = vm.download_file("/tmp/gateway/blob.bin", local_path=str(out))
    assert down["size"] == len(data)
    assert out.read_bytes() == data
    # The code sees the same file.
    r = vm.execute(
        "import hashlib; print(hashlib.sha256(open('/tmp/gateway/blob.bin','rb').read()).hexdigest())"
    )
    assert r["stdout"].strip() == hashlib.sha256(data).hexdigest()


def test_execute_async_polled_through_another_replica(vm, second_endpoint, api_key):
    started = vm.execute_async("import time; time.sleep(1); print('done', x)")
    task = started["task_id"]
    poller = InstaVM(api_key, base_url=second_endpoint, auto_start_session=False)
    result = poller.get_task_result(task, poll_interval=1, timeout=300)
    assert result["stdout"] == "done 42\n"
    assert result["execution_time"] > 0
    assert result["created_at"]


def test_streaming_extension(vm, endpoint, api_key):
    resp = requests.post(
        f"{endpoint}/v1/execute/stream",
        json={"session_id": vm.session_id, "command": "for i in range(3): print(i, flush=True)"},
        headers={"X-API-Key": api_key},
        stream=True,
        timeout=300,
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events, name = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
    stdout = "".join(d["text"] for n, d in events if n == "stdout")
    assert stdout == "0\n1\n2\n"
    assert events[-1][0] == "completion"
    assert events[-1][1]["status"] == "ok"


def test_egress_policy_round_trips(vm):
    before = vm.get_session_egress()
    assert before["session_id"] == vm.session_id
    after = vm.set_session_egress(
        allow_package_managers=False,
        allow_http=False,
        allowed_domains=["example.com"],
        allowed_cidrs=["198.51.100.0/24"],
    )
    assert after["allowed_domains"] == ["example.com"]
    assert after["allowed_cidrs"] == ["198.51.100.0/24"]
    assert after["allow_http"] is False and after["allow_https"] is True
    again = vm.get_session_egress()
    assert again["allowed_domains"] == ["example.com"]
    assert again["allow_public_repos"] is False


def test_vms_create_wait_get_delete(endpoint, api_key):
    client = InstaVM(api_key, base_url=endpoint, auto_start_session=False)
    created = client.vms.create(wait=True, vm_lifetime_seconds=300)
    vm_id = created["vm_id"]
    try:
        assert created["status"] == "active"
        assert client.vms.get(vm_id)["status"] == "active"
        assert vm_id in [v["vm_id"] for v in client.vms.list()]
    finally:
        deleted = client.vms.delete(vm_id)
    assert deleted["status"] in ("terminating", "terminated")
    assert client.vms.get(vm_id)["status"] in ("terminating", "terminated")


def _not_found(call):
    """The SDK's `vms` and `snapshots` managers raise requests' HTTPError for a 404."""
    with pytest.raises(requests.HTTPError) as err:
        call()
    assert err.value.response.status_code == 404, err.value.response.text
    assert err.value.response.json()["detail"]


def test_vms_snapshot_restore_clone_suspend_resume(endpoint, api_key, other_key):
    """Three VMs (the source, one started from its snapshot, a clone), at most two of them
    (besides conftest's `vm`) at once."""
    client = InstaVM(api_key, base_url=endpoint, auto_start_session=False)
    other = InstaVM(other_key, base_url=endpoint, auto_start_session=False)
    made, snap_id = [], None

    def run(vm_id, code):
        client.session_id = vm_id
        return client.execute(code)

    def delete_vm(vm_id):
        made.remove(vm_id)
        assert client.vms.delete(vm_id)["status"] in ("terminating", "terminated")

    try:
        src = client.vms.create(wait=True, vm_lifetime_seconds=600)["vm_id"]
        made.append(src)
        assert run(src, "x = 41")["success"] is True

        snap = client.vms.snapshot(src, name="base", metadata={"suite": "gateway"})
        snap_id = snap["id"]
        assert snap_id.startswith("snap-")
        assert snap["snapshot_id"] == snap_id
        assert (snap["name"], snap["status"], snap["vm_id"]) == ("base", "ready", src)
        assert snap["metadata"] == {"suite": "gateway"}
        assert snap["created_at"]
        assert snap_id in [s["id"] for s in client.snapshots.list()]
        # InstaVM's `type` filter is accepted (every snapshot here is a VM's).
        assert snap_id in [s["id"] for s in client.snapshots.list(snapshot_type="user")]
        got = client.snapshots.get(snap_id)
        assert (got["id"], got["name"], got["vm_id"]) == (snap_id, "base", src)
        assert got["size_bytes"] > 0
        assert (got["vcpu_count"], got["memory_mb"]) == (snap["vcpu_count"], snap["memory_mb"])

        # Another tenant sees neither the snapshot nor the VM.
        _not_found(lambda: other.snapshots.get(snap_id))
        _not_found(lambda: other.snapshots.delete(snap_id))
        _not_found(lambda: other.vms.clone(src))
        _not_found(lambda: other.vms.snapshot(src, name="stolen"))
        _not_found(lambda: other.vms.suspend(src))
        assert snap_id not in [s["id"] for s in other.snapshots.list()]

        # How an SDK user starts a VM from a snapshot: vms.create(**payload) sends it as is.
        restored = client.vms.create(wait=True, snapshot_id=snap_id, vm_lifetime_seconds=300)
        made.append(restored["vm_id"])
        assert restored["status"] == "active"
        assert restored["source_snapshot_id"] == snap_id
        assert restored["vm_id"] != src
        assert run(restored["vm_id"], "print(x)")["stdout"] == "41\n"

        deleted = client.snapshots.delete(snap_id)
        assert deleted["id"] == snap_id
        snap_id = None
        _not_found(lambda: client.snapshots.get(deleted["id"]))
        assert deleted["id"] not in [s["id"] for s in client.snapshots.list()]
        # A VM started from it runs on.
        assert run(restored["vm_id"], "print(x + 1)")["stdout"] == "42\n"
        delete_vm(restored["vm_id"])

        clone = client.vms.clone(src)
        made.append(clone["vm_id"])
        assert clone["status"] == "active"
        assert clone["vm_id"] not in (src, restored["vm_id"])
        assert clone["parent_vm_id"] == src
        assert run(clone["vm_id"], "print(x)")["stdout"] == "41\n"
        delete_vm(clone["vm_id"])

        suspended = client.vms.suspend(src)
        assert (suspended["vm_id"], suspended["status"]) == (src, "suspended")
        assert suspended["suspended_at"]
        assert client.vms.get(src)["status"] == "suspended"
        resumed = client.vms.resume(src, wait=True)
        assert (resumed["vm_id"], resumed["status"]) == (src, "active")
        assert run(src, "print(x)")["stdout"] == "41\n"
    finally:
        for vm_id in list(made):
            try:
                client.vms.delete(vm_id)
            except Exception as e:  # noqa: BLE001 - clean up the rest regardless
                print(f"deleting {vm_id}: {e}")
        if snap_id:
            client.snapshots.delete(snap_id)


def test_openapi_document(endpoint):
    doc = requests.get(f"{endpoint}/openapi.json", timeout=30).json()
    assert "/execute" in doc["paths"] and "/upload" in doc["paths"]


def test_kill(vm, api_key, endpoint):
    sid = vm.session_id
    killed = vm.kill()
    assert killed["success"] is True
    assert killed["session_id"] == sid
    status = InstaVM(api_key, base_url=endpoint, auto_start_session=False).get_session_status(sid)
    assert status["vm_status"] in ("terminating", "terminated")
    assert status["vm_alive"] is False
