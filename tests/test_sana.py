"""Parity of waifukit.waifu.dit.LinearDiT with diffusers' SanaTransformer2DModel on a tiny random model,
through both the diffusers and the original-Sana key layouts."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import max_rel_err, randomize_
from waifukit.waifu.dit import LinearDiT, LinearDiTParams, detect_layout, relu_linear_attention, to_sana_layout

# diffusers' SanaLinearAttnProcessor2_0 hard-codes the denominator eps to 1e-15
# (original Sana blocks use 1e-8, our default).
DIFFUSERS_LINEAR_EPS = 1e-15

TINY = dict(
    in_channels=16, out_channels=16, num_attention_heads=7, attention_head_dim=32, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=112, cross_attention_dim=224,
    caption_channels=64, mlp_ratio=2.5, sample_size=8, patch_size=1, interpolation_scale=None,
)


@pytest.fixture(scope="module")
def ref():
    """Tiny randomised diffusers model, its inputs and its fp32 output."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(**TINY).eval()
    randomize_(model, seed=1, std=0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 6, generator=g)                  # non-square latent
    t = torch.tensor([999.0, 250.0])
    ctx = torch.randn(2, 12, 64, generator=g)
    mask = torch.zeros(2, 12)
    mask[0, :5] = 1
    mask[1, :9] = 1                                             # different real lengths
    with torch.no_grad():
        out = model(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask).sample
    return model, (x, t, ctx, mask), out


def _ours(sd_sana, eps, dtype=torch.float32):
    params = dataclasses.replace(LinearDiTParams.infer(sd_sana), linear_eps=eps)
    model = LinearDiT(params).eval()
    model.load_state_dict(sd_sana, strict=True)
    return model.to(dtype)


def _independent_sana_sd(model) -> dict:
    """diffusers -> original Sana keys, written here independently of to_sana_layout."""
    d = {k: v.detach().clone() for k, v in model.state_dict().items()}
    top = {
        "patch_embed.proj": "x_embedder.proj",
        "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_embed.linear": "t_block.1",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "proj_out": "final_layer.linear",
    }
    sd = {}
    for a, b in top.items():
        for s in ("weight", "bias"):
            sd[f"{b}.{s}"] = d[f"{a}.{s}"]
    sd["attention_y_norm.weight"] = d["caption_norm.weight"]
    sd["final_layer.scale_shift_table"] = d["scale_shift_table"]
    for i in range(TINY["num_layers"]):
        a, b = f"transformer_blocks.{i}", f"blocks.{i}"
        sd[f"{b}.scale_shift_table"] = d[f"{a}.scale_shift_table"]
        sd[f"{b}.attn.qkv.weight"] = torch.cat([d[f"{a}.attn1.to_{c}.weight"] for c in "qkv"])
        sd[f"{b}.cross_attn.kv_linear.weight"] = torch.cat([d[f"{a}.attn2.to_{c}.weight"] for c in "kv"])
        sd[f"{b}.cross_attn.kv_linear.bias"] = torch.cat([d[f"{a}.attn2.to_{c}.bias"] for c in "kv"])
        for s in ("weight", "bias"):
            sd[f"{b}.attn.proj.{s}"] = d[f"{a}.attn1.to_out.0.{s}"]
            sd[f"{b}.cross_attn.q_linear.{s}"] = d[f"{a}.attn2.to_q.{s}"]
            sd[f"{b}.cross_attn.proj.{s}"] = d[f"{a}.attn2.to_out.0.{s}"]
            sd[f"{b}.mlp.inverted_conv.conv.{s}"] = d[f"{a}.ff.conv_inverted.{s}"]
            sd[f"{b}.mlp.depth_conv.conv.{s}"] = d[f"{a}.ff.conv_depth.{s}"]
        sd[f"{b}.mlp.point_conv.conv.weight"] = d[f"{a}.ff.conv_point.weight"]
    assert len(sd) == len(d) - 4 * TINY["num_layers"]  # q|k|v -> qkv, k|v (w and b) -> kv: 4 fewer per block
    # Buffers original checkpoints carry, which the loader must drop.
    sd["y_embedder.y_embedding"] = torch.randn(300, TINY["caption_channels"])
    sd["pos_embed"] = torch.randn(1, 64, 224)
    return sd


def test_diffusers_layout_parity(ref):
    model, (x, t, ctx, mask), out_ref = ref
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    assert detect_layout(sd) == "diffusers"
    sana_sd = to_sana_layout(sd)
    for eps, tol in ((DIFFUSERS_LINEAR_EPS, 1e-4), (1e-8, 1e-4)):
        ours = _ours(sana_sd, eps)
        with torch.no_grad():
            out = ours(x, t, ctx, attention_mask=mask, transformer_options={}, control=None)
        err = max_rel_err(out, out_ref)
        print(f"diffusers layout, eps={eps:g}: max rel err {err:.3e}")
        assert out.shape == out_ref.shape
        assert err <= tol


