"""One encode path under fp16: AD's clean latents get the same fp32 upcast as every image; the VAE's
dtype comes back after an error; `--vae` loads a replacement VAE and records it.

The fp16 overflow is real, not mocked: a tiny `AutoencoderKL` whose first convolution is scaled
by 1e5 gives activations past fp16's 65504 (inf, then NaN after GroupNorm) while fp32 carries them
and GroupNorm brings them back to unit scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stylekit.engine import ad, latents, models
from stylekit.errors import ModelError, UsageError

OVERFLOW = 1e5  # conv_in × 1e5: a unit input gives activations ~1e5 > 65504, fp16's largest


def image(seed: int = 0, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def overflowing_vae(models_dir):
    """A tiny KL VAE (force_upcast, as SDXL's) that is NaN in fp16 and finite in fp32."""
    from diffusers import AutoencoderKL

    path = models_dir / "overflowing-vae"
    if not (path / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            vae = AutoencoderKL(
                block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1,
                latent_channels=4,
                sample_size=64,
                scaling_factor=0.13025,
                force_upcast=True,
            )
        with torch.no_grad():
            vae.encoder.conv_in.weight.mul_(OVERFLOW)
        vae.save_pretrained(path)
    return path


def load(model_path, *, dtype: str, vae=None) -> models.LoadedModel:
    spec = models.ModelSpec(
        str(model_path), accelerator="none", device="cpu", dtype=dtype, vae=vae and str(vae)
    )
    return models.load(spec)


@pytest.fixture(scope="module")
def fp16_model(sdxl_path, overflowing_vae):
    return load(sdxl_path, dtype="fp16", vae=overflowing_vae)


def test_the_overflowing_vae_really_overflows_in_fp16(fp16_model):
    x = latents.to_tensor(image())
    vae = fp16_model.vae
    assert vae.dtype == torch.float16
    with torch.no_grad():
        half = latents.posterior(vae, x.half(), None, sample=False)
    assert not torch.isfinite(half).all()  # what the old clean_latent returned


def test_ad_reference_and_content_encode_upcast_like_every_image(
    fp16_model, sdxl_path, overflowing_vae
):
    z = ad.clean_latent(fp16_model, image())
    assert z.dtype == torch.float16 and torch.isfinite(z).all()
    assert fp16_model.vae.dtype == torch.float16  # back in its own dtype
    # the same latents as an fp32 run, to fp16 rounding
    fp32 = load(sdxl_path, dtype="fp32", vae=overflowing_vae)
    reference = ad.clean_latent(fp32, image())
    assert torch.allclose(z.float(), reference, rtol=1e-2, atol=1e-2)
    # and the AD references of a session are built through it
    refs = ad.make_references(fp16_model, [image(1)], noise=torch.Generator().manual_seed(0))
    assert torch.isfinite(refs.latents[0]).all()


def test_encode_under_fp16_autocast_is_finite(sdxl_path, overflowing_vae):
    model = load(sdxl_path, dtype="fp32", vae=overflowing_vae)
    x = latents.to_tensor(image())
    with torch.autocast("cpu", dtype=torch.float16):
        with torch.no_grad():
            raw = latents.posterior(model.vae, x, None, sample=False)
        if torch.isfinite(raw).all():
            pytest.skip("this torch's CPU autocast runs convolutions in fp32: nothing overflows")
        assert latents.upcast_needed(model)
        z = ad.clean_latent(model, image())
        sampled = latents.encode(model, image(), torch.Generator().manual_seed(0))
    assert torch.isfinite(z).all() and torch.isfinite(sampled).all()


def test_mean_and_sample_are_the_only_difference(fp16_model):
    x = latents.to_tensor(image())
    mean = latents.encode_pixels(fp16_model, x, sample=False)
    drawn = latents.encode_pixels(fp16_model, x, torch.Generator().manual_seed(0))
    assert mean.shape == drawn.shape and torch.isfinite(drawn).all()
    assert not torch.equal(mean, drawn)  # a posterior draw is not its mean
    assert torch.equal(mean, ad.clean_latent(fp16_model, image()))


@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_vae_dtype_comes_back_after_an_error(fp16_model, monkeypatch, stage):
    vae = fp16_model.vae

    def broken(*args, **kwargs):
        assert vae.dtype == torch.float32  # it did flip for the upcast
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(vae, stage, broken)
    with pytest.raises(RuntimeError, match="simulated"):
        if stage == "encode":
            latents.encode_pixels(fp16_model, latents.to_tensor(image()), sample=False)
        else:
            latents.decode(fp16_model, torch.zeros(1, 4, 4, 4, dtype=torch.float16))
    assert vae.dtype == torch.float16


def test_vae_flag_replaces_the_models_vae(sd15_path, overflowing_vae):
    from diffusers import AutoencoderKL

    model = load(sd15_path, dtype="fp32", vae=overflowing_vae)
    assert model.vae.encoder.conv_in.weight.abs().max() > 100  # the scaled one, not SD1.5's own
    saved = AutoencoderKL.from_pretrained(overflowing_vae)
    assert torch.equal(model.vae.encoder.conv_in.weight, saved.encoder.conv_in.weight)


def test_vae_flag_loads_a_pipeline_folder_vae(sd15_path, sdxl_path):
    model = load(sd15_path, dtype="fp32", vae=sdxl_path)  # folder with vae/: its subfolder
    assert model.vae.config.scaling_factor == pytest.approx(0.13025)


def test_vae_flag_refuses_a_vae_of_other_latents(sd15_path, tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), latent_channels=16, norm_num_groups=8).save_pretrained(
        tmp_path / "vae16"
    )
    with pytest.raises(ModelError, match="16 latent channels"):
        load(sd15_path, dtype="fp32", vae=tmp_path / "vae16")


def test_vae_and_tiny_vae_together_are_refused(sd15_path, tiny_vae_path):
    spec = models.ModelSpec(
        str(sd15_path), accelerator="none", device="cpu", vae=str(sd15_path), tiny_vae=True
    )
    with pytest.raises(UsageError, match="--vae and --tiny-vae"):
        models.load(spec)


def test_missing_vae_path_is_a_clear_error(sd15_path, tmp_path):
    with pytest.raises(ModelError, match="VAE .*no such file"):
        load(sd15_path, dtype="fp32", vae=tmp_path / "nope")


def test_notice_names_the_fp16_fix_only_when_the_vae_is_upcast(fp16_model, sdxl_path):
    notices = [n for n in fp16_model.notices if "VAE" in n]
    assert len(notices) == 1 and models.SDXL_FP16_VAE in notices[0] and "fp32" in notices[0]
    assert not [n for n in load(sdxl_path, dtype="bf16").notices if "VAE" in n]  # fp32's range


def test_cli_vae_flag_is_used_and_recorded(sd15_path, overflowing_vae, tmp_path):
    from stylekit.cli import app
    from stylekit.media.metadata import read_metadata

    src = tmp_path / "in.png"
    image(size=64).save(src)
    out = tmp_path / "out.png"
    args = ["stylize", str(src), "-o", str(out), "--model", str(sd15_path), "--vae"]
    args += [str(overflowing_vae), "--accelerator", "none", "--device", "cpu", "--dtype", "fp32"]
    args += ["--steps", "1", "--seed", "1", "--cfg", "1", "--style-mode", "none", "-q", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert read_metadata(out)["vae"] == str(overflowing_vae)
    assert json.loads(result.stdout.splitlines()[-1])["status"] == "done"
