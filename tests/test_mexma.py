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

from fixtures.mexma_snapshot import (VISION, build_mexma_siglip, load_mexma_reference, processor_config,
                                     reference_encode_images, reference_encode_texts, reference_processor)
from helpers import max_rel_err
from waifukit.loading import CheckpointError, load_strict
from waifukit.mexma.model import (MISSING_PROJECTOR, MexmaSigLIPText, SiglipImageProcessing, SiglipVisionTower,
                            image_pixels, resolve_mexma)

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
    assert res.vision_params.num_heads == 2 and res.vision_params.image_size == 36  # the processor's, not 4 * 8


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


def _images(seed, h, w, n=2):
    """uint8 images as files give them, and the ComfyUI IMAGE made from them ([B,H,W,3], x / 255)."""
    u8 = torch.randint(0, 256, (n, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return u8.numpy(), u8.float() / 255


def test_encode_images_matches_reference(mexma_dir, reference):
    """Issue 10 defect 3: the image goes through the published processor (resize to its size, here 36 like
    so400m's 384: not a multiple of the patch) and the tower reads the top-left grid * patch pixels, as
    transformers' SiglipImageProcessor + SiglipVisionModel do. fp32, pooler output <= 1e-4 relative."""
    res = resolve_mexma(mexma_dir)
    processor = reference_processor(mexma_dir)
    u8, image = _images(0, 53, 71)
    pixels = res.image_processing(image)
    ref_pixels = processor(images=list(u8), return_tensors="pt").pixel_values
    assert pixels.shape == ref_pixels.shape == (2, 3, 36, 36)
    assert (pixels - ref_pixels).abs().max() <= 1e-6
    tower = _vision(res)
    with torch.no_grad():
        ours = tower(pixels)
    expected = reference_encode_images(reference, u8, processor)
    err = max_rel_err(ours, expected)
    print(f"pixel_values max abs diff {(pixels - ref_pixels).abs().max():.1e}; pooler max rel err {err:.2e}")
    assert err <= 1e-4, f"encode_images max rel err {err:.2e}"
    # Control: another image moves the embedding far past the bound.
    with torch.no_grad():
        other = tower(res.image_processing(_images(1, 53, 71)[1]))
    print(f"control, another image: {max_rel_err(other, expected):.2f}")
    assert max_rel_err(other, expected) > 0.05
    # Control: the old reading (resize to grid * patch = 32) is far off too.
    with torch.no_grad():
        old = SiglipVisionTower(res.vision_params.__class__(**{**res.vision_params.__dict__, "image_size": 32}))
        old.load_state_dict(tower.state_dict())
        old_emb = old.eval()(SiglipImageProcessing(height=32, width=32)(image))
    print(f"control, the old 32 x 32 reading: {max_rel_err(old_emb, expected):.2f}")
    assert max_rel_err(old_emb, expected) > 0.05


def test_processing_equals_siglip_image_processor_at_published_size():
    """The published processor at 384 x 384 (so400m-patch14-384) on images smaller, larger and of other
    aspect: pixel_values equal to transformers' (same uint8 resize, same fused rescale + normalise)."""
    from transformers import SiglipImageProcessor
    proc = SiglipImageProcessor(**{k: v for k, v in processor_config(384).items()
                                   if k not in ("image_processor_type", "processor_class")})
    ours = SiglipImageProcessing.from_config(processor_config(384))
    for seed, (h, w) in enumerate([(512, 640), (300, 200), (384, 384)]):
        u8, image = _images(seed, h, w, n=1)
        ref = proc(images=list(u8), return_tensors="pt").pixel_values
        got = ours(image)
        assert got.shape == ref.shape == (1, 3, 384, 384)
        assert (got - ref).abs().max() <= 1e-6, (h, w)


def test_images_need_the_processor_config(mexma_dir, tmp_path):
    """Without preprocessor_config.json the side is not pinned (any of 32..39 fills the tiny tower's 16 rows;
    378..391 the published one's 729): images are refused, naming the file, and the text side still loads.
    A processor config of another tower is refused at load."""
    import json
    copy = shutil.copytree(mexma_dir, tmp_path / "mexma", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    res = resolve_mexma(copy)
    assert res.image_processing is None and res.vision_params is not None
    with pytest.raises(ValueError, match="(?s)model.safetensors.*missing preprocessor_config.json"):
        image_pixels(res.image_processing, _images(0, 40, 40)[1], res.source)
    assert image_pixels(resolve_mexma(mexma_dir).image_processing, _images(0, 40, 40)[1], "x").shape[-1] == 36
    (copy / "preprocessor_config.json").write_text(json.dumps(processor_config(48)))  # 6 x 6 patches, not 4 x 4
    with pytest.raises(CheckpointError, match="(?s)preprocessor_config.json.*does not fit"):
        resolve_mexma(copy)
    cfg = processor_config(VISION["image_size"])
    cfg["resample"] = 2
    (copy / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="resample"):
        resolve_mexma(copy)


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
