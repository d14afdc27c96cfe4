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


T2I_CASES = [
    # family, scheduler, gamma, cfg, start, end
    ("sd15", "tcd", 0.3, 1.0, 0.0, 1.0),
    ("sd15", "lcm", 0.0, 2.0, 0.0, 0.5),
    ("sdxl", "tcd", 0.0, 3.0, 0.0, 1.0),
]


@pytest.mark.parametrize("family,scheduler,gamma,cfg,start,end", T2I_CASES)
def test_t2i_matches_diffusers_controlnet(
    request, control_map, family, scheduler, gamma, cfg, start, end
):
    """t2i-styled's generation with a control image and AD off = the text-to-image pipelines."""
    path = request.getfixturevalue(f"{family}_path")
    nets = [request.getfixturevalue(f"{family}_controlnet")]
    settings = settings_for(
        path, nets, (0.7,), scheduler=scheduler, cfg=cfg, gamma=gamma, start=start, end=end
    )
    session = open_session(settings, runtime=CPU32, task="noise")
    ours = as_float(session.generate(72, 64, seed=5, given=control_map))
    ref = diffusers_controlnet(
        path,
        family,
        nets,
        None,
        [control_map],
        (0.7,),
        task="t2i",
        scheduler=scheduler,
        steps=4,
        strength=1.0,
        cfg=cfg,
        gamma=gamma,
        start=start,
        end=end,
        seed=5,
        size=(72, 64),
    )
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() <= 1 / 255
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-5


# --- through the CLI ---------------------------------------------------------------------------


def cli(command, *args, model, seed=1):
    from typer.testing import CliRunner

    from stylekit.cli import app

    flags = ["--model", str(model), "--accelerator", "none", "--dtype", "fp32", "--device", "cpu"]
    flags += ["--steps", "2", "--seed", str(seed), "-q"]
    return CliRunner().invoke(app, [command, *map(str, args), *flags])


def write_image(path, seed=0, size=(72, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    # flat blocks with sharp borders: Canny finds edges with the default thresholds
    img = np.asarray(Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST))
    Image.fromarray(img).save(path)
    return path


def test_cli_canny_equals_the_documented_opencv_call(tmp_path, sd15_path, sd15_controlnet):
    """`--control canny` gives the image that the documented map (cv2.Canny on the RGB array,
    ×3) passed as `--control-image` gives; the metadata records the control."""
    import cv2

    from stylekit.media.metadata import read_metadata

    photo = write_image(tmp_path / "in" / "photo.png")
    edges = cv2.Canny(np.array(Image.open(photo).convert("RGB")), 100, 200)
    assert edges.any()
    Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2)).save(tmp_path / "edges.png")
    net = ["--controlnet", str(sd15_controlnet)]
    computed = cli(
        "stylize", photo, "--control", "canny:0.9", *net, "-o", tmp_path / "a.png", model=sd15_path
    )
    assert computed.exit_code == 0, computed.output
    given = cli(
        "stylize",
        photo,
        "--control",
        "canny:0.9",
        *net,
        "--control-image",
        tmp_path / "edges.png",
        "-o",
        tmp_path / "b.png",
        model=sd15_path,
    )
    assert given.exit_code == 0, given.output
    plain = cli("stylize", photo, "-o", tmp_path / "c.png", model=sd15_path)
    assert plain.exit_code == 0, plain.output
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in "abc")
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 2  # the control acts (8-bit levels)
    meta = read_metadata(tmp_path / "a.png")
    (entry,) = meta["controls"]
    assert entry == {
        "type": "canny",
        "scale": 0.9,
        "controlnet": str(sd15_controlnet),
        "start": 0.0,
        "end": 1.0,
        "canny": [100, 200],
    }
    assert read_metadata(tmp_path / "b.png")["control_image"] == "edges.png"


