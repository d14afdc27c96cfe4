"""ControlNet: parity with diffusers' ControlNet pipelines, maps, metadata and bad input.

The tiny ControlNets come from `ControlNetModel.from_unet` with their zero convolutions filled
with seeded noise (`stylekit.testing.build_controlnet`): with zeros every parity test would pass
whatever the code did, so `test_control_changes_the_output` checks they act.
"""

from dataclasses import replace

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


@pytest.fixture(scope="module")
def control_map():
    """A precomputed map: bright blocks on black, the size of `content`."""
    arr = np.zeros((64, 72, 3), dtype=np.uint8)
    arr[8:40, 16:56] = 255
    arr[44:60, 4:30] = 128
    return Image.fromarray(arr)


def settings_for(
    path,
    nets,
    scales,
    *,
    scheduler="tcd",
    cfg=1.0,
    gamma=0.0,
    start=0.0,
    end=1.0,
    steps=4,
    strength=0.75,
):
    return Settings(
        model=str(path),
        accelerator="none",
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt="a painting of a cat",
        style_mode="none",
        controls=tuple(f"canny:{s}" for s in scales[:1]) + tuple(f"tile:{s}" for s in scales[1:]),
        controlnets=tuple(str(n) for n in nets),
        control_start=start,
        control_end=end,
        control_image="map.png",  # the canny control's map is given (not read: the test passes it)
        control_type="canny",
    )


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def diffusers_controlnet(
    path,
    family,
    nets,
    image,
    maps,
    scales,
    *,
    task="img2img",
    scheduler,
    steps,
    strength,
    cfg,
    gamma,
    start,
    end,
    seed,
    size=None,
):
    import diffusers
    from diffusers import ControlNetModel, LCMScheduler, TCDScheduler

    xl = "XL" if family == "sdxl" else ""
    kind = "Img2Img" if task == "img2img" else ""
    cls = getattr(diffusers, f"StableDiffusion{xl}ControlNet{kind}Pipeline")
    loaded = [ControlNetModel.from_pretrained(n) for n in nets]
    pipe = cls.from_pretrained(path, controlnet=loaded if len(loaded) > 1 else loaded[0])
    pipe.scheduler = (TCDScheduler if scheduler == "tcd" else LCMScheduler).from_config(
        pipe.scheduler.config
    )
    pipe.set_progress_bar_config(disable=True)
    one = len(nets) == 1
    kwargs = {"eta": gamma} if scheduler == "tcd" else {}
    if task == "img2img":
        kwargs |= {"image": image, "control_image": maps[0] if one else maps, "strength": strength}
        kwargs["num_inference_steps"] = sampling.grid_steps_for(steps, strength)
    else:
        kwargs |= {"image": maps[0] if one else maps, "num_inference_steps": steps}
        kwargs |= {"width": size[0], "height": size[1]}
    return pipe(
        "a painting of a cat",
        guidance_scale=cfg,
        controlnet_conditioning_scale=scales[0] if one else list(scales),
        control_guidance_start=start,
        control_guidance_end=end,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images[0]


CASES = [
    # family, scheduler, gamma, cfg, nets, start, end
    ("sd15", "tcd", 0.0, 1.0, 1, 0.0, 1.0),
    ("sd15", "tcd", 0.3, 3.0, 1, 0.0, 1.0),  # CFG: the nets see both halves
    ("sd15", "lcm", 0.0, 1.5, 2, 0.0, 1.0),  # two ControlNets, residuals summed
    ("sd15", "tcd", 0.0, 2.0, 2, 0.25, 0.6),  # a start/end window (steps 1 of 4 on)
    ("sdxl", "tcd", 0.0, 3.0, 1, 0.0, 0.5),
    ("sdxl", "lcm", 0.0, 1.0, 2, 0.0, 1.0),
]


@pytest.mark.parametrize("family,scheduler,gamma,cfg,count,start,end", CASES)
def test_stylize_matches_diffusers_controlnet_img2img(
    request, content, control_map, family, scheduler, gamma, cfg, count, start, end
):
    path = request.getfixturevalue(f"{family}_path")
    nets = [request.getfixturevalue(f"{family}_controlnet")]
    if count == 2:
        nets.append(request.getfixturevalue("sd15_controlnet2") if family == "sd15" else nets[0])
    scales = (0.8, 0.5)[:count]
    settings = settings_for(
        path, nets, scales, scheduler=scheduler, cfg=cfg, gamma=gamma, start=start, end=end
    )
    # the precomputed map drives the first net; a tile net reads the content image itself
    maps = [control_map, content][:count]
    session = open_session(settings, runtime=CPU32)
    ours = as_float(run_img2img(session, content, maps))
    ref = diffusers_controlnet(
        path,
        family,
        nets,
        content,
        maps,
        scales,
        scheduler=scheduler,
        steps=4,
        strength=0.75,
        cfg=cfg,
        gamma=gamma,
        start=start,
        end=end,
        seed=11,
    )
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() <= 1 / 255
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-5


def run_img2img(session, content, maps):
    """stylize's session call with the first control's map given (`--control-image`)."""
    return session.img2img([content], [11], given=[maps[0]])[0]


def test_control_changes_the_output(sd15_path, sd15_controlnet, content, control_map):
    """The noise-filled zero convolutions act: with the control the image differs clearly from
    the run without it, a scale of 0 gives the run without it, and so does a start/end window
    that holds none of the steps run."""
    with_control = settings_for(sd15_path, [sd15_controlnet], (0.8,))
    plain = replace(
        with_control, controls=(), controlnets=(), control_image=None, control_type=None
    )
    base = as_float(open_session(plain, runtime=CPU32).img2img([content], [11])[0])
    ours = as_float(run_img2img(open_session(with_control, runtime=CPU32), content, [control_map]))
    assert np.abs(ours - base).mean() > 5 / 255
    zero = replace(with_control, controls=("canny:0",))
    off = as_float(run_img2img(open_session(zero, runtime=CPU32), content, [control_map]))
    assert np.abs(off - base).max() <= 1e-6
    late = replace(with_control, control_start=0.9, control_end=1.0)  # 4 steps: none kept
    skipped = as_float(run_img2img(open_session(late, runtime=CPU32), content, [control_map]))
    assert np.abs(skipped - base).max() <= 1e-6


def test_keep_factors_follow_diffusers_rule():
    from stylekit.engine.controlnet import keep_factors

    assert keep_factors(4, 0.0, 1.0) == [1, 1, 1, 1]
    assert keep_factors(4, 0.0, 0.5) == keep_factors(4, 0.0, 0.6) == [1, 1, 0, 0]
    assert keep_factors(4, 0.25, 0.75) == [0, 1, 1, 0]
