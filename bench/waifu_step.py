"""Benchmark: one CFG step (model batch 2) of the Waifu Linear DiT, and a whole 20-step flow-Euler image, ours vs
diffusers' SanaTransformer2DModel (same random weights, same inputs, measured in the same run).

Rows:
  ours forward   LinearDiT.forward with the default kernel dispatch, same call as diffusers (512 padded text tokens)
  ours step      one step of kernels.fused.sample_flow_euler_fast: text K/V cached per image, text trimmed to the
                 longest real prompt, sync-free fused CFG+Euler update
  diffusers      SanaTransformer2DModel.forward (+ the CFG combine and FlowMatchEulerDiscreteScheduler.step in the
                 20-step loop)
GPU: full-size Waifu (hidden 2240, depth 20), random init, bf16, CUDA events; ms/step, % of the bf16 compute floor
(FLOPs counted with torch.utils.flop_counter on the diffusers forward), peak memory; 20 steps at 768².
CPU (no GPU): REDUCED width (hidden 448, depth 2), fp32; ratios only; peak RSS of one step (first call), each
reading in a fresh subprocess, --rss-repeats of them: median [min-max]. --compile adds the torch.compile'd loop.

    .venv/bin/python bench/waifu_step.py                  # writes bench/results/waifu_step-<device>.txt
    .venv/bin/python bench/waifu_step.py --sizes 128 --reps 5 --loop-reps 3 --rss-repeats 3 --out -   # quick look
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import (Report, fresh_process_kib, load_note, min_median, parser, peak_alloc_bytes,  # noqa: E402
                    print_rss_growth, summary, time_gpu, time_interleaved, write_results)
import kernels  # noqa: E402  (this repository's kernels/: ROOT leads sys.path)
from waifukit.flow import flow_sigmas  # noqa: E402
from kernels.fused import sample_flow_euler_fast  # noqa: E402
from waifukit.waifu.dit import LinearDiT, LinearDiTParams, to_sana_layout  # noqa: E402

# Dense bf16 tensor-core peak by device name (FLOP/s).
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12}
TEXT_LEN, COND_REAL, UNCOND_REAL = 512, 77, 2   # Waifu pads prompts to 512; a 77-token prompt, empty negative


def config(full: bool) -> dict:
    width = dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20) if full else \
        dict(num_attention_heads=14, num_layers=2, num_cross_attention_heads=4)
    heads = width["num_attention_heads"]
    return dict(in_channels=16, out_channels=16, attention_head_dim=32, cross_attention_head_dim=112,
                cross_attention_dim=heads * 32, caption_channels=1024, mlp_ratio=2.5, sample_size=32, patch_size=1,
                interpolation_scale=None, **width)


def build(full: bool, device, dtype, which=("ours", "diffusers")):
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(0)
    ref = SanaTransformer2DModel(**config(full)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    models = {}
    if "ours" in which:
        sd = to_sana_layout(ref.state_dict())
        ours = LinearDiT(LinearDiTParams.infer(sd), attention=kernels.linear_attention).eval()
        ours.load_state_dict(sd, strict=True)
        models["ours"] = ours.to(device=device, dtype=dtype)
    models["diffusers"] = ref.to(device=device, dtype=dtype) if "diffusers" in which else None
    if "diffusers" not in which:
        del ref
    return models


def inputs(px, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, px // 8, px // 8, generator=g)
    cond = torch.randn(1, TEXT_LEN, 1024, generator=g)
    uncond = torch.randn(1, TEXT_LEN, 1024, generator=g)
    cm, um = torch.zeros(1, TEXT_LEN), torch.zeros(1, TEXT_LEN)
    cm[:, :COND_REAL], um[:, :UNCOND_REAL] = 1, 1
    d = lambda t: t.to(device)  # noqa: E731
    return d(x), d(cond), d(cm), d(uncond), d(um)


def step_fns(models, px, device, dtype):
    """Closures for one CFG step of each variant (state x in fp32, model in dtype)."""
    x, cond, cm, uncond, um = inputs(px, device, dtype)
    ours, ref = models.get("ours"), models.get("diffusers")
    ctx, mask = torch.cat([uncond, cond]).to(dtype), torch.cat([um, cm])
    t = torch.full((2,), 750.0, device=device)
    sig2 = torch.tensor([0.75, 0.7], device=device)
    fns = {}
    if ours is not None:
        fns["ours forward"] = lambda: ours(torch.cat([x, x]).to(dtype), t, ctx, attention_mask=mask)
        fns["ours step"] = lambda: sample_flow_euler_fast(ours, x, sig2, cond, cm, uncond, um, 4.5, dtype=dtype)
    if ref is not None:
        fns["diffusers"] = lambda: ref(torch.cat([x, x]).to(dtype), encoder_hidden_states=ctx,
                                       encoder_attention_mask=mask, timestep=t).sample
    return fns


def diffusers_loop(ref, x, cond, cm, uncond, um, steps, cfg, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps, device=x.device)
    ctx, mask = torch.cat([uncond, cond]).to(dtype), torch.cat([um, cm])
    for t in sched.timesteps:
        v = ref(torch.cat([x, x]).to(dtype), encoder_hidden_states=ctx, encoder_attention_mask=mask,
                timestep=t.expand(2)).sample.float()
        v_u, v_c = v.chunk(2)
        x = sched.step(v_u + cfg * (v_c - v_u), t, x).prev_sample
    return x


def ours_loop(ours, x, cond, cm, uncond, um, steps, cfg, dtype, **kw):
    return sample_flow_euler_fast(ours, x, flow_sigmas(steps, 3.0), cond, cm, uncond, um, cfg, dtype=dtype, **kw)


# --------------------------------------------------------------------------------------------------------------

def worker(spec):
    """Subprocess: peak RSS growth (KiB) of one step of one variant over the RSS with the model and inputs
    built (VmHWM reset first). Measured on the first call, so allocator caching cannot hide the working set."""
    models = build(False, "cpu", torch.float32, which=(spec["model"],))
    fn = step_fns(models, spec["px"], "cpu", torch.float32)[spec["variant"]]
    with torch.no_grad():
        print_rss_growth(fn)


def peak_rss(px, variant, repeats):
    """Peak-RSS growth (KiB) of one step, one reading per fresh process, ``repeats`` readings."""
    spec = dict(px=px, variant=variant, model="diffusers" if variant == "diffusers" else "ours")
    return fresh_process_kib(__file__, spec, repeats)


def main(args):
    report = Report()  # prints each line and keeps it for the results file, header first
    emit = report.emit
    if torch.cuda.is_available():
        from torch.utils.flop_counter import FlopCounterMode
        dev, dtype, name = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        emit(f"device: {name}  torch {torch.__version__}  kernels={kernels.kernel_mode()} "
             f"(triton: {kernels.use_triton(dev)}); full Waifu (hidden 2240, depth 20), random init, bf16")
        models = build(True, dev, dtype)
        emit(f"one CFG step (model batch 2), median of 10 (CUDA events); compute floor at "
             f"{(peak or float('nan')) / 1e12:.0f} TFLOP/s bf16 dense")
        emit(f"{'px':>5} {'N':>6} | {'variant':>13} {'ms':>8} {'%floor':>7} {'peak GiB':>9} | {'vs diffusers':>12}")
        with torch.no_grad():
            for px in args.sizes or (512, 768, 1024):
                fns = step_fns(models, px, dev, dtype)
                with FlopCounterMode(display=False) as fc:
                    fns["diffusers"]()
                floor_ms = fc.get_total_flops() / peak * 1e3 if peak else float("nan")
                res = {}
                for k, f in fns.items():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms = time_gpu(f)
                    res[k] = (ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 30)
                for k, (ms, gib) in res.items():
                    emit(f"{px:>5} {(px // 8) ** 2:>6} | {k:>13} {ms:>8.2f} {100 * floor_ms / ms:>6.1f}% {gib:>9.2f} | "
                         f"{res['diffusers'][0] / ms:>11.2f}x")
            emit(f"FLOPs per step counted on the diffusers forward at 1024: {fc.get_total_flops() / 1e12:.1f} TFLOP")
            emit("")
            emit("20-step 768² image (CFG 4.5), transformer loop only, median of 3")
            x, cond, cm, uncond, um = inputs(768, dev, dtype)
            loops = {
                "diffusers": lambda: diffusers_loop(models["diffusers"], x, cond, cm, uncond, um, 20, 4.5, dtype),
                "ours": lambda: ours_loop(models["ours"], x, cond, cm, uncond, um, 20, 4.5, dtype),
                "ours+graph": lambda: ours_loop(models["ours"], x, cond, cm, uncond, um, 20, 4.5, dtype,
                                                cuda_graph=True),
            }
            res = {k: time_gpu(f, reps=3, warm=1) for k, f in loops.items()}
            a, b = loops["ours"](), loops["diffusers"]()
            for k, ms in res.items():
                emit(f"{k:>12} {ms / 1e3:>7.3f} s   {res['diffusers'] / ms:>5.2f}x vs diffusers")
            emit(f"final latents, ours vs diffusers (bf16): max rel err "
                 f"{((a - b).abs().max() / b.abs().max()).item():.2e}")
    else:
        dtype = torch.float32
        emit(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)  "
             f"torch {torch.__version__}  kernels={kernels.kernel_mode()} (default path on CPU: eager torch)")
        emit("REDUCED Waifu: hidden 448 (14 heads x 32), depth 2, cross 4 x 112, caption 1024, fp32; text 512 padded "
             f"({COND_REAL} real cond tokens, {UNCOND_REAL} uncond); ratios only")
        models = build(False, "cpu", dtype)
        emit(f"time: min and median of {args.reps} interleaved repeats. alloc: peak tensor bytes live during one step "
             "(allocator records, torch.profiler; read twice, must repeat exactly). RSS: peak RSS growth of one step "
             f"(first call), one reading per fresh process, median [min-max] of {args.rss_repeats} (MiB)")
        emit(f"{'px':>5} {'N':>6} | {'variant':>13} | {'time/diffusers min':>18} {'(median)':>9} | "
             f"{'alloc MiB':>9} {'/diffusers':>10} | {'peak RSS MiB':>24} {'/diffusers':>10}")
        with torch.no_grad():
            for px in args.sizes or (128, 192, 256):
                fns = step_fns(models, px, "cpu", dtype)
                ts = min_median(time_interleaved(fns, args.reps), 1e3)   # (min, median) ms
                alloc = {k: [peak_alloc_bytes(f) for _ in range(2)] for k, f in fns.items()}
                repeats = all(a == b for a, b in alloc.values())
                rss = {k: peak_rss(px, k, args.rss_repeats) for k in fns} if args.rss_repeats else None
                for k in ("ours forward", "ours step", "diffusers"):
                    mem, ratio = "-", "-"
                    if rss:
                        mem = summary(rss[k], 1 / 1024)
                        ratio = f"{statistics.median(rss[k]) / max(statistics.median(rss['diffusers']), 1):.3f}"
                    emit(f"{px:>5} {(px // 8) ** 2:>6} | {k:>13} | {ts[k][0] / ts['diffusers'][0]:>18.3f} "
                         f"{ts[k][1] / ts['diffusers'][1]:>9.3f} | {alloc[k][0] / 2 ** 20:>9.1f} "
                         f"{alloc[k][0] / alloc['diffusers'][0]:>10.3f} | {mem:>24} {ratio:>10}")
                emit(f"{'':>14} alloc readings repeat exactly: {repeats}")
                emit(f"{'':>14} (abs min: ours forward {ts['ours forward'][0]:.1f} ms, ours step "
                     f"{ts['ours step'][0]:.1f} ms, diffusers {ts['diffusers'][0]:.1f} ms)")
            emit("")
            px, steps = args.loop_px, args.loop_steps
            emit(f"{steps}-step {px}² image (CFG 4.5), transformer loop only, {args.loop_reps} interleaved repeats")
            x, cond, cm, uncond, um = inputs(px, "cpu", dtype)
            loops = {
                "diffusers": lambda: diffusers_loop(models["diffusers"], x, cond, cm, uncond, um, steps, 4.5, dtype),
                "ours": lambda: ours_loop(models["ours"], x, cond, cm, uncond, um, steps, 4.5, dtype),
            }
            if args.compile:
                t0 = time.perf_counter()
                ours_loop(models["ours"], x, cond, cm, uncond, um, steps, 4.5, dtype, compile=True)
                emit(f"torch.compile (inductor) first call incl. compile: {time.perf_counter() - t0:.1f} s")
                loops["ours compiled"] = lambda: ours_loop(models["ours"], x, cond, cm, uncond, um, steps, 4.5, dtype,
                                                           compile=True)
            ts = min_median(time_interleaved(loops, args.loop_reps), 1e3)
            for k in loops:
                if k != "diffusers":
                    emit(f"{k} / diffusers: {ts[k][0] / ts['diffusers'][0]:.3f} (min), "
                         f"{ts[k][1] / ts['diffusers'][1]:.3f} (median)   (abs min {ts[k][0]:.0f} vs "
                         f"{ts['diffusers'][0]:.0f} ms)")
            a, b = loops["ours"](), loops["diffusers"]()
            emit(f"final latents ours vs diffusers, fp32: max rel err {((a - b).abs().max() / b.abs().max()).item():.2e}"
                 " (eps 1e-8 vs diffusers' 1e-15, trimmed text)")
    emit(load_note())
    write_results("waifu_step", report.lines, args.out)


def cli(argv=None):
    p = parser("waifu_step", __doc__)
    p.add_argument("--sizes", type=int, nargs="+", help="image sides in px (default CPU: 128 192 256; GPU: 512 768 1024)")
    p.add_argument("--reps", type=int, default=15, help="interleaved timing repeats per step variant (CPU)")
    p.add_argument("--rss-repeats", type=int, default=5, help="fresh-process peak-RSS readings per variant (CPU; 0 skips)")
    p.add_argument("--loop-px", type=int, default=128, help="image side of the whole-loop timing (CPU)")
    p.add_argument("--loop-steps", type=int, default=20, help="steps of the whole-loop timing (CPU)")
    p.add_argument("--loop-reps", type=int, default=5, help="interleaved repeats of the whole loop (CPU)")
    p.add_argument("--compile", action="store_true", help="also time sample_flow_euler_fast(compile=True) (CPU: "
                                                          "inductor; compiling takes minutes)")
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main(cli())
