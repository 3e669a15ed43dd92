"""LoRA on the Linear DiT: key mapping (no host) and, in a real ComfyUI server (both hosts), our
LinearDiTLoraLoader and the stock LoraLoaderModelOnly against a reference built on diffusers' SanaTransformer2DModel.

PEFT files are written by diffusers' own ``SanaPipeline.save_lora_weights`` (as train_dreambooth_lora_sana.py
saves them, LoraConfig metadata included) and the reference loads them with diffusers' ``load_lora_weights`` +
``fuse_lora(lora_scale=s)`` (stacks: ``set_adapters`` weights, then ``fuse_lora``). diffusers' Sana loader reads
no kohya or ComfyUI-layout keys (it loads nothing from them; asserted below), so for those two files the
reference merges the same tensors by hand the way PEFT's merge does (W += s * alpha / r * B @ A per diffusers
module), which equals the diffusers-loaded PEFT twin exactly (asserted below). It never imports our package.
Bound: the pack's pixel parity (mean abs diff <= 1/255, max <= 8/255).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

RANK = 4
PROMPT = "1girl, silver hair, red eyes, cherry blossoms, detailed anime illustration"
# diffusers modules the test LoRAs touch (split q/k/v of both attentions, outputs, and the 1x1 FFN convs)
MODULES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point"]


def make_lora(transformer, seed: int, alpha: float | None = None) -> dict:
    """{diffusers module name: (A [r, in(,1,1)], B [out, r(,1,1)], alpha)} for every block, random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    mods = dict(transformer.named_modules())
    for i in range(len(transformer.transformer_blocks)):
        for m in MODULES:
            name = f"transformer_blocks.{i}.{m}"
            w = mods[name].weight
            tail = tuple(w.shape[2:])
            a = torch.randn((RANK, w.shape[1], *tail), generator=g) * 0.3
            b = torch.randn((w.shape[0], RANK, *tail), generator=g) * 0.3
            out[name] = (a, b, alpha)
    return out


def peft_file(lora: dict, path: Path, alpha: float | None):
    """Saved as train_dreambooth_lora_sana.py saves: SanaPipeline.save_lora_weights with the LoraConfig as
    metadata (packed "transformer.<field>" keys); ``alpha`` None: an older file without metadata (alpha == r)."""
    from diffusers.loaders import SanaLoraLoaderMixin
    from peft import LoraConfig

    sd = {}
    for name, (a, b, _) in lora.items():
        sd[f"{name}.lora_A.weight"] = a.contiguous()
        sd[f"{name}.lora_B.weight"] = b.contiguous()
    meta = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=sorted(lora)).to_dict() if alpha else None
    SanaLoraLoaderMixin.save_lora_weights(str(path.parent), transformer_lora_layers=sd, weight_name=path.name,
                                         transformer_lora_adapter_metadata=meta)


class _SanaLoras:
    """The LoRA half of diffusers' SanaPipeline (its SanaLoraLoaderMixin) around a bare SanaTransformer2DModel,
    so the reference runs diffusers' own load_lora_weights / set_adapters / fuse_lora code."""

    def __new__(cls, transformer):
        from diffusers.loaders import SanaLoraLoaderMixin

        class Pipe(SanaLoraLoaderMixin):
            hf_device_map = None  # read by diffusers' offload check

            @property
            def components(self):
                return {"transformer": self.transformer}

        pipe = Pipe()
        pipe.transformer = transformer
        return pipe


def diffusers_fused(transformer, files: list, scales: list):
    """``transformer`` with the PEFT ``files`` loaded by diffusers and fused at ``scales`` (in place)."""
    pipe = _SanaLoras(transformer)
    names = [f"lora{i}" for i in range(len(files))]
    for path, name in zip(files, names):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(files) == 1:
        pipe.fuse_lora(lora_scale=scales[0])
    else:
        pipe.set_adapters(names, scales)
        pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
    return transformer


