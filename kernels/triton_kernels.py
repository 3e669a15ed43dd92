"""Triton kernels (inference only): two-phase ReLU linear attention and the fused CFG + flow-Euler update.

Written for this pack after reading the math of diffusers' ``SanaLinearAttnProcessor2_0`` and the design notes in
NVlabs/Sana ``fastlinear`` (token-major views of the qkv GEMM output, fp32 state); no code is copied.

Linear attention, per (batch, head), D = head dim:
  phase 1 ``_la_state``: grid (B*H, SPLIT). Each program reduces one contiguous N-chunk to partial
           S = relu(K)^T V [D, D] and z = sum relu(K) [D] in fp32 and writes them to a workspace.
  phase 2 ``_la_apply``: grid (B*H, N-chunks). Each program sums the SPLIT partials in a fixed order, then for
           its tokens writes relu(q) S / (relu(q) . z + eps) into [B, N, H, D] (= [B, N, C], what proj wants).
No atomics, and a reduction order fixed by the shape alone: phase 1 accumulates in tiles of ``RED_N`` (64) tokens,
in token order, whatever BLOCK_N the autotuner picked (BLOCK_N only sets how many such tiles one loop iteration
loads); phase 2 reduces over the head dim only, per token. So the tuned config, which autotune picks by timing and
can differ between processes, does not change the result: bitwise reproducible across runs and processes for the
same shapes, dtypes, device model (the split follows the SM count) and Triton version (its dot lowering).
tests/test_kernels.py checks this in the interpreter with every BLOCK_N of the tuning space.

Importing this module registers the ops ``waifu::relu_linear_attention`` and ``waifu::cfg_euler`` with
torch.library (with fake impls) so torch.compile traces them as single nodes.

``TRITON_INTERPRET=1`` must be set before this module (and triton) is imported to run the kernels on CPU; in
the interpreter autotuning is bypassed (fixed configs) and every load is upcast to fp32 at once, because the
interpreter computes raw bf16 arithmetic wrongly (triton-lang/triton#11584).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tokens per split / per apply program are multiples of this, so every autotuned BLOCK_N (<= 256) divides them
# and no tile straddles two chunks.
_CHUNK_UNIT = 256
# Phase 1's reduction tile: fixed, so the summation order does not follow the autotuned BLOCK_N (a multiple of it).
RED_N = 64
BLOCK_CHOICES = (64, 128, 256)
_MAX_SPLIT = 8
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs power-of-two tiles >= 16


@triton.jit
def _la_state(k_ptr, v_ptr, s_ptr, z_ptr, N, H, CHUNK,
              skb, skn, skh, skd, svb, svn, svh, svd,
              D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr, RED: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, N)
    acc = tl.zeros((D, D), dtype=tl.float32)
    zacc = tl.zeros((D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        # RED-token tiles in token order, whatever BLOCK_N is: the same additions in the same order for every config.
        for j in tl.static_range(BLOCK_N // RED):
            offs_n = n0 + j * RED + tl.arange(0, RED)
            m = (offs_n < end)[:, None]
            rows = offs_n.to(tl.int64)[:, None]
            kt = tl.load(k_base + rows * skn + offs_d[None, :] * skd, mask=m, other=0.0)
            vt = tl.load(v_base + rows * svn + offs_d[None, :] * svd, mask=m, other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            kt = tl.maximum(kt, 0.0)
            # bf16/fp16 operands: the products are exact in the fp32 accumulator (tensor cores on GPU).
            acc = tl.dot(tl.trans(kt), vt, acc, input_precision=PREC)
            zacc += tl.sum(kt.to(tl.float32), axis=0)
    ws = (pid_bh * SPLIT + pid_s).to(tl.int64)
    tl.store(s_ptr + ws * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
    tl.store(z_ptr + ws * D + offs_d, zacc)


@triton.jit
def _la_apply(q_ptr, s_ptr, z_ptr, o_ptr, N, H, CHUNK, eps,
              sqb, sqn, sqh, sqd, sob, son, soh, sod,
              D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    # Fixed-order reduction of the phase-1 partials (deterministic; tiny, L2-resident).
    ws0 = (pid_bh * SPLIT).to(tl.int64)
    S = tl.zeros((D, D), dtype=tl.float32)
    z = tl.zeros((D,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        S += tl.load(s_ptr + (ws0 + s) * D * D + offs_d[:, None] * D + offs_d[None, :])
        z += tl.load(z_ptr + (ws0 + s) * D + offs_d)
    q_base = q_ptr + b * sqb + h * sqh
    o_base = o_ptr + b * sob + h * soh
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = (offs_n < end)[:, None]
        rows = offs_n.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * sqn + offs_d[None, :] * sqd, mask=m, other=0.0).to(tl.float32)
        q = tl.maximum(q, 0.0)
        num = tl.dot(q, S, input_precision=PREC)
        den = tl.sum(q * z[None, :], axis=1)
        out = num / (den + eps)[:, None]   # relu(q) == 0 gives 0 / eps = 0, not NaN
        tl.store(o_base + rows * son + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cfg_euler(x_ptr, v_ptr, sig_ptr, i_ptr, xn_ptr, x0_ptr, numel, g,
               GUIDED: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    i = tl.load(i_ptr)
    s0 = tl.load(sig_ptr + i)
    s1 = tl.load(sig_ptr + i + 1)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if GUIDED:
        vu = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        vc = tl.load(v_ptr + numel + offs, mask=m, other=0.0).to(tl.float32)
        v = vu + g * (vc - vu)
    else:
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(xn_ptr + offs, x + (s1 - s0) * v, mask=m)
    if WRITE_X0:
        tl.store(x0_ptr + offs, x - s0 * v, mask=m)


def _configs(blocks, warps, stages):
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn in blocks for w in warps for s in stages]


if INTERPRET:
    # @triton.autotune does not run in the interpreter: fixed configs.
    _STATE_FIXED = {"BLOCK_N": 64}
    _APPLY_FIXED = {"BLOCK_N": 64}
    _la_state_run, _la_apply_run = _la_state, _la_apply
else:
    _STATE_FIXED = _APPLY_FIXED = {}
    # Keyed on the shape and (implicitly) the dtypes; run it before CUDA-graph capture (the loop warms up).
    _la_state_run = triton.autotune(_configs(BLOCK_CHOICES, (2, 4, 8), (2, 3, 4)),
                                    key=["N", "H", "D", "SPLIT"])(_la_state)
    _la_apply_run = triton.autotune(_configs(BLOCK_CHOICES, (4, 8), (2, 3)),
                                    key=["N", "H", "D", "SPLIT"])(_la_apply)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                            split: int | None = None) -> torch.Tensor:
    """Token-major [B, N, H, D] views (any strides, e.g. ``qkv.view(B, N, 3, H, D).unbind(2)``) -> contiguous
    [B, N, H, D] in q's dtype. ``split`` forces the number of phase-1 N-chunks (tests)."""
    B, N, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported by the Triton kernel (need one of {SUPPORTED_HEAD_DIMS})")
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    if N == 0 or B == 0:
        return out
    units = triton.cdiv(N, _CHUNK_UNIT)
    if split is None:
        # Enough programs to fill the GPU twice over when B*H is small; at Waifu's B*H = 140 this is 2 on H100.
        split = min(_MAX_SPLIT, triton.cdiv(2 * _num_sms(q.device), B * H))
    split = max(1, min(split, units))
    chunk = triton.cdiv(units, split) * _CHUNK_UNIT
    split = triton.cdiv(N, chunk)
    ws_s = torch.empty((B * H * split * D * D,), dtype=torch.float32, device=q.device)
    ws_z = torch.empty((B * H * split * D,), dtype=torch.float32, device=q.device)
    half = q.dtype in (torch.float16, torch.bfloat16)
    # Interpreter: fp32 everywhere, exact dots. GPU: half operands on tensor cores for K^T V; q . S keeps S in
    # fp32 (tf32x3 ~ fp32 accuracy) for half inputs and full IEEE fp32 for fp32 inputs.
    upcast = INTERPRET
    state_prec = "ieee" if (INTERPRET or not half) else "tf32"  # ignored for half operands
    apply_prec = "ieee" if (INTERPRET or not half) else "tf32x3"
    _la_state_run[(B * H, split)](
        k, v, ws_s, ws_z, N, H, chunk, *k.stride(), *v.stride(),
        D=D, SPLIT=split, UPCAST=upcast, PREC=state_prec, RED=RED_N, **_STATE_FIXED)
    chunk2 = 2 * _CHUNK_UNIT
    _la_apply_run[(B * H, triton.cdiv(N, chunk2))](
        q, ws_s, ws_z, out, N, H, chunk2, float(eps), *q.stride(), *out.stride(),
        D=D, SPLIT=split, PREC=apply_prec, **_APPLY_FIXED)
    return out


