"""Preview factors fitted from a VAE, and tiled decoding (pure torch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from waifukit.preview import fit_latent_rgb
from waifukit.tiling import decode_tiled, seam_mask, tile_plan

ROOT = Path(__file__).resolve().parent.parent


def test_fit_recovers_an_affine_decoder_exactly():
    torch.manual_seed(0)
    A, b = torch.randn(16, 3) * 0.3, torch.randn(3) * 0.1

    def decode(raw):  # an "ideal" VAE: every pixel is an affine function of its latent
        x = (raw * 0.18215).movedim(1, -1)
        return (x @ A + b).movedim(-1, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)

    factors, bias = fit_latent_rgb(decode, 16, 0.18215)
    assert np.allclose(factors, A.numpy(), atol=1e-5) and np.allclose(bias, b.numpy(), atol=1e-5)


def test_tile_plan_covers_with_the_requested_overlap():
    for length in (64, 129, 256, 300, 1000):
        size, starts = tile_plan(length, 128, 16)
        assert size <= 128 and starts[0] == 0 and starts[-1] + size == length
        assert all(a + size - b >= 16 for a, b in zip(starts, starts[1:]))


def test_tiled_decode_of_a_local_decoder_is_exact():
    """A decoder without global statistics (a pointwise upsampler) tiles with no error at all."""
    z = torch.randn(1, 4, 40, 56)
    dec = lambda t: torch.tanh(t[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)  # noqa: E731
    assert torch.allclose(decode_tiled(dec, z, 16, 4), dec(z), atol=1e-6)


BUDGET_MIB = 1536  # stated budget for a 2048x2048 tiled decode of the test VAE on CPU, above the baseline


def _decode_in_subprocess(tmp_path, tiled: bool):
    script = f"""
import json, resource, sys, torch, numpy as np
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from fixtures.waifu_snapshot import tiny_vae
from waifukit.vae16.autoencoder import AutoencoderKL, AutoencoderKLParams
from waifukit.tiling import decode_tiled
ref = tiny_vae(3)
vae = AutoencoderKL(AutoencoderKLParams.from_diffusers_config(ref.config)).eval()
vae.load_state_dict(ref.state_dict()); del ref
z = torch.randn(1, 16, 256, 256, generator=torch.Generator().manual_seed(0)) * 3.0
torch.set_num_threads(2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    out = decode_tiled(vae.decode, z, 160, 16) if {tiled} else vae.decode(z)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save({str(tmp_path / ('tiled.npy' if tiled else 'full.npy'))!r}, ((out.clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
print(json.dumps({{"peak_mib": (peak - base) / 1024}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.slow
def test_2048px_tiled_decode_under_budget_and_matches_untiled(tmp_path):
    tiled_mib = _decode_in_subprocess(tmp_path, True)
    full_mib = _decode_in_subprocess(tmp_path, False)
    print(f"2048x2048 decode peak above baseline: tiled {tiled_mib:.0f} MiB, untiled {full_mib:.0f} MiB")
    assert tiled_mib < BUDGET_MIB and tiled_mib < full_mib
    tiled, full = np.load(tmp_path / "tiled.npy"), np.load(tmp_path / "full.npy")
    keep = seam_mask(256, 256, 160, 16).numpy()
    diff = np.abs(tiled.astype(float) - full.astype(float))[0][:, keep]
    print(f"tiled vs untiled away from seams: mean {diff.mean():.2f}/255")
    assert diff.mean() <= 2.0, f"{diff.mean():.2f}/255 away from seams"
