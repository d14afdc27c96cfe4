"""Tiled image-to-image (`--tiled`): MultiDiffusion windows and the tiled VAE at full resolution.

On the tiny random SD1.5 (native window 32 latents, 256 px). What is checked: a one-window canvas
is the untiled run, the UNet never sees more than one window batch whatever the canvas size,
parity with diffusers' panorama pipeline from the same start latent, and the CLI end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.engine import sampling
from stylekit.engine.img2img import Windows, img2img, start_latent
from stylekit.engine.tiling import views


@pytest.fixture(scope="module")
def sd15(sd15_path):
    from stylekit.engine.models import ModelSpec, load

    return load(ModelSpec(str(sd15_path), accelerator="none", dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def empty_prompt(sd15):
    from stylekit.engine.conditioning import encode_text

    return encode_text(sd15, "", None, cfg=1.0)


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth random image (a photo's low frequencies, so the VAE sees structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size[1] // 32, 2), max(size[0] // 32, 2), 3), np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def tcd(model, gamma: float = 0.0):
    return sampling.make_sampler("tcd", dict(model.pipe.scheduler.config), gamma=gamma)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_one_window_canvas_is_the_untiled_run(sd15, empty_prompt, gamma):
    """A canvas of one window, within one VAE tile: the same draws, the same UNet calls and the
    whole-latent VAE, so the result is bit-identical (averaging one window divides by 1 in fp32)."""
    image = photo((256, 192))
    kwargs = dict(steps=2, strength=0.6)
    plain = img2img(
        sd15,
        empty_prompt,
        tcd(sd15, gamma),
        [image],
        generator=[torch.Generator().manual_seed(3)],
        **kwargs,
    )
    tiled = img2img(
        sd15,
        empty_prompt,
        tcd(sd15, gamma),
        [image],
        generator=[torch.Generator().manual_seed(3)],
        windows=Windows(views(24, 32, window=32, stride=16)),
        **kwargs,
    )
    assert tiled.shape == plain.shape == (1, 192, 256, 3)
    assert np.array_equal(tiled, plain)


def test_one_window_canvas_with_ad_is_the_untiled_run(sd15_path):
    """The session method with AD guidance (windowed refinement of one window) and AdaIN.

    To float error, not bit-identical: the sampler's latent is channels-last (strides of the
    VAE's output) and Adam's backward pass through the UNet rounds differently on it than on a
    window's crop, which is contiguous (2e-4 after the first refinement; equal for equal
    strides). Random weights amplify that over the steps; measured: mean 0.45/255 (max 27/255
    on a few pixels). Without AD the same comparison is exact (above).
    """
    from stylekit.api import Runtime
    from stylekit.presets import Settings
    from stylekit.session import open_session
    from stylekit.tasks.textures import plan_canvas

    settings = Settings(
        model=str(sd15_path),
        accelerator="none",
        scheduler="tcd",
        steps=2,
        style_mode="ad",
        ad_iters=1,
        cfg=1.0,
    )
    session = open_session(settings, Runtime(device="cpu", dtype="fp32"), task="img2img")
    session = session.with_references([photo((128, 128), seed=5)], seed=0)
    image = photo((256, 256))
    plain = session.img2img([image], [7])[0]
    tiled = session.img2img_tiled(image, 7, plan_canvas(image.size, native=session.native))
    diff = np.abs(np.asarray(plain, dtype=int) - np.asarray(tiled, dtype=int))
    assert diff.mean() <= 1  # 8-bit levels


def unet_and_decoder_sizes(model, run) -> tuple[set, set]:
    """Run `run()` and return the UNet's input shapes (B, h, w) and the VAE decoder's conv_out
    input sizes (h, w): what bounds the activations' memory."""
    unet_shapes, decoder_sizes = set(), set()
    hooks = [
        model.unet.register_forward_pre_hook(
            lambda m, args: unet_shapes.add((args[0].shape[0], *args[0].shape[-2:]))
        ),
        model.vae.decoder.conv_out.register_forward_pre_hook(
            lambda m, args: decoder_sizes.add(tuple(args[0].shape[-2:]))
        ),
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return unet_shapes, decoder_sizes


def test_memory_stays_flat_as_the_canvas_grows(sd15, empty_prompt):
    """Two canvases, one 4 times the other's area: the UNet sees at most `view_batch` windows of
    the window size in every call and the VAE decoder one tile (with context) at a time, the same
    for both, so activation memory does not grow with the canvas (only the latent does)."""
    window, vb, tile, overlap = 16, 2, 16, 4
    seen = {}
    for size in ((256, 256), (512, 512)):
        h, w = size[1] // 8, size[0] // 8
        spec = Windows(
            views(h, w, window=window, stride=8), view_batch=vb, tile=tile, overlap=overlap
        )
        out = {}

        def run(size=size, spec=spec, out=out):
            out["arr"] = img2img(
                sd15,
                empty_prompt,
                tcd(sd15),
                [photo(size)],
                steps=1,
                strength=0.5,
                generator=[torch.Generator().manual_seed(0)],
                windows=spec,
            )

        seen[size] = unet_and_decoder_sizes(sd15, run)
        assert out["arr"].shape == (1, size[1], size[0], 3)
    small, large = seen.values()
    calls = small[0] | large[0]  # (B, h, w) of every UNet call
    assert {tuple(hw) for _, *hw in calls} == {(window, window)}
    assert max(b for b, *_ in small[0]) == max(b for b, *_ in large[0]) == vb
    biggest = max(a * b for a, b in small[1] | large[1])
    assert biggest <= (8 * (tile + 2 * overlap)) ** 2


def test_panorama_parity_img2img(sd15, empty_prompt):
    """AD off, CFG 1, TCD γ 0, from the same start latent (the content latent noised to the first
    timestep, drawn as img2img draws it) and the same timesteps: the tiled loop equals diffusers'
    panorama pipeline (window 64, stride 8) on a 2-window canvas. The VAE tile is set above the
    canvas so both decode the latent whole: what is compared is the window-averaged loop."""
    from diffusers import StableDiffusionPanoramaPipeline, TCDScheduler

    pipe = sd15.pipe
    panorama = StableDiffusionPanoramaPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=TCDScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    panorama.set_progress_bar_config(disable=True)
    height, width, steps, strength = 512, 576, 2, 0.6  # latents 64 × 72: windows at x = 0 and 8
    image = photo((width, height))
    sampler = tcd(sd15)
    _, ts = sampling.img2img_schedule(steps, strength)
    z_t0, _, _ = start_latent(sd15, image, ts[0], sampler, torch.Generator().manual_seed(1))
    theirs = panorama(
        "",
        height=height,
        width=width,
        timesteps=list(ts),
        guidance_scale=1.0,
        view_batch_size=2,
        latents=z_t0.clone(),
        output_type="np",
    ).images
    spec = Windows(views(64, 72, window=64, stride=8), view_batch=2, tile=128)
    ours = img2img(
        sd15,
        empty_prompt,
        sampler,
        [image],
        steps=steps,
        strength=strength,
        generator=[torch.Generator().manual_seed(1)],
        windows=spec,
    )
    assert ours.shape == theirs.shape == (1, height, width, 3)
    # parity means every pixel within one 8-bit level
    assert np.abs(ours - theirs).max() <= 1 / 255


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


def test_cli_tiled_writes_the_input_size_and_records_the_windows(sd15_path, tmp_path):
    """A 600 × 330 px photo (far above the tiny model's 256² working budget) comes out at
    600 × 330 with --tiled: it runs at 600 × 328 (multiples of 8; latents 41 × 75, 16-latent
    windows every 8: 5 × 9 of them) and is resampled back; at 1.5× with --upscale 1.5."""
    from stylekit.media.metadata import read_metadata

    big = tmp_path / "big.png"
    photo((600, 330)).save(big)
    out = tmp_path / "out"
    flags = ("--window", "16", "--view-batch", "3", "--seed", "4", "-o", out)
    result = invoke("stylize", big, "--tiled", *flags, *tiny_flags(sd15_path))
    assert result.exit_code == 0, result.output
    written = Image.open(out / "big.png")
    assert written.size == (600, 330)
    meta = read_metadata(out / "big.png")
    assert meta["tiled"] is True and meta["window"] == 16 and meta["stride"] == 8
    assert meta["working_size"] == "600x328" and meta["windows"] == 5 * 9
    assert meta["seed"] == 4 and meta["upscale"] == 1.0

    up = tmp_path / "up"
    result = invoke(
        "stylize",
        big,
        "--tiled",
        "--upscale",
        "1.5",
        "--window",
        "32",
        "-o",
        up,
        *tiny_flags(sd15_path),
    )
    assert result.exit_code == 0, result.output
    assert Image.open(up / "big.png").size == (900, 495)
    assert read_metadata(up / "big.png")["upscale"] == 1.5
    assert json.loads(result.stdout.strip().splitlines()[-1])  # the --json record


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--upscale", "2"), "need --tiled"),
        (("--tiled", "--max-size", "256"), "drop --size"),
        (("--tiled", "--upscale", "0"), "--upscale must be above 0"),
        (("--tiled", "--batch-size", "2"), "one image at a time"),
        (("--tiled", "--mode", "optimize", "--style", "{img}"), "--mode optimize has no windows"),
        (("--tiled", "--stride", "40", "--window", "16"), "--stride 40 is larger"),
    ],
)
def test_cli_tiled_refuses_conflicting_flags(sd15_path, tmp_path, flags, message):
    img = tmp_path / "a.png"
    photo((64, 64)).save(img)
    flags = [str(img) if f == "{img}" else f for f in flags]
    result = invoke("stylize", img, *flags, "-o", tmp_path / "out", *tiny_flags(sd15_path))
    assert result.exit_code == 2 and message in result.output, result.output


