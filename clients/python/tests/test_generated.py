"""The checked-in generated code is what generate.py makes from proto/ now, and the
installed `capsa` is this tree (else the suite would test something else)."""

from __future__ import annotations

import filecmp
import importlib.util
import tempfile
from pathlib import Path

import capsa

HERE = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("capsa_generate", HERE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current():
    gen = _generator()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "proto"
        gen.generate(fresh)
        stale = gen.stale_files(HERE / "src" / "capsa" / "proto", fresh)
    assert not stale, (
        f"src/capsa/proto is stale in {stale}: run `$CAPSA_PYTHON clients/python/generate.py`"
    )


def test_the_installed_package_is_this_tree():
    installed = Path(capsa.__file__).parent
    source = HERE / "src" / "capsa"
    files = [
        p.relative_to(source)
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    differ = [
        str(f)
        for f in files
        if not (installed / f).is_file()
        or not filecmp.cmp(source / f, installed / f, shallow=False)
    ]
    assert files and not differ, (
        f"the installed capsa ({installed}) differs from clients/python/src in {differ}: "
        "rerun deploy/scripts/python-env.sh"
    )
