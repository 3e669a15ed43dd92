"""DDPM / DDIM schedule and steps vs diffusers' DDPMScheduler / DDIMScheduler.

Bounds: timesteps identical; every step's prev_sample exactly equal (same float32 operations), checked at
<= 1e-6 abs to stay robust to BLAS-free elementwise reordering; the whole seeded loop equal to diffusers'
(initial latent and per-step noise from one CPU generator in the reference's order).
"""
import numpy as np
import pytest
import torch

from waifukit.ddpm import DDPMParams, DiscreteSchedule, sample

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
         timestep_spacing="leading", steps_offset=1, clip_sample=False),
    dict(beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False,
         rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace", clip_sample=True,
         variance_type="fixed_large"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
         timestep_spacing="leading", variance_type="fixed_small_log", clip_sample=False),
    # dynamic thresholding (replaces clip_sample), with a ratio that bites on these magnitudes
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
         timestep_spacing="trailing", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    # clip_sample with a range, DDPMScheduler's defaults otherwise (clip_sample is on by default there)
    dict(beta_schedule="linear", clip_sample=True, clip_sample_range=0.5, steps_offset=1),
]


def _fake_model(x, t):
    # a deterministic function of (x, t) standing in for the UNet + CFG
    return torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1) / 1000.0)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 40])
def test_ddpm_loop_equals_diffusers(cfg, steps):
    ref = diffusers.DDPMScheduler(**cfg)
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ref.config)))
    ref.set_timesteps(steps)
    assert np.array_equal(ours.timesteps(steps), ref.timesteps.numpy())

    shape, seed = (2, 4, 6, 5), 1234
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for t in ref.timesteps:
        x = ref.step(_fake_model(x, t.float().expand(2)), t, x, generator=g).prev_sample
    got = sample(_fake_model, ours, shape, steps, torch.Generator("cpu").manual_seed(seed), "ddpm")
    assert (got - x).abs().max().item() <= 1e-6


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 9, 40])
def test_ddim_eta0_equals_diffusers(cfg, steps):
    ddpm = diffusers.DDPMScheduler(**cfg)
    ref = diffusers.DDIMScheduler.from_config(ddpm.config)
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ddpm.config)))
    ref.set_timesteps(steps)
    shape, seed = (1, 4, 5, 5), 7
    x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    for t in ref.timesteps:
        x = ref.step(_fake_model(x, t.float().expand(1)), t, x, eta=0.0).prev_sample
    got = sample(_fake_model, ours, shape, steps, torch.Generator("cpu").manual_seed(seed), "ddim")
    assert (got - x).abs().max().item() <= 1e-6


def test_single_steps_exact():
    """Each DDPM step bit-identical to diffusers' with the same noise draw."""
    ref = diffusers.DDPMScheduler(**CONFIGS[0])
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ref.config)))
    ref.set_timesteps(10)
    ts = ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(2))
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(i))
        mine, _ = ours.ddpm_step(out, t, prev, x, noise)
        theirs = ref.step(out, torch.tensor(t), x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.equal(mine, theirs), t


def test_thresholding_and_clip_move_the_result():
    """Control: the x0 limits of CONFIGS[4] / [5] change the sampled latents well past the 1e-6 bound."""
    for cfg, off in ((CONFIGS[4], dict(thresholding=False, clip_sample=False)), (CONFIGS[5], dict(clip_sample=False))):
        on = DiscreteSchedule(DDPMParams.from_scheduler_config(cfg))
        plain = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(cfg, **off)))
        a, b = (sample(_fake_model, s, (2, 4, 6, 5), 7, torch.Generator("cpu").manual_seed(3), "ddpm")
                for s in (on, plain))
        assert (a - b).abs().max().item() > 1e-2


def test_limit_x0_equals_diffusers_threshold_sample():
    ref = diffusers.DDPMScheduler(**CONFIGS[4])
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ref.config)))
    x0 = torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(ours.limit_x0(x0), ref._threshold_sample(x0))
    assert not torch.equal(ours.limit_x0(x0), x0.clamp(-1, 1))  # control: not plain clipping here


@pytest.mark.parametrize("bad,needle", [
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(variance_type="fixed_large_log"), "fixed_large_log"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "FlowMatchEulerDiscreteScheduler"),
])
def test_unsupported_config_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        DDPMParams.from_scheduler_config(dict(CONFIGS[0], **bad))


def test_img2img_tail_of_schedule():
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(CONFIGS[0]))
    seen = []
    start = torch.zeros(1, 4, 4, 4)
    sample(lambda x, t: (seen.append(int(t[0])), torch.zeros_like(x))[1], ours, start.shape, 5,
           torch.Generator().manual_seed(0), "ddim", start=start, denoise=0.5)
    assert seen == ours.timesteps(10)[-5:].tolist()


def test_leading_spacing_past_the_table_is_a_clear_error():
    sched = DiscreteSchedule(DDPMParams.from_scheduler_config(
        {"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}))
    assert sched.timesteps(999)[0] == 999
    with pytest.raises(ValueError, match="at most 999 steps"):
        sched.timesteps(1000)


@pytest.mark.parametrize("cfg", CONFIGS + [dict(trained_betas=[0.0001 + 0.0005 * i for i in range(40)],
                                                num_train_timesteps=40)])
def test_noise_schedule_bit_equal_to_diffusers(cfg):
    """The betas and alphas_cumprod the model sampling is built from (nodes/sdxs_host.py) are diffusers' to the
    bit (zero-SNR included: the rescale follows diffusers' operation order)."""
    ref = diffusers.DDPMScheduler(**cfg)
    ours = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ref.config)))
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
