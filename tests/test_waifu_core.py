"""The pure-torch Waifu path (no ComfyUI) against the reference pipeline on the tiny snapshot files."""
from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fixtures.waifu_snapshot import build_waifu_snapshot, load_reference, reference_encode
from helpers import max_rel_err
from waifukit import loading
from waifukit.flow import flow_sigmas, initial_noise, sample_flow_euler
from waifukit.waifu.dit import LinearDiT, to_sana_layout
from waifukit.vae16.autoencoder import AutoencoderKL
from waifukit.mexma.model import MexmaSigLIPText, resolve_mexma
from waifukit.mexma.xlmr import XLMRobertaTextModel

MULTILINGUAL = ["Девушка с зонтиком под дождём", "一只可爱的猫在花园里", "桜の下で笑う少女", "A girl, Silver Hair  ", ""]


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return build_waifu_snapshot(tmp_path_factory.mktemp("snap") / "waifu-2b")


@pytest.fixture(scope="module")
def ref(snap):
    return load_reference(snap)


def _text_tower(path):
    """The Waifu text path exactly as the loader nodes resolve it: per-token XLM-R states and the tokenizer."""
    res = resolve_mexma(path)
    te = MexmaSigLIPText(res.text_params, res.projector_dim, res.projector_bias).eval()
    loading.load_strict(te, res.text_state_dict, res.source)
    return te.text_model, res.tokenizer


def _build(resolved, cls):
    module = cls(resolved.params, dtype=torch.float32).eval()
    loading.load_strict(module, resolved.state_dict, resolved.source)
    return module


def encode(te, tok, prompts):
    ids, mask = tok([p.lower().strip() for p in prompts])
    with torch.no_grad():
        return te(ids, mask), mask


def test_flow_sigmas_bitwise_equal_diffusers():
    for shift in (1.0, 3.0, 5.0):
        for steps in (1, 4, 20, 28):
            sched = FlowMatchEulerDiscreteScheduler(shift=shift)
            sched.set_timesteps(steps)
            assert torch.equal(flow_sigmas(steps, shift), sched.sigmas)
            assert torch.equal(flow_sigmas(steps, shift)[:-1] * 1000, sched.timesteps)


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    full = flow_sigmas(10, 3.0)
    assert torch.equal(flow_sigmas(5, 3.0, denoise=0.5), full[-6:])
    with pytest.raises(ValueError):
        flow_sigmas(0, 3.0)


def test_multilingual_prompts_tokenize_and_encode_like_reference(snap, ref):
    te, tok = _text_tower(snap)
    ids, mask = tok([p.lower().strip() for p in MULTILINGUAL])
    ref_tok = ref["tokenizer"]([p.lower().strip() for p in MULTILINGUAL], padding="max_length", max_length=512,
                               truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref_tok.input_ids) and torch.equal(mask, ref_tok.attention_mask)
    assert (ids[:3, 1:4] != 3).all(), "Cyrillic/CJK prompts must not collapse to <unk>"
    ours, _ = encode(te, tok, MULTILINGUAL)
    theirs, _ = reference_encode(ref, MULTILINGUAL)
    assert max_rel_err(ours, theirs) <= 1e-4  # fp32 parity bound for every module


def test_eager_pipeline_latents_match_reference(snap, ref):
    """Text tower + Linear DiT + flow-Euler with CFG, all ours, vs diffusers' scheduler loop: fp32, <= 1e-4."""
    dit_res = loading.resolve_linear_dit(snap)
    (te, tok), dit = _text_tower(snap), _build(dit_res, LinearDiT)
    assert dit_res.extra["shift"] == 3.0
    prompts, seed, steps, cfg = ["Ночной город, неон"] * 2, 11, 3, 4.5
    cond, cond_mask = encode(te, tok, prompts)
    uncond, uncond_mask = encode(te, tok, [""] * 2)
    noise = initial_noise([2, 16, 8, 12], seed)
    with torch.no_grad():
        ours = sample_flow_euler(lambda x, t, c, m: dit(x, t, c, attention_mask=m), noise, flow_sigmas(steps, 3.0),
                                 cond, cond_mask, uncond, uncond_mask, cfg)
        sched = ref["scheduler"]
        sched.set_timesteps(steps)
        rc, rcm = reference_encode(ref, prompts)
        ru, rum = reference_encode(ref, [""] * 2)
        x = noise.clone()
        for t in sched.timesteps:
            v = ref["transformer"](torch.cat([x, x]), encoder_hidden_states=torch.cat([ru, rc]),
                                   encoder_attention_mask=torch.cat([rum, rcm]), timestep=t.expand(4)).sample
            v_u, v_c = v.chunk(2)
            x = sched.step(v_u + cfg * (v_c - v_u), t, x).prev_sample
    assert max_rel_err(ours, x) <= 1e-4


