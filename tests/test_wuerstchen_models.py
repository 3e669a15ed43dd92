"""Würstchen v2 Stage C / B / A and the DDPM sampler vs the diffusers classes on the same random weights (fp32).

Bound: max relative error (max|ours-ref| / max|ref|) <= 1e-4 for every forward; the scheduler step and the
timestep lists are bit-identical. Bad configs and wrong-family files give ValueError/CheckpointError naming
what was found.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fixtures.wuerstchen_snapshot import tiny_decoder, tiny_prior, tiny_vqgan
from helpers import max_rel_err
from waifukit.loading import CheckpointError
from waifukit.paella_vq import PaellaVQ, PaellaVQParams, resolve_vqgan
from waifukit.wuerstchen_decoder import DiffNeXtParams, WuerstchenDiffNeXt, resolve_decoder
from waifukit.wuerstchen_prior import WuerstchenPrior, WuerstchenPriorParams, resolve_prior
from waifukit.wuerstchen_sched import WuerstchenDDPM, sample, timesteps

BOUND = 1e-4


def _ours(cls, params, ref):
    model = cls(params).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _prior_params(ref):
    c = ref.config
    return WuerstchenPriorParams(c_in=c.c_in, c=c.c, c_cond=c.c_cond, c_r=c.c_r, depth=c.depth, nhead=c.nhead)


def _decoder_params(ref):
    return DiffNeXtParams.from_diffusers_config(dict(ref.config, _class_name="WuerstchenDiffNeXt"))


@pytest.fixture(scope="module")
def prior_pair():
    ref = tiny_prior()
    return ref, _ours(WuerstchenPrior, _prior_params(ref), ref)


@pytest.fixture(scope="module")
def decoder_pair():
    ref = tiny_decoder()
    return ref, _ours(WuerstchenDiffNeXt, _decoder_params(ref), ref)


@pytest.fixture(scope="module")
def vq_pair():
    ref = tiny_vqgan()
    return ref, _ours(PaellaVQ, PaellaVQParams.from_diffusers_config(dict(ref.config)), ref)


@torch.no_grad()
@pytest.mark.parametrize("hw,r", [((3, 3), [1.0, 0.5]), ((6, 4), [0.6842, 0.0])])
def test_prior_forward_parity(prior_pair, hw, r):
    ref, ours = prior_pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, *hw, generator=g)
    c = torch.randn(2, 77, ref.config.c_cond, generator=g)
    rr = torch.tensor(r)
    err = max_rel_err(ours(x, rr, c), ref(x, r=rr, c=c))
    assert err <= BOUND, err


@torch.no_grad()
@pytest.mark.parametrize("hw,emb_hw", [((32, 32), (3, 3)), ((64, 32), (6, 3)), ((48, 80), (5, 7))])
def test_decoder_forward_parity(decoder_pair, hw, emb_hw):
    ref, ours = decoder_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    eff = torch.randn(2, 16, *emb_hw, generator=g) * 3
    clip = torch.randn(2, 77, ref.config.clip_embd, generator=g)
    r = torch.tensor([0.9, 0.25])
    err = max_rel_err(ours(x, r, eff, clip), ref(x, r=r, effnet=eff, clip=clip))
    assert err <= BOUND, err


@torch.no_grad()
def test_vqgan_decode_and_encode_parity(vq_pair):
    ref, ours = vq_pair
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 4, 16, 24, generator=g)
    assert max_rel_err(ours.decode(h), ref.decode(h).sample) <= BOUND
    img = torch.rand(1, 3, 64, 32, generator=g)
    assert max_rel_err(ours.encode(img), ref.encode(img, return_dict=False)[0]) <= BOUND


def test_default_timesteps_are_the_references():
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
    from diffusers import DDPMWuerstchenScheduler
    s = DDPMWuerstchenScheduler()
    s.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    assert torch.equal(timesteps(29, "wuerstchen_default"), s.timesteps)
    for n in (1, 4, 12, 60):
        s.set_timesteps(n)
        assert torch.equal(timesteps(n, "linear"), s.timesteps)
    for n in (2, 5, 10, 40):  # the generalised default stays monotone, from 1 to 0, through 2/3
        ts = timesteps(n, "wuerstchen_default")
        assert len(ts) == n + 1 and ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError):
        timesteps(0)
    with pytest.raises(ValueError):
        timesteps(4, "karras")


def test_scheduler_step_is_bit_identical():
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
    ref = DDPMWuerstchenScheduler()
    ref.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    ours = WuerstchenDDPM()
    ts = timesteps(29, "wuerstchen_default")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 5, generator=g)
    for i in range(len(ts) - 1):
        eps = torch.randn(x.shape, generator=g)
        t = ts[i].expand(2)
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        got = ours.step(eps, t, ts[i + 1].expand(2), x, noise)
        assert torch.equal(got, expected), (i, (got - expected).abs().max())
        x = expected


def test_sample_loop_matches_pipeline_loop(prior_pair):
    """Our loop (initial noise, per-step noise, CFG lerp, [cond; uncond]) vs the loop diffusers runs."""
    from diffusers import DDPMWuerstchenScheduler
    ref_model, ours = prior_pair
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 77, ref_model.config.c_cond, generator=g)
    ts = timesteps(6, "wuerstchen_default")
    with torch.no_grad():
        got = sample(lambda x, r: ours(x, r, c), (1, 16, 3, 3), ts, torch.Generator().manual_seed(9), cfg=4.0)
        sched = DDPMWuerstchenScheduler()
        sched.set_timesteps(timesteps=ts)
        gen = torch.Generator().manual_seed(9)
        x = torch.randn((1, 16, 3, 3), generator=gen)
        for t in sched.timesteps[:-1]:
            r = t.expand(1)
            eps_c, eps_u = ref_model(torch.cat([x, x]), r=torch.cat([r, r]), c=c).chunk(2)
            x = sched.step(torch.lerp(eps_u, eps_c, 4.0), r, x, generator=gen).prev_sample
    assert max_rel_err(got, x) <= BOUND


# --- loading: files, inference from shapes, original layout, wrong families -----------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wfiles")
    out = {}
    for name, model in (("prior", tiny_prior()), ("decoder", tiny_decoder()), ("vqgan", tiny_vqgan())):
        out[name] = d / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out[name]))
    from fixtures.wuerstchen_snapshot import tiny_clip_text
    te = tiny_clip_text(600, 64, 7)
    out["clip"] = d / "clip.safetensors"
    save_file({"text_model." + k: v.contiguous() for k, v in te.state_dict().items()}, str(out["clip"]))
    return out


def test_single_files_infer_the_published_configs(files):
    params, sd, _ = resolve_prior(files["prior"])
    assert params == _prior_params(tiny_prior())
    params, sd, _ = resolve_decoder(files["decoder"])
    assert params == _decoder_params(tiny_decoder())
    params, sd, _ = resolve_vqgan(files["vqgan"])
    assert params == PaellaVQParams.from_diffusers_config(dict(tiny_vqgan().config))


def test_original_in_proj_layout_converts(tmp_path):
    ref = tiny_prior()
    sd = {}
    for k, v in ref.state_dict().items():
        if ".attention.to_q." in k:
            kind = k.rsplit(".", 1)[1]
            base = k.split(".attention.")[0]
            sd[f"{base}.attention.attn.in_proj_{kind}"] = torch.cat(
                [v, ref.state_dict()[k.replace("to_q", "to_k")], ref.state_dict()[k.replace("to_q", "to_v")]])
        elif ".attention.to_out.0." in k:
            sd[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        else:
            sd[k] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "orig.safetensors"))
    params, sd2, _ = resolve_prior(tmp_path / "orig.safetensors")
    model = WuerstchenPrior(params).eval()
    model.load_state_dict(sd2, strict=True)
    g = torch.Generator().manual_seed(0)
    x, c, r = torch.randn(1, 16, 3, 3, generator=g), torch.randn(1, 77, 128, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        assert max_rel_err(model(x, r, c), ref(x, r=r, c=c)) <= BOUND


@pytest.mark.parametrize("resolver,name,wanted", [
    (resolve_prior, "decoder", "Stage B decoder"), (resolve_prior, "vqgan", "VQGAN"), (resolve_prior, "clip", "CLIP"),
    (resolve_decoder, "prior", "Stage C prior"), (resolve_decoder, "vqgan", "VQGAN"), (resolve_decoder, "clip", "CLIP"),
    (resolve_vqgan, "prior", "Stage C prior"), (resolve_vqgan, "decoder", "Stage B decoder"),
    (resolve_vqgan, "clip", "CLIP"),
])
def test_wrong_family_is_named(files, resolver, name, wanted):
    with pytest.raises(CheckpointError) as e:
        resolver(files[name])
    msg = str(e.value)
    assert files[name].name in msg and wanted in msg, msg


def test_clip_loader_rejects_diffusion_models(files):
    from waifukit.clip_text import resolve_clip_text
    for name, wanted in (("prior", "Stage C"), ("decoder", "Stage B"), ("vqgan", "VQGAN")):
        with pytest.raises(CheckpointError) as e:
            resolve_clip_text(files[name])
        assert wanted in str(e.value) and files[name].name in str(e.value)


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError):
        WuerstchenPriorParams(c=100, nhead=3)
    with pytest.raises(ValueError):
        DiffNeXtParams(blocks=[1, 1])
    with pytest.raises(ValueError):
        DiffNeXtParams(level_config=["CT", "CTX", "CTA", "CTA"])
    with pytest.raises(ValueError):
        PaellaVQParams(scale_factor=0)
    with pytest.raises(ValueError):
        WuerstchenPriorParams.from_diffusers_config({"_class_name": "WuerstchenDiffNeXt"})


@torch.no_grad()
def test_shape_errors_are_clear(decoder_pair, prior_pair, vq_pair):
    _, dec = decoder_pair
    with pytest.raises(ValueError, match="multiples of 16"):
        dec(torch.randn(1, 4, 40, 32), torch.tensor([0.5]), torch.randn(1, 16, 3, 3), torch.randn(1, 77, 64))
    with pytest.raises(ValueError, match="Stage C embeddings"):
        dec(torch.randn(1, 4, 32, 32), torch.tensor([0.5]), torch.randn(1, 4, 3, 3), torch.randn(1, 77, 64))
    with pytest.raises(ValueError, match="CLIP-bigG"):
        prior_pair[1](torch.randn(1, 16, 3, 3), torch.tensor([0.5]), torch.randn(1, 77, 64))
    with pytest.raises(ValueError, match="from Stage B"):
        vq_pair[1].decode(torch.randn(1, 16, 3, 3))
