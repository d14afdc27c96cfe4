"""Parity: stylekit's few-step image-to-image equals diffusers' own pipelines on tiny models.

Same model, LoRA, seed, size, prompt, negative prompt, CFG and γ; diffusers runs its img2img
pipeline with TCDScheduler / LCMScheduler at the matching num_inference_steps and strength.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.engine import sampling
from stylekit.presets import Settings, load_preset
from stylekit.session import Runtime, open_session

CPU32 = Runtime(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def content():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(64, 72, 3) * 255).astype(np.uint8))


def diffusers_img2img(
    path,
    family,
    image,
    *,
    scheduler,
    steps,
    strength,
    cfg,
    gamma,
    prompt,
    negative,
    seed,
    lora=None,
):
    from diffusers import (
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        TCDScheduler,
    )

    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = (TCDScheduler if scheduler == "tcd" else LCMScheduler).from_config(
        pipe.scheduler.config
    )
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    kwargs = {"eta": gamma} if scheduler == "tcd" else {}
    return pipe(
        prompt,
        image=image,
        num_inference_steps=sampling.grid_steps_for(steps, strength),
        strength=strength,
        guidance_scale=cfg,
        negative_prompt=negative,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images[0]


CASES = [
    # family, scheduler, gamma, cfg, steps, strength, negative, lora
    ("sd15", "tcd", 0.0, 1.0, 4, 0.75, None, False),
    ("sd15", "tcd", 0.3, 3.0, 4, 0.75, "blurry", True),
    ("sd15", "lcm", 0.0, 1.0, 4, 0.6, None, True),
    ("sd15", "lcm", 0.0, 2.5, 2, 0.5, None, False),
    ("sdxl", "tcd", 0.0, 6.0, 8, 0.75, None, True),
    ("sdxl", "tcd", 0.3, 1.0, 4, 0.75, None, False),
    ("sdxl", "lcm", 0.0, 2.0, 4, 0.6, "", False),
]


@pytest.mark.parametrize("family,scheduler,gamma,cfg,steps,strength,negative,use_lora", CASES)
def test_img2img_matches_diffusers(
    request, content, family, scheduler, gamma, cfg, steps, strength, negative, use_lora
):
    path = request.getfixturevalue(f"{family}_path")
    lora = request.getfixturevalue(f"{family}_lora") if use_lora else None
    settings = Settings(
        model=str(path),
        accelerator="none",
        loras=(str(lora),) if lora else (),
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt="a painting of a cat",
        negative=negative,
        style_mode="none",
    )
    ours = (
        np.asarray(
            open_session(settings, runtime=CPU32).img2img([content], [11])[0], dtype=np.float32
        )
        / 255
    )
    ref = diffusers_img2img(
        path,
        family,
        content,
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt=settings.prompt,
        negative=negative,
        seed=11,
        lora=lora,
    )
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() <= 1 / 255
    # before 8-bit rounding the two agree to float error
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-5


PREDICTION_CASES = [
    # model fixture, scheduler, gamma, cfg, steps, strength
    ("sd15_vpred", "tcd", 0.0, 1.0, 4, 0.75),
    ("sd15_vpred", "tcd", 0.3, 3.0, 4, 0.75),  # γ > 0 re-noises with the ε the output implies
    ("sd15_vpred", "lcm", 0.0, 2.5, 4, 0.6),
    ("sd15_sample", "tcd", 0.3, 1.0, 3, 0.75),
    ("sd15_sample", "lcm", 0.0, 2.0, 2, 0.5),
    ("sd2", "tcd", 0.0, 2.0, 4, 0.75),  # SD 2.x (v-prediction, OpenCLIP-like text encoder)
    ("sd2", "lcm", 0.0, 1.0, 2, 0.6),
]


@pytest.mark.parametrize("fixture,scheduler,gamma,cfg,steps,strength", PREDICTION_CASES)
def test_prediction_types_match_diffusers(
    request, content, fixture, scheduler, gamma, cfg, steps, strength
):
    """v- and x0-prediction models: stylekit's img2img = diffusers' with TCD/LCMScheduler, which
    read `prediction_type` from the same scheduler config."""
    path = request.getfixturevalue(f"{fixture}_path")
    settings = Settings(
        model=str(path),
        accelerator="none",
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt="a painting of a cat",
        style_mode="none",
    )
    session = open_session(settings, runtime=CPU32)
    assert session.sampler.prediction == session.model.pipe.scheduler.config.prediction_type
    assert session.sampler.prediction != "epsilon"
    ours = np.asarray(session.img2img([content], [11])[0], dtype=np.float32) / 255
    ref = diffusers_img2img(
        path,
        "sd15",  # SD 2.x runs through the same StableDiffusionImg2ImgPipeline
        content,
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt=settings.prompt,
        negative=None,
        seed=11,
    )
    assert ours.shape == ref.shape
    # ours went through 8 bits: rounding moves a value by at most half a level; 1e-5 is the
    # float error of two implementations (measured: max 0.501 levels, mean 0.24-0.25 levels)
    assert np.abs(ours - ref).max() <= 0.5 / 255 + 1e-5
    assert np.abs(ours - ref).mean() <= 0.3 / 255


@pytest.mark.parametrize("fixture", ["sd15_vpred", "sd15_sample"])
def test_prediction_type_is_not_ignored(request, sd15_path, content, fixture):
    """The same UNet weights read as ε give another image: the parity above is not vacuous."""
    base = Settings(
        model=str(sd15_path),
        accelerator="none",
        scheduler="tcd",
        steps=4,
        strength=0.75,
        cfg=1.0,
        style_mode="none",
    )
    as_eps = open_session(base, runtime=CPU32).img2img([content], [11])[0]
    other = replace(base, model=str(request.getfixturevalue(f"{fixture}_path")))
    as_other = open_session(other, runtime=CPU32).img2img([content], [11])[0]
    diff = np.abs(np.asarray(as_eps, dtype=np.float32) - np.asarray(as_other, dtype=np.float32))
    assert diff.mean() > 5.0  # 8-bit levels (measured: 30 read as v, 44 read as x0)


def test_lora_changes_the_output(sd15_path, sd15_lora, content):
    base = Settings(
        model=str(sd15_path),
        accelerator="none",
        scheduler="lcm",
        steps=2,
        strength=0.6,
        cfg=1.0,
        style_mode="none",
    )
    plain = np.asarray(
        open_session(base, runtime=CPU32).img2img([content], [1])[0], dtype=np.float32
    )
    with_lora = Settings(**{**base.__dict__, "loras": (str(sd15_lora),)})
    changed = np.asarray(
        open_session(with_lora, runtime=CPU32).img2img([content], [1])[0], dtype=np.float32
    )
    assert np.abs(plain - changed).mean() > 1.0


def test_batching_does_not_change_results(sd15_path, tmp_path):
    from stylekit.api import stylize
    from stylekit.runner import Output

    rng = np.random.RandomState(3)
    for i in range(3):
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    inputs = [str(tmp_path / f"{i}.png") for i in range(3)]
    settings = Settings(
        model=str(sd15_path),
        accelerator="none",
        scheduler="tcd",
        gamma=0.3,
        steps=3,
        strength=0.75,
        cfg=2.0,
        style_mode="none",
    )
    outs = {}
    for batch in (1, 2, 3):
        out = tmp_path / f"out{batch}"
        report = stylize(
            inputs,
            settings=settings,
            runtime=CPU32,
            batch_size=batch,
            output=Output(out=out, seed=5),
        )
        assert len(report.done) == 3
        outs[batch] = [np.asarray(Image.open(out / f"{i}.png"), dtype=np.int16) for i in range(3)]
    for batch in (2, 3):
        for a, b in zip(outs[1], outs[batch], strict=True):
            assert (
                np.abs(a - b).max() <= 1
            )  # same seeds per image; only float summation order differs


# --- IP-Adapter, through the CLI -------------------------------------------------------------

# InstantStyle's maps for the style block stylekit picks (`style.style_block`): SDXL's middle
# attention of up block 0 (tiny SDXL: 3 attentions there, as SDXL's), all of SD1.5's up block 1
# (tiny SD1.5: 2 attentions there).
STYLE_BLOCK_MAPS = {
    "sd15": lambda s: {"up": {"block_1": s}},
    "sdxl": lambda s: {"up": {"block_0": [0.0, s, 0.0]}},
}

IP_CASES = [
    # family, cfg, steps, strength, style scale, negative
    ("sd15", 1.0, 2, 0.6, 1.0, None),
    ("sd15", 3.0, 3, 0.75, 0.6, "blurry"),
    ("sdxl", 2.0, 2, 0.6, 1.0, None),
]


@pytest.mark.parametrize("family,cfg,steps,strength,scale,negative", IP_CASES)
def test_ip_adapter_img2img_matches_diffusers(
    request, tmp_path, content, family, cfg, steps, strength, scale, negative
):
    """`stylekit stylize --style REF --style-mode ipadapter` = diffusers' img2img with the adapter.

    diffusers: `load_ip_adapter` (image encoder from the adapter folder, as stylekit's loader
    finds it), `set_ip_adapter_scale` with InstantStyle's style-block-only map, LCMScheduler,
    the same seed, strength, steps, CFG and negative prompt.
    """
    from diffusers import (
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )
    from typer.testing import CliRunner

    from stylekit.cli import app
    from stylekit.testing import IP_ADAPTER_WEIGHTS

    path = request.getfixturevalue(f"{family}_path")
    adapter = request.getfixturevalue(f"{family}_ip_adapter")
    rng = np.random.RandomState(5)
    style = Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8))
    content.save(tmp_path / "content.png")
    style.save(tmp_path / "style.png")
    prompt, out = "a painting of a cat", tmp_path / "out.png"
    args = ["stylize", tmp_path / "content.png", "-o", out, "--model", path]
    args += ["--accelerator", "none", "--device", "cpu", "--dtype", "fp32", "--seed", "11"]
    args += ["--scheduler", "lcm", "--steps", steps, "--strength", strength, "--cfg", cfg]
    args += ["--prompt", prompt, *(["--negative", negative] if negative is not None else [])]
    args += ["--style", tmp_path / "style.png", "--ip-adapter", adapter]
    args += ["--style-mode", "ipadapter", "--style-scale", scale, "-q"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    ours = np.asarray(Image.open(out), dtype=np.float32) / 255

    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name=IP_ADAPTER_WEIGHTS)
    pipe.set_ip_adapter_scale(STYLE_BLOCK_MAPS[family](scale))

    def run_diffusers():
        return pipe(
            prompt,
            image=content,
            ip_adapter_image=style,
            num_inference_steps=sampling.grid_steps_for(steps, strength),
            strength=strength,
            guidance_scale=cfg,
            negative_prompt=negative if negative is not None else preset_negative,
            generator=torch.Generator().manual_seed(11),
            output_type="np",
        ).images[0]

    preset_negative = load_preset(None).negative  # no --negative: the default preset's, STD's
    ref = run_diffusers()
    pipe.set_ip_adapter_scale(0.0)
    unstyled = run_diffusers()
    # the adapter moves the image by several 8-bit levels (~3.6 on average here), so the
    # agreement below is not that of two runs the adapter left alone
    assert np.abs(ref - unstyled).mean() > 2 / 255
    assert ours.shape == ref.shape == (content.height, content.width, 3)
    # ours went through an 8-bit PNG: rounding moves a value by at most half a level; 1e-5 is
    # the float error of two implementations (measured ~1e-6 before rounding)
    assert np.abs(ours - ref).max() <= 0.5 / 255 + 1e-5
    assert np.abs(ours - ref).mean() <= 0.5 / 255