def test_cli_control_image_folder_resize_and_missing(tmp_path, sd15_path, sd15_controlnet):
    """A folder of maps is matched by stem; a map of another size is resized and recorded; an
    input without a map fails alone (exit 1)."""
    from stylekit.media.metadata import read_metadata

    for name in ("a", "b"):
        write_image(tmp_path / "in" / f"{name}.png")
    (tmp_path / "maps").mkdir()
    write_image(tmp_path / "maps" / "a.png", seed=3, size=(36, 32))
    result = cli(
        "stylize",
        tmp_path / "in",
        "--control-image",
        tmp_path / "maps",
        "--control-type",
        "canny",
        "--controlnet",
        str(sd15_controlnet),
        "-o",
        tmp_path / "out",
        model=sd15_path,
    )
    assert result.exit_code == 1, result.output
    assert "b.png: no control image named b.* in" in result.stderr
    meta = read_metadata(tmp_path / "out" / "a.png")
    assert meta["control_image_resized_from"] == "36x32"
    assert meta["controls"][0]["map"] == "control image"
    assert not (tmp_path / "out" / "b.png").exists()


def test_wrong_family_controlnet_is_a_usage_error(tmp_path, sdxl_path, sd15_controlnet):
    photo = write_image(tmp_path / "photo.png")
    result = cli(
        "stylize",
        photo,
        "--control",
        "tile",
        "--controlnet",
        str(sd15_controlnet),
        "-o",
        tmp_path / "out.png",
        model=sdxl_path,
    )
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert str(sd15_controlnet) in line and "sd15" in line and "sdxl" in line
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--control", "canny:x"], "not a number"),
        (["--control", "lineart"], "another type needs its map"),
        (["--control", "canny", "--canny", "200,100"], "LOW ≤ HIGH"),
        (["--control-type", "canny"], "--control-type names the type"),
        (["--control", "canny", "--control", "tile", "--controlnet", "x/y"], "one per --control"),
        (["--control", "canny", "--control-start", "0.6", "--control-end", "0.5"], "below"),
    ],
)
def test_bad_control_flags(tmp_path, sd15_path, flags, message):
    photo = write_image(tmp_path / "photo.png")
    result = cli("stylize", photo, *flags, "-o", tmp_path / "out.png", model=sd15_path)
    assert result.exit_code == 2
    assert message in result.stderr


def test_canny_without_opencv_names_the_extra(monkeypatch):
    import builtins

    from stylekit import control
    from stylekit.errors import UsageError

    real = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("no cv2")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(UsageError, match=r"stylekit\[control\]"):
        control.control_specs(Settings(controls=("canny",)))


def test_cli_depth_uses_the_depth_pipeline(tmp_path, sd15_path, sd15_controlnet, depth_model_path):
    """`--control depth --depth-model FOLDER` loads a (tiny, random) depth model through the
    transformers pipeline a hub id takes; the map is that pipeline's "depth" image ×3, so the
    output equals the run given that map."""
    from transformers import pipeline

    photo = write_image(tmp_path / "photo.png")
    depth = pipeline("depth-estimation", model=str(depth_model_path))(Image.open(photo))["depth"]
    assert depth.size == (72, 64) and np.ptp(np.asarray(depth)) > 0
    depth.convert("RGB").save(tmp_path / "depth.png")
    net = ["--controlnet", str(sd15_controlnet)]
    computed = cli(
        "stylize",
        photo,
        "--control",
        "depth",
        *net,
        "--depth-model",
        depth_model_path,
        "-o",
        tmp_path / "a.png",
        model=sd15_path,
    )
    assert computed.exit_code == 0, computed.output
    given = cli(
        "stylize",
        photo,
        "--control",
        "depth",
        *net,
        "--control-image",
        tmp_path / "depth.png",
        "-o",
        tmp_path / "b.png",
        model=sd15_path,
    )
    assert given.exit_code == 0, given.output
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)


