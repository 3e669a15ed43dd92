"""Parity of waifukit.vae16.autoencoder.AutoencoderKL with diffusers AutoencoderKL on tiny random models.

Bound: max|ours - ref| / max|ref| <= 1e-4 in fp32 for decode, encode (posterior mean) and seeded sampling.
"""
import re

import pytest
import torch

from tests.helpers import max_rel_err, randomize_
from waifukit.vae16.autoencoder import AutoencoderKL, AutoencoderKLParams, check_latent_channels, to_native_layout

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

# (block_out_channels, layers_per_block, norm_num_groups): a 2-level model with 8 groups and a 3-level one with
# 32 groups (the count infer() assumes, so its params equal the config's exactly).
VARIANTS = {"2lvl": ((32, 64), 1, 8), "3lvl": ((32, 64, 64), 1, 32)}
_CACHE = {}


def ref_vae(variant, attn):
    key = (variant, attn)
    if key not in _CACHE:
        ch, layers, groups = VARIANTS[variant]
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=ch, layers_per_block=layers,
            norm_num_groups=groups, down_block_types=("DownEncoderBlock2D",) * len(ch),
            up_block_types=("UpDecoderBlock2D",) * len(ch), mid_block_add_attention=attn)
        randomize_(vae, seed=1, std=0.05).eval()
        _CACHE[key] = vae
    return _CACHE[key]


def ours_from(sd, params):
    model = AutoencoderKL(params).eval()
    model.load_state_dict(to_native_layout(sd), strict=True)
    return model


def inputs():
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 16, 6, 8, generator=g), torch.rand(2, 3, 48, 64, generator=g) * 2 - 1


def check_parity(ours, ref):
    z, x = inputs()
    with torch.no_grad():
        dec = max_rel_err(ours.decode(z), ref.decode(z).sample)
        enc = max_rel_err(ours.encode(x), ref.encode(x).latent_dist.mean)
        s_ours = ours.encode(x, generator=torch.Generator().manual_seed(7), sample=True)
        s_ref = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        smp = max_rel_err(s_ours, s_ref)
    assert dec <= TOL and enc <= TOL and smp <= TOL, (dec, enc, smp)
    return dec, enc, smp


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", [True, False])
def test_parity_diffusers_layout(variant, attn):
    ref = ref_vae(variant, attn)
    sd = ref.state_dict()
    assert any(".attentions.0." in k for k in sd) == attn
    params = AutoencoderKLParams.from_diffusers_config(dict(ref.config))
    check_parity(ours_from(sd, params), ref)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", [True, False])
def test_config_matches_inferred(variant, attn):
    ref = ref_vae(variant, attn)
    from_cfg = AutoencoderKLParams.from_diffusers_config(dict(ref.config))
    assert from_cfg.mid_block_add_attention == attn
    sd = to_native_layout(ref.state_dict())
    groups = VARIANTS[variant][2]
    if groups == 32:
        assert AutoencoderKLParams.infer(sd) == from_cfg
    else:
        # The group count is not in the weights: infer() assumes 32 unless told.
        assert AutoencoderKLParams.infer(sd).norm_num_groups == 32
        assert AutoencoderKLParams.infer(sd, norm_num_groups=groups) == from_cfg


def to_ldm(sd, n_levels):
    """Independent diffusers -> LDM/ComfyUI mapping (written out by hand, not the module's converter)."""
    out = {}
    for k, v in sd.items():
        n = k
        m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
        if m:
            n = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
        if m:
            n = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
        if m:
            n = f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
        if m:
            n = f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        n = n.replace("conv_shortcut", "nin_shortcut")
        n = n.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", k)
        if m:
            layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
            n = f"{m[1]}.mid.attn_1.{layer}.{m[3]}"
            if layer != "norm" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM stores them as 1x1 convs
        n = n.replace("encoder.conv_norm_out", "encoder.norm_out").replace("decoder.conv_norm_out", "decoder.norm_out")
        out[n] = v.clone()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", [True, False])
