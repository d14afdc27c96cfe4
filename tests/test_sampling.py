"""The pure samplers against the spec's arithmetic and diffusers' own schedulers."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    TCDScheduler,
)

from stylekit.engine import sampling
from stylekit.errors import ModelError, UsageError

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def test_step_counts_from_the_spec():
    assert sampling.grid_steps_for(4, 0.75) == 6
    assert sampling.grid_steps_for(6, 0.75) == 8
    assert sampling.grid_steps_for(8, 0.75) == 11
    n, ts = sampling.img2img_schedule(8, 0.75)
    assert n == 11 and ts == [739, 639, 559, 459, 379, 279, 199, 99]
    _, ts4 = sampling.img2img_schedule(4, 0.75)
    assert len(ts4) == 4 and ts4[0] == 679 and ts4[-1] == 179
    # n = 5 would give only 3 steps: the plan never returns a schedule of the wrong length
    assert len(sampling.strength_tail(sampling.consistency_timesteps(5), 0.75)) == 3


@pytest.mark.parametrize("nfe", range(1, 9))
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.6, 0.65, 0.75, 0.85, 0.95, 1.0])
def test_every_plan_runs_exactly_the_requested_steps(nfe, strength):
    try:
        _, ts = sampling.img2img_schedule(nfe, strength)
    except UsageError:
        assert nfe / strength > 50 - 1e-9 or sampling.math.ceil(nfe / strength) > 50
        return
    assert len(ts) == nfe


def test_plans_beyond_the_grid_are_refused():
    with pytest.raises(UsageError, match="grid"):
        sampling.grid_steps_for(8, 0.15)


@pytest.mark.parametrize("n", range(1, 51))
def test_timesteps_match_tcd_and_lcm_schedulers(n):
    for cls in (TCDScheduler, LCMScheduler):
        sched = cls(**SD_CONFIG)
        sched.set_timesteps(n)
        assert sampling.consistency_timesteps(n) == sched.timesteps.tolist()


def test_alphas_cumprod_matches_diffusers():
    for schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"):
        config = {**SD_CONFIG, "beta_schedule": schedule}
        ours = sampling.alphas_cumprod(config)
        assert torch.equal(ours, TCDScheduler(**config).alphas_cumprod), schedule


def _scheduler_step(cls, ts, i, eps, z, noise, config=SD_CONFIG, **kwargs):
    """One diffusers scheduler step at index i, with the given noise as its random draw."""
    sched = cls(**config)
    sched.set_timesteps(timesteps=ts)
    sched._step_index = i
    gen = torch.Generator().manual_seed(0)
    original = torch.randn

    def fake_randn(*args, **kw):  # randn_tensor draws with torch.randn: hand it our noise
        return noise.clone()

    torch.randn = fake_randn
    try:
        return sched.step(eps, ts[i], z, generator=gen, **kwargs).prev_sample
    finally:
        torch.randn = original


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_step_matches_scheduler(gamma):
    ts = [999, 759, 499, 259]
    ac = sampling.alphas_cumprod(SD_CONFIG)
    g = torch.Generator().manual_seed(1)
    z, eps, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    s = sampling.Sampler("tcd", ac, gamma)
    for i in range(len(ts)):
        want = _scheduler_step(TCDScheduler, ts, i, eps, z, noise, eta=gamma)
        got = s.step(eps, ts, i, z, noise if s.needs_noise(i, len(ts)) else None)
        assert torch.allclose(got, want, atol=1e-6), (gamma, i)


def test_lcm_step_matches_scheduler():
    ts = [999, 759, 499, 259]
    ac = sampling.alphas_cumprod(SD_CONFIG)
    g = torch.Generator().manual_seed(2)
    z, eps, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    s = sampling.Sampler("lcm", ac)
    for i in range(len(ts)):
        want = _scheduler_step(LCMScheduler, ts, i, eps, z, noise)
        got = s.step(eps, ts, i, z, noise if s.needs_noise(i, len(ts)) else None)
        assert torch.allclose(got, want, atol=1e-6), i


PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_split_output_recovers_x0_and_noise(prediction):
    """The three parameterisations by their definitions: z = √ā x0 + √(1 − ā) ε, v = √ā ε − √(1 − ā) x0."""
    ac = sampling.alphas_cumprod(SD_CONFIG)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (999, 500, 19):
        a = ac[t].double()
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        got_x0, got_eps = sampling.split_output(out[prediction], z, a, prediction)
        torch.testing.assert_close(got_x0, x0, atol=1e-9, rtol=0)
        torch.testing.assert_close(got_eps, eps, atol=1e-9, rtol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_tcd_step_matches_scheduler_for_every_prediction_type(prediction, gamma):
    """TCD re-noises with the ε the output implies: for v and x0 that ε is derived, not the output."""
    config = {**SD_CONFIG, "prediction_type": prediction}
    ts = [999, 759, 499, 259]
    g = torch.Generator().manual_seed(5)
    z, out, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    s = sampling.make_sampler("tcd", config, gamma=gamma)
    assert s.prediction == prediction
    for i in range(len(ts)):
        want = _scheduler_step(TCDScheduler, ts, i, out, z, noise, config, eta=gamma)
        got = s.step(out, ts, i, z, noise if s.needs_noise(i, len(ts)) else None)
        assert torch.allclose(got, want, atol=1e-5), (prediction, gamma, i)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_lcm_step_matches_scheduler_for_every_prediction_type(prediction):
    config = {**SD_CONFIG, "prediction_type": prediction}
    ts = [999, 759, 499, 259]
    g = torch.Generator().manual_seed(6)
    z, out, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    s = sampling.make_sampler("lcm", config)
    for i in range(len(ts)):
        want = _scheduler_step(LCMScheduler, ts, i, out, z, noise, config)
        got = s.step(out, ts, i, z, noise if s.needs_noise(i, len(ts)) else None)
        assert torch.allclose(got, want, atol=1e-5), (prediction, i)


def test_the_prediction_type_changes_the_step():
    """The same output read as ε, v or x0 gives three different latents: the type is not ignored."""
    ac = sampling.alphas_cumprod(SD_CONFIG)
    g = torch.Generator().manual_seed(7)
    z, out = torch.randn(2, 1, 4, 8, 8, generator=g)
    steps = [sampling.tcd_step(out, 759, 499, z, ac, prediction=p) for p in PREDICTIONS]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (steps[a] - steps[b]).abs().mean() > 0.1


def test_prediction_type_is_read_from_the_scheduler_config():
    assert sampling.make_sampler("tcd", SD_CONFIG).prediction == "epsilon"  # absent: ε
    none = sampling.make_sampler("lcm", {**SD_CONFIG, "prediction_type": None})
    assert none.prediction == "epsilon"
    with pytest.raises(ModelError, match="prediction_type 'flow'"):
        sampling.make_sampler("tcd", {**SD_CONFIG, "prediction_type": "flow"})


def test_zero_terminal_snr_schedule_matches_diffusers():
    """v-prediction fine-tunes often rescale betas to zero terminal SNR (Lin et al. 2023)."""
    config = {**SD_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    ours = sampling.alphas_cumprod(config)
    for cls in (TCDScheduler, LCMScheduler):
        assert torch.equal(ours, cls(**config).alphas_cumprod), cls
    assert ours[-1] < 1e-6 < sampling.alphas_cumprod(SD_CONFIG)[-1]


def test_tcd_intermediate_step_uses_float32_floor():
    # the spec's trap: (1 - 0.3) * 90 is 63 in float32, as diffusers computes it, but 62.99… in float64
    assert int(torch.floor((1 - 0.3) * torch.tensor(90))) == 63
    assert int((1 - 0.3) * 90) == 62
    ac = sampling.alphas_cumprod(SD_CONFIG)
    eps, z = torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    got = sampling.tcd_step(eps, 500, 90, z, ac, gamma=0.3)
    x0 = (z - (1 - ac[500]).sqrt() * eps) / ac[500].sqrt()
    want = ac[63].sqrt() * x0 + (1 - ac[63]).sqrt() * eps
    assert torch.allclose(got, want)


def test_trailing_timesteps_for_turbo():
    assert sampling.trailing_timesteps(1) == [999]
    assert sampling.trailing_timesteps(4) == [999, 749, 499, 249]
    _, ts = sampling.img2img_schedule(2, 0.5, turbo=True)
    assert ts == [499, 249]


# stabilityai/sd-turbo ships EulerDiscreteScheduler and stabilityai/sdxl-turbo
# EulerAncestralDiscreteScheduler, both scaled_linear with timestep_spacing "trailing" and
# steps_offset 1 (which trailing spacing ignores); DDPM/DDIM implement the same spacing.
# LCMScheduler is not among them: it ignores timestep_spacing (sampling.md, "Traps").
TURBO_CONFIG = {**SD_CONFIG, "timestep_spacing": "trailing", "steps_offset": 1}
TRAILING_SCHEDULERS = [
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DDPMScheduler,
    DDIMScheduler,
]


def _diffusers_timesteps(cls, n: int) -> list[int]:
    sched = cls(**TURBO_CONFIG)
    sched.set_timesteps(n)
    ts = sched.timesteps
    assert torch.equal(ts, ts.round()), cls  # Euler keeps them as floats; all are whole numbers
    return [int(t) for t in ts]


@pytest.mark.parametrize("cls", TRAILING_SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("n", [*range(1, 51), 64, 100, 333, 999, 1000])
def test_trailing_timesteps_match_diffusers_trailing_spacing(cls, n):
    assert sampling.trailing_timesteps(n) == _diffusers_timesteps(cls, n)


@pytest.mark.parametrize("cls", TRAILING_SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
@pytest.mark.parametrize("strength", [0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_turbo_img2img_schedule_matches_diffusers_get_timesteps(cls, nfe, strength):
    """What diffusers' img2img pipeline runs for a turbo model at (n, strength), by its own code."""
    n, ts = sampling.img2img_schedule(nfe, strength, turbo=True)
    sched = cls(**TURBO_CONFIG)
    sched.set_timesteps(n)
    pipe = SimpleNamespace(scheduler=sched)  # get_timesteps reads only self.scheduler
    want, steps = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
    assert ts == [int(t) for t in want]
    assert len(ts) == steps == nfe


def test_sampler_validation():
    with pytest.raises(UsageError, match="tcd"):
        sampling.make_sampler("ddim", SD_CONFIG)
    with pytest.raises(UsageError, match="gamma"):
        sampling.make_sampler("tcd", SD_CONFIG, gamma=1.5)