def test_cli_t2i_styled_with_a_control_image(tmp_path, sd15_path, sd15_controlnet, control_map):
    """t2i-styled generates at the map's size with the map; without a map it is a usage error."""
    from stylekit.media.metadata import read_metadata

    control_map.save(tmp_path / "map.png")
    net = ["--controlnet", str(sd15_controlnet), "--style-mode", "none"]
    result = cli(
        "t2i-styled",
        "a cat",
        "--control",
        "canny",
        *net,
        "--control-image",
        tmp_path / "map.png",
        "-o",
        tmp_path / "out.png",
        model=sd15_path,
    )
    assert result.exit_code == 0, result.output
    out = Image.open(tmp_path / "out.png")
    assert out.size == control_map.size
    assert read_metadata(tmp_path / "out.png")["controls"][0]["map"] == "control image"
    missing = cli(
        "t2i-styled", "a cat", "--control", "canny", *net, "-o", tmp_path / "x.png", model=sd15_path
    )
    assert missing.exit_code == 2
    assert "t2i-styled --control needs --control-image" in missing.stderr


@pytest.mark.parametrize(
    "family,scheduler,gamma,cfg", [("sd15", "tcd", 0.3, 3.0), ("sdxl", "lcm", 0.0, 2.0)]
)
def test_inpaint_matches_diffusers_controlnet_inpaint(
    request, content, control_map, family, scheduler, gamma, cfg
):
    """The engine's inpaint with a ControlNet = diffusers' ControlNet inpaint pipelines."""
    import diffusers
    from diffusers import ControlNetModel, LCMScheduler, TCDScheduler

    from stylekit.engine import conditioning, models
    from stylekit.engine.controlnet import Control, image_tensor
    from stylekit.engine.inpaint import binarize, inpaint

    path, net_path = (
        request.getfixturevalue(f"{family}_path"),
        request.getfixturevalue(f"{family}_controlnet"),
    )
    model = models.load(
        models.ModelSpec(model=str(path), accelerator="none", device="cpu", dtype="fp32")
    )
    net = ControlNetModel.from_pretrained(net_path)
    mask = Image.fromarray(np.pad(np.full((32, 40), 255, np.uint8), ((16, 16), (16, 16))))
    sampler = sampling.make_sampler(scheduler, dict(model.pipe.scheduler.config), gamma=gamma)
    cond = conditioning.encode_text(model, "a red cat", None, cfg=cfg)
    control = Control((net,), (image_tensor([control_map]),), (0.6,))
    ours = inpaint(
        model,
        cond,
        sampler,
        content,
        binarize(mask),
        steps=3,
        strength=0.75,
        generator=torch.Generator().manual_seed(7),
        control=control,
    )
    xl = "XL" if family == "sdxl" else ""
    cls = getattr(diffusers, f"StableDiffusion{xl}ControlNetInpaintPipeline")
    extra = {"add_watermarker": False} if xl else {"requires_safety_checker": False}
    pipe = cls(**model.pipe.components, controlnet=net, **extra)
    pipe.scheduler = (TCDScheduler if scheduler == "tcd" else LCMScheduler).from_config(
        model.pipe.scheduler.config
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red cat",
        image=content,
        mask_image=mask,
        control_image=control_map,
        height=64,
        width=72,
        strength=0.75,
        guidance_scale=cfg,
        eta=gamma,
        num_inference_steps=sampling.grid_steps_for(3, 0.75),
        controlnet_conditioning_scale=0.6,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]
    diff = np.abs(ours - ref)
    print(f"{family}: mean {diff.mean():.2e} max {diff.max():.2e}")
    # both decode floats without 8-bit rounding: only float error separates them
    assert diff.mean() <= 1e-5
    assert diff.max() <= 1e-4