def test_ldm_layout(variant, attn):
    ref = ref_vae(variant, attn)
    sd = ref.state_dict()
    ldm = to_ldm(sd, len(VARIANTS[variant][0]))
    assert not any("_blocks" in k or "mid_block" in k for k in ldm)
    # Inside a whole checkpoint, like ComfyUI / original LDM checkpoints store it.
    ckpt = {"first_stage_model." + k: v for k, v in ldm.items()}
    ckpt["model.diffusion_model.x.weight"] = torch.zeros(1)
    native = to_native_layout(ckpt)
    assert set(native) == set(sd)
    groups = VARIANTS[variant][2]
    check_parity(ours_from(ckpt, AutoencoderKLParams.infer(native, norm_num_groups=groups)), ref)


def test_old_diffusers_attention_names_and_prefix():
    ref = ref_vae("2lvl", True)
    old = {}
    for k, v in ref.state_dict().items():
        for new, o in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        old["vae." + k] = v
    assert any(".proj_attn." in k for k in old)
    params = AutoencoderKLParams.from_diffusers_config(dict(ref.config))
    check_parity(ours_from(old, params), ref)


def test_wrong_family_refused():
    t = torch.zeros(4, 4)
    cases = {
        "diffusion transformer": {"blocks.0.attn.qkv.weight": t, "x_embedder.proj.weight": t},
        "text encoder": {"encoder.layer.0.attention.self.query.weight": t, "embeddings.word_embeddings.weight": t},
        "UNet": {"down_blocks.0.resnets.0.conv1.weight": t, "time_embedding.linear_1.weight": t},
        "something else": {"foo.weight": t},
    }
    for what, sd in cases.items():
        with pytest.raises(ValueError, match=what):
            to_native_layout(sd)
    with pytest.raises(ValueError, match="transformer"):
        to_native_layout({"transformer_blocks.0.attn1.to_q.weight": t})


def test_four_channel_vae_refused():
    small = AutoencoderKLParams(latent_channels=4, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8)
    sd = to_native_layout(AutoencoderKL(small).state_dict())  # generic: converts fine
    params = AutoencoderKLParams.infer(sd, norm_num_groups=8)
    assert params.latent_channels == 4
    with pytest.raises(ValueError, match="16-channel"):
        check_latent_channels(params, source="sdxl_vae.safetensors")
    check_latent_channels(AutoencoderKLParams())  # the Waifu default passes


def test_bad_config_and_inputs():
    cfg = dict(ref_vae("2lvl", False).config)
    with pytest.raises(ValueError, match="block types"):
        AutoencoderKLParams.from_diffusers_config({**cfg, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKLParams.from_diffusers_config({**cfg, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderKLParams(block_out_channels=(48, 64), norm_num_groups=32)
    p = AutoencoderKLParams.from_diffusers_config({**cfg, "shift_factor": None, "latents_mean": [0.0] * 16,
                                                   "latents_std": [1.0] * 16})
    assert p.shift_factor == 0.0 and len(p.latents_mean) == 16
    # diffusers' own default when the key is missing is attention on.
    assert AutoencoderKLParams.from_diffusers_config({"latent_channels": 16}).mid_block_add_attention is True
    assert AutoencoderKLParams().mid_block_add_attention is False and AutoencoderKLParams().downscale == 8
    model = AutoencoderKL(AutoencoderKLParams(block_out_channels=(32, 32, 32, 32), layers_per_block=1))
    with pytest.raises(ValueError, match="nearest valid size is 48x64"):
        model.encode(torch.zeros(1, 3, 50, 62))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_smoke(dtype):
    ref = ref_vae("2lvl", True)
    params = AutoencoderKLParams.from_diffusers_config(dict(ref.config))
    ours32 = ours_from(ref.state_dict(), params)
    ours = AutoencoderKL(params, dtype=dtype).eval()
    ours.load_state_dict(to_native_layout(ref.state_dict()))
    assert ours.dtype == dtype
    z, x = inputs()
    with torch.no_grad():
        img = ours.decode(z.to(dtype))
        lat = ours.encode(x.to(dtype), generator=torch.Generator().manual_seed(0), sample=True)
        assert img.dtype == dtype and lat.dtype == dtype and lat.shape == (2, 16, 24, 32)
        assert torch.isfinite(img).all() and torch.isfinite(lat).all()
        assert max_rel_err(img, ours32.decode(z)) < 5e-2
