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


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int,
                 scale: int = 8) -> torch.Tensor:
    """Decode latents z [B,C,H,W] in tiles of ``tile`` latent pixels overlapping by ``overlap``.

    ``decode(z_tile)`` returns channels-first pixels [B,c,h*scale,w*scale]; the result has the same layout,
    float32, on the device of the first decoded tile.
    """
    if overlap * 2 > tile:
        raise ValueError(f"overlap {overlap} must be at most half the tile size {tile}")
    B, _, H, W = z.shape
    (th_, ys), (tw_, xs) = tile_plan(H, tile, overlap), tile_plan(W, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return decode(z).float()
    out = weight = None
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            th, tw = th_, tw_
            pix = decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = torch.zeros(B, pix.shape[1], H * scale, W * scale, device=pix.device)
                weight = torch.zeros(1, 1, H * scale, W * scale, device=pix.device)
            # Fade only where a neighbour overlaps this tile; the fade spans the actual overlap.
            top = (ys[yi - 1] + th - y0) * scale if yi > 0 else 0
            bottom = (y0 + th - ys[yi + 1]) * scale if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tw - x0) * scale if xi > 0 else 0
            right = (x0 + tw - xs[xi + 1]) * scale if xi + 1 < len(xs) else 0
            w = (_ramp(th * scale, top, bottom)[:, None] * _ramp(tw * scale, left, right)[None]).to(pix.device)
            ys_, xs_ = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, ys_, xs_] += pix * w
            weight[:, :, ys_, xs_] += w
    return out / weight


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
