"""Tests for stylekit.media.images and stylekit.media.metadata on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from stylekit.errors import InputError, UsageError
from stylekit.media.images import load_image, parse_size, save_image
from stylekit.media.metadata import a1111_parameters, read_metadata, read_parameters

SETTINGS = {
    "prompt": "a watercolor fox, soft light",
    "negative_prompt": "blurry",
    "steps": 4,
    "sampler": "TCD",
    "cfg_scale": 1.5,
    "seed": 42,
    "width": 64,
    "height": 48,
    "model": "sdxl-base",
    "strength": 0.6,
    "style_image": "styles/ink wash.png",
    "lora_scale": 0.8,
    "caption": "naïve café ✓",
}


def noise(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Return a random uint8 RGB array of shape (height, width, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def info(path: Path) -> tuple[str, str, dict]:
    """Return (format, mode, text chunks) of an image file, closing it."""
    with Image.open(path) as img:
        return img.format, img.mode, dict(getattr(img, "text", {}))


def write(path: Path, img: Image.Image, **options) -> Path:
    """Save `img` to `path` and return the path."""
    img.save(path, **options)
    return path


# --- loading -------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(noise(64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = write(tmp_path / "rotated.jpg", img, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (32, 64)
    assert loaded.mode == "RGB"


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    path = write(tmp_path / "alpha.png", Image.fromarray(rgba))
    arr = np.asarray(load_image(path))
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[15, 15].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.info["transparency"] = 0
    img.paste(0, (0, 0, 16, 8))
    path = write(tmp_path / "pal.png", img, transparency=0)
    arr = np.asarray(load_image(path))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[15, 0].tolist() == [0, 0, 255]


def test_la_and_cmyk_become_rgb(tmp_path):
    la = write(tmp_path / "la.png", Image.new("LA", (16, 16), (0, 0)))
    cmyk = write(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]
    red = np.asarray(load_image(cmyk))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257 * 100, 65535, 65535]] * 8, dtype=np.uint16).repeat(2, axis=1)
    path = write(tmp_path / "deep.png", Image.fromarray(grey))
    assert info(path)[1].startswith("I")
    arr = np.asarray(load_image(path))
    assert arr[0, [0, 2, 4]].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


def test_mode_i_is_scaled(tmp_path):
    img = Image.fromarray(np.full((8, 8), 257 * 128, dtype=np.int32))
    path = write(tmp_path / "int.tif", img)
    assert np.asarray(load_image(path))[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    good = write(tmp_path / f"good.{fmt}", Image.fromarray(noise(64, 64)))
    bad = tmp_path / f"broken.{fmt}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InputError, match=rf"broken\.{fmt}: truncated image"):
        load_image(bad)


def test_non_image_names_the_file(tmp_path):
    path = tmp_path / "photo.png"
    path.write_text("not really a picture")
    with pytest.raises(InputError, match=r"photo\.png: not an image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="gone.png: file not found"):
        load_image(tmp_path / "gone.png")


def test_native_size_rounds_down_to_8(tmp_path):
    path = write(tmp_path / "odd.png", Image.fromarray(noise(103, 70)))
    assert load_image(path).size == (96, 64)


def test_tiny_image_is_an_input_error(tmp_path):
    path = write(tmp_path / "tiny.png", Image.fromarray(noise(7, 64)))
    with pytest.raises(InputError, match=r"tiny\.png: image is 7x64"):
        load_image(path)


def test_exact_size_and_max_size(tmp_path):
    path = write(tmp_path / "big.png", Image.fromarray(noise(200, 100)))
    assert load_image(path, size=(64, 128)).size == (64, 128)
    assert load_image(path, max_size=100).size == (96, 48)  # 100x50 rounded down
    assert load_image(path, max_size=1000).size == (200, 96)  # never scaled up
    with pytest.raises(UsageError, match="multiples of 8"):
        load_image(path, size=(60, 64))


def test_parse_size():
    assert parse_size("768x512") == (768, 512)
    assert parse_size(" 512 X 640 ") == (512, 640)
    assert parse_size("512") == (512, 512)
    for bad in ["", "512x", "x512", "-8x8", "axb", "500x512", "0x8"]:
        with pytest.raises(UsageError):
            parse_size(bad)


# --- saving and metadata -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_metadata_round_trip(tmp_path, fmt):
    path = save_image(Image.fromarray(noise(64, 48)), tmp_path / f"out.{fmt}", metadata=SETTINGS)
    assert info(path)[0] == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    assert read_metadata(path) == SETTINGS
    assert read_parameters(path) == a1111_parameters(SETTINGS)


def test_png_chunks_are_named(tmp_path):
    path = save_image(Image.fromarray(noise(16, 16)), tmp_path / "a.png", metadata=SETTINGS)
    text = info(path)[2]
    assert set(text) == {"parameters", "stylekit"}
    assert text["stylekit"].startswith('{"caption":')  # sorted keys


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_same_inputs_give_same_bytes(tmp_path, fmt):
    img = Image.fromarray(noise(32, 32))
    a = save_image(img, tmp_path / f"a.{fmt}", metadata=SETTINGS)
    b = save_image(img, tmp_path / f"b.{fmt}", metadata=SETTINGS)
    assert a.read_bytes() == b.read_bytes()


def test_save_without_metadata_reads_back_empty(tmp_path):
    path = save_image(Image.fromarray(noise(16, 16)), tmp_path / "plain.jpg")
    assert read_metadata(path) == {}
    assert read_parameters(path) is None


def test_save_leaves_no_temp_files_and_makes_folders(tmp_path):
    save_image(Image.fromarray(noise(16, 16)), tmp_path / "sub" / "x.webp", fmt="webp")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.webp"]


def test_read_metadata_of_non_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="notes.txt"):
        read_metadata(path)


def test_a1111_parameters_text():
    text = a1111_parameters(SETTINGS)
    prompt, negative, params = text.split("\n")
    assert prompt == "a watercolor fox, soft light"
    assert negative == "Negative prompt: blurry"
    assert params.startswith(
        "Steps: 4, Sampler: TCD, CFG scale: 1.5, Seed: 42, Size: 64x48, Model: sdxl-base, "
        "Denoising strength: 0.6, "
    )
    assert "Caption: naïve café ✓, Lora scale: 0.8, Style image: styles/ink wash.png" in params


def test_a1111_parameters_quotes_and_skips():
    text = a1111_parameters({"prompt": "", "negative_prompt": None, "seed": 1, "note": "a, b: c"})
    assert text == 'Seed: 1, Note: "a, b: c"'
