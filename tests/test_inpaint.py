"""Inpainting: parity with diffusers' inpaint pipelines, paste-back, mask matching, the CLI command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

W, H = 64, 64


def photo(seed: int, size=(W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def square_mask(size=(W, H), box=(20, 16, 52, 48), mode="L") -> Image.Image:
    """White box (left, top, right, bottom) on black."""
    grey = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    grey[top:bottom, left:right] = 255
    return Image.fromarray(grey).convert(mode)


@pytest.fixture(scope="module")
def loaded():
    """Load each tiny model once for this module: path -> LoadedModel."""
    from stylekit.engine import models

    cache = {}

    def get(path):
        if path not in cache:
            spec = models.ModelSpec(model=str(path), accelerator="none", device="cpu", dtype="fp32")
            cache[path] = models.load(spec)
        return cache[path]

    return get


def diffusers_inpaint(model, kind, *, image, mask, prompt, cfg, gamma, nfe, strength, seed):
    """The same inpainting through diffusers' own pipeline, built on the loaded components."""
    import torch
    from diffusers import (
        LCMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        TCDScheduler,
    )

    from stylekit.engine.sampling import grid_steps_for

    if model.family == "sdxl":
        pipe = StableDiffusionXLInpaintPipeline(**model.pipe.components, add_watermarker=False)
    else:
        pipe = StableDiffusionInpaintPipeline(
            **model.pipe.components, requires_safety_checker=False
        )
    scheduler = TCDScheduler if kind == "tcd" else LCMScheduler
    pipe.scheduler = scheduler.from_config(model.pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        image=image,
        mask_image=mask,
        height=image.height,
        width=image.width,
        strength=strength,
        num_inference_steps=grid_steps_for(nfe, strength),
        guidance_scale=cfg,
        eta=gamma,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


CASES = {  # id: (model fixture, scheduler, γ, CFG, strength)
    "sd15-tcd-g0": ("sd15_path", "tcd", 0.0, 1.0, 0.75),
    "sd15-tcd-g0.3-cfg3": ("sd15_path", "tcd", 0.3, 3.0, 0.75),
    "sd15-lcm": ("sd15_path", "lcm", 0.0, 1.0, 0.75),
    "sd15-lcm-strength1": ("sd15_path", "lcm", 0.0, 1.0, 1.0),
    "sdxl-tcd-g0-cfg6": ("sdxl_path", "tcd", 0.0, 6.0, 0.75),
    "sdxl-tcd-g0.3": ("sdxl_path", "tcd", 0.3, 1.0, 0.75),
    "sdxl-lcm-cfg2": ("sdxl_path", "lcm", 0.0, 2.0, 0.6),
    "sd15-9ch-tcd-g0.3-cfg3": ("sd15_inpaint_path", "tcd", 0.3, 3.0, 0.75),
    "sd15-9ch-lcm": ("sd15_inpaint_path", "lcm", 0.0, 1.0, 0.75),
    "sd15-9ch-tcd-strength1": ("sd15_inpaint_path", "tcd", 0.0, 2.0, 1.0),
    # v-prediction: the blend noises the known latent itself; only the steps read the output
    "sd2-vpred-tcd-g0.3-cfg2": ("sd2_path", "tcd", 0.3, 2.0, 0.75),
    "sd2-vpred-lcm-strength1": ("sd2_path", "lcm", 0.0, 1.0, 1.0),
    "sd15-sample-tcd": ("sd15_sample_path", "tcd", 0.0, 1.0, 0.75),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_inpaint_pipeline(case, request, loaded):
    import torch

    from stylekit.engine import conditioning, sampling
    from stylekit.engine.inpaint import binarize, inpaint

    fixture, kind, gamma, cfg, strength = CASES[case]
    model = loaded(request.getfixturevalue(fixture))
    assert model.inpainting_unet == (fixture == "sd15_inpaint_path")
    image, mask, prompt, nfe, seed = photo(1), square_mask(), "a red cat", 3, 7
    sampler = sampling.make_sampler(kind, dict(model.pipe.scheduler.config), gamma=gamma)
    cond = conditioning.encode_text(model, prompt, None, cfg=cfg)
    ours = inpaint(
        model,
        cond,
        sampler,
        image,
        binarize(mask),
        steps=nfe,
        strength=strength,
        generator=torch.Generator().manual_seed(seed),
    )
    ref = diffusers_inpaint(
        model,
        kind,
        image=image,
        mask=mask,
        prompt=prompt,
        cfg=cfg,
        gamma=gamma,
        nfe=nfe,
        strength=strength,
        seed=seed,
    )
    assert ours.shape == ref.shape == (H, W, 3)
    diff = np.abs(ours - ref)
    print(f"{case}: mean abs diff {diff.mean():.2e}, max {diff.max():.2e}")
    # the requirement is 1/255; the same draws in the same order give ~1e-7 on average (0 measured
    # on CPU) and no pixel may stray further than float noise: 1e-4 is 25x below one 8-bit level
    assert diff.mean() <= 1e-5
    assert diff.max() <= 1e-4


def test_paste_back_keeps_every_pixel_outside_the_feather():
    from stylekit.engine.inpaint import binarize, feather, paste_back

    original = photo(2)
    generated = np.asarray(photo(3), dtype=np.float32) / 255.0
    weights = feather(binarize(square_mask()), 4)
    out = np.asarray(paste_back(original, generated, weights))
    assert weights.max() == 1.0 and weights[32, 36] == 1.0
    far = weights == 0
    assert far[:, :16].all() and not far[:, 16:20].all()  # reaches ≤ 4 px outside (x = 20 edge)
    np.testing.assert_array_equal(out[far], np.asarray(original)[far])
    np.testing.assert_array_equal(out[weights == 1], np.asarray(photo(3))[weights == 1])
    hard = feather(binarize(square_mask()), 0)
    assert set(np.unique(hard)) == {0.0, 1.0}


class Recorder:
    """Events that keep the finished records."""

    def __init__(self):
        self.records = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def finished(self, record):
        self.records.append(record)


def tiny_settings(model, **extra):
    from stylekit.presets import Settings

    values = dict(model=str(model), accelerator="none", scheduler="lcm", steps=2, cfg=1.0)
    values.update(extra)
    values.setdefault("style_mode", "none")
    return Settings(**values)


CPU = dict(device="cpu", dtype="fp32")


def test_batch_matches_masks_by_stem_and_goes_on_without_one(tmp_path, sd15_path):
    from stylekit.api import Runtime
    from stylekit.engine.inpaint import binarize, feather
    from stylekit.media.metadata import read_metadata
    from stylekit.runner import Output
    from stylekit.tasks.inpaint import inpaint

    photos, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    (photos / "sub").mkdir(parents=True)
    masks.mkdir()
    photo(1).save(photos / "a.png")
    photo(2, (64, 48)).save(photos / "sub" / "b.jpg")
    photo(3).save(photos / "c.png")  # no mask
    square_mask(mode="RGBA").save(masks / "a.png")
    square_mask((32, 24), (8, 4, 24, 20), mode="RGB").save(masks / "b.png")  # half size
    events = Recorder()
    report = inpaint(
        [str(photos)],
        mask=str(masks),
        settings=tiny_settings(sd15_path, prompt="a red cat"),
        output=Output(out=out, seed=5),
        runtime=Runtime(**CPU),
        mask_blur=2,
        events=events,
    )
    assert sorted(p.name for p in report.done) == ["a.png", "b.png"]
    assert [(p.name, "c.png" in why and "mask" in why) for p, why in report.failed] == [
        ("c.png", True)
    ]
    assert report.exit_code() == 1
    assert [r.status for r in events.records].count("failed") == 1
    result = np.asarray(Image.open(out / "a.png"))
    keep = feather(binarize(square_mask()), 2) == 0
    np.testing.assert_array_equal(result[keep], np.asarray(photo(1))[keep])
    assert np.abs(result[~keep].astype(int) - np.asarray(photo(1))[~keep]).mean() > 10
    meta = read_metadata(out / "a.png")
    assert (meta["mask"], meta["mask_blur"], meta["invert_mask"]) == ("a.png", 2, False)
    assert meta["mask_resized_from"] is None and meta["seed"] == 5
    resized = read_metadata(out / "sub" / "b.png")
    assert (resized["mask"], resized["mask_resized_from"], resized["size"]) == (
        "b.png",
        "32x24",
        "64x48",
    )


def test_invert_mask_and_an_all_black_mask(tmp_path, sd15_inpaint_path):
    from stylekit.api import Runtime
    from stylekit.media.metadata import read_metadata
    from stylekit.runner import Output
    from stylekit.tasks.inpaint import inpaint

    photo(4).save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    settings = tiny_settings(sd15_inpaint_path, scheduler="tcd", cfg=2.0)
    report = inpaint(
        [str(tmp_path / "in.png")],
        mask=tmp_path / "mask.png",
        settings=settings,
        output=Output(out=tmp_path / "out.png", seed=1),
        runtime=Runtime(**CPU),
        invert_mask=True,
        mask_blur=0,
    )
    assert report.exit_code() == 0
    result, original = np.asarray(Image.open(tmp_path / "out.png")), np.asarray(photo(4))
    np.testing.assert_array_equal(result[16:48, 20:52], original[16:48, 20:52])  # white: kept
    assert (result[:16] != original[:16]).any()
    assert read_metadata(tmp_path / "out.png")["invert_mask"] is True

    Image.new("L", (W, H), 0).save(tmp_path / "black.png")
    report = inpaint(
        [str(tmp_path / "in.png")],
        mask=tmp_path / "black.png",
        settings=settings,
        output=Output(out=tmp_path / "black-out.png", seed=1),
        runtime=Runtime(**CPU),
    )
    assert report.exit_code() == 1 and "no white pixels" in report.failed[0][1]


def test_bad_mask_arguments_stop_before_loading(tmp_path):
    from stylekit.errors import UsageError
    from stylekit.tasks.inpaint import inpaint

    photo(1).save(tmp_path / "a.png")
    with pytest.raises(UsageError, match="--mask .*no such file"):
        inpaint([str(tmp_path / "a.png")], mask=tmp_path / "missing.png")
    with pytest.raises(UsageError, match="--mask-blur"):
        inpaint([str(tmp_path / "a.png")], mask=tmp_path / "a.png", mask_blur=-1)
    with pytest.raises(UsageError, match="every input is one of the masks"):
        inpaint([str(tmp_path / "a.png")], mask=tmp_path / "a.png")


def test_cli_inpaint_command(tmp_path, sd15_path, monkeypatch):
    from typer.testing import CliRunner

    from stylekit.cli import app

    photo(1).save(tmp_path / "a.png")
    photo(2).save(tmp_path / "b.png")
    square_mask().save(tmp_path / "m.png")
    common = ["--model", str(sd15_path), "--accelerator", "none", "--scheduler", "lcm"]
    common += ["--steps", "2", "--cfg", "1", "--device", "cpu", "--dtype", "fp32", "-q", "--json"]
    runner = CliRunner()
    ok = runner.invoke(
        app,
        ["inpaint", str(tmp_path / "a.png"), "--mask", str(tmp_path / "m.png"), "--seed", "3"]
        + ["--mask-blur", "1", "--invert-mask", "-o", str(tmp_path / "out"), *common],
    )
    assert ok.exit_code == 0, ok.output
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    assert record["status"] == "done" and record["settings"]["mask"] == "m.png"
    assert (tmp_path / "out" / "a.png").is_file()

    masks = tmp_path / "masks"
    masks.mkdir()
    square_mask().save(masks / "a.png")
    failed = runner.invoke(
        app,
        ["inpaint", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--mask", str(masks)]
        + ["-o", str(tmp_path / "out2"), *common],
    )
    assert failed.exit_code == 1, failed.output
    statuses = {
        json.loads(line)["input"]: json.loads(line)["status"] for line in failed.stdout.splitlines()
    }
    assert statuses == {str(tmp_path / "a.png"): "done", str(tmp_path / "b.png"): "failed"}
    usage = runner.invoke(app, ["inpaint", str(tmp_path / "a.png"), "--mask", "nope.png"])
    assert usage.exit_code == 2
