"""Tiled VAE decoding with feathered seams, so large images decode in bounded memory.

Each tile is decoded on its own (its GroupNorm statistics are the tile's, as in every tiled decoder) and
blended into the canvas with linear ramps over the overlap, which hides the seams.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_plan(length: int, max_tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, starts) covering ``length`` with the fewest tiles of at most ``max_tile`` that overlap by at
    least ``overlap``, spread evenly so no work is wasted on a squeezed last tile."""
    if length <= max_tile:
        return length, [0]
    n = -(-(length - overlap) // (max_tile - overlap))
    size = -(-(length + (n - 1) * overlap) // n)
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def _ramp(n: int, fade_in: int, fade_out: int) -> torch.Tensor:
    w = torch.ones(n)
    if fade_in:
        w[:fade_in] = (torch.arange(fade_in) + 0.5) / fade_in
    if fade_out:
        w[n - fade_out:] = torch.minimum(w[n - fade_out:], (torch.arange(fade_out, 0, -1) - 0.5) / fade_out)
    return w


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile, overlap: int, in_scale: int = 1,
              out_scale: int = 8) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of x [B,C,H,W] and blend the results with feathered seams.

    The tiling is planned on a grid of cells: a cell is ``in_scale`` input pixels and ``out_scale`` output pixels
    (decode: 1 latent -> 8 pixels; encode: 8 pixels -> 1 latent). ``tile`` is (height, width) or one size, and
    ``overlap`` the overlap, in cells. ``fn`` returns channels-first [B,c,h,w]; the result is float32 on the
    device of the first tile.
    """
    th_max, tw_max = (tile, tile) if isinstance(tile, int) else tile
    if overlap * 2 > min(th_max, tw_max):
        raise ValueError(f"overlap {overlap} must be at most half the tile size {min(th_max, tw_max)}")
    B, _, H, W = x.shape
    H, W = H // in_scale, W // in_scale
    (th, ys), (tw, xs) = tile_plan(H, th_max, overlap), tile_plan(W, tw_max, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x).float()
    s, o = in_scale, out_scale
    out = weight = None
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            res = fn(x[:, :, y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s]).float()
            if out is None:
                out = torch.zeros(B, res.shape[1], H * o, W * o, device=res.device)
                weight = torch.zeros(1, 1, H * o, W * o, device=res.device)
            # Fade only where a neighbour overlaps this tile; the fade spans the actual overlap.
            top = (ys[yi - 1] + th - y0) * o if yi > 0 else 0
            bottom = (y0 + th - ys[yi + 1]) * o if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tw - x0) * o if xi > 0 else 0
            right = (x0 + tw - xs[xi + 1]) * o if xi + 1 < len(xs) else 0
            w = (_ramp(th * o, top, bottom)[:, None] * _ramp(tw * o, left, right)[None]).to(res.device)
            ys_, xs_ = slice(y0 * o, (y0 + th) * o), slice(x0 * o, (x0 + tw) * o)
            out[:, :, ys_, xs_] += res * w
            weight[:, :, ys_, xs_] += w
    return out / weight


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int,
                 scale: int = 8) -> torch.Tensor:
    """Decode latents z [B,C,H,W] in tiles of ``tile`` latent pixels overlapping by ``overlap`` (run_tiled)."""
    return run_tiled(decode, z, tile, overlap, 1, scale)


def seam_mask(H: int, W: int, tile: int, overlap: int, scale: int = 8, margin: int = 0) -> torch.Tensor:
    """Bool [H*scale, W*scale]: True away from the overlap bands (plus ``margin`` pixels) of a tiling."""
    keep = torch.ones(H * scale, W * scale, dtype=torch.bool)
    for axis, length in ((0, H), (1, W)):
        size, starts = tile_plan(length, tile, overlap)
        for a, b in zip(starts, starts[1:]):
            lo, hi = b * scale - margin, (a + size) * scale + margin
            if axis == 0:
                keep[max(lo, 0):hi] = False
            else:
                keep[:, max(lo, 0):hi] = False
    return keep
