"""MEXMA-SigLIP pooled text embedding, projector and SigLIP vision tower vs a reference built from
transformers' XLMRobertaModel + SiglipVisionModel + a torch Linear projector (tiny configs, same weights).

Bounds: fp32, max rel err <= 1e-4 for per-token states, encode_texts [B,D] and encode_images [B,D]. Layouts:
the visheratin single file, an sdxs-style split text_encoder/ + text_projector/, and the Waifu text encoder
(no projector: clear error when the pooled mode is needed).
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.mexma_snapshot import (build_mexma_siglip, load_mexma_reference, reference_encode_images,
                                     reference_encode_texts)
from helpers import max_rel_err
from waifukit.loading import CheckpointError, load_strict
from waifukit.mexma import (MISSING_PROJECTOR, MexmaSigLIPText, SiglipVisionTower, preprocess_images,
                            resolve_mexma)

pytest.importorskip("transformers")

PROMPTS = ["a girl with an umbrella standing in the rain, anime style", "Девушка с зонтиком под дождём",
           "一只可爱的猫在花园里", ""]


@pytest.fixture(scope="module")
def mexma_dir(tmp_path_factory):
    return build_mexma_siglip(tmp_path_factory.mktemp("mexma") / "mexma-siglip")


@pytest.fixture(scope="module")
def reference(mexma_dir):
    return load_mexma_reference(mexma_dir)


def _text(res):
    m = MexmaSigLIPText(res.text_params, res.projector_dim, res.projector_bias, dtype=torch.float32).eval()
    load_strict(m, res.text_state_dict, res.source)
    return m


def _vision(res):
    m = SiglipVisionTower(res.vision_params, dtype=torch.float32).eval()
    load_strict(m, res.vision_state_dict, res.source)
    return m


def test_single_file_layout_parts(mexma_dir):
    res = resolve_mexma(mexma_dir)
    assert res.projector_dim == 144 and res.projector_bias
    assert res.vision_params.num_heads == 2 and res.vision_params.image_size == 32


def test_encode_texts_matches_reference(mexma_dir, reference):
    res = resolve_mexma(mexma_dir / "model.safetensors")
    ids, mask = res.tokenizer(PROMPTS, max_length=512)
    with torch.no_grad():
        hidden, pooled = _text(res)(ids, mask)
    expected = reference_encode_texts(reference, PROMPTS)
    assert pooled.shape == expected.shape == (len(PROMPTS), 144)
    err = max_rel_err(pooled, expected)
    assert err <= 1e-4, f"encode_texts max rel err {err:.2e}"
    tok = reference["tokenizer"](PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_hidden = reference["text_model"](input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    assert max_rel_err(hidden, ref_hidden) <= 1e-4


def test_encode_images_matches_reference(mexma_dir, reference):
    res = resolve_mexma(mexma_dir)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = _vision(res)(pixels)
    expected = reference_encode_images(reference, pixels)
    err = max_rel_err(ours, expected)
    assert err <= 1e-4, f"encode_images max rel err {err:.2e}"


def test_preprocess_close_to_siglip_image_processor():
    """Ours is torch's antialiased bicubic; the reference resizes uint8 images with PIL: close, not equal."""
    from transformers import SiglipImageProcessor
    proc = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 80), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2], -1)[None]  # smooth [1,96,80,3]
    ref = proc((img[0].numpy() * 255).round().astype("uint8"), return_tensors="pt").pixel_values
    ours = preprocess_images(img, 32)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02


def test_split_sdxs_layout_equals_single_file(mexma_dir, tmp_path):
    """AiArtLab/sdxs later revisions: text_encoder/ (XLM-R only) + text_projector/ + tokenizer/."""
    snap = tmp_path / "sdxs"
    sd = load_file(str(mexma_dir / "model.safetensors"))
    (snap / "text_encoder").mkdir(parents=True)
    (snap / "text_projector").mkdir()
    save_file({k[len("text_model."):]: v for k, v in sd.items() if k.startswith("text_model.")},
              str(snap / "text_encoder" / "model.safetensors"))
    save_file({k[len("text_projector."):]: v for k, v in sd.items() if k.startswith("text_projector.")},
              str(snap / "text_projector" / "diffusion_pytorch_model.safetensors"))
    shutil.copytree(mexma_dir, snap / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    split, single = resolve_mexma(snap), resolve_mexma(mexma_dir)
    assert split.vision_params is None
    ids, mask = single.tokenizer(PROMPTS[:2], max_length=512)
    with torch.no_grad():
        assert torch.equal(_text(split)(ids, mask)[1], _text(single)(ids, mask)[1])


def test_waifu_text_encoder_has_no_projector(tmp_path):
    from fixtures.waifu_snapshot import build_waifu_snapshot
    snap = build_waifu_snapshot(tmp_path / "waifu-2b")
    res = resolve_mexma(snap)
    assert res.projector_dim is None and res.vision_params is None
    _, pooled = _text(res)(*res.tokenizer(["x"], max_length=512))
    assert pooled is None
    assert "missing projector weights" in MISSING_PROJECTOR


def test_wrong_family_named(tmp_path):
    from fixtures.waifu_snapshot import tiny_vae
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="VAE"):
        resolve_mexma(tmp_path / "vae.safetensors")