def test_encode_above_the_lockstep_budget_runs_tile_by_tile(sd15):
    """Above WHOLE_MID_TOKENS (forced here with lockstep=False) `encode_tiled` runs every tile
    through the encoder alone: the encoder never sees more than one tile with its context, and
    the latent stays close to the whole encode (per-tile statistics: measured mean 0.02 against
    a latent std of 0.19 on the tiny VAE, 512² px, tiles 16/4 latents)."""
    from stylekit.engine.latents import encode_pixels, to_tensor
    from stylekit.engine.tiling import encode_tiled

    x = to_tensor(photo((512, 512)))
    sizes = set()
    hook = sd15.vae.encoder.conv_in.register_forward_pre_hook(
        lambda m, args: sizes.add(tuple(args[0].shape[-2:]))
    )
    try:
        alone = encode_tiled(
            sd15, x, torch.Generator().manual_seed(1), tile=16, overlap=4, lockstep=False
        )
    finally:
        hook.remove()
    whole = encode_pixels(sd15, x, torch.Generator().manual_seed(1))
    assert alone.shape == whole.shape == (1, 4, 64, 64)
    assert max(a * b for a, b in sizes) <= (8 * (16 + 2 * 4)) ** 2
    assert (alone - whole).abs().mean() <= 0.15 * whole.std()


