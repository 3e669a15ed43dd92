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


def test_shared_timing_and_rss_helpers():
    """The timing and RSS helpers the scripts share (bench/common.py): warm-up calls, interleaved rounds, sync around
    each timed call, (min, median) scaled, and the 'RSS<kib>' line fresh_process_kib reads back."""
    import contextlib
    import io
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    ts = common.time_interleaved(fns, 3, warm=1, sync=lambda: calls.append("|"))
    assert calls == ["a", "b"] + ["|", "a", "|", "|", "b", "|"] * 3
    assert {k: len(v) for k, v in ts.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in ts.values() for t in v)
    calls.clear()
    common.time_interleaved(fns, 2, warm=0)
    assert calls == ["a", "b", "a", "b"]
    assert common.min_median({"x": [0.003, 0.001, 0.002]}, 1e3) == {"x": (1.0, 2.0)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        common.print_rss_growth(lambda: bytearray(64 << 20))
    line = out.getvalue().strip()
    assert line.startswith("RSS") and int(line[3:]) >= 0
