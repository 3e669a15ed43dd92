"""The fast flow-Euler loop: same schedule, CFG and result as :func:`waifukit.flow.sample_flow_euler`, with the
per-image work hoisted out of the step and the step made sync-free (so it can be CUDA-graph captured).

What it does differently from the eager sampler (all exact, up to fp rounding order):
- the caption projection, its norm, the mask bias and every block's cross-attention K/V are computed once per
  image (``LinearDiT.encode_context``), not once per step;
- padded text tokens after the last real token of the longest prompt in the batch are dropped (padded keys get a
  -10000 bias, i.e. a softmax weight of exactly 0 in fp32/bf16; a batch with an all-padding row is not trimmed);
- sigma and the step index stay on the device; guidance + Euler update is one fused op
  (``kernels.cfg_euler``: Triton on CUDA, torch ops elsewhere);
- optional ``torch.compile`` of the step and optional CUDA-graph capture of one step (CUDA, static shapes; the
  model must be fully resident, i.e. not ComfyUI low-VRAM partial loading).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import cfg_euler


def _keep_len(mask: Optional[torch.Tensor]) -> Optional[int]:
    """Text length to keep (last real token of any row, >= 1), or None when trimming is not exact/possible."""
    if mask is None:
        return None
    m = mask[:, 0] if mask.ndim == 3 and mask.shape[1] == 1 else mask
    real = m != 0
    if real.ndim != 2 or not bool(real.any(dim=1).all()):
        return None
    pos = torch.arange(1, real.shape[1] + 1, device=real.device)
    return max(1, int((real * pos).amax()))


def trim_padding(context: torch.Tensor, mask: Optional[torch.Tensor]):
    """Drop the text positions after the last real token of any row (at least one kept). Runs once per image
    (one host read of the mask). Returns (context, mask) unchanged if there is no mask or a row has no real token
    (softmax over only-masked keys is uniform over all of them, so trimming would change it)."""
    keep = _keep_len(mask)
    if keep is None:
        return context, mask
    m = mask[:, 0] if mask.ndim == 3 and mask.shape[1] == 1 else mask
    return context[:, :keep], m[:, :keep]


def token_mask(context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The [B, L] mask that goes with ``context`` [B, L, D]: all ones when absent; extended with ones when the
    context is longer (ComfyUI's ConditioningConcat appends tokens and keeps the first conditioning's mask; the
    MEXMA-SigLIP encoder emits prompts at their own length, so appended tokens are real ones)."""
    B, L = context.shape[:2]
    if mask is None:
        return torch.ones((B, L), dtype=torch.long, device=context.device)
    if mask.ndim == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 2 or mask.shape[1] > L or mask.shape[0] not in (1, B):
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not fit the conditioning {tuple(context.shape)}")
    if mask.shape[1] < L:
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], L - mask.shape[1]))], dim=1)
    return mask


def pad_tokens(context: torch.Tensor, mask: torch.Tensor, length: int):
    """``context``/``mask`` padded on the right to ``length`` tokens with zeros (masked: -10000 bias, softmax
    weight exactly 0), so prompts of different lengths share one batch with the result of separate ones."""
    extra = length - context.shape[1]
    if extra <= 0:
        return context, mask
    context = torch.cat([context, context.new_zeros((context.shape[0], extra, *context.shape[2:]))], dim=1)
    return context, torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], dim=1)


