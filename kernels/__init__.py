"""The fast path behind LinearDiTSampler: kernel dispatch (Triton on CUDA when importable, the eager torch twins
everywhere else) and, in ``kernels.fused``, the fused flow-Euler loop. Pure torch/triton, for inference; it imports
no model code (the model receives ``linear_attention`` as its ``attention`` op).

``WAIFU_KERNELS`` (read at every call) picks the path:
  ``auto`` (default)  Triton for CUDA tensors if ``triton`` imports, else eager;
  ``eager``           always the pure-torch twins;
  ``triton``          always Triton (on CPU only with ``TRITON_INTERPRET=1`` set before import; slow, for tests).
                      What Triton cannot run is refused with an error that says what to set, never swapped for
                      the eager twin: CPU tensors without TRITON_INTERPRET, and head dims other than
                      ``TRITON_HEAD_DIMS`` (``auto`` runs the eager twin for those).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import eager
from .eager import cfg_euler as cfg_euler_eager
from .eager import linear_attention as linear_attention_eager

_MODES = ("auto", "eager", "triton")
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # what the linear-attention kernel's block sizes cover
_triton_mod = None
_triton_error: Optional[BaseException] = None
# Set when a Triton kernel failed at run time (e.g. it does not compile on this GPU or Triton version): auto mode
# then stays on the eager twins for the rest of the process instead of failing every prompt.
_triton_failed: Optional[BaseException] = None


def kernel_mode() -> str:
    mode = os.environ.get("WAIFU_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"WAIFU_KERNELS={mode!r}; use one of {', '.join(_MODES)}")
    return mode


def load_triton():
    """The Triton module, or None if triton cannot be imported (the error is kept for ``use_triton``)."""
    global _triton_mod, _triton_error
    if _triton_mod is None and _triton_error is None:
        try:
            from . import triton_kernels as mod
            _triton_mod = mod
        except Exception as e:  # ImportError, or a broken triton install
            _triton_error = e
    return _triton_mod


def use_triton(device: torch.device) -> bool:
    mode = kernel_mode()
    if mode == "eager":
        return False
    if mode == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            # Triton itself would fail with "0 active drivers".
            raise RuntimeError(f"WAIFU_KERNELS=triton, but these tensors are on {device.type} and Triton runs on CUDA "
                               "GPUs only. Unset WAIFU_KERNELS (or set it to auto or eager) to use the eager kernels; "
                               "for tests on a CPU, set TRITON_INTERPRET=1 before starting Python.")
        if load_triton() is None:
            raise RuntimeError(f"WAIFU_KERNELS=triton but triton cannot be imported: {_triton_error!r}. Install "
                               "triton, or set WAIFU_KERNELS=auto (or eager) to use the eager kernels.")
        return True
    return device.type == "cuda" and _triton_failed is None and load_triton() is not None


def _guarded(fast, slow):
    global _triton_failed
    try:
        return fast()
    except Exception as e:
        if kernel_mode() == "triton":
            raise
        _triton_failed = e
        logging.warning("comfyui-waifu: Triton kernel failed (%r); using the eager kernels from now on "
                        "(set WAIFU_KERNELS=eager to skip Triton)", e)
        return slow()


def _triton_linear_attention(q, k, v, eps):
    return torch.ops.waifu.relu_linear_attention(q, k, v, float(eps))


def _triton_cfg_euler(x, v, sigmas, i, cfg, want_x0):
    return torch.ops.waifu.cfg_euler(x, v, sigmas, i, float(cfg), bool(want_x0))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """ReLU linear attention on token-major [B, N, heads, dim] views (strided views of the qkv output are fine);
    returns [B, N, heads, dim] in q's dtype. fp32 state and divide on both paths. Inference only (the eager twin
    refuses a gradient itself; the Triton path is checked here)."""
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        if kernel_mode() == "triton":
            raise RuntimeError(f"WAIFU_KERNELS=triton: the Triton linear-attention kernel takes head dims "
                               f"{', '.join(map(str, TRITON_HEAD_DIMS))}; this model has {q.shape[-1]}. Set "
                               "WAIFU_KERNELS=auto to run the eager kernel for it.")
        return linear_attention_eager(q, k, v, eps)
    if use_triton(q.device):
        eager.refuse_autograd(q, k, v)
        return _guarded(lambda: _triton_linear_attention(q, k, v, eps), lambda: linear_attention_eager(q, k, v, eps))
    return linear_attention_eager(q, k, v, eps)


def cfg_euler(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: torch.Tensor, cfg: float,
              want_x0: bool = False):
    """x_next = x + (s[i+1] - s[i]) * (v_u + cfg (v_c - v_u)), and x0 = x - s[i] * v if ``want_x0``;
    ``sigmas`` and the step index ``i`` (1-element int64) live on x's device: no host sync."""
    if use_triton(x.device):
        def fast():
            outs = _triton_cfg_euler(x, v, sigmas, i, cfg, want_x0)
            return outs[0], (outs[1] if want_x0 else None)
        return _guarded(fast, lambda: cfg_euler_eager(x, v, sigmas, i, cfg, want_x0))
    return cfg_euler_eager(x, v, sigmas, i, cfg, want_x0)


__all__ = ["kernel_mode", "use_triton", "load_triton", "linear_attention", "cfg_euler",
           "linear_attention_eager", "cfg_euler_eager", "eager"]
