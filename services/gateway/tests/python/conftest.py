"""Fixtures for the gateway suite: the gateway's base URL and two tenants' API keys come from
the environment (tests/tests/gateway.rs sets them; against `deploy/scripts/up.sh`, source
.capsa/dev.env and create a second key with `capsa-session-manager create-api-key`)."""

import os

import pytest
import requests
from instavm import InstaVM


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set (see services/gateway/tests/python/conftest.py)")
    return value


@pytest.fixture(scope="session")
def endpoint() -> str:
    return _env("CAPSA_HTTP_ENDPOINT").rstrip("/")


@pytest.fixture(scope="session")
def second_endpoint(endpoint: str) -> str:
    """Another gateway replica on the same Redis, when the runner started one."""
    return os.environ.get("CAPSA_HTTP_ENDPOINT_2", endpoint).rstrip("/")


@pytest.fixture(scope="session")
def api_key() -> str:
    return _env("CAPSA_API_KEY")


@pytest.fixture(scope="session")
def other_key() -> str:
    return _env("CAPSA_OTHER_API_KEY")


@pytest.fixture(scope="session")
def vm(endpoint: str, api_key: str):
    """One session for the whole run (VM boots are slow under emulation), made the way the seed's examples make it: the SDK's
    context manager with a lifetime, size, env and metadata. The SDK's exit leaves the session
    to expire (InstaVM's behaviour), so the fixture kills it unless a test already did."""
    with InstaVM(
        api_key,
        base_url=endpoint,
        timeout=600,
        cpu_count=1,
        memory_mb=512,
        env={"GREETING": "hello from env"},
        metadata={"suite": "gateway"},
    ) as client:
        sid = client.session_id
        assert sid, "the SDK got no session_id"
        yield client
    requests.post(
        f"{endpoint}/kill", json={"session_id": sid}, headers={"X-API-Key": api_key}, timeout=60
    )