def cfg_euler_triton(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: torch.Tensor, cfg: float,
                     want_x0: bool = False):
    """Triton twin of :func:`kernels.eager.cfg_euler` (one launch, sigma and index read on device)."""
    x = x.contiguous()
    v = v.contiguous()
    guided = v.shape[0] == 2 * x.shape[0]
    if not guided and v.shape != x.shape:
        raise ValueError(f"v {tuple(v.shape)} is neither x's shape {tuple(x.shape)} nor [uncond; cond]")
    x_next = torch.empty_like(x, dtype=torch.float32)
    x0 = torch.empty_like(x_next) if want_x0 else x_next
    numel = x.numel()
    block = 1024
    _cfg_euler[(triton.cdiv(numel, block),)](x, v, sigmas.float().contiguous(), i.reshape(1), x_next, x0, numel,
                                             float(cfg), GUIDED=guided, WRITE_X0=want_x0, BLOCK=block)
    return x_next, (x0 if want_x0 else None)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: opaque single nodes for torch.compile (Dynamo cannot trace into a Triton launch with
# autotuning and a Python heuristic; a custom op with a fake impl is traced without graph breaks).

@torch.library.custom_op("waifu::relu_linear_attention", mutates_args=())
def relu_linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return linear_attention_triton(q, k, v, eps)


@relu_linear_attention_op.register_fake
def _(q, k, v, eps):
    return q.new_empty(q.shape)


@torch.library.custom_op("waifu::cfg_euler", mutates_args=())
def cfg_euler_op(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: torch.Tensor, cfg: float,
                 want_x0: bool) -> list[torch.Tensor]:
    x_next, x0 = cfg_euler_triton(x, v, sigmas, i, cfg, want_x0)
    return [x_next, x0] if want_x0 else [x_next]


@cfg_euler_op.register_fake
def _(x, v, sigmas, i, cfg, want_x0):
    x_next = x.new_empty(x.shape, dtype=torch.float32)
    return [x_next, x.new_empty(x.shape, dtype=torch.float32)] if want_x0 else [x_next]
