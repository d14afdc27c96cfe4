"""Regression: AD's reference noise is never an image's or a canvas's initial noise, in any command.

With equal shapes (inputs at the model's native size, where the references are resized to) a
reference noised like the image pulls the output towards a copy of the reference's layout. The
reference noise comes from its own seed stream (`session.reference_generator`); these tests record
every Gaussian draw of a run through the CLI and compare.
"""

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.engine import ad

NATIVE = 256  # the tiny SD1.5's native size: sample_size 32 latents


@pytest.fixture
def draws(monkeypatch):
    """Record the reference noises AD makes and every other Gaussian draw of the run."""
    from diffusers.utils import torch_utils

    from stylekit.engine import img2img, inpaint, sampling, stream, txt2img
    from stylekit.tasks import textures

    seen = {"references": [], "drawn": []}
    original_refs, original_randn = ad.make_references, torch_utils.randn_tensor

    def make_references(*args, **kwargs):
        refs = original_refs(*args, **kwargs)
        seen["references"] += refs.noise
        return refs

    def randn_tensor(*args, **kwargs):
        out = original_randn(*args, **kwargs)
        seen["drawn"].append(out)
        return out

    monkeypatch.setattr(ad, "make_references", make_references)
    for module in (img2img, inpaint, sampling, stream, txt2img, textures):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return seen


def noise_png(path, seed, size=(NATIVE, NATIVE)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def assert_never_equal(seen):
    refs = seen["references"]
    assert refs, "AD made no reference"
    same_shape = [d for d in seen["drawn"] if any(d.shape == r.shape for r in refs)]
    assert same_shape, "no draw had the reference's shape: the check would prove nothing"
    for r in refs:
        for d in same_shape:
            assert not torch.equal(r, d.to(r.dtype)), "reference noise equals an initial noise"


def flags(model):
    return [
        *("--model", model, "--accelerator", "none", "--scheduler", "tcd", "--steps", "1"),
        *("--device", "cpu", "--dtype", "fp32", "-q", "--seed", "0", "--ad-iters", "1"),
    ]


@pytest.mark.parametrize("command", ["stylize", "inpaint"])
def test_image_commands(draws, tmp_path, sd15_path, command):
    content, ref = noise_png(tmp_path / "in.png", 1), noise_png(tmp_path / "ref.png", 2)
    extra = []
    if command == "inpaint":
        Image.new("L", (NATIVE, NATIVE), 255).save(tmp_path / "mask.png")
        extra = ["--mask", tmp_path / "mask.png"]
    run(command, content, "--style", ref, "--style-mode", "ad", "--strength", "1.0",
        *extra, *flags(sd15_path), "-o", tmp_path / "out")  # fmt: skip
    assert_never_equal(draws)


def test_t2i_styled(draws, tmp_path, sd15_path):
    ref = noise_png(tmp_path / "ref.png", 2)
    run("t2i-styled", "a house", "--style", ref, "-n", "2", *flags(sd15_path), "-o", tmp_path)
    assert_never_equal(draws)


@pytest.mark.parametrize("command", ["texture", "texture-expand"])
def test_texture_commands(draws, tmp_path, sd15_path, command):
    exemplar = noise_png(tmp_path / "ex.png", 3)
    size = ["--size", f"{NATIVE}x{NATIVE}"] if command == "texture-expand" else []
    run(command, exemplar, *size, *flags(sd15_path), "-o", tmp_path / "out")
    assert_never_equal(draws)


def test_video(draws, tmp_path, sd15_path):
    from imageio_ffmpeg import get_ffmpeg_exe

    clip, ref = tmp_path / "clip.mp4", noise_png(tmp_path / "ref.png", 2)
    subprocess.run(
        [get_ffmpeg_exe(), "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
         f"testsrc2=size={NATIVE}x{NATIVE}:rate=10", "-frames:v", "2", "-pix_fmt", "yuv444p",
         str(clip)],
        check=True,
    )  # fmt: skip
    run("video", clip, "--style", ref, "--style-mode", "ad", "--strength", "1.0",
        *flags(sd15_path), "-o", tmp_path / "out")  # fmt: skip
    assert_never_equal(draws)
