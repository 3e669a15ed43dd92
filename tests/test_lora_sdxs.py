"""LoRA on the SDXS UNet (SDXSLoraLoader): key mapping (no host) and, in a real ComfyUI server (both hosts), our
image against the SDXS reference (tests/fixtures/sdxs_snapshot.py: the AiArtLab/sdxs card's generation code)
with the LoRA loaded by diffusers' own ``StableDiffusionLoraLoaderMixin.load_lora_weights`` (PEFT files saved by
its ``save_lora_weights``, alpha in their metadata; kohya ``lora_unet_...`` files through diffusers' own kohya
conversion) and fused with ``fuse_lora(lora_scale=s)``. The reference never imports our package.
Bound: the pack's pixel parity (mean abs diff <= 1/255, max <= 8/255).
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

RANK = 4
PROMPT = "a girl with an umbrella standing in the rain, anime style, highly detailed"
# the modules diffusers' SD LoRA scripts target (train_text_to_image_lora.py: to_q/to_k/to_v/to_out.0)
TARGET = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def make_lora(unet, seed: int) -> dict:
    """{diffusers module name: (A [r, in], B [out, r])} for every attention projection, random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in unet.named_modules():
        if TARGET.match(name):
            out[name] = (torch.randn(RANK, mod.weight.shape[1], generator=g) * 0.4,
                         torch.randn(mod.weight.shape[0], RANK, generator=g) * 0.4)
    return out


def peft_file(lora: dict, path: Path, alpha: float | None):
    """As diffusers' SD LoRA training scripts save: StableDiffusionLoraLoaderMixin.save_lora_weights with the
    LoraConfig as metadata (packed "unet.<field>" keys); ``alpha`` None: no metadata (alpha == r)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig

    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{name}.lora_A.weight"] = a.contiguous()
        sd[f"{name}.lora_B.weight"] = b.contiguous()
    meta = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=sorted(lora)).to_dict() if alpha else None
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(path.parent), unet_lora_layers=sd, weight_name=path.name,
                                                    unet_lora_adapter_metadata=meta)


def kohya_file(lora: dict, path: Path, alpha: float, extra: dict | None = None):
    sd = {}
    for name, (a, b) in lora.items():
        flat = name.replace(".", "_")
        sd[f"lora_unet_{flat}.lora_down.weight"] = a.contiguous()
        sd[f"lora_unet_{flat}.lora_up.weight"] = b.contiguous()
        sd[f"lora_unet_{flat}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))


def diffusers_fused(unet, files: list, scales: list):
    """``unet`` with the LoRA ``files`` loaded by diffusers' StableDiffusionLoraLoaderMixin.load_lora_weights
    (the LoRA half of StableDiffusionPipeline) and fused at ``scales`` (stacks: set_adapters, then fuse)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Pipe(StableDiffusionLoraLoaderMixin):
        hf_device_map = None  # read by diffusers' offload check
        text_encoder = None

        @property
        def components(self):
            return {"unet": self.unet}

    pipe = Pipe()
    pipe.unet = unet
    names = [f"lora{i}" for i in range(len(files))]
    for path, name in zip(files, names):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(files) == 1:
        pipe.fuse_lora(components=["unet"], lora_scale=scales[0])
    else:
        pipe.set_adapters(names, scales)
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return unet


# --------------------------------------------------------------------------------------------------- no host

def test_unet_key_map_forms():
    from fixtures.sdxs_snapshot import tiny_unet
    from waifukit.lora import unet_key_map, unmatched

    unet = tiny_unet()
    mapping = unet_key_map({k: tuple(v.shape) for k, v in unet.state_dict().items()})
    name = next(n for n in make_lora(unet, 0) if n.endswith("attn2.to_out.0"))
    target = f"diffusion_model.{name}.weight"
    attn = name[: -len(".to_out.0")]
    for prefix in (f"unet.{name}", f"lora_unet_{name.replace('.', '_')}", f"diffusion_model.{name}",
                   f"unet.{attn}.processor.to_out", f"{attn}.processor.to_out"):
        assert mapping[prefix] == target, prefix
    assert mapping[f"{attn}.processor.to_q"] == f"diffusion_model.{attn}.to_q.weight"
    sd = {f"unet.{name}.lora_A.weight": 0, "unet.mid_block.nothing.lora_A.weight": 0}
    assert unmatched(sd, mapping) == ["unet.mid_block.nothing.lora_A.weight"]


