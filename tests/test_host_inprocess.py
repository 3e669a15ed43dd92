"""ComfyUI glue checked in-process (ComfyUI imported the way it loads custom nodes), in a subprocess so the
host's global state stays out of the other tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from setup_comfyui import comfyui_path  # noqa: E402

pytestmark = pytest.mark.host

PRELUDE = f"""
import importlib.util, sys, torch
sys.path.insert(0, {str(comfyui_path())!r})
from comfy.cli_args import args
args.cpu = True
spec = importlib.util.spec_from_file_location("waifu_pack", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["waifu_pack"] = pack; spec.loader.exec_module(pack)
"""


def run(script: str) -> str:
    res = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=300,
                         cwd=comfyui_path())
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout + res.stderr


def test_fp16_vae_decode_that_overflows_is_redone_in_fp32():
    out = run("""
from waifu_pack.nodes.vae16_host import AuraVAE

class Overflowing(torch.nn.Module):
    # Decodes to NaN whenever its weights are fp16, as an overflowing fp16 VAE does.
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((1,), 0.5))
    def decode(self, z):
        pix = z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3) * self.w
        return pix * float("nan") if self.w.dtype == torch.float16 else pix

vae = AuraVAE(Overflowing(), 16, "overflowing.safetensors", torch.float16)
z = torch.randn(1, 16, 4, 4)
img = vae.decode(z)
assert not torch.isnan(img).any(), "NaN survived"
expected = torch.clamp((z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3) * 0.5 + 1) / 2, 0, 1).movedim(1, -1)
assert torch.allclose(img, expected, atol=1e-6)
assert vae.vae_dtype == torch.float16 and vae.first_stage_model.w.dtype == torch.float16  # back to fp16 after
print("OK")
""")
    assert "OK" in out and "decoding again in fp32" in out