def test_vae_from_snapshot_matches_reference(snap, ref):
    vae = _build(loading.resolve_vae(snap), AutoencoderKL)
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert max_rel_err(vae.decode(z), ref["vae"].decode(z).sample) <= 1e-4
        assert max_rel_err(vae.encode(img), ref["vae"].encode(img).latent_dist.mode()) <= 1e-4


def test_original_sana_pth_loads_weights_only(snap, tmp_path):
    """Issue 10 defect 4: recoilme/waifu's save_checkpoint container (state_dict + epoch + rng_state with numpy's
    RNG state, pickled under numpy-1 names) loads with weights_only plus the numpy-array allow-list."""
    from fixtures.waifu_snapshot import pickle_globals, save_sana_checkpoint
    res = loading.resolve_linear_dit(snap)
    sd = {k: v.clone() for k, v in res.state_dict.items()}
    sd["y_embedder.y_embedding"] = torch.randn(512, 128)  # buffers the original checkpoints carry
    path = save_sana_checkpoint(sd, tmp_path / "waifu-2b-v09.pth")
    names = pickle_globals(path)
    assert {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"} <= names, names
    # Control: torch's plain weights_only refuses this very file (what the old loader did).
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)
    got = loading.resolve_linear_dit(path)
    assert got.params == res.params and got.extra["shift"] is None
    assert set(got.state_dict) == set(res.state_dict)
    assert all(torch.equal(got.state_dict[k], res.state_dict[k]) for k in res.state_dict)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os
        return (os.system, (self.cmd,))


def test_numpy_allow_list_still_refuses_code(tmp_path):
    """The numpy allow-list admits array data only: a save_checkpoint-like .pth that also carries os.system is
    refused, naming the file, and the command never runs."""
    from fixtures.waifu_snapshot import save_sana_checkpoint
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    save_sana_checkpoint({"w": torch.zeros(1), "x": _System(f"touch {marker}")}, path)
    with pytest.raises(loading.CheckpointError, match="evil.pth.*weights-only"):
        loading.read_state_dict(path)
    assert not marker.exists()
    # Control: an unrestricted load of the same file does run it (so the test can see the difference).
    torch.load(path, weights_only=False)
    assert marker.exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickles_with_code_are_refused(tmp_path, capfd):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, f)
    with pytest.raises(loading.CheckpointError, match="evil.ckpt"):
        loading.read_state_dict(path)
    assert "pickle code ran" not in capfd.readouterr().out