# --------------------------------------------------------------------------------------------------- host

@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    from comfy_host import ComfyHost
    from fixtures.sdxs_snapshot import build_sdxs_snapshot, load_reference

    base = tmp_path_factory.mktemp(f"lora-sdxs-{comfy_host.name}")
    snap = build_sdxs_snapshot(base / "models" / "diffusers" / "sdxs")
    ref = load_reference(snap)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    first, second = make_lora(ref["unet"], 21), make_lora(ref["unet"], 22)
    peft_file(first, loras / "first-peft.safetensors", alpha=2.0 * RANK)  # alpha 2r: scale x2
    kohya_file(first, loras / "first-kohya.safetensors", alpha=2.0 * RANK)
    kohya_file(first, loras / "first-kohya-extra.safetensors", alpha=2.0 * RANK,
               extra={"lora_unet_not_in_this_unet.lora_down.weight": torch.zeros(RANK, 8)})
    peft_file(second, loras / "second-peft.safetensors", alpha=None)
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 2)},
              str(loras / "sana.safetensors"))
    h = ComfyHost(base, comfy_host).start()
    h.ref, h.lora_dir = ref, loras
    yield h
    h.stop()


def graph(seed=7, steps=3, size=128) -> dict:
    wf = json.loads((ROOT / "example_workflows" / "sdxs_t2i.api.json").read_text())
    wf["4"]["inputs"].update(seed=seed, steps=steps, width=size, height=size)
    return wf


def add_lora(wf, node: str, name: str, strength: float, model=("1", 0)) -> list:
    wf[node] = {"class_type": "SDXSLoraLoader", "inputs": {"model": list(model), "lora_name": name,
                                                            "strength": strength}}
    return [node, 0]


def reference(host, parts, seed=7, steps=3, size=128):
    from fixtures.sdxs_snapshot import reference_images
    ref = dict(host.ref)
    ref["unet"] = copy.deepcopy(host.ref["unet"])
    if parts:
        diffusers_fused(ref["unet"], [host.lora_dir / p for p, _ in parts], [s for _, s in parts])
    wf = graph()["4"]["inputs"]
    return reference_images(ref, PROMPT, "", seed, steps, wf["cfg"], size, size, sampler=wf["sampler"])[0]


def far(a, b, at_least=5.0):
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
    print(f"control diff: mean {diff:.3f}/255")
    assert diff > at_least


@pytest.mark.host
@pytest.mark.parametrize("name", ["first-peft.safetensors", "first-kohya.safetensors",
                                  "first-kohya-extra.safetensors"])
def test_sdxs_lora_matches_diffusers_load_lora_weights(host, name):
    """The -extra file carries one key that names nothing (diffusers' kohya conversion fails on it, so its
    reference is the same file without it): it is named in the log, the rest applies."""
    from host_checks import assert_pixels_match, run_ok
    wf = graph()
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", name, 0.8)
    ours = run_ok(host, wf)[0]
    assert_pixels_match(ours, reference(host, [(name.replace("-extra", ""), 0.8)]))
    far(ours, reference(host, []))  # control: the LoRA moves the image
    if "extra" in name:
        line = [x for x in host.log_tail(5000).splitlines() if "match no module" in x][-1]
        assert "lora_unet_not_in_this_unet.lora_down.weight" in line and "SDXS UNet" in line


@pytest.mark.host
def test_sdxs_lora_strength_zero_stacking_and_refusals(host):
    from host_checks import assert_pixels_match, run_failed, run_ok
    wf = graph()
    base = run_ok(host, wf)[0]
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", "first-peft.safetensors", 0.0)
    assert np.array_equal(run_ok(host, wf)[0], base)
    wf["4"]["inputs"]["model"] = add_lora(wf, "11", "second-peft.safetensors", -0.6,
                                          model=add_lora(wf, "10", "first-peft.safetensors", 0.5))
    both = run_ok(host, wf)[0]
    assert_pixels_match(both, reference(host, [("first-peft.safetensors", 0.5), ("second-peft.safetensors", -0.6)]))
    far(both, reference(host, [("first-peft.safetensors", 0.5)]))  # control: the second one counts
    wf = graph()
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", "sana.safetensors", 1.0)
    message = run_failed(host, wf)
    assert "sana.safetensors" in message and "not a LoRA for the SDXS UNet" in message