def test_mask_kinds_and_padding_ignored(ref):
    model, (x, t, ctx, mask), out_ref = ref
    ours = _ours(to_sana_layout(model.state_dict()), DIFFUSERS_LINEAR_EPS)
    ctx2 = ctx.clone()
    ctx2[mask == 0] = 123.0                                   # padded tokens must not matter
    with torch.no_grad():
        for m in (mask.bool(), mask.long()):
            assert max_rel_err(ours(x, t, ctx2, attention_mask=m), out_ref) <= 1e-4
        # no mask == all real
        full = ours(x, t, ctx, attention_mask=torch.ones(2, 12))
        assert max_rel_err(ours(x, t, ctx), full) <= 1e-6


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_original_sana_layout_parity(ref, tmp_path, fmt):
    model, (x, t, ctx, mask), out_ref = ref
    sd = _independent_sana_sd(model)
    if fmt == "safetensors":
        path = tmp_path / "waifu.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        loaded = load_file(str(path))
    else:
        path = tmp_path / "waifu.pth"
        torch.save({"state_dict": sd}, path)
        loaded = torch.load(path, weights_only=True)["state_dict"]
    assert detect_layout(loaded) == "sana"
    sana_sd = to_sana_layout({"module." + k: v for k, v in loaded.items()})
    assert "pos_embed" not in sana_sd and "y_embedder.y_embedding" not in sana_sd
    ours = _ours(sana_sd, DIFFUSERS_LINEAR_EPS)
    with torch.no_grad():
        err = max_rel_err(ours(x, t, ctx, attention_mask=mask), out_ref)
    print(f"sana layout ({fmt}): max rel err {err:.3e}")
    assert err <= 1e-4


def test_params_config_equals_infer(ref):
    model = ref[0]
    from_cfg = LinearDiTParams.from_diffusers_config(model.config)
    inferred = LinearDiTParams.infer(to_sana_layout(model.state_dict()))
    assert from_cfg == inferred
    assert (from_cfg.num_heads, from_cfg.cross_head_dim, from_cfg.mlp_hidden) == (7, 112, 560)


def test_waifu_defaults():
    p = LinearDiTParams()
    assert (p.num_heads, p.cross_head_dim, p.mlp_hidden) == (70, 112, 5600)


@pytest.mark.parametrize("bad", [
    dict(qk_norm="rms_norm_across_heads"), dict(guidance_embeds=True), dict(interpolation_scale=1.0),
    dict(timestep_scale=400.0), dict(cross_attention_dim=128),
])
def test_config_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        LinearDiTParams.from_diffusers_config({**TINY, **bad})


def test_params_validation():
    with pytest.raises(ValueError):
        LinearDiTParams(hidden_size=100)
    with pytest.raises(ValueError):
        LinearDiTParams(cross_num_heads=0)


@pytest.mark.parametrize("sd, hint", [
    ({"roberta.encoder.layer.0.attention.self.query.weight": torch.zeros(1),
      "roberta.embeddings.word_embeddings.weight": torch.zeros(1)}, "XLM-R"),
    ({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1),
      "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "VAE"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "Flux"),
    ({}, "empty"),
])
def test_wrong_family(sd, hint):
    with pytest.raises(ValueError, match=hint):
        to_sana_layout(sd)
    with pytest.raises(ValueError):
        detect_layout(sd)


def test_patch_multiple_required():
    p = LinearDiTParams(patch_size=2, hidden_size=64, depth=1, cross_num_heads=1, caption_channels=8)
    model = LinearDiT(p)
    with pytest.raises(ValueError):
        model(torch.randn(1, 16, 7, 6), torch.tensor([500.0]), torch.randn(1, 3, 8))
    assert model(torch.randn(1, 16, 8, 6), torch.tensor([500.0]), torch.randn(1, 3, 8)).shape == (1, 16, 8, 6)


@pytest.mark.parametrize("which", ["model formula", "kernels eager twin"])
def test_linear_attention_matches_explicit(which):
    """The model's own formula and the pack's fast eager twin both equal the attention written out as a
    (quadratic) matrix of ReLU scores; a changed eps moves it far past the bound (control)."""
    import kernels
    op = relu_linear_attention if which == "model formula" else kernels.linear_attention_eager
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 10, 3, 4, generator=g) for _ in range(3))
    qr, kr = q.relu(), k.relu()
    w = torch.einsum("bnhd,bmhd->bhnm", qr, kr)               # un-normalised ReLU kernel
    ref = torch.einsum("bhnm,bmhe->bnhe", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + 1e-15)
    with torch.no_grad():
        assert max_rel_err(op(q, k, v, 1e-15), ref) <= 1e-5
        assert max_rel_err(op(q, k, v, 1.0), ref) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_smoke(ref, dtype):
    model, (x, t, ctx, mask), out_ref = ref
    ours = _ours(to_sana_layout(model.state_dict()), 1e-8, dtype=dtype)
    assert ours.dtype == dtype
    with torch.no_grad():
        out = ours(x.to(dtype), t, ctx.to(dtype), attention_mask=mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = max_rel_err(out.float(), out_ref)
    print(f"{dtype}: max rel err vs fp32 diffusers {err:.3e}")
    assert err <= 5e-2
