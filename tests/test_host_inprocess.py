"""ComfyUI glue checked in-process (ComfyUI imported the way it loads custom nodes), in a subprocess so the
host's global state stays out of the other tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.host

PRELUDE = f"""
import importlib.util, os, sys, torch
sys.path.insert(0, os.getcwd())
from comfy.cli_args import args
args.cpu = True
spec = importlib.util.spec_from_file_location("waifu_pack", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["waifu_pack"] = pack; spec.loader.exec_module(pack)
"""


def run(comfy_host, script: str) -> str:
    """Run ``script`` after importing the pack the way ``comfy_host`` (a setup_comfyui.Host) loads custom nodes."""
    res = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=300,
                         cwd=comfy_host.path, env=comfy_host.env())
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout + res.stderr


def test_fp16_vae_decode_that_overflows_is_redone_in_fp32(comfy_host):
    out = run(comfy_host, """
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


def test_core_surface_binds_on_this_host(comfy_host):
    out = run(comfy_host, """
from waifu_pack.nodes import core_api
problems = core_api.check_surface()
print("SURFACE", len(core_api.SURFACE), "names;", "problems:", problems)
assert not problems, problems
""")
    assert "problems: []" in out, out


def _host_without(comfy_host, tmp_path, rel: str, old: str, new: str):
    """A copy of the host (symlinks, except the one edited file) where ``old`` is replaced by ``new`` in ``rel``."""
    root = tmp_path / "host"
    parts = Path(rel).parts
    src, dst = Path(comfy_host.path), root
    dst.mkdir()
    for depth, part in enumerate(parts):
        for entry in src.iterdir():
            if entry.name != part:
                (dst / entry.name).symlink_to(entry)
        src, dst = src / part, dst / part
        if depth < len(parts) - 1:
            dst.mkdir()
    text = src.read_text()
    assert old in text
    dst.write_text(text.replace(old, new))
    return root


@pytest.mark.parametrize("rel,old,new,name", [
    ("comfy/model_management.py", "def throw_exception_if_processing_interrupted(",
     "def _gone_throw_exception_if_processing_interrupted(", "throw_exception_if_processing_interrupted: missing"),
    ("comfy/model_patcher.py", "def __init__(self, model, load_device, offload_device,",
     "def __init__(self, model, device, offload_device,", "comfy.model_patcher.ModelPatcher"),
])
def test_drift_guard_names_a_changed_core_name(comfy_host, tmp_path, rel, old, new, name):
    """The guard is proven able to fail: on a host copy with one name we use removed or renamed, the pack's
    load-time check names it (and the check test above would fail)."""
    broken = _host_without(comfy_host, tmp_path, rel, old, new)
    res = subprocess.run([sys.executable, "-c", PRELUDE + """
from waifu_pack.nodes import core_api
print("PROBLEMS", core_api.check_surface())
"""], capture_output=True, text=True, timeout=300, cwd=broken, env=comfy_host.env())
    out = res.stdout + res.stderr
    assert name in out and "differs from the versions this pack is tested on" in out, out[-3000:]
    print(next(line for line in out.splitlines() if line.startswith("PROBLEMS")))


def test_prompt_length_conds_batch_in_core_sampler(comfy_host):
    """A 23-token prompt and a 3-token negative (MexmaSigLIPEncode's own lengths) form one batch in core's sampler:
    CONDTokens pads states and mask with zeros to the longest. Control: core's CONDCrossAttn + CONDRegular pair
    (what the Waifu MODEL used before) refuses to batch them."""
    out = run(comfy_host, """
import comfy.conds, comfy.samplers
from waifu_pack.nodes.waifu_host import CONDTokens
g = torch.Generator().manual_seed(0)
sa, sb = torch.randn(1, 23, 8, generator=g), torch.randn(1, 3, 8, generator=g)
ma, mb = torch.ones(1, 23, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
ours = [{"c_crossattn": CONDTokens(s), "attention_mask": CONDTokens(m)} for s, m in ((sa, ma), (sb, mb))]
assert comfy.samplers.cond_equal_size(*ours) and comfy.samplers.cond_equal_size(*ours[::-1])
core = [{"c_crossattn": comfy.conds.CONDCrossAttn(s), "attention_mask": comfy.conds.CONDRegular(m)}
        for s, m in ((sa, ma), (sb, mb))]
assert not comfy.samplers.cond_equal_size(*core)
states = ours[0]["c_crossattn"].concat([ours[1]["c_crossattn"]])
mask = ours[0]["attention_mask"].concat([ours[1]["attention_mask"]])
assert states.shape == (2, 23, 8) and torch.equal(states[1, :3], sb[0]) and not states[1, 3:].any()
assert torch.equal(states[0], sa[0]) and mask.tolist() == [[1] * 23, [1] * 3 + [0] * 20]
assert not CONDTokens(sa).can_concat(CONDTokens(torch.randn(2, 3, 8)))  # another batch size: not mergeable
print("OK")
""")
    assert "OK" in out