def test_video_stream_maps_per_frame(sd15_path, sd15_controlnet):
    """The stream computes each frame's canny map as it arrives: the first frame equals the still
    path with the same control (a batch of one both ways), stream batch (each call's rows at
    different stages with their own maps and keep factors) stays within batch rounding of
    sequential, and the control changes the frames."""
    from stylekit.engine.stream import FrameStream, StreamOptions

    settings = replace(
        settings_for(sd15_path, [sd15_controlnet], (0.8,), steps=3, end=0.7),
        control_image=None,
        control_type=None,
    )
    session = open_session(settings, runtime=CPU32)
    blocks = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(blocks).resize((96, 64), Image.Resampling.NEAREST))
    frames = [base[:, k * 4 : k * 4 + 72].copy() for k in range(5)]  # panning, 72x64

    def run(batched, control=True):
        opts = StreamOptions(steps=3, strength=0.75, seed=3, stream_batch=batched)
        ctl = session.frame_control() if control else None
        fs = FrameStream(session.model, session.cond, session.sampler, opts, control=ctl)
        return [out.copy() for out in fs.run(frames)]

    sequential, batched, plain = run(False), run(True), run(False, control=False)
    still = np.asarray(session.img2img([Image.fromarray(frames[0])], [3])[0])
    assert np.array_equal(sequential[0], still)
    for a, b in zip(sequential, batched, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 2 and diff.mean() <= 0.05
    assert np.abs(sequential[2].astype(int) - plain[2].astype(int)).mean() > 2


def test_windows_crop_the_control_maps(sd15_path, sd15_controlnet):
    """MultiDiffusion windows each read their crop of the maps (latent view × 8 px): the
    window-averaged ε equals averaging each window's own ε with its cropped map."""
    from diffusers import ControlNetModel

    from stylekit.engine import conditioning, models
    from stylekit.engine.controlnet import Control
    from stylekit.engine.predict import noise_predictor
    from stylekit.engine.tiling import View
    from stylekit.engine.windows import Windows

    model = models.load(
        models.ModelSpec(model=str(sd15_path), accelerator="none", device="cpu", dtype="fp32")
    )
    cond = conditioning.encode_text(model, "a cat", None, cfg=2.0)
    net = ControlNetModel.from_pretrained(sd15_controlnet)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    control = Control((net,), (image,), (0.8,))
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    views = [View(0, 0, 8, 8), View(0, 4, 8, 8)]
    with torch.no_grad():
        ours = Windows(views, view_batch=2).predictor(model, cond, control=control)(z, 500)
        left, right = (
            noise_predictor(
                model, cond, 64, 64, control=replace(control, images=(image[..., a : a + 64],))
            )(z[..., a // 8 : a // 8 + 8], 500)
            for a in (0, 32)
        )
    expected = torch.zeros_like(z)
    expected[..., :8] += left
    expected[..., 4:] += right
    expected[..., 4:8] /= 2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    plain = Windows(views, view_batch=2).predictor(model, cond)(z, 500)
    assert (ours - plain).abs().mean() > 1e-2


def test_cli_texture_expand_with_a_control_image(tmp_path, sd15_path, sd15_controlnet, control_map):
    from stylekit.media.metadata import read_metadata

    exemplar = write_image(tmp_path / "ex.png", size=(64, 64))
    control_map.resize((96, 64)).save(tmp_path / "map.png")
    common = ["--size", "96x64", "--window", "8", "--stride", "4", "--style-mode", "none"]
    net = ["--control", "canny", "--controlnet", str(sd15_controlnet)]
    result = cli(
        "texture-expand",
        exemplar,
        *common,
        *net,
        "--control-image",
        tmp_path / "map.png",
        "-o",
        tmp_path / "a.png",
        model=sd15_path,
    )
    assert result.exit_code == 0, result.output
    plain = cli("texture-expand", exemplar, *common, "-o", tmp_path / "b.png", model=sd15_path)
    assert plain.exit_code == 0, plain.output
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in "ab")
    assert a.shape == (64, 96, 3) and np.abs(a - b).mean() > 2
    assert read_metadata(tmp_path / "a.png")["controls"][0]["type"] == "canny"
    missing = cli(
        "texture-expand", exemplar, *common, *net, "-o", tmp_path / "c.png", model=sd15_path
    )
    assert missing.exit_code == 2 and "needs --control-image" in missing.stderr


def test_ad_refinement_passes_see_the_residuals(sd15_path, sd15_controlnet, content, control_map):
    """With AD on, every sampling pass and every refinement pass of the image's latent gets the
    ControlNet residuals; the references' feature passes (another image) get none."""
    settings = replace(
        settings_for(sd15_path, [sd15_controlnet], (0.8,), steps=2),
        style_mode="ad",
        ad_iters=1,
        ad_adain=False,
    )
    style = Image.fromarray(np.asarray(content)[::-1].copy())
    session = open_session(settings, runtime=CPU32, style=[style], style_names=["s.png"], seed=1)
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("down_block_additional_residuals") is not None)

    handle = session.model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run_img2img(session, content, [control_map])
    finally:
        handle.remove()
    # 2 sampling passes + 2 refinements × 1 iteration with residuals; reference passes without
    assert sum(seen) == 4
    assert len(seen) - sum(seen) == 2  # the reference's features at the 2 refinement timesteps
    plain = replace(settings, controls=(), controlnets=(), control_image=None, control_type=None)
    base = open_session(plain, runtime=CPU32, style=[style], style_names=["s.png"], seed=1)
    other = as_float(base.img2img([content], [11])[0])
    assert np.abs(as_float(out) - other).mean() > 2 / 255


def test_a_preset_may_set_controls(tmp_path):
    from stylekit.presets import load_preset

    path = tmp_path / "p.toml"
    path.write_text(
        'model = "m"\ncontrols = ["depth:0.5", "canny"]\ncontrol_end = 0.8\ncanny = "50,150"\n'
    )
    s = load_preset(str(path))
    assert s.controls == ("depth:0.5", "canny") and s.control_end == 0.8 and s.canny == "50,150"


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--control", "canny"], "lllyasviel/control_v11p_sd15_canny"),  # the family's default
        (["--control", "tile", "--controlnet", "nobody/no-such-net"], "nobody/no-such-net"),
    ],
)
def test_a_controlnet_not_in_the_cache_offline_is_one_line(tmp_path, sd15_path, flags, named):
    photo = write_image(tmp_path / "photo.png")
    result = cli("stylize", photo, *flags, "-o", tmp_path / "out.png", model=sd15_path)
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"ControlNet {named}" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_optimize_mode_takes_no_control(tmp_path, sd15_path):
    photo = write_image(tmp_path / "photo.png")
    result = cli(
        "stylize",
        photo,
        "--control",
        "tile",
        "--mode",
        "optimize",
        "--style",
        photo,
        "-o",
        tmp_path / "out.png",
        model=sd15_path,
    )
    assert result.exit_code == 2 and "--mode sample" in result.stderr