def kohya_file(lora: dict, path: Path, extra: dict | None = None):
    sd = {}
    for name, (a, b, alpha) in lora.items():
        flat = name.replace(".", "_")
        sd[f"lora_unet_{flat}.lora_down.weight"] = a.contiguous()
        sd[f"lora_unet_{flat}.lora_up.weight"] = b.contiguous()
        if alpha is not None:
            sd[f"lora_unet_{flat}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))


def comfy_file(lora: dict, path: Path):
    """ComfyUI's own layout on the Sana (fused) names: the q/k/v (k/v) LoRAs stacked into one of rank 3r (2r)
    with a block-diagonal up matrix, which is exactly the sum of the split ones."""
    sd, blocks = {}, {}
    for name, (a, b, _) in lora.items():
        i, mod = name.split(".")[1], name.split(".", 2)[2]
        blocks.setdefault(i, {})[mod] = (a, b)
    names = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
             "ff.conv_inverted": "mlp.inverted_conv.conv", "ff.conv_point": "mlp.point_conv.conv"}
    for i, mods in blocks.items():
        for fused, parts in (("attn.qkv", "qkv"), ("cross_attn.kv_linear", "kv")):
            attn = "attn1" if fused == "attn.qkv" else "attn2"
            a_s = [mods[f"{attn}.to_{c}"][0] for c in parts]
            b_s = [mods[f"{attn}.to_{c}"][1] for c in parts]
            sd[f"diffusion_model.blocks.{i}.{fused}.lora_down.weight"] = torch.cat(a_s).contiguous()
            sd[f"diffusion_model.blocks.{i}.{fused}.lora_up.weight"] = torch.block_diag(*b_s).contiguous()
        for mod, ours in names.items():
            a, b = mods[mod]
            sd[f"diffusion_model.blocks.{i}.{ours}.lora_down.weight"] = a.contiguous()
            sd[f"diffusion_model.blocks.{i}.{ours}.lora_up.weight"] = b.contiguous()
    save_file(sd, str(path))


@torch.no_grad()
def fuse_like_peft(transformer, lora: dict, scale: float):
    """PEFT LoraLayer.merge as diffusers' fuse_lora(lora_scale=scale) runs it: W += scale * alpha/r * B @ A."""
    mods = dict(transformer.named_modules())
    for name, (a, b, alpha) in lora.items():
        w = mods[name].weight
        delta = b.flatten(1) @ a.flatten(1)
        w += (scale * (alpha if alpha else RANK) / RANK * delta).reshape(w.shape)


# --------------------------------------------------------------------------------------------------- no host

def test_key_map_covers_every_diffusers_projection_and_names_the_rest():
    from fixtures.waifu_snapshot import tiny_transformer
    from waifukit.lora import key_map, unmatched
    from waifukit.waifu.dit import LinearDiT, LinearDiTParams, to_sana_layout

    ref = tiny_transformer()
    ours = to_sana_layout(ref.state_dict())
    mapping = key_map({k: tuple(v.shape) for k, v in ours.items()})
    lora = make_lora(ref, 0)
    sd = {f"transformer.{n}.lora_A.weight": a for n, (a, b, _) in lora.items()}
    sd["transformer.not_a_module.lora_A.weight"] = torch.zeros(1)
    sd["transformer_blocks.0.attn1.to_q.weird_suffix"] = torch.zeros(1)
    assert unmatched(sd, mapping) == ["transformer.not_a_module.lora_A.weight",
                                      "transformer_blocks.0.attn1.to_q.weird_suffix"]
    # The row ranges of the split projections tile the fused weights exactly.
    hidden = ours["blocks.0.attn.qkv.weight"].shape[1]
    assert [mapping[f"transformer.transformer_blocks.1.attn1.to_{c}"] for c in "qkv"] == [
        ("diffusion_model.blocks.1.attn.qkv.weight", (0, j * hidden, hidden)) for j in range(3)]
    assert mapping["lora_unet_transformer_blocks_1_attn2_to_v"] == (
        "diffusion_model.blocks.1.cross_attn.kv_linear.weight", (0, hidden, hidden))
    assert mapping["lora_unet_blocks_0_attn_qkv"] == "diffusion_model.blocks.0.attn.qkv.weight"
    LinearDiT(LinearDiTParams.infer(ours)).load_state_dict(ours)  # the targets are the model's real keys


