"""Parity: stylekit's few-step image-to-image equals diffusers' own pipelines on tiny models.

Same model, LoRA, seed, size, prompt, negative prompt, CFG and γ; diffusers runs its img2img
pipeline with TCDScheduler / LCMScheduler at the matching num_inference_steps and strength.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.engine import sampling
from stylekit.presets import Settings
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
