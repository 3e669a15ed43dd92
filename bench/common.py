"""Pieces every benchmark script uses: argument parsing, the results header (command, machine, torch, date, load),
timing (interleaved wall clock, CUDA events), memory readings from /proc in fresh processes, summaries that say how
much a figure moves, writing the raw results."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is this section's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def device_tag() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return "cpu"


def parser(script: str, doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every bench has: --out (default bench/results/<script>-<device>.txt)."""
    p = argparse.ArgumentParser(prog=f"bench/{script}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help=f"results file (default: bench/results/{script}-<device>.txt); '-' prints only")
    return p


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            return m.group(1).strip() if m else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def header() -> list[str]:
    """Command, date, machine, torch version and the load at the start: what a reader needs to rerun a figure
    and to judge whether the machine was quiet."""
    cmd = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        dev = f"cpu only, {torch.get_num_threads()} torch threads"
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    lines = [
        f"command: {cmd}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {_cpu_model()}, {cores} cores, {platform.system()} {platform.release()}; {dev}",
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"load average at start: {load:.2f} on {cores} cores"
        + ("  -> NOT QUIET: other jobs were running; absolute times are inflated, same-run ratios less so"
           if load > 0.5 * cores else ""),
    ]
    return lines


def load_note() -> str:
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average at end: {load:.2f} on {cores} cores" + ("  -> NOT QUIET" if load > 0.5 * cores else "")


def summary(values, scale: float = 1.0, fmt: str = ".1f") -> str:
    """'median [min-max] (n=k)' of values * scale: the spread says whether the figure repeats."""
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):{fmt}} [{v[0]:{fmt}}-{v[-1]:{fmt}}] (n={len(v)})"


def peak_alloc_bytes(fn) -> int:
    """Peak bytes of tensor memory live at once during ``fn()`` beyond what was live before, counted from the
    allocator's own alloc/free records (torch.profiler with profile_memory=True). Unlike RSS it does not see
    allocator caching, thread pools or page reuse, so it repeats exactly from run to run."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in records:
        cur += n
        peak = max(peak, cur)
    return peak


def time_interleaved(fns: dict, reps: int, warm: int = 1, sync=None) -> dict[str, list[float]]:
    """Wall times (s) of each callable in ``fns``: ``warm`` untimed calls of each, then ``reps`` rounds with the
    variants interleaved, so that load from other processes hits all alike. ``sync`` (e.g. a CUDA synchronize) runs
    right before and right after each timed call."""
    for _ in range(warm):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            f()
            if sync is not None:
                sync()
            ts[k].append(time.perf_counter() - t0)
    return ts


def min_median(ts: dict, scale: float = 1.0) -> dict[str, tuple[float, float]]:
    """(min, median) * scale per variant of ``time_interleaved``'s readings. On a CPU shared with other jobs the
    minimum is the stable estimate of a variant's own cost; the median says how much it moved."""
    return {k: (min(v) * scale, statistics.median(v) * scale) for k, v in ts.items()}


def time_gpu(fn, reps: int = 10, warm: int = 3) -> float:
    """Median ms of ``fn()`` over ``reps`` calls, each timed with CUDA events, after ``warm`` untimed calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def print_rss_growth(fn) -> None:
    """In a ``--worker`` process: peak RSS growth (KiB) during ``fn()`` over the RSS just before it (VmHWM reset
    first), printed as the 'RSS<kib>' line ``fresh_process_kib`` collects."""
    base = status_kb("VmRSS")
    reset_peak_rss()
    fn()
    print("RSS" + json.dumps(status_kb("VmHWM") - base))


def fresh_process_kib(script: str, spec: dict, repeats: int) -> list[int]:
    """Run ``script --worker <spec>`` ``repeats`` times, each in a new process, and collect the 'RSS<kib>' line each
    prints: one peak-RSS reading per fresh process, so no allocator state carries over between readings."""
    out = []
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for _ in range(repeats):
        p = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                           env=env, check=True)
        out.append(int(next(ln for ln in p.stdout.splitlines() if ln.startswith("RSS"))[3:]))
    return out


def write_results(script: str, lines: list[str], out: Path | None = None) -> None:
    """Raw output of one run, by default named by script and device under bench/results/."""
    if out is not None and str(out) == "-":
        return
    out = out or ROOT / "bench" / "results" / f"{script}-{device_tag()}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


class Report:
    """The lines of one results file: ``emit`` prints a line and keeps it; the header comes first."""

    def __init__(self):
        self.lines: list[str] = []
        for line in header():
            self.emit(line)

    def emit(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)