def test_diffusers_saved_alpha_is_read_and_hand_merge_equals_diffusers(tmp_path):
    """Defect: alphas in diffusers' packed metadata ("transformer.lora_alpha") were ignored (scale 1 instead of
    alpha/r). Also pins the reference: diffusers loads nothing from a kohya file, and the hand merge used for
    kohya/ComfyUI files equals diffusers' load_lora_weights + fuse_lora on the PEFT twin."""
    from safetensors import safe_open

    from fixtures.waifu_snapshot import tiny_transformer
    from waifukit.lora import peft_alphas

    ref = tiny_transformer()
    lora = make_lora(ref, 3, alpha=2.0 * RANK)
    peft_file(lora, tmp_path / "p.safetensors", alpha=2.0 * RANK)
    peft_file(lora, tmp_path / "bare.safetensors", alpha=None)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    alphas = peft_alphas(sd, meta)
    assert len(alphas) == len(lora) and {float(v) for v in alphas.values()} == {2.0 * RANK}
    with safe_open(str(tmp_path / "bare.safetensors"), "pt") as f:
        assert peft_alphas(sd, f.metadata()) == {}  # control: no metadata, no alpha (alpha == r)

    fused = diffusers_fused(copy.deepcopy(ref), [tmp_path / "p.safetensors"], [0.8]).state_dict()
    hand = copy.deepcopy(ref)
    fuse_like_peft(hand, lora, 0.8)
    base = ref.state_dict()
    err = max((fused[k] - v).abs().max().item() for k, v in hand.state_dict().items())
    moved = max((fused[k] - v).abs().max().item() for k, v in base.items())
    print(f"hand merge vs diffusers fuse: max {err:.2e}; LoRA moved weights by {moved:.2e}")
    assert err <= 1e-6 and moved > 1e-1
    kohya_file(lora, tmp_path / "k.safetensors")
    untouched = diffusers_fused(copy.deepcopy(ref), [tmp_path / "k.safetensors"], [0.8]).state_dict()
    assert all(torch.equal(untouched[k], v) for k, v in base.items())


# --------------------------------------------------------------------------------------------------- host

@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    from comfy_host import ComfyHost
    from fixtures.waifu_snapshot import build_waifu_snapshot, load_reference

    base = tmp_path_factory.mktemp(f"lora-{comfy_host.name}")
    snap = build_waifu_snapshot(base / "models" / "diffusers" / "waifu-2b")
    ref = load_reference(snap)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    first = make_lora(ref["transformer"], 11, alpha=2.0 * RANK)   # alpha 2r: scale x2
    second = make_lora(ref["transformer"], 12)
    peft_file(first, loras / "first-peft.safetensors", alpha=2.0 * RANK)
    kohya_file(first, loras / "first-kohya.safetensors")
    kohya_file(first, loras / "first-kohya-extra.safetensors",
               extra={"lora_unet_not_in_this_model.lora_down.weight": torch.zeros(RANK, 8)})
    unit = {k: (a, b, None) for k, (a, b, _) in first.items()}  # the comfy layout carries no alpha: scale 1
    comfy_file(unit, loras / "first-unit-comfy.safetensors")
    peft_file(second, loras / "second-peft.safetensors", alpha=None)
    save_file({"text_model.encoder.layers.0.lora_A.weight": torch.zeros(2, 2)}, str(loras / "someone-else.safetensors"))
    h = ComfyHost(base, comfy_host).start()
    h.ref, h.lora_dir = ref, loras
    h.loras = {"first": "first-peft.safetensors", "second": "second-peft.safetensors", "first-hand": first,
               "unit": unit}
    yield h
    h.stop()


def graph(seed=7, steps=3, size=128) -> dict:
    wf = json.loads((ROOT / "example_workflows" / "waifu_t2i.api.json").read_text())
    wf["4"]["inputs"].update(seed=seed, steps=steps, width=size, height=size)
    return wf


def add_lora(wf, node: str, name: str, strength: float, model=("1", 0), stock=False) -> list:
    if stock:
        wf[node] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": list(model), "lora_name": name, "strength_model": strength}}
    else:
        wf[node] = {"class_type": "LinearDiTLoraLoader",
                    "inputs": {"model": list(model), "lora_name": name, "strength": strength}}
    return [node, 0]