def test_cli_tiled_stylize_and_inpaint_take_controls(tmp_path, sd15_path, sd15_controlnet):
    """The wiring of the other commands: stylize --tiled (windows crop the tile map) and inpaint
    (a precomputed map cropped with the mask's box) run with controls and record them."""
    from stylekit.media.metadata import read_metadata

    photo = write_image(tmp_path / "photo.png", size=(96, 64))
    net = ["--controlnet", str(sd15_controlnet)]
    tiled = ["--tiled", "--window", "8", "--stride", "4"]
    for name, flags in (("a", ["--control", "tile", *net]), ("b", [])):
        result = cli(
            "stylize", photo, *tiled, *flags, "-o", tmp_path / f"{name}.png", model=sd15_path
        )
        assert result.exit_code == 0, result.output
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in "ab")
    assert np.abs(a - b).mean() > 2
    assert read_metadata(tmp_path / "a.png")["controls"][0]["type"] == "tile"
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    write_image(tmp_path / "edges.png", seed=5, size=(96, 64))
    result = cli(
        "inpaint",
        photo,
        "--mask",
        tmp_path / "mask.png",
        "--control",
        "canny",
        *net,
        "--control-image",
        tmp_path / "edges.png",
        "-o",
        tmp_path / "c.png",
        model=sd15_path,
    )
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "c.png")
    assert meta["control_image"] == "edges.png" and meta["controls"][0]["map"] == "control image"