def test_tiny_vae_encodes_tile_by_tile_like_the_whole(sd15_path, tiny_vae_path):
    """TAESD has no GroupNorm: `encode_tiled` runs it tile by tile (bounded memory) and, with
    enough context for its convolutions, gets the whole encode's latents to float error
    (measured on the tiny TAESD, 6 latents of context: max 1.5e-6 against a latent std of 0.07)."""
    from stylekit.engine.latents import encode_pixels, to_tensor
    from stylekit.engine.models import ModelSpec, load
    from stylekit.engine.tiling import encode_tiled

    model = load(
        ModelSpec(
            str(sd15_path), accelerator="none", dtype="fp32", device="cpu",
            tiny_vae=str(tiny_vae_path),
        )
    )  # fmt: skip
    x = to_tensor(photo((512, 384)))
    sizes = set()
    hook = model.vae.encoder.register_forward_pre_hook(
        lambda m, args: sizes.add(tuple(args[0].shape[-2:]))
    )
    try:
        tiled = encode_tiled(model, x, None, tile=16, overlap=6)
    finally:
        hook.remove()
    whole = encode_pixels(model, x, None)
    assert tiled.shape == whole.shape == (1, 4, 48, 64)
    assert max(a * b for a, b in sizes) <= (8 * (16 + 2 * 6)) ** 2
    assert (tiled - whole).abs().max() <= 1e-3 * whole.std()