def sample_flow_euler_fast(dit: torch.nn.Module, x: torch.Tensor, sigmas: torch.Tensor,
                           cond: torch.Tensor, cond_mask: Optional[torch.Tensor],
                           uncond: Optional[torch.Tensor] = None, uncond_mask: Optional[torch.Tensor] = None,
                           cfg: float = 1.0,
                           callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                           compile: bool = False, cuda_graph: bool = False,
                           interrupt: Optional[Callable[[], None]] = None,
                           dtype: Optional[torch.dtype] = None, trim: bool = True,
                           inpaint: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                           timestep_scale: float = 1000.0) -> torch.Tensor:
    """Euler over ``sigmas`` from x at sigmas[0]; returns x (fp32) at sigmas[-1].

    Same arguments and semantics as :func:`waifukit.flow.sample_flow_euler`, with the model object instead of a
    ``model_fn`` (a ``waifukit.waifu.dit.LinearDiT``, used through ``encode_context``, ``dtype`` and
    ``forward(..., kv_cache=)``: this package imports no model code): CFG as one [uncond, cond] batch, v = v_u + cfg (v_c - v_u), cfg == 1 skips the unconditional
    half, state in fp32. ``callback(i, x0_estimate, x_next)`` and ``interrupt()`` (which may raise to stop) run every
    step. ``dtype`` is the model's compute dtype (default: the weights' dtype); inputs are cast to it like the
    ComfyUI node's ``model_fn`` does. ``cuda_graph`` is ignored off CUDA.

    ``inpaint = (mask, noise, latent)`` (all shaped like x; latent in model space) is ComfyUI's noise_mask
    convention (comfy/samplers.py ``KSamplerX0Inpaint`` around k-diffusion's ``sample_euler``): where mask is 0
    the model sees the input latent re-noised to the current sigma and its x0 estimate is replaced by the
    latent; the Euler step then runs on the unblended state. ``timestep_scale`` is the model sampling's
    multiplier (the DiT sees multiplier * sigma)."""
    use_cfg = uncond is not None and cfg != 1.0
    if use_cfg:
        if cond_mask is not None or uncond_mask is not None or cond.shape[1] != uncond.shape[1]:
            # Prompts encoded at their own lengths: one [uncond, cond] batch, the shorter padded and masked.
            cond_mask, uncond_mask = token_mask(cond, cond_mask), token_mask(uncond, uncond_mask)
            n = max(cond.shape[1], uncond.shape[1])
            cond, cond_mask = pad_tokens(cond, cond_mask, n)
            uncond, uncond_mask = pad_tokens(uncond, uncond_mask, n)
        mask = None if cond_mask is None else torch.cat([uncond_mask, cond_mask])
        # Trim before concatenating: the padded [2B, 512, 1024] caption batch is never materialised.
        keep = _keep_len(mask) if trim else None
        if keep is not None:
            uncond, cond, mask = uncond[:, :keep], cond[:, :keep], mask[..., :keep]
        context = torch.cat([uncond, cond])
    else:
        context, mask = cond, cond_mask
    device = x.device
    dtype = dtype or dit.dtype
    x = x.float()
    sig = sigmas.to(device=device, dtype=torch.float32).contiguous()
    steps = sig.numel() - 1
    if trim:
        context, mask = trim_padding(context, mask)
    want_x0 = callback is not None
    batch = 2 * x.shape[0] if use_cfg else x.shape[0]
    if inpaint is not None:
        inp_mask, inp_noise, inp_latent = (t.to(device=device, dtype=torch.float32) for t in inpaint)
        keep = 1.0 - inp_mask

    with torch.no_grad():
        cache = dit.encode_context(context.to(device), None if mask is None else mask.to(device), dtype=dtype)

        def step(x_cur: torch.Tensor, i: torch.Tensor):
            s = sig.index_select(0, i)                    # device-side: no .item()
            x_model = x_cur
            if inpaint is not None:
                x_model = x_cur * inp_mask + (s * inp_noise + (1.0 - s) * inp_latent) * keep
            x_in = torch.cat([x_model, x_model]) if use_cfg else x_model
            t = (s * timestep_scale).expand(batch)
            v = dit(x_in.to(dtype), t, None, kv_cache=cache)
            if inpaint is None:
                return cfg_euler(x_cur, v, sig, i, cfg, want_x0)
            _, x0 = cfg_euler(x_model, v, sig, i, cfg, True)
            x0 = x0 * inp_mask + inp_latent * keep
            # k-diffusion's Euler: d = (x - x0) / sigma on the loop state, not on the blended model input.
            x_next = x_cur + (x_cur - x0) / s * (sig.index_select(0, i + 1) - s)
            return x_next, x0

        step_fn = torch.compile(step, dynamic=False) if compile else step
        i_dev = torch.zeros(1, dtype=torch.long, device=device)

        if cuda_graph and device.type == "cuda" and steps > 0:
            return _run_graphed(step_fn, x, i_dev, steps, callback, interrupt)

        for i in range(steps):
            if interrupt is not None:
                interrupt()
            x_next, x0 = step_fn(x, i_dev)
            if callback is not None:
                callback(i, x0, x_next)
            x = x_next
            i_dev.add_(1)                                 # in-place on device, read by the next step
        return x


def _run_graphed(step_fn, x, i_dev, steps, callback, interrupt):
    """Capture one step (including the state update) in a CUDA graph and replay it ``steps`` times."""
    static_x = x.clone()
    # Warm up on a side stream (Triton autotuning, compile, cuBLAS workspaces) before capture; the step is pure.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step_fn(static_x, i_dev)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_next, x0 = step_fn(static_x, i_dev)
        static_x.copy_(x_next)
        i_dev.add_(1)
    for i in range(steps):
        if interrupt is not None:
            interrupt()
        graph.replay()
        if callback is not None:
            # The buffers are overwritten by the next replay: hand out copies, as the eager loop hands out new tensors.
            callback(i, x0.clone(), static_x.clone())
    return static_x.clone()
