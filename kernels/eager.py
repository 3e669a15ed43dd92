"""Eager (pure torch) twins of the Triton kernels: same semantics, used on CPU/MPS, without Triton, and as the
test oracle for the kernels. Nothing here synchronises with the host."""
from __future__ import annotations

from typing import Optional

import torch


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """ReLU linear attention on token-major [B, N, heads, dim] tensors (strided views are fine):
    O_n = (sum_m v_m relu(k_m)^T) relu(q_n) / (relu(q_n) . sum_m relu(k_m) + eps).
    Sums over all tokens overflow half precision, so it always accumulates in fp32. Returns a contiguous
    [B, N, heads, dim] tensor in q's dtype (relu(q) == 0 gives 0).

    Laid out for the CPU: each of q, k, v is copied once into a head-major fp32 buffer with the ReLU fused into
    that copy (F.relu on the strided qkv views is several times slower), the state [S | z] is one [dim, dim+1]
    matrix per head so numerator and denominator come out of one batched GEMM (Sana's pad trick, without
    materialising a padded V), and the divide writes straight into the token-major output."""
    B, N, H, D = q.shape
    refuse_autograd(q, k, v)
    kh = _relu_head_major(k)
    vh = torch.empty(kh.shape, dtype=torch.float32, device=v.device)
    vh.copy_(v.transpose(1, 2))
    state = torch.cat([torch.matmul(kh.transpose(-1, -2), vh), kh.sum(2).unsqueeze(-1)], -1)  # [B, H, D, D+1]
    del kh, vh
    o = torch.matmul(_relu_head_major(q), state)                                              # [B, H, N, D+1]
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    if q.dtype == torch.float32:
        torch.div(o[..., :D], o[..., D:] + eps, out=out.transpose(1, 2))
    else:  # out= must match the fp32 result dtype
        out.transpose(1, 2).copy_(o[..., :D] / (o[..., D:] + eps))
    return out


def refuse_autograd(*tensors: torch.Tensor) -> None:
    """The kernels are for inference (out= ops and Triton launches have no autograd); a gradient through them is
    refused in words instead of failing inside an op. LinearDiT runs its own plain formula when one flows."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("kernels.linear_attention is inference-only (no autograd); for gradients use "
                           "waifukit.waifu.dit.relu_linear_attention (LinearDiT switches to it by itself)")


def _relu_head_major(t: torch.Tensor) -> torch.Tensor:
    """relu(t) as a contiguous fp32 [B, heads, N, dim] buffer, in one pass for fp32 input."""
    B, N, H, D = t.shape
    out = torch.empty((B, H, N, D), dtype=torch.float32, device=t.device)
    if t.dtype == torch.float32:
        torch.clamp_min(t.transpose(1, 2), 0, out=out)
    else:  # clamp_min(out=) wants out in the input dtype: upcast (exact), then clamp in place
        out.copy_(t.transpose(1, 2))
        out.clamp_min_(0)
    return out


def cfg_euler(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: torch.Tensor, cfg: float,
              want_x0: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One flow-Euler step with classifier-free guidance, sigma and step index read on the device.

    x [B, ...] fp32; v [2B, ...] ordered [uncond, cond] (guided with ``cfg``) or [B, ...] (used as is);
    i a 1-element int64 tensor on x's device. Returns (x + (s[i+1] - s[i]) * v, x - s[i] * v or None), in the
    op order of :func:`waifukit.flow.sample_flow_euler`, so the fp32 result is bitwise the same."""
    # index_select with a device index never reads the index back to the host (plain indexing may).
    i = i.reshape(1)
    s0 = sigmas.index_select(0, i)
    s1 = sigmas.index_select(0, i + 1)
    v = v.float()
    if v.shape[0] == 2 * x.shape[0]:
        v_u, v_c = v.chunk(2)
        v = v_u + cfg * (v_c - v_u)
    x_next = x + (s1 - s0) * v
    return x_next, (x - s0 * v) if want_x0 else None