def test_the_size_check_counts_every_controlnet(
    tmp_path, sd15_path, sd15_controlnet, sd15_controlnet2, monkeypatch
):
    """Two controls add their nets' weights (before the load) and activations (per UNet row) by
    `engine.memory`'s figures at the nets' own width; a size that fits without them but not with
    them is refused in one line naming the controls: exit 2 for `--size`, the input alone for an
    oversized input."""
    from stylekit.engine import memory

    seen, free = [], [2**50]
    real = memory.estimate

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(memory, "estimate", spy)
    monkeypatch.setattr(memory, "available", lambda device: free[0])
    image = write_image(tmp_path / "in.png", size=(64, 64))
    two = ["--control", "canny", "--control", "tile"]
    two += ["--controlnet", str(sd15_controlnet), "--controlnet", str(sd15_controlnet2)]

    def run(*flags, out):
        seen.clear()
        result = cli("stylize", image, "--cfg", "2", *flags, "-o", tmp_path / out, model=sd15_path)
        return result, list(seen)

    result, (plan0, input0) = run("--size", "64x64", out="a")  # before the load, then the input
    assert result.exit_code == 0, result.output
    result, (plan2, input2) = run("--size", "64x64", *two, out="b")
    assert result.exit_code == 0, result.output
    scale = 32 / 320  # the tiny nets' first block width, read off their config.json
    net_weights = int(memory.CONTROL_PARAMS["sd15"] * scale**2 * 4)  # fp32
    net_rows = memory.CONTROL_FORWARD["sd15"] * 8 * 8 * scale * 4 / 2 * 2  # latent 8², 2 CFG rows
    assert plan2.weights - plan0.weights == pytest.approx(2 * net_weights, abs=2)
    assert plan2.control == int(2 * net_rows) and plan0.control == 0
    assert plan2.unet - plan0.unet == pytest.approx(2 * net_rows, abs=1)
    assert input2.weights == input0.weights == 0 and input2.control == plan2.control

    free[0] = (plan0.peak + plan2.peak) // 2  # fits without the controls, not with them
    assert run("--size", "64x64", out="c")[0].exit_code == 0
    result, _ = run("--size", "64x64", *two, out="d")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--size 64x64 with ControlNets canny, tile: needs about" in lines[0]
    assert "--no-size-check" in lines[0] and not (tmp_path / "d").exists()
    assert run("--size", "64x64", *two, "--dry-run", out="d")[0].exit_code == 2  # as planned

    free[0] = (input0.peak + input2.peak) // 2  # an input at its own size, after the load
    assert run(out="e")[0].exit_code == 0
    result, _ = run(*two, out="f")
    assert result.exit_code == 1, result.output
    assert "in.png: 64x64 with ControlNets canny, tile: needs about" in result.stderr
    assert not (tmp_path / "f" / "in.png").exists()


def test_the_depth_estimator_counts_until_it_is_loaded():
    from stylekit.session import control_nets

    nets, depth = control_nets(Settings(controls=("depth", "canny")), "sdxl")
    assert [(n.name, n.family, n.width) for n in nets] == [
        ("depth", "sdxl", None),
        ("canny", "sdxl", None),
    ]
    assert depth  # the depth map is computed: its estimator loads
    given = Settings(controls=("depth",), control_image="maps", controlnets=("some/net",))
    assert control_nets(given, "sd15") == ([control_nets(given, "sd15")[0][0]], False)
    assert control_nets(Settings(), "sd15") == ([], False)
