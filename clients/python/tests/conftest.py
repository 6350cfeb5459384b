"""Fixtures for the suite. The tests marked by needing `stack` run against a real Capsa
stack: `cargo nextest run -p capsa-e2e --test python_client` starts one and passes
CAPSA_ENDPOINT, CAPSA_API_KEY and CAPSA_TEST_OTHER_API_KEY (a second tenant's key). Without
them those tests fail (never skip) with a message saying so."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from capsa import Capsa


@dataclass(frozen=True)
class Stack:
    endpoint: str
    api_key: str
    # A key of another tenant, for isolation checks.
    other_api_key: str


@pytest.fixture(scope="session")
def stack() -> Stack:
    names = ("CAPSA_ENDPOINT", "CAPSA_API_KEY", "CAPSA_TEST_OTHER_API_KEY")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: these tests need a running stack; run them with "
            "`cargo nextest run -p capsa-e2e --test python_client`",
            pytrace=False,
        )
    return Stack(*(os.environ[n] for n in names))


@pytest.fixture(scope="module")
def vm(stack: Stack) -> Iterator[Capsa]:
    """One session for a whole test module (VM boots are slow under TCG)."""
    with Capsa(stack.api_key, stack.endpoint, lifetime=1800) as vm:
        yield vm