def test_truncated_and_wrong_family_files_name_file_and_fix(snap, tmp_path):
    data = (snap / "vae" / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(loading.CheckpointError, match="half.safetensors.*download it again"):
        loading.resolve_vae(bad)
    with pytest.raises(loading.CheckpointError, match="diffusion_pytorch_model.fp16.safetensors.*not a Waifu"):
        loading.resolve_linear_dit(snap / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(loading.CheckpointError, match="not a 16-channel AutoencoderKL"):
        loading.resolve_vae(snap / "transformer" / "diffusion_pytorch_model.fp16.safetensors")


def test_missing_tokenizer_is_a_clear_error(snap, tmp_path):
    lone = tmp_path / "te" / "mexma.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((snap / "text_encoder" / "model.fp16.safetensors").read_bytes())
    with pytest.raises(loading.CheckpointError, match="(?s)mexma.safetensors.*tokenizer.json"):
        resolve_mexma(lone)


def test_diffusers_and_sana_layouts_are_the_same_model(snap):
    res = loading.resolve_linear_dit(snap)
    assert to_sana_layout(res.state_dict).keys() == res.state_dict.keys()


def test_vae_blocks_follow_the_weights_when_the_config_is_silent(snap, tmp_path):
    """A vae/config.json without mid_block_add_attention means True to diffusers; the 16ch VAE's weights have no
    mid-block attention, so the weights decide (and scaling still comes from the config)."""
    import json
    import shutil
    vae_dir = tmp_path / "vae"
    shutil.copytree(snap / "vae", vae_dir)
    cfg = json.loads((vae_dir / "config.json").read_text())
    cfg.pop("mid_block_add_attention", None)
    cfg["scaling_factor"] = 0.2
    (vae_dir / "config.json").write_text(json.dumps(cfg))
    res = loading.resolve_vae(tmp_path)
    assert res.params.mid_block_add_attention is False and res.params.scaling_factor == 0.2
    _build(res, AutoencoderKL)  # loads strictly


def test_full_size_architectures_have_the_published_parameter_counts():
    """Built on the meta device: the defaults are waifu-2b's, down to the parameter (counts that fit the file
    sizes in huggingface.co/AiArtLab/waifu-2b: 1,601,523,856 for the DiT = the 3.2 GB fp16 file; 558.84 M for
    XLM-R-large without pooler; 81.72 M for the 16ch VAE without mid-block attention)."""
    from waifukit.waifu.dit import LinearDiTParams
    from waifukit.vae16.autoencoder import AutoencoderKLParams
    from waifukit.mexma.xlmr import XLMRobertaParams

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(LinearDiT(LinearDiTParams(), device="meta")) == 1_601_523_856
    assert round(count(XLMRobertaTextModel(XLMRobertaParams(), device="meta")) / 1e6, 2) == 558.84
    assert round(count(AutoencoderKL(AutoencoderKLParams(), device="meta")) / 1e6, 2) == 81.72


def test_text_encoder_folder_uses_its_own_tokenizer(snap, tmp_path):
    """Issue 10 defect 7: models/text_encoders/<name>/ with its own tokenizer.json must not take the sibling
    models/text_encoders/tokenizer/ (another model's); without its own, it is refused rather than borrowed."""
    import shutil
    te_root = tmp_path / "text_encoders"
    own = te_root / "mexma-text"
    own.mkdir(parents=True)
    shutil.copy(snap / "text_encoder" / "model.fp16.safetensors", own / "model.safetensors")
    shutil.copy(snap / "text_encoder" / "config.json", own / "config.json")
    shutil.copy(snap / "tokenizer" / "tokenizer.json", own / "tokenizer.json")
    shutil.copytree(snap / "tokenizer", te_root / "tokenizer")  # someone else's tokenizer folder
    res = resolve_mexma(own / "model.safetensors")
    assert res.tokenizer.source.startswith(str(own / "tokenizer.json")), res.tokenizer.source
    (own / "tokenizer.json").unlink()
    with pytest.raises(loading.CheckpointError, match="(?s)model.safetensors.*tokenizer.json"):
        resolve_mexma(own / "model.safetensors")
    # The snapshot layout still finds the snapshot's tokenizer/ beside text_encoder/.
    assert str(snap / "tokenizer") in resolve_mexma(snap).tokenizer.source


def test_snapshot_without_transformer_config_is_refused(snap, tmp_path):
    """A snapshot's transformer/config.json pins the head counts; without it (an incomplete download) the loader
    names the file instead of inferring them. A single file keeps the documented shape inference (control)."""
    import shutil
    copy = tmp_path / "waifu-2b"
    shutil.copytree(snap, copy)
    assert loading.resolve_linear_dit(copy / "transformer").params  # control: complete snapshot loads
    (copy / "transformer" / "config.json").unlink()
    with pytest.raises(loading.CheckpointError, match=r"transformer/config.json: missing"):
        loading.resolve_linear_dit(copy / "transformer")
    single = tmp_path / "single" / "waifu-transformer.safetensors"
    single.parent.mkdir()
    shutil.copy(next((copy / "transformer").glob("*.safetensors")), single)
    assert loading.resolve_linear_dit(single).params == loading.resolve_linear_dit(snap / "transformer").params
