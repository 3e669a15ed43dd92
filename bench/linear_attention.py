"""Benchmark: the ReLU linear-attention core at Waifu's shape (70 heads x 32, batch 2 = one CFG step).

Compares, on the same inputs and in the same run:
  ours     kernels.linear_attention (the default dispatch: Triton on CUDA, eager torch elsewhere), fed
           strided token-major views of one qkv buffer [B, N, 3C], as LinearSelfAttention does;
  eager    our pure-torch twin (GPU only, to show what the kernel buys);
  diffusers the math of diffusers' SanaLinearAttnProcessor2_0 re-implemented op for op (q, k, v from separate
           projections [B, N, C]; transposes, relu, fp32 casts, pad, two matmuls, divide, layout change, cast).
GPU: bf16, CUDA events, median of the repeats; µs, GB/s (q, k, v read once + output written once) and % of the
HBM roofline. CPU (no GPU): fp32 at a reduced width (hidden 448 = 14 heads) and ratios only, plus the peak tensor
bytes of one call (allocator records: repeats exactly) and the peak RSS growth of one call, one reading per fresh
process, median [min-max] of --rss-repeats.

    .venv/bin/python bench/linear_attention.py            # writes bench/results/linear_attention-<device>.txt
    .venv/bin/python bench/linear_attention.py --sizes 256 --reps 3 --rss-repeats 2 --out -   # quick look
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (Report, fresh_process_kib, load_note, min_median, parser, peak_alloc_bytes,  # noqa: E402
                    print_rss_growth, summary, time_gpu, time_interleaved, write_results)
import kernels  # noqa: E402  (this repository's kernels/: ROOT leads sys.path)

HEAD_DIM = 32
# Nominal HBM bandwidth (bytes/s) by device name; the measured copy bandwidth is printed as well.
HBM = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
       "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12, "A100-SXM4-40GB": 1.56e12}


def diffusers_math(q, k, v, heads, eps=1e-15):
    """SanaLinearAttnProcessor2_0's core (diffusers 0.42.1), between the projections, op for op."""
    dtype = q.dtype
    query = q.transpose(1, 2).unflatten(1, (heads, -1))
    key = k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)
    value = v.transpose(1, 2).unflatten(1, (heads, -1))
    query, key = F.relu(query), F.relu(key)
    query, key, value = query.float(), key.float(), value.float()
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
    scores = torch.matmul(value, key)
    hs = torch.matmul(scores, query)
    hs = hs[:, :, :-1] / (hs[:, :, -1:] + eps)
    return hs.flatten(1, 2).transpose(1, 2).to(dtype)