def reference(host, parts, seed=7, steps=3, size=128):
    """diffusers' image with ``parts`` [(PEFT file name, scale)] loaded and fused by diffusers, or
    [(lora dict, scale)] merged by hand (kohya / ComfyUI layouts, which diffusers' Sana loader does not read)."""
    from fixtures.waifu_snapshot import reference_images
    ref = dict(host.ref)
    ref["transformer"] = copy.deepcopy(host.ref["transformer"])
    files = [(host.lora_dir / p, s) for p, s in parts if isinstance(p, str)]
    if files:
        diffusers_fused(ref["transformer"], [p for p, _ in files], [s for _, s in files])
    for lora, scale in parts:
        if not isinstance(lora, str):
            fuse_like_peft(ref["transformer"], lora, scale)
    return reference_images(ref, PROMPT, "", seed, steps, 4.5, size, size)[0]


def far(a, b, at_least=5.0):
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
    print(f"control diff: mean {diff:.3f}/255")
    assert diff > at_least



@pytest.mark.host
@pytest.mark.parametrize("name,lora", [("first-peft.safetensors", "first"),
                                       ("first-kohya.safetensors", "first-hand"),
                                       ("first-unit-comfy.safetensors", "unit")])
def test_lora_matches_diffusers_fused_reference(host, name, lora):
    from host_checks import assert_pixels_match, run_ok
    wf = graph()
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", name, 0.8)
    ours = run_ok(host, wf)[0]
    assert_pixels_match(ours, reference(host, [(host.loras[lora], 0.8)]))
    far(ours, reference(host, []))  # control: the LoRA moves the image


@pytest.mark.host
@pytest.mark.parametrize("name", ["first-unit-comfy.safetensors", "first-kohya.safetensors"])
def test_stock_lora_loader_model_only_where_keys_map(host, name):
    """The stock LoraLoaderModelOnly maps ComfyUI-layout keys (and kohya ones on Sana names) by itself; the
    diffusers-named kohya file does not map there (core has no key-map hook for our model): our loader does."""
    from host_checks import assert_pixels_match, run_ok
    wf = graph()
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", name, 0.8)
    ours = run_ok(host, wf)[0]
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", name, 0.8, stock=True)
    stock = run_ok(host, wf)[0]
    if "comfy" in name:
        assert_pixels_match(stock, ours)
    else:
        far(stock, ours)  # stock skips every key ("lora key not loaded"): the base image
        assert "lora key not loaded: lora_unet_transformer_blocks_0_attn1_to_q" in host.log_tail(5000)


@pytest.mark.host
def test_strength_zero_stacking_and_unpatched_base(host):
    from host_checks import assert_pixels_match, run_ok
    wf = graph()
    base = run_ok(host, wf)[0]
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", "first-peft.safetensors", 0.0)
    assert np.array_equal(run_ok(host, wf)[0], base)
    # Two stacked LoRAs.
    wf["4"]["inputs"]["model"] = add_lora(wf, "11", "second-peft.safetensors", -0.6,
                                          model=add_lora(wf, "10", "first-peft.safetensors", 0.5))
    both = run_ok(host, wf)[0]
    assert_pixels_match(both, reference(host, [(host.loras["first"], 0.5), (host.loras["second"], -0.6)]))
    far(both, reference(host, [(host.loras["first"], 0.5)]))  # control: the second one counts
    # The base MODEL in another branch of the same prompt stays unpatched.
    wf["20"] = copy.deepcopy(wf["4"])
    wf["20"]["inputs"]["model"] = ["1", 0]
    wf["21"] = {"class_type": "AuraVAE16Decode", "inputs": {"samples": ["20", 0], "vae": ["1", 2], "tile_size": 0,
                                                          "overlap": 128}}
    wf["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "base"}}
    images = run_ok(host, wf)
    assert len(images) == 2
    assert any(np.array_equal(im, base) for im in images) and any(np.array_equal(im, both) for im in images)


@pytest.mark.host
def test_unmatched_keys_named_and_foreign_lora_refused(host):
    from host_checks import assert_pixels_match, run_failed, run_ok
    wf = graph()
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", "first-kohya-extra.safetensors", 0.8)
    assert_pixels_match(run_ok(host, wf)[0], reference(host, [(host.loras["first-hand"], 0.8)]))
    line = [x for x in host.log_tail(5000).splitlines() if "match no module" in x][-1]
    assert "first-kohya-extra.safetensors" in line and "lora_unet_not_in_this_model.lora_down.weight" in line
    wf["4"]["inputs"]["model"] = add_lora(wf, "10", "someone-else.safetensors", 1.0)
    message = run_failed(host, wf)
    assert "someone-else.safetensors" in message and "not a Waifu/Sana LoRA" in message
