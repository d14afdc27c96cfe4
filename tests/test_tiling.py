"""MultiDiffusion windows and loop, circular padding and tiled decoding, on tiny random models."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from stylekit.engine import sampling
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import multidiffusion
from stylekit.engine.tiling import (
    View,
    circular_padding,
    coverage,
    crop,
    decode_tiled,
    paste_add,
    views,
)
from stylekit.errors import UsageError

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def sd15(sd15_path):
    from stylekit.engine.models import ModelSpec, load

    return load(ModelSpec(str(sd15_path), accelerator="none", dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def empty_prompt(sd15):
    from stylekit.engine.conditioning import encode_text

    return encode_text(sd15, "", None, cfg=1.0)


# --- windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(64, 72), (64, 64), (70, 83), (20, 100), (65, 129)])
@pytest.mark.parametrize("wrap", [False, True])
def test_windows_cover_every_latent(h, w, wrap):
    windows = views(h, w, window=64, stride=8, wrap_x=wrap, wrap_y=wrap)
    count = coverage(h, w, windows)
    assert count.min() > 0
    assert {(v.height, v.width) for v in windows} == {(min(h, 64), min(w, 64))}
    if not wrap:  # clamped: nothing runs past the edge, the last window ends at it
        assert max(v.top + v.height for v in windows) == h
        assert max(v.left + v.width for v in windows) == w
        assert all(v.top + v.height <= h and v.left + v.width <= w for v in windows)


def test_windows_match_the_panorama_pipeline_where_they_tile_exactly():
    from diffusers import StableDiffusionPanoramaPipeline

    theirs = StableDiffusionPanoramaPipeline.get_views(None, 512, 1024)  # (64, 128) latents
    ours = views(64, 128, window=64, stride=8)
    assert [(v.top, v.top + v.height, v.left, v.left + v.width) for v in ours] == theirs


def test_wrapped_windows_start_at_every_stride_step():
    windows = views(32, 48, window=16, stride=8, wrap_x=True, wrap_y=True)
    assert sorted({v.left for v in windows}) == list(range(0, 48, 8))
    assert sorted({v.top for v in windows}) == list(range(0, 32, 8))
    assert torch.equal(coverage(32, 48, windows), torch.full((32, 48), 4.0))  # (16 / 8)²


def test_a_canvas_smaller_than_the_window_is_one_window():
    assert views(40, 24, window=64, stride=8, wrap_x=True) == [View(0, 0, 40, 24)]


@pytest.mark.parametrize("window, stride", [(0, 1), (16, 0), (16, 17)])
def test_bad_window_settings_are_refused(window, stride):
    with pytest.raises(UsageError, match="stride"):
        views(64, 64, window=window, stride=stride)


def test_crop_and_paste_wrap_around_the_canvas():
    x = torch.arange(2 * 5 * 7.0).view(1, 2, 5, 7)
    view = View(3, 5, 4, 6)  # runs past the bottom and the right edge
    expected = x.roll((-3, -5), (-2, -1))[..., :4, :6]
    assert torch.equal(crop(x, view), expected)
    canvas = torch.zeros_like(x)
    paste_add(canvas, view, expected)
    mask = coverage(5, 7, [view]).bool()
    assert torch.equal(canvas, torch.where(mask, x, 0.0))


# --- the loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd2"])  # the tiny SD 2.x predicts v
def test_panorama_parity_tcd(request, family):
    """AD off, CFG 1, TCD γ 0: the loop equals diffusers' panorama pipeline on a 2-window canvas;
    averaging v (or x0) over windows is as valid as averaging ε: the steps are affine in it."""
    from diffusers import StableDiffusionPanoramaPipeline, TCDScheduler

    from stylekit.engine.conditioning import encode_text
    from stylekit.engine.latents import decode
    from stylekit.engine.models import ModelSpec, load
    from stylekit.engine.predict import noise_predictor

    if family == "sd15":
        model, prompt = request.getfixturevalue("sd15"), request.getfixturevalue("empty_prompt")
    else:
        path = request.getfixturevalue("sd2_path")
        model = load(ModelSpec(str(path), accelerator="none", dtype="fp32", device="cpu"))
        prompt = encode_text(model, "", None, cfg=1.0)
    pipe = model.pipe
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
    height, width, steps = 512, 576, 4  # latents 64 × 72: windows at x = 0 and 8
    theirs = panorama(
        "",
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=1.0,
        view_batch_size=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images

    generator = torch.Generator().manual_seed(0)
    z = randn_tensor((1, 4, height // 8, width // 8), generator=generator)
    sampler = sampling.make_sampler("tcd", dict(pipe.scheduler.config))
    assert sampler.prediction == ("v_prediction" if family == "sd2" else "epsilon")
    eps = noise_predictor(model, prompt, height, width)
    ts = sampling.consistency_timesteps(steps)
    with torch.no_grad():
        z = multidiffusion(eps, z, ts, sampler, window=64, stride=8, view_batch=2)
        ours = decode(model, z)
    assert ours.shape == theirs.shape == (1, height, width, 3)
    # parity means every pixel within one 8-bit level (the same loop measures 0 on CPU)
    assert np.abs(ours - theirs).mean() <= 1 / 255
    assert np.abs(ours - theirs).max() <= 1 / 255


@pytest.mark.parametrize("wrap", [False, True])
def test_lcm_draws_one_noise_for_the_whole_canvas(wrap):
    """With a pointwise model every window steps like the canvas: the loop equals one plain LCM run.

    Independent per-window noises (what diffusers' panorama pipeline averages) would not.
    """
    sampler = sampling.make_sampler("lcm", SD_CONFIG)
    ts = sampling.consistency_timesteps(4)
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(1))

    def eps(x, t):
        return 0.3 * x + 0.001 * t

    ours = multidiffusion(
        eps,
        z,
        ts,
        sampler,
        window=16,
        stride=8,
        generator=torch.Generator().manual_seed(0),
        wrap_x=wrap,
        wrap_y=wrap,
    )
    plain = sampling.sample(eps, z, ts, sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_windowed_after_step_and_callback():
    """AD's windowed refinement runs after each step on every window of the averaged canvas;
    the callback counts windows over all steps."""
    from stylekit.engine.tiling import map_windows, views

    sampler = sampling.make_sampler("tcd", SD_CONFIG)
    ts = [999, 759, 499, 259]
    seen, progress = [], []
    windows = views(16, 24, window=16, stride=8)  # 2 windows per step

    def refine(crops, t_next):
        seen.append((crops.shape[0], t_next))
        return crops

    def after_step(i, z):
        t_next = ts[i + 1] if i + 1 < len(ts) else 0
        return map_windows(lambda c: refine(c, t_next), z, windows, view_batch=1)

    multidiffusion(
        lambda x, t: torch.zeros_like(x),
        torch.randn(2, 4, 16, 24),
        ts,
        sampler,
        window=16,
        stride=8,
        view_batch=1,
        after_step=after_step,
        callback=lambda done, total: progress.append((done, total)),
    )
    assert [t for _, t in seen] == [759, 759, 499, 499, 259, 259, 0, 0]
    assert all(rows == 2 for rows, _ in seen)  # one window of both images
    assert progress == [(k, 8) for k in range(1, 9)]


def test_map_windows_of_the_identity_is_the_identity():
    from stylekit.engine.tiling import map_windows, views

    z = torch.randn(1, 4, 20, 28)
    for wrap in (False, True):
        windows = views(20, 28, window=16, stride=8, wrap_x=wrap, wrap_y=wrap)
        torch.testing.assert_close(map_windows(lambda c: c, z, windows, view_batch=3), z)


@pytest.mark.parametrize("h, w, ky, kx", [(32, 48, 16, 16), (16, 48, 8, 16)])
def test_seamless_output_is_roll_equivariant(sd15, empty_prompt, h, w, ky, kx):
    """Wrapped windows + circular padding: rolling the noise by k latents rolls the image by 8k px.

    Shifts are multiples of the stride (the window set maps onto itself), of the UNet's downsampling
    (2) and of the decode tiles' cores (16), so all of it holds up to float error. At h = 16 the
    canvas is one window high: there the UNet's circular padding does the wrapping.
    """
    from stylekit.engine.latents import decode
    from stylekit.engine.predict import noise_predictor

    sampler = sampling.make_sampler("tcd", dict(sd15.pipe.scheduler.config))
    eps = noise_predictor(sd15, empty_prompt, 8 * h, 8 * w)
    ts = sampling.consistency_timesteps(4)
    z0 = randn_tensor((1, 4, h, w), generator=torch.Generator().manual_seed(0))
    images, tiled = [], []
    for noise in (z0, z0.roll((ky, kx), (-2, -1))):
        with circular_padding(sd15.unet, x=True, y=True):
            z = multidiffusion(
                eps, noise, ts, sampler, window=16, stride=8, wrap_x=True, wrap_y=True
            )
        with torch.no_grad(), circular_padding(sd15.vae, x=True, y=True):
            images.append(decode(sd15, z))
            tiled.append(decode_tiled(sd15, z, tile=16, overlap=4, wrap_x=True, wrap_y=True))
    shift = (8 * ky, 8 * kx)
    assert np.abs(images[1] - np.roll(images[0], shift, (1, 2))).max() < 1e-4
    assert np.abs(tiled[1] - np.roll(tiled[0], shift, (1, 2))).max() < 1e-4


# --- circular padding --------------------------------------------------------------------------


@pytest.mark.parametrize("x, y", [(True, False), (False, True), (True, True)])
def test_circular_padding_wraps_the_chosen_axes(x, y):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 5, padding=2))
    inp = torch.randn(1, 3, 9, 11)

    def reference(t):  # circular where chosen, zeros elsewhere, then an unpadded conv
        for conv in net:
            p = conv.kernel_size[0] // 2  # (its own padding is moved into a hook here)
            t = F.pad(t, (p, p, 0, 0), mode="circular" if x else "constant")
            t = F.pad(t, (0, 0, p, p), mode="circular" if y else "constant")
            t = F.conv2d(t, conv.weight, conv.bias)
        return t

    with torch.no_grad(), circular_padding(net, x=x, y=y):
        torch.testing.assert_close(net(inp), reference(inp))
        if x and y:
            both = [
                nn.Conv2d(
                    c.in_channels,
                    c.out_channels,
                    c.kernel_size,
                    padding=c.kernel_size[0] // 2,
                    padding_mode="circular",
                )
                for c in net
            ]
            for src, dst in zip(net, both, strict=True):
                dst.load_state_dict(src.state_dict())
            torch.testing.assert_close(net(inp), nn.Sequential(*both)(inp))


def test_circular_padding_restores_the_convs(sd15):
    convs = [m for m in sd15.vae.modules() if isinstance(m, nn.Conv2d)]
    before = [(c.padding, c.padding_mode, dict(c._forward_pre_hooks)) for c in convs]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        plain = sd15.vae.decode(z).sample
        with pytest.raises(RuntimeError, match="inside"):
            with circular_padding(sd15.vae, x=True, y=False):
                wrapped = sd15.vae.decode(z).sample
                raise RuntimeError("inside")
        assert [(c.padding, c.padding_mode, dict(c._forward_pre_hooks)) for c in convs] == before
        assert not torch.allclose(plain, wrapped)
        assert torch.equal(sd15.vae.decode(z).sample, plain)


# --- tiled decoding ----------------------------------------------------------------------------


class LocalDecoder(nn.Module):
    """A stand-in VAE whose output pixel depends on a 3 × 3 latent neighbourhood only (scale 8)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    @property
    def dtype(self):
        return self.conv.weight.dtype

    def decode(self, z, return_dict=False):
        return (F.interpolate(torch.tanh(self.conv(z)), scale_factor=8, mode="nearest"),)


@pytest.mark.parametrize("h, w", [(16, 16), (37, 50), (40, 23)])
@pytest.mark.parametrize("wrap", [False, True])
def test_tiles_blend_exactly_for_a_local_decoder(h, w, wrap):
    """Context wider than the receptive field: tiled equals whole decoding, seams and edges included."""
    from stylekit.engine.latents import decode

    torch.manual_seed(0)
    model = LoadedModel(SimpleNamespace(vae=LocalDecoder()), "sd15", False, "cpu", torch.float32)
    z = torch.randn(2, 4, h, w)
    with torch.no_grad(), circular_padding(model.vae, x=wrap, y=wrap):
        whole = decode(model, z)
        tiled = decode_tiled(model, z, tile=16, overlap=4, wrap_x=wrap, wrap_y=wrap)
    assert tiled.shape == whole.shape == (2, 8 * h, 8 * w, 3)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def border_and_interior(diff: np.ndarray, edges: list[int], band: int) -> tuple[float, float]:
    """Mean of an (H, W) difference within `band` px of the given column/row edges, and elsewhere."""
    near = np.zeros(diff.shape, bool)
    for e in edges:
        near[max(e - band, 0) : e + band, :] = True
        near[:, max(e - band, 0) : e + band] = True
    return float(diff[near].mean()), float(diff[~near].mean())


@pytest.mark.parametrize("size, tile, overlap", [(48, 32, 8), (64, 48, 8), (64, 32, 12)])
def test_tiled_decode_agrees_with_the_whole(sd15, size, tile, overlap):
    """Shared mid block and GroupNorm statistics: the tiles decode like the whole latent.

    Measured (tiny KL VAE, random latents): mean 0.007-0.03/255 with shared statistics against
    10-12/255 with each tile normalised alone (max 0.3 vs 123/255); the goal is ≤ 2/255 and at
    least 5× below the per-tile figure, with no more difference along tile borders than inside.
    """
    from stylekit.engine.latents import decode
    from stylekit.engine.tiling import _spans

    z = randn_tensor((1, 4, size, size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decode(sd15, z)
        shared = decode_tiled(sd15, z, tile=tile, overlap=overlap)  # lockstep_fits here
        alone = decode_tiled(sd15, z, tile=tile, overlap=overlap, lockstep=False)
    d_shared, d_alone = np.abs(shared - plain)[0].max(-1), np.abs(alone - plain)[0].max(-1)
    assert d_shared.mean() <= 2 / 255 and 5 * d_shared.mean() <= d_alone.mean()
    assert d_shared.max() <= 8 / 255  # no tile stands out anywhere (measured ≤ 0.3/255)
    spans = _spans(size, tile=tile, overlap=overlap, wrap=False)
    edges = [8 * (s.start + s.core_offset) for s in spans[1:]]  # px where a tile's core begins
    border, interior = border_and_interior(d_shared, edges, band=8)
    assert border <= max(2 * interior, 0.5 / 255), (border, interior)


def test_one_tile_decodes_as_the_whole(sd15):
    """A latent within one tile: the same decoder on the same input, either way."""
    from stylekit.engine.latents import decode

    z = randn_tensor((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decode(sd15, z)
        np.testing.assert_array_equal(
            decode_tiled(sd15, z, tile=32, overlap=8, lockstep=False), plain
        )
        # shared statistics are summed in float64, GroupNorm's kernel sums in float32: 1e-5 apart
        np.testing.assert_allclose(decode_tiled(sd15, z, tile=32, overlap=8), plain, atol=5e-5)


@pytest.mark.parametrize("tile, overlap", [(0, 0), (16, 8), (16, -1)])
def test_bad_tile_settings_are_refused(tile, overlap):
    model = LoadedModel(SimpleNamespace(vae=LocalDecoder()), "sd15", False, "cpu", torch.float32)
    with pytest.raises(UsageError, match="overlap"):
        decode_tiled(model, torch.zeros(1, 4, 8, 8), tile=tile, overlap=overlap)


def test_tiled_encode_agrees_with_the_whole(sd15):
    """Down blocks in step with shared GroupNorm statistics, mid block on the whole latent: the
    latents equal the whole encode's to float error (posterior noise from the same generator).

    Measured (tiny KL VAE, 512² px, tiles 32/8 latents): mean 2e-6, max 2e-5 against a latent
    std of 0.19; tiles encoded alone and put together differ by far more (see the assertion's message). Goal: within 1e-4 and
    at least 5× below the independent tiles.
    """
    from stylekit.engine.latents import encode_pixels
    from stylekit.engine.tiling import _spans, encode_tiled

    g = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 64, 64, generator=g)
    x = F.interpolate(small, size=(512, 512), mode="bicubic").clamp(0, 1) * 2 - 1
    whole = encode_pixels(sd15, x, torch.Generator().manual_seed(1))
    tiled = encode_tiled(sd15, x, torch.Generator().manual_seed(1), tile=32, overlap=8)
    # the baseline: each tile encoded on its own, its core put in place; compared by posterior
    # means, since each tile would draw its own noise (tiled and whole share theirs)
    vae, scale = sd15.vae, sd15.vae.config.scaling_factor
    mean_whole = vae.encode(x).latent_dist.mean * scale
    alone = torch.zeros_like(whole)
    spans = _spans(64, tile=32, overlap=8, wrap=False)
    for r in spans:
        for c in spans:
            px = x[
                ..., 8 * r.start : 8 * (r.start + r.length), 8 * c.start : 8 * (c.start + c.length)
            ]
            z = vae.encode(px).latent_dist.mean * scale
            rows = slice(r.start + r.core_offset, r.start + r.core_offset + r.core)
            cols = slice(c.start + c.core_offset, c.start + c.core_offset + c.core)
            alone[..., rows, cols] = z[
                ..., r.core_offset : r.core_offset + r.core, c.core_offset : c.core_offset + c.core
            ]
    d_tiled, d_alone = (tiled - whole).abs().mean(), (alone - mean_whole).abs().mean()
    assert tiled.shape == whole.shape == (1, 4, 64, 64)
    assert d_tiled <= 1e-4 and (tiled - whole).abs().max() <= 1e-3
    assert 5 * d_tiled <= d_alone, (float(d_tiled), float(d_alone))
