"""Published containers and layouts (research note published_layouts.md; issue 10).

Containers, on tiny copies: sharded folders exactly as save_pretrained writes them (with and without the fp16
variant), ``.bin`` pickle twins beside ``.safetensors``, and the index checks. Every component loader goes through
waifukit/loading.py, so each is run on a sharded copy of its folder and must give the unsharded state dict
bit for bit.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.containers import add_bin_twin, index_name, shard_component
from waifukit import loading


# ----------------------------------------------------------------------------- tiny snapshots, built once

@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    from fixtures.sdxs_snapshot import build_sdxs_snapshot
    from fixtures.waifu_snapshot import build_waifu_snapshot
    from fixtures.wuerstchen_snapshot import build_decoder_snapshot, build_prior_snapshot
    root = tmp_path_factory.mktemp("published")
    return {"waifu": build_waifu_snapshot(root / "waifu-2b"), "sdxs": build_sdxs_snapshot(root / "sdxs"),
            "prior": build_prior_snapshot(root / "wuerstchen-prior"),
            "decoder": build_decoder_snapshot(root / "wuerstchen")}


def _dit(p):
    return loading.resolve_linear_dit(p).state_dict


def _vae(p):
    return loading.resolve_vae(p).state_dict


def _mexma(p):
    return loading_mexma(p).text_state_dict


def loading_mexma(p):
    from waifukit.mexma import resolve_mexma
    return resolve_mexma(p)


def _unet(p):
    from waifukit.sdxs import resolve_unet
    return resolve_unet(p)[1]


def _clip(p):
    from waifukit.clip_text import resolve_clip_text
    return resolve_clip_text(p)[1]


def _prior(p):
    from waifukit.wuerstchen_prior import resolve_prior
    return resolve_prior(p)[1]


def _decoder(p):
    from waifukit.wuerstchen_decoder import resolve_decoder
    return resolve_decoder(p)[1]


def _vqgan(p):
    from waifukit.paella_vq import resolve_vqgan
    return resolve_vqgan(p)[1]


# (snapshot, component folder, resolver): every component loader of the pack.
COMPONENTS = [("waifu", "transformer", _dit), ("waifu", "vae", _vae), ("waifu", "text_encoder", _mexma),
              ("sdxs", "unet", _unet), ("sdxs", "text_encoder", _mexma), ("sdxs", "text_projector", _mexma),
              ("sdxs", "vae", _vae), ("prior", "prior", _prior), ("prior", "text_encoder", _clip),
              ("decoder", "decoder", _decoder), ("decoder", "vqgan", _vqgan), ("decoder", "text_encoder", _clip)]


def _only_weights(folder):
    files = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    assert len(files) == 1, files
    return files[0]


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("snap,sub,resolve", COMPONENTS, ids=[f"{s}-{c}" for s, c, _ in COMPONENTS])
def test_every_loader_reads_sharded_folders(snaps, tmp_path, snap, sub, resolve):
    """Issue 10 defect 5: save_pretrained shards any component over max_shard_size; each loader must read the
    shards through the index (the old loader refused: "several weight files")."""
    copy = shutil.copytree(snaps[snap], tmp_path / snap)
    expected = resolve(copy)
    written = shard_component(_only_weights(copy / sub), shards=3)
    assert len(written) == 4 and written[-1].name.endswith(".json")
    _same(resolve(copy), expected)
    if sub != "text_projector":  # a folder on its own, and one shard picked in a file list, load the whole
        _same(resolve(copy / sub), expected)
        _same(resolve(written[1]), expected)


def test_save_pretrained_names_are_the_ones_read(snaps, tmp_path):
    """The names come from diffusers/transformers themselves: a transformer saved with variant="fp16" over a
    small max_shard_size, and an XLM-R text encoder likewise, load back equal to the single files."""
    from fixtures.waifu_snapshot import tiny_text_encoder, tiny_transformer
    dit = tiny_transformer(1)
    out = tmp_path / "transformer"
    dit.half().save_pretrained(out, variant="fp16", max_shard_size="300KB")
    names = sorted(p.name for p in out.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names, names
    assert any(re.fullmatch(r"diffusion_pytorch_model\.fp16-00001-of-\d{5}\.safetensors", n) for n in names), names
    assert index_name("diffusion_pytorch_model.fp16.safetensors") in names
    got = loading.resolve_linear_dit(out)
    ref = loading.resolve_linear_dit(snaps["waifu"])
    _same(got.state_dict, ref.state_dict)  # same seed, same fp16 values
    assert got.params == ref.params

    te = tiny_text_encoder(vocab_size=900, seed=2)
    te_dir = tmp_path / "te"
    te.save_pretrained(te_dir, max_shard_size="300KB")
    tnames = sorted(p.name for p in te_dir.iterdir())
    assert "model.safetensors.index.json" in tnames and any(re.fullmatch(r"model-00001-of-\d{5}\.safetensors", n)
                                                      for n in tnames), tnames
    shutil.copy(snaps["waifu"] / "tokenizer" / "tokenizer.json", te_dir / "tokenizer.json")
    res = loading_mexma(te_dir)
    expected = {f"text_model.{k}": v for k, v in te.state_dict().items()}
    assert res.text_state_dict.keys() == expected.keys()
    assert all(torch.equal(res.text_state_dict[k], expected[k].float()) for k in expected)


def test_shard_index_is_checked(snaps, tmp_path):
    """Every indexed key present exactly once, in the shard the index names; every listed shard present."""
    folder = shutil.copytree(snaps["waifu"] / "vae", tmp_path / "vae")
    written = shard_component(_only_weights(folder), shards=2)
    index = written[-1]
    data = json.loads(index.read_text())
    # a listed shard is gone
    moved = written[1].rename(tmp_path / "away.safetensors")
    with pytest.raises(loading.CheckpointError, match=f"(?s){index.name}.*{written[1].name}.*Download"):
        loading.resolve_vae(folder)
    moved.rename(written[1])
    loading.resolve_vae(folder)  # control: intact again, it loads
    # a key the index lists is in no shard
    part = load_file(str(written[1]))
    dropped = sorted(part)[0]
    save_file({k: v for k, v in part.items() if k != dropped}, str(written[1]))
    with pytest.raises(loading.CheckpointError, match=f"(?s)indexed key.*{dropped}"):
        loading.resolve_vae(folder)
    # a key in two shards
    first = load_file(str(written[0]))
    save_file({**part, next(iter(first)): next(iter(first.values()))}, str(written[1]))
    with pytest.raises(loading.CheckpointError, match=f"(?s){written[1].name}.*another shard"):
        loading.resolve_vae(folder)
    # shards without their index
    save_file(part, str(written[1]))
    index.unlink()
    with pytest.raises(loading.CheckpointError, match="(?s)sharded weights.*index.json"):
        loading.resolve_vae(folder)
    with pytest.raises(loading.CheckpointError, match="no \\*.index.json beside it"):
        loading.resolve_vae(written[0])
    assert data["weight_map"]


TWINNED = [c for c in COMPONENTS if c[1] != "text_projector"]


@pytest.mark.parametrize("snap,sub,resolve", TWINNED, ids=[f"{s}-{c}" for s, c, _ in TWINNED])
def test_bin_twins_are_never_unpickled(snaps, tmp_path, monkeypatch, snap, sub, resolve):
    """warp-ai ships diffusion_pytorch_model.bin beside .safetensors: the .safetensors wins and the pickle is
    not even opened (torch.load would raise here)."""
    copy = shutil.copytree(snaps[snap], tmp_path / snap)
    expected = resolve(copy)
    twin = add_bin_twin(_only_weights(copy / sub))
    assert twin.is_file()

    def no_pickles(*a, **k):
        raise AssertionError(f"a pickle was opened: {a[:1]}")
    monkeypatch.setattr(torch, "load", no_pickles)
    _same(resolve(copy), expected)
    _same(resolve(copy / sub), expected)
    monkeypatch.undo()
    # Control: the twin alone is read, and it holds other values.
    _only_weights(copy / sub).unlink()
    other = resolve(copy / sub)
    assert any(not torch.equal(other[k], expected[k]) for k in expected)


def test_waifu_text_encoder_fp32_under_fp16_name_with_pooler(tmp_path):
    """waifu-2b's text_encoder/model.fp16.safetensors holds fp32 data (A4), maybe with XLM-R's pooler keys: the
    dtype of the data is kept (not the name's), the pooler is dropped, and the per-token states match
    transformers' XLMRobertaModel on the same file (fp32, <= 1e-4 relative)."""
    from safetensors import safe_open

    from fixtures.waifu_snapshot import build_waifu_snapshot, load_reference, reference_encode
    from helpers import max_rel_err
    from waifukit.mexma import MexmaSigLIPText
    snap = build_waifu_snapshot(tmp_path / "waifu-2b", te_pooler=True)
    te_file = snap / "text_encoder" / "model.fp16.safetensors"
    with safe_open(str(te_file), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert any(k.startswith("pooler.") for k in keys)
    res = loading_mexma(snap)
    assert not any("pooler" in k for k in res.text_state_dict)
    assert {v.dtype for v in res.text_state_dict.values()} == {torch.float32}
    te = MexmaSigLIPText(res.text_params, None).eval()
    loading.load_strict(te, res.text_state_dict, res.source)
    ref = load_reference(snap)
    prompts = ["A girl, Silver Hair  ", "一只可爱的猫"]
    ids, mask = res.tokenizer([p.lower().strip() for p in prompts])
    with torch.no_grad():
        ours = te(ids, mask)[0]
    theirs, _ = reference_encode(ref, prompts)
    assert max_rel_err(ours, theirs) <= 1e-4
    # Control: another prompt is far off.
    ids2, mask2 = res.tokenizer(["a dog on a bench", "夜の街"])
    with torch.no_grad():
        assert max_rel_err(te(ids2, mask2)[0], theirs) > 0.05
