"""SDXS UNet (config-driven UNet2DConditionModel port) vs diffusers' UNet2DConditionModel.

Bound: fp32 output, max rel err <= 1e-4 on the same random weights and config, for tiny configs shaped like
AiArtLab/sdxs (16 in/out channels, 4 levels, transformer depth varying per level, one conditioning token)
and for the other block types / projections a config may use. Bad configs and wrong-family weights raise
errors naming what is wrong.
"""
import pytest
import torch

from helpers import max_rel_err, randomize_
from waifukit.sdxs.unet import SDXSUNet, SDXSUNetParams, to_native_layout

diffusers = pytest.importorskip("diffusers")

SDXS_LIKE = dict(
    sample_size=16, in_channels=16, out_channels=16, block_out_channels=[32, 48, 64, 80],
    down_block_types=["CrossAttnDownBlock2D"] * 4, up_block_types=["CrossAttnUpBlock2D"] * 4,
    layers_per_block=1, transformer_layers_per_block=[1, 2, 1, 2], attention_head_dim=[2, 2, 4, 4],
    cross_attention_dim=24, norm_num_groups=16,
)
VARIANTS = {
    "sdxs_like": SDXS_LIKE,
    "mixed_linear": dict(SDXS_LIKE, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         use_linear_projection=True, layers_per_block=[1, 2, 1, 1], attention_head_dim=4,
                         flip_sin_to_cos=False, freq_shift=1, block_out_channels=[32, 32, 48, 64]),
}


def _pair(cfg, seed=0):
    ref = randomize_(diffusers.UNet2DConditionModel(**cfg).eval(), seed=seed, std=0.05)
    params = SDXSUNetParams.from_diffusers_config(dict(ref.config))
    ours = SDXSUNet(params).eval()
    ours.load_state_dict(to_native_layout(ref.state_dict()), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])  # 12x20: not a multiple of 8, upsample sizes forwarded
def test_unet_matches_diffusers(name, hw):
    ref, ours = _pair(VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, *hw, generator=g)
    ctx = torch.randn(2, 1, ref.config.cross_attention_dim, generator=g)
    t = torch.tensor([999.0, 421.0])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
    err = max_rel_err(got, expected)
    assert err <= 1e-4, f"{name} {hw}: max rel err {err:.2e}"


def test_pooled_context_2d_is_one_token():
    ref, ours = _pair(SDXS_LIKE)
    x, ctx = torch.randn(1, 16, 16, 16), torch.randn(1, 24)
    with torch.no_grad():
        assert torch.equal(ours(x, torch.tensor([10.0]), context=ctx), ours(x, torch.tensor([10.0]), context=ctx[:, None]))


@pytest.mark.parametrize("key,value,needle", [
    ("addition_embed_type", "text_time", "addition_embed_type"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("down_block_types", ["AttnDownBlock2D"] * 4, "AttnDownBlock2D"),
    ("num_attention_heads", 8, "num_attention_heads"),
    ("_class_name", "SanaTransformer2DModel", "UNet2DConditionModel"),
])
def test_unsupported_config_is_refused(key, value, needle):
    cfg = dict(SDXS_LIKE, **{key: value})
    with pytest.raises(ValueError, match=needle):
        SDXSUNetParams.from_diffusers_config(cfg)


def test_wrong_family_weights_named():
    from fixtures.waifu_snapshot import tiny_transformer
    with pytest.raises(ValueError, match="Sana/Waifu Linear DiT"):
        to_native_layout(tiny_transformer().state_dict())


def test_waifu_loader_names_a_unet():
    from waifukit.waifu.dit import to_sana_layout
    ref = diffusers.UNet2DConditionModel(**SDXS_LIKE)
    with pytest.raises(ValueError, match="a UNet"):
        to_sana_layout(ref.state_dict())


def test_one_key_cross_attention_is_the_attention_written_out():
    """SDXS cross-attends to one token (the pooled text vector): the shortcut (every query gets to_out(v)) equals
    the attention computed in full; a second key takes the general path and moves the result (control)."""
    import torch.nn.functional as F

    from waifukit.ops import TorchOps
    from waifukit.sdxs.unet import Attention
    g = torch.Generator().manual_seed(0)
    att = randomize_(Attention(64, 4, 32, False, None, None, TorchOps), 1).eval()
    x, ctx = torch.randn(2, 50, 64, generator=g), torch.randn(2, 1, 32, generator=g)
    with torch.no_grad():
        q, k, v = (t.view(2, -1, 4, 16).transpose(1, 2) for t in (att.to_q(x), att.to_k(ctx), att.to_v(ctx)))
        full = att.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 50, 64))
        fast = att(x, ctx)
        assert fast.shape == full.shape and max_rel_err(fast, full) <= 1e-6
        two = torch.cat([ctx, torch.randn(2, 1, 32, generator=g)], dim=1)
        assert max_rel_err(att(x, two), fast) > 1e-2
