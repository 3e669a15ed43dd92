"""Bench hygiene: every bench script parses its arguments, so ``--help`` prints usage and exits without measuring
anything or touching bench/results/ (it used to run the whole benchmark and overwrite the results)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["waifu_step", "linear_attention", "text_encode", "workflow"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_only_prints_usage(script):
    results = sorted((ROOT / "bench" / "results").glob("*"))
    before = {p: p.stat().st_mtime_ns for p in results}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: bench/{script}.py") and "--out" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == before
    # control: an unknown option is refused (the parser is really in charge)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--no-such-option"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
