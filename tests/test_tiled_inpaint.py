"""Tiled inpainting (`inpaint --tiled`): the mask's crop at full size over MultiDiffusion windows.

On the tiny random SD1.5 (4-channel) and SD1.5-inpainting (9-channel) UNets, native window 32
latents (256 px). What is checked: a crop of one window is the untiled run, the UNet never sees
more than one window batch of one window's size (a 9-channel UNet gets each window's crop of the
mask and masked-image latent), and the CLI end to end on an odd-size image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.engine import conditioning, sampling
from stylekit.engine.img2img import Windows
from stylekit.engine.inpaint import binarize, inpaint
from stylekit.engine.tiling import views


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


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth random image (a photo's low frequencies, so the VAE sees structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size[1] // 32, 2), max(size[0] // 32, 2), 3), np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """White box (left, top, right, bottom) on black."""
    grey = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    grey[top:bottom, left:right] = 255
    return Image.fromarray(grey)


CASES = {  # id: (model fixture, scheduler, γ, CFG, strength)
    "4ch-lcm": ("sd15_path", "lcm", 0.0, 1.0, 0.75),  # the sampler draws after the posteriors
    "4ch-tcd-g0.3-cfg2": ("sd15_path", "tcd", 0.3, 2.0, 0.6),
    "4ch-strength1": ("sd15_path", "lcm", 0.0, 1.0, 1.0),
    "9ch-tcd-g0.3-cfg2": ("sd15_inpaint_path", "tcd", 0.3, 2.0, 0.75),
    "9ch-strength1": ("sd15_inpaint_path", "lcm", 0.0, 1.0, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_window_crop_is_the_untiled_run(case, request, loaded):
    """A 256 × 192 crop is one 32-latent window and one VAE tile: the same draws in the same
    order (a 4-channel UNet skips encoding the masked image but still takes its posterior draw),
    the same UNet calls (the 9-channel extra channels cropped to the one window are the whole),
    the whole-latent VAE: bit-identical (averaging one window divides by 1 in fp32)."""
    fixture, kind, gamma, cfg, strength = CASES[case]
    model = loaded(request.getfixturevalue(fixture))
    image, size = photo((256, 192)), (256, 192)
    mask = binarize(box_mask(size, (40, 30, 200, 150)))
    cond = conditioning.encode_text(model, "a red door", None, cfg=cfg)

    def run(windows):
        sampler = sampling.make_sampler(kind, dict(model.pipe.scheduler.config), gamma=gamma)
        return inpaint(
            model,
            cond,
            sampler,
            image,
            mask,
            steps=2,
            strength=strength,
            generator=torch.Generator().manual_seed(5),
            windows=windows,
        )

    plain = run(None)
    tiled = run(Windows(views(24, 32, window=32, stride=16)))
    assert tiled.shape == plain.shape == (192, 256, 3)
    assert np.array_equal(tiled, plain)


@pytest.mark.parametrize("fixture", ["sd15_path", "sd15_inpaint_path"])
def test_unet_sees_one_window_batch_as_the_crop_grows(fixture, request, loaded):
    """Two crops, one 4 times the other's area, over 16-latent windows, 2 per call: every UNet
    call has at most 2 windows of 16 × 16 latents (with 9 input channels for the inpainting
    UNet: its mask and masked-image latent are cropped per window), the same for both sizes; the
    VAE decoder sees one tile with its context at a time."""
    model = loaded(request.getfixturevalue(fixture))
    cond = conditioning.encode_text(model, "", None, cfg=1.0)
    window, vb, tile, overlap = 16, 2, 16, 4
    seen = {}
    for size in ((256, 256), (512, 512)):
        h, w = size[1] // 8, size[0] // 8
        spec = Windows(
            views(h, w, window=window, stride=8), view_batch=vb, tile=tile, overlap=overlap
        )
        shapes, decoded = set(), set()
        hooks = [
            model.unet.register_forward_pre_hook(
                lambda m, args, shapes=shapes: shapes.add(tuple(args[0].shape))
            ),
            model.vae.decoder.conv_out.register_forward_pre_hook(
                lambda m, args, decoded=decoded: decoded.add(tuple(args[0].shape[-2:]))
            ),
        ]
        try:
            out = inpaint(
                model,
                cond,
                sampling.make_sampler("tcd", dict(model.pipe.scheduler.config)),
                photo(size),
                binarize(box_mask(size, (16, 16, size[0] - 16, size[1] - 16))),
                steps=1,
                strength=0.6,
                generator=torch.Generator().manual_seed(0),
                windows=spec,
            )
        finally:
            for hook in hooks:
                hook.remove()
        assert out.shape == (size[1], size[0], 3)
        seen[size] = shapes, decoded
    channels = model.unet.config.in_channels
    for shapes, decoded in seen.values():
        assert {s[1:] for s in shapes} == {(channels, window, window)}
        assert max(s[0] for s in shapes) == vb
        assert max(a * b for a, b in decoded) <= (8 * (tile + 2 * overlap)) ** 2
    assert channels == (9 if fixture == "sd15_inpaint_path" else 4)


# --- through the CLI ---------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from stylekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_flags(model) -> list[str]:
    return [
        *("--model", str(model), "--accelerator", "none", "--scheduler", "tcd"),
        *("--steps", "1", "--device", "cpu", "--dtype", "fp32", "-q", "--json"),
    ]


@pytest.mark.parametrize("fixture", ["sd15_path", "sd15_inpaint_path"])
def test_cli_tiled_keeps_the_size_and_every_unmasked_byte(fixture, request, tmp_path):
    """A 480 × 333 px photo with a mask whose crop (plus padding) is far above the tiny model's
    256² budget: with --tiled the crop runs at its own size over 16-latent windows, its box
    widened to a multiple of 8 px across (425 → 432) and, as the image's 333 px height has no
    room for 336, resampled to 328 down; the output keeps the input's size and every byte
    outside the mask grown by --mask-blur."""
    from stylekit.media.metadata import read_metadata

    model = request.getfixturevalue(fixture)
    size, box, blur = (480, 333), (37, 29, 390, 301), 4
    big, mask = tmp_path / "big.png", tmp_path / "mask.png"
    photo(size, seed=3).save(big)
    box_mask(size, box).save(mask)
    out = tmp_path / "out"
    flags = ("--window", "16", "--view-batch", "3", "--seed", "4", "--mask-blur", str(blur))
    result = invoke(
        "inpaint", big, "--mask", mask, "--tiled", *flags, "-o", out, *tiny_flags(model)
    )
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(out / "big.png").convert("RGB"))
    source = np.asarray(Image.open(big).convert("RGB"))
    assert written.shape == source.shape == (333, 480, 3)
    keep = np.ones(source.shape[:2], bool)
    left, top, right, bottom = box
    keep[top - blur : bottom + blur, left - blur : right + blur] = False
    assert np.array_equal(written[keep], source[keep])
    assert not np.array_equal(written[~keep], source[~keep])  # something was repainted
    meta = read_metadata(out / "big.png")
    # the box grown by blur + 32 px of padding: x 1..426 widened to 432 px, y the whole 333
    assert meta["crop"] == "432x333+0+0"
    assert meta["working_size"] == "432x328"
    assert meta["tiled"] is True and meta["window"] == 16 and meta["stride"] == 8
    assert meta["windows"] > 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--window", "16"), "--window and --stride need --tiled"),
        (("--tiled", "--max-size", "256"), "drop --size"),
        (("--tiled", "--stride", "40", "--window", "16"), "--stride 40 is larger"),
    ],
)
def test_cli_tiled_inpaint_refuses_conflicting_flags(sd15_path, tmp_path, flags, message):
    img = tmp_path / "a.png"
    photo((64, 64)).save(img)
    result = invoke(
        "inpaint", img, "--mask", img, *flags, "-o", tmp_path / "out", *tiny_flags(sd15_path)
    )
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_tiled_with_ad_refines_each_window(sd15_path, tmp_path):
    """--style-mode ad with --tiled over several windows (windowed AD guidance): it runs, keeps
    every byte outside the mask, and the style changes the repainted region (against the same
    run without --style)."""
    size, box = (200, 136), (20, 20, 180, 116)
    big, mask, ref = tmp_path / "big.png", tmp_path / "mask.png", tmp_path / "ref.png"
    photo(size, seed=1).save(big)
    box_mask(size, box).save(mask)
    photo((64, 64), seed=9).save(ref)
    common = ("--mask", mask, "--tiled", "--window", "16", "--seed", "2", "--mask-blur", "0")
    outs = {}
    for mode in ("ad", "none"):
        out = tmp_path / mode
        style = ("--style", ref, "--style-mode", mode, "--ad-iters", "1") if mode == "ad" else ()
        result = invoke("inpaint", big, *common, *style, "-o", out, *tiny_flags(sd15_path))
        assert result.exit_code == 0, result.output
        outs[mode] = np.asarray(Image.open(out / "big.png").convert("RGB")).astype(int)
    source = np.asarray(Image.open(big).convert("RGB")).astype(int)
    keep = np.ones(source.shape[:2], bool)
    keep[box[1] : box[3], box[0] : box[2]] = False
    for arr in outs.values():
        assert arr.shape == source.shape and np.array_equal(arr[keep], source[keep])
    changed = np.abs(outs["ad"] - outs["none"]).max(axis=-1)[~keep] > 2
    assert changed.mean() > 0.2


def test_snap_box_widens_to_multiples_of_8_within_the_image():
    from stylekit.engine.inpaint import snap_box

    assert snap_box((10, 5, 20, 13), (100, 100)) == (7, 5, 23, 13)  # 10 → 16 around the centre
    assert snap_box((90, 0, 99, 8), (100, 100)) == (84, 0, 100, 8)  # shifted to stay inside
    assert snap_box((0, 0, 97, 30), (99, 99)) == (0, 0, 97, 32)  # no room for 104: left alone
