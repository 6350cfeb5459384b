"""The gateway under bad input and a hostile second tenant: InstaVM's error statuses with a
`{"detail": ...}` body, and nothing created for a request it rejects."""

import pytest
import requests
from instavm import InstaVM, AuthenticationError, ExecutionError, SessionError

TEN_MIB = 10 << 20


def _sessions(endpoint, key):
    resp = requests.get(
        f"{endpoint}/v1/sessions/sandboxes",
        params={"limit": 1000},
        headers={"X-API-Key": key},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return {s["session_id"] for s in resp.json()}


def test_missing_or_wrong_key_is_401(endpoint):
    resp = requests.post(f"{endpoint}/execute", json={"session_id": "s", "command": "1"}, timeout=60)
    assert resp.status_code == 401
    assert "X-API-Key" in resp.json()["detail"]
    with pytest.raises(AuthenticationError):
        InstaVM("not-a-key", base_url=endpoint)


def test_unknown_session_is_404(endpoint, api_key):
    resp = requests.get(
        f"{endpoint}/v1/sessions/session/no-such-session",
        headers={"X-API-Key": api_key},
        timeout=60,
    )
    assert resp.status_code == 404
    assert resp.json()["detail"]
    client = InstaVM(api_key, base_url=endpoint, auto_start_session=False)
    with pytest.raises(SessionError):
        client.get_session_info("no-such-session")
    resp = requests.get(
        f"{endpoint}/v1/executions/00000000-0000-4000-8000-000000000000",
        headers={"X-API-Key": api_key},
        timeout=60,
    )
    assert resp.status_code == 404


def test_rejected_requests_create_nothing(endpoint, api_key):
    """Checked right after the rejected calls returned: creation is synchronous, so a
    session they had made would already be listed."""
    before = _sessions(endpoint, api_key)
    bad_json = requests.post(
        f"{endpoint}/v1/sessions/session",
        data="{not json",
        headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        timeout=60,
    )
    assert bad_json.status_code == 422
    assert "invalid request body" in bad_json.json()["detail"]
    too_many_cpus = requests.post(
        f"{endpoint}/v1/sessions/session",
        json={"vcpu_count": 99},
        headers={"X-API-Key": api_key},
        timeout=60,
    )
    assert too_many_cpus.status_code == 422
    assert "vcpus" in too_many_cpus.json()["detail"]
    no_key = requests.post(f"{endpoint}/v1/vms", json={"vm_lifetime_seconds": 60}, timeout=60)
    assert no_key.status_code == 401
    assert _sessions(endpoint, api_key) == before


def _snapshots(endpoint, key):
    resp = requests.get(f"{endpoint}/v1/snapshots", headers={"X-API-Key": key}, timeout=60)
    assert resp.status_code == 200, resp.text
    return {s["id"] for s in resp.json()}


def test_bad_snapshot_requests_name_the_problem_and_make_nothing(vm, endpoint, api_key):
    h = {"X-API-Key": api_key}
    sessions, snapshots = _sessions(endpoint, api_key), _snapshots(endpoint, api_key)
    for name in ["", "n" * 129, "tab\there"]:
        resp = requests.post(
            f"{endpoint}/v1/vms/{vm.session_id}/snapshot", json={"name": name}, headers=h, timeout=120
        )
        assert resp.status_code == 422, (name, resp.text)
        assert "name" in resp.json()["detail"]
    # InstaVM builds snapshots from OCI images; here they are taken of a running VM.
    resp = requests.post(
        f"{endpoint}/v1/snapshots", json={"oci_image": "python:3.11", "name": "img"}, headers=h, timeout=60
    )
    assert resp.status_code == 501
    assert "POST /v1/vms/{id}/snapshot" in resp.json()["detail"]
    resp = requests.get(f"{endpoint}/v1/snapshots/snap-{'0' * 32}", headers=h, timeout=60)
    assert resp.status_code == 404
    resp = requests.post(f"{endpoint}/v1/vms", json={"snapshot_id": "nope"}, headers=h, timeout=60)
    assert resp.status_code == 422
    assert "snapshot_id" in resp.json()["detail"]
    resp = requests.post(
        f"{endpoint}/v1/vms", json={"snapshot_id": f"snap-{'0' * 32}"}, headers=h, timeout=60
    )
    assert resp.status_code == 404, resp.text
    resp = requests.get(f"{endpoint}/v1/snapshots", params={"limit": 0}, headers=h, timeout=60)
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("limit: ")
    assert _sessions(endpoint, api_key) == sessions
    assert _snapshots(endpoint, api_key) == snapshots
    assert vm.get_session_status()["vm_status"] == "active"


def test_ten_mib_command_is_refused_with_a_reason(vm, endpoint, api_key):
    resp = requests.post(
        f"{endpoint}/execute",
        json={"session_id": vm.session_id, "command": "x" * TEN_MIB},
        headers={"X-API-Key": api_key},
        timeout=120,
    )
    assert resp.status_code == 413
    assert "a command is at most 1 MiB" in resp.json()["detail"]
    with pytest.raises(ExecutionError, match="413"):
        vm.execute("x" * TEN_MIB)
    # Just over the command limit but within the body limit: the field is named.
    resp = requests.post(
        f"{endpoint}/execute",
        json={"session_id": vm.session_id, "command": "x" * ((1 << 20) + 1)},
        headers={"X-API-Key": api_key},
        timeout=120,
    )
    assert resp.status_code == 413
    assert resp.json()["detail"].startswith("command is 1048577 bytes")
    # The session is unharmed.
    assert vm.execute("print('still here')")["stdout"] == "still here\n"


def test_another_tenant_sees_nothing_of_the_first(vm, endpoint, api_key, other_key):
    sid = vm.session_id
    task = vm.execute_async("print('secret')")["task_id"]
    assert vm.get_task_result(task, poll_interval=1, timeout=300)["stdout"] == "secret\n"
    h = {"X-API-Key": other_key}
    for method, path, body in [
        ("GET", f"/v1/sessions/session/{sid}", None),
        ("GET", f"/v1/sessions/status/{sid}", None),
        ("GET", f"/v1/sessions/usage/{sid}", None),
        ("GET", f"/v1/executions/{task}", None),
        ("GET", f"/v1/egress/session/{sid}", None),
        ("POST", f"/v1/egress/session/{sid}", {"allowed_domains": ["evil.example"]}),
        ("POST", "/execute", {"session_id": sid, "command": "print(1)"}),
        ("POST", "/execute_async", {"session_id": sid, "command": "print(1)"}),
        ("POST", "/kill", {"session_id": sid}),
        ("DELETE", f"/v1/vms/{sid}", None),
        ("POST", f"/v1/vms/{sid}/suspend", None),
        ("POST", f"/v1/vms/{sid}/resume", None),
        ("POST", f"/v1/vms/{sid}/snapshot", {"name": "stolen"}),
        ("POST", f"/v1/vms/{sid}/clone", {}),
    ]:
        resp = requests.request(method, f"{endpoint}{path}", json=body, headers=h, timeout=60)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
    resp = requests.post(
        f"{endpoint}/download",
        data={"session_id": sid, "filename": "/etc/hostname"},
        headers=h,
        timeout=60,
    )
    assert resp.status_code == 404
    assert sid not in _sessions(endpoint, other_key)
    # The owner's session is untouched, its execution still readable by its owner.
    assert vm.get_session_status()["vm_status"] == "active"
    assert vm.get_task_result(task, poll_interval=1, timeout=60)["stdout"] == "secret\n"