def make_inputs(B, N, heads, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = heads * HEAD_DIM
    qkv = torch.randn(B, N, 3 * C, generator=g).to(device=device, dtype=dtype)
    ours = qkv.view(B, N, 3, heads, HEAD_DIM).unbind(2)
    theirs = tuple(t.contiguous() for t in qkv.view(B, N, 3, C).unbind(2))  # separate to_q/to_k/to_v outputs
    return ours, theirs


def variants(heads):
    return {
        "ours": lambda o, t: kernels.linear_attention(*o, 1e-8),
        "eager": lambda o, t: kernels.linear_attention_eager(*o, 1e-8),
        "diffusers": lambda o, t: diffusers_math(*t, heads),
    }


def worker(spec):
    """Subprocess: peak RSS growth (KiB) during one call of one variant (VmHWM reset just before the call)."""
    B, N, heads, name = spec["B"], spec["N"], spec["heads"], spec["variant"]
    o, t = make_inputs(B, N, heads, torch.float32, "cpu")
    fn = variants(heads)[name]
    fn(o, t)                                   # first-call allocations (thread pools, caches) out of the way
    print_rss_growth(lambda: fn(o, t))


def peak_rss(B, N, heads, variant, repeats):
    return fresh_process_kib(__file__, dict(B=B, N=N, heads=heads, variant=variant), repeats)



def main(args):
    report = Report()  # prints each line and keeps it for the results file, header first
    emit = report.emit

    B = 2
    if torch.cuda.is_available():
        dev, name = torch.device("cuda"), torch.cuda.get_device_name()
        heads, dtype = 70, torch.bfloat16
        bw = next((v for k, v in HBM.items() if k in name), None)
        big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        copy_us = 1e3 * time_gpu(lambda: big.clone(), reps=10)
        copy_bw = 2 * big.numel() / (copy_us * 1e-6)
        del big
        emit(f"device: {name}  torch {torch.__version__}  kernels={kernels.kernel_mode()} "
             f"(triton path: {kernels.use_triton(dev)})")
        emit(f"HBM nominal {bw / 1e12 if bw else float('nan'):.2f} TB/s, measured 1 GiB copy {copy_bw / 1e12:.2f} TB/s")
        emit(f"attention core, B={B}, {heads} heads x {HEAD_DIM}, bf16, median of 20 (CUDA events)")
        emit(f"{'px':>5} {'N':>6} | {'ours us':>8} {'GB/s':>7} {'%HBM':>6} {'floor us':>8} | {'eager us':>8} "
             f"{'diffusers us':>12} | {'vs eager':>8} {'vs diffusers':>12}")
        for px in args.sizes or (512, 768, 1024):
            N = (px // 8) ** 2
            o, t = make_inputs(B, N, heads, dtype, dev)
            fns = variants(heads)
            us = {k: 1e3 * time_gpu(lambda f=f: f(o, t), reps=20) for k, f in fns.items()}   # median µs
            nbytes = 8 * B * N * heads * HEAD_DIM   # bf16 q, k, v read + out written
            gbs = nbytes / (us["ours"] * 1e-6) / 1e9
            peak = bw or copy_bw
            emit(f"{px:>5} {N:>6} | {us['ours']:>8.1f} {gbs:>7.0f} {100 * gbs * 1e9 / peak:>5.1f}% "
                 f"{nbytes / peak * 1e6:>8.1f} | {us['eager']:>8.1f} {us['diffusers']:>12.1f} | "
                 f"{us['eager'] / us['ours']:>7.2f}x {us['diffusers'] / us['ours']:>11.2f}x")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            mem = {}
            for k, f in fns.items():
                torch.cuda.reset_peak_memory_stats()
                f(o, t)
                mem[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            emit(f"{'':>14} peak extra MiB: ours {mem['ours']:.0f}, eager {mem['eager']:.0f}, "
                 f"diffusers {mem['diffusers']:.0f}")
    else:
        heads, dtype = 14, torch.float32
        emit(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)  "
             f"torch {torch.__version__}  kernels={kernels.kernel_mode()} (default path on CPU: eager torch)")
        emit(f"attention core, B={B}, REDUCED width {heads} heads x {HEAD_DIM} (hidden {heads * HEAD_DIM}), fp32; "
             f"wall-clock median of {args.reps} interleaved repeats; ratios only. alloc: peak tensor bytes of one call "
             f"(allocator records, read twice). RSS: one reading per fresh process, median [min-max] of "
             f"{args.rss_repeats} (MiB)")
        emit(f"{'px':>5} {'N':>6} | {'time ours/diffusers':>19} | {'alloc ours/diffusers':>20} | "
             f"{'RSS ours MiB':>24} {'RSS diffusers MiB':>24}")
        for px in args.sizes or (256, 384, 512):
            N = (px // 8) ** 2
            o, t = make_inputs(B, N, heads, dtype, "cpu")
            fns = {k: (lambda f=f: f(o, t)) for k, f in variants(heads).items() if k != "eager"}
            us = {k: med for k, (_, med) in min_median(time_interleaved(fns, args.reps), 1e6).items()}   # median µs
            alloc = {k: [peak_alloc_bytes(f) for _ in range(2)] for k, f in fns.items()}
            rss = {k: peak_rss(B, N, heads, k, args.rss_repeats) for k in fns} if args.rss_repeats else None
            emit(f"{px:>5} {N:>6} | {us['ours'] / us['diffusers']:>19.3f} | "
                 f"{alloc['ours'][0] / alloc['diffusers'][0]:>20.3f} | "
                 f"{summary(rss['ours'], 1 / 1024) if rss else '-':>24} {summary(rss['diffusers'], 1 / 1024) if rss else '-':>24}")
            emit(f"{'':>14} (abs: {us['ours']:.0f} vs {us['diffusers']:.0f} us; alloc {alloc['ours'][0] / 2 ** 20:.1f} vs "
                 f"{alloc['diffusers'][0] / 2 ** 20:.1f} MiB, repeats exactly: "
                 f"{all(a == b for a, b in alloc.values())})")
    emit(load_note())
    write_results("linear_attention", report.lines, args.out)


def cli(argv=None):
    p = parser("linear_attention", __doc__)
    p.add_argument("--sizes", type=int, nargs="+", help="image sides in px (default CPU: 256 384 512; GPU: 512 768 1024)")
    p.add_argument("--reps", type=int, default=7, help="interleaved timing repeats (CPU)")
    p.add_argument("--rss-repeats", type=int, default=5, help="fresh-process peak-RSS readings per variant (CPU; 0 skips)")
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main(cli())
