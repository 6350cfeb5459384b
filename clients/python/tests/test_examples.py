"""examples/python runs against the stack, and its `with` block really ends its session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from capsa import Capsa, EndReason, SessionStatus

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def test_quickstart_runs_and_its_with_block_ends_the_session(stack, tmp_path: Path):
    env = dict(os.environ, CAPSA_ENDPOINT=stack.endpoint, CAPSA_API_KEY=stack.api_key)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    assert "x = 42" in out
    assert "live output:\n0\n1\n2\n" in out
    assert "downloaded: 3 rows\n" in out
    m = re.search(r"^session (\S+)$", out, re.MULTILINE)
    assert m, out
    with Capsa.attach(m.group(1), stack.api_key, stack.endpoint) as other:
        info = other.info()
    assert info.status is SessionStatus.TERMINATED, info
    assert info.end_reason is EndReason.DELETED
