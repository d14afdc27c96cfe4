"""The working size: the size rule (a table), phone-photo-sized inputs, --keep-size, --max-pixels,
transparency kept or flattened, and inpainting a crop of any input at its exact size."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.errors import InputError, UsageError
from stylekit.media.images import Sizing, finish, read_image, save_image
from stylekit.media.metadata import read_metadata

RUNNER = CliRunner()

# --- the rule ----------------------------------------------------------------------------------

PHONE = (4032, 3024)  # a 12-megapixel phone photo

TABLE = [  # (input (W, H), native px, Sizing, fill, working (W, H))
    (PHONE, 256, Sizing(), False, (288, 216)),  # the tiny test models: 256² = 65,536 px
    (PHONE, 512, Sizing(), False, (584, 440)),  # SD1.5
    (PHONE, 1024, Sizing(), False, (1176, 880)),  # SDXL
    ((3024, 4032), 1024, Sizing(), False, (880, 1176)),  # portrait stays portrait
    ((1001, 750), 256, Sizing(), False, (288, 216)),
    ((200, 100), 256, Sizing(), False, (200, 96)),  # within budget: never up, rounded down to 8
    ((70, 67), 256, Sizing(), False, (64, 64)),
    ((256, 256), 256, Sizing(), False, (256, 256)),  # exactly the budget
    (PHONE, 256, Sizing(max_pixels=0), False, PHONE),  # no cap
    (PHONE, 256, Sizing(max_pixels=10_000), False, (112, 80)),
    (PHONE, 256, Sizing(max_size=1000), False, (1000, 744)),  # replaces the native budget
    (PHONE, 256, Sizing(max_size=1000, max_pixels=65_536), False, (288, 216)),  # both bind
    ((64, 64), 256, Sizing(max_size=128), False, (64, 64)),  # never up
    (PHONE, 256, Sizing(size=(64, 128)), False, (64, 128)),  # exact
    ((100, 80), 256, Sizing(), True, (280, 224)),  # fill (inpaint's crop): scaled up
    (PHONE, 256, Sizing(), True, (288, 216)),  # fill: down as well
    ((100, 80), 256, Sizing(max_pixels=0), True, (96, 80)),  # fill without a cap: its own size
    ((100, 80), 256, Sizing(max_size=512), True, (512, 408)),
]


@pytest.mark.parametrize(("size", "native", "sizing", "fill", "expected"), TABLE)
def test_working_size_table(size, native, sizing, fill, expected):
    assert sizing.check().working(size, native, fill=fill) == expected


@pytest.mark.parametrize("native", [256, 512, 1024])
def test_working_size_stays_within_the_budget_and_keeps_the_aspect(native):
    rng = np.random.default_rng(0)
    for width, height in rng.integers(8, 9000, size=(300, 2)):
        w, h = Sizing().working((int(width), int(height)), native)
        assert w % 8 == 0 and h % 8 == 0 and w * h <= native * native
        assert w <= width and h <= height
        if w * h > 64 * 64:  # rounding down to 8 moves the ratio by at most 8 px a side
            assert abs(math.log((w / h) / (width / height))) < math.log((w + 8) / w) + 8 / h


def test_working_size_errors():
    with pytest.raises(InputError, match="7x64, smaller than 8 px"):
        Sizing().working((7, 64), 256)
    with pytest.raises(InputError, match="too thin"):
        Sizing().working((100_000, 8), 256)
    for bad in (
        Sizing(size=(64, 64), max_size=64),
        Sizing(size=(64, 64), max_pixels=0),
        Sizing(size=(60, 64)),
        Sizing(max_pixels=-1),
        Sizing(max_pixels=10),
        Sizing(max_size=4),
    ):
        with pytest.raises(UsageError):
            bad.check()


def test_the_rule_in_words():
    assert Sizing().describe(1024) == (
        "at most 1,048,576 px (1024x1024, the model's native size), aspect ratio kept"
    )
    assert "longer side of 800" in Sizing(max_size=800).describe(1024)
    assert "no cap" in Sizing(max_pixels=0).describe(1024)
    assert Sizing(size=(64, 48)).describe(1024) == "64x48 (--size)"
    assert Sizing().describe(512, fill=True).startswith("scaled to fill 262,144 px")


# --- transparency ------------------------------------------------------------------------------


def rgba_image(size=(64, 64), seed=0) -> Image.Image:
    """Random colours; alpha a left-to-right ramp with a fully transparent top quarter."""
    w, h = size
    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgba[: h // 4, :, 3] = 0
    return Image.fromarray(rgba, "RGBA")


def test_alpha_is_read_apart_and_given_back(tmp_path):
    rgba = rgba_image()
    rgba.save(tmp_path / "a.png")
    source = read_image(tmp_path / "a.png")
    assert source.rgb.mode == "RGB" and source.alpha.mode == "L"
    np.testing.assert_array_equal(np.asarray(source.alpha), np.asarray(rgba)[..., 3])
    assert np.asarray(source.rgb)[0, 0].tolist() == [255, 255, 255]  # transparent: white
    out = finish(Image.new("RGB", (32, 32), "red"), source, keep_size=False)
    assert out.mode == "RGBA" and out.size == (32, 32)
    expected = source.alpha.resize((32, 32), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(out)[..., 3], np.asarray(expected))
    kept = finish(Image.new("RGB", (32, 32), "red"), source, keep_size=True)
    assert kept.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(kept)[..., 3], np.asarray(rgba)[..., 3])

    Image.new("RGBA", (16, 16), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png").alpha is None  # nothing to keep
    Image.new("RGB", (16, 16)).save(tmp_path / "rgb.png")
    assert (
        finish(Image.new("RGB", (8, 8)), read_image(tmp_path / "rgb.png"), keep_size=False).mode
        == "RGB"
    )


def test_jpeg_flattens_alpha_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    save_image(rgba, tmp_path / "a.jpg")
    with Image.open(tmp_path / "a.jpg") as img:
        assert img.mode == "RGB"
        assert np.asarray(img).min() > 240  # transparent red is white


# --- stylize -----------------------------------------------------------------------------------


def tiny(model: Path) -> list[str]:
    return [
        *("--model", str(model), "--accelerator", "none", "--scheduler", "lcm", "--cfg", "1"),
        *("--dtype", "fp32", "--device", "cpu", "--steps", "1", "--seed", "1"),
    ]


def solid(path: Path, size, colour=(90, 140, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def stylize(*args, model: Path, quiet: bool = True):
    extra = [*tiny(model), *(["-q"] if quiet else [])]
    return RUNNER.invoke(app, ["stylize", *map(str, args), *extra])


def test_a_phone_photo_runs_at_the_native_budget(tmp_path, sd15_path):
    """A 4032x3024 input runs (and is written) at 288x216 on a model of 256² px, quickly; the
    rule is printed once for the run and each output records its working size."""
    first = solid(tmp_path / "in" / "a.png", PHONE)
    solid(tmp_path / "in" / "b.png", PHONE, (200, 30, 30))
    start = time.perf_counter()
    result = stylize(
        tmp_path / "in", "-o", tmp_path / "out", "--json", model=sd15_path, quiet=False
    )
    seconds = time.perf_counter() - start
    print(f"two 12 MP inputs on the tiny model: {seconds:.1f} s")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("working size: at most 65,536 px (256x256") == 1
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.size == (288, 216)
        meta = read_metadata(tmp_path / "out" / name)
        assert (meta["size"], meta["working_size"]) == ("288x216", "288x216")
        assert meta["input_size"] == "4032x3024"
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["settings"]["working_size"] for r in records] == ["288x216"] * 2
    assert first.stat().st_size > 0
    assert seconds < 60  # at 12 MP the tiny UNet alone would take minutes on a CPU


def test_keep_size_writes_the_input_size(tmp_path, sd15_path):
    source = solid(tmp_path / "odd.png", (1001, 750))
    result = stylize(source, "-o", tmp_path / "out.png", "--keep-size", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.png") as img:
        assert img.size == (1001, 750)
    meta = read_metadata(tmp_path / "out.png")
    assert (meta["size"], meta["working_size"]) == ("1001x750", "288x216")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (288, 216)),  # 76,800 px is over the 65,536 px budget
        (["--max-pixels", "0"], (320, 240)),
        (["--max-pixels", "20000"], (160, 120)),
        (["--max-size", "160"], (160, 120)),
        (["--size", "64x48"], (64, 48)),
    ],
)
def test_max_pixels_max_size_and_size(tmp_path, sd15_path, flags, expected):
    source = solid(tmp_path / "in.png", (320, 240))
    result = stylize(source, "-o", tmp_path / "out.png", *flags, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == expected
    assert read_metadata(tmp_path / "out.png")["working_size"] == "{}x{}".format(*expected)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-pixels", "-5"], "--max-pixels"),
        (["--size", "64x64", "--max-pixels", "0"], "not both"),
    ],
)
def test_bad_size_flags_are_usage_errors(tmp_path, flags, words):
    source = solid(tmp_path / "in.png", (64, 64))
    result = RUNNER.invoke(app, ["stylize", str(source), *flags, "--model", "nowhere"])
    assert result.exit_code == 2 and words in result.stderr


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_alpha_is_kept_in_png_and_webp(tmp_path, sd15_path, fmt):
    rgba_image((64, 64)).save(tmp_path / "same.png")
    rgba_image((320, 240), seed=1).save(tmp_path / "big.png")
    result = stylize(
        tmp_path / "same.png",
        tmp_path / "big.png",
        "-o",
        tmp_path / "out",
        "-f",
        fmt,
        model=sd15_path,
    )
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out" / f"same.{fmt}") as img:
        assert img.mode == "RGBA" and img.size == (64, 64)
        alpha = np.asarray(img)[..., 3].astype(int)
    # PNG is exact; WebP stores alpha losslessly at its default alpha quality
    np.testing.assert_array_equal(alpha, np.asarray(rgba_image((64, 64)))[..., 3])
    with Image.open(tmp_path / "out" / f"big.{fmt}") as img:
        assert img.mode == "RGBA" and img.size == (288, 216)
        alpha = np.asarray(img)[..., 3]
    source = Image.open(tmp_path / "big.png").getchannel("A")
    expected = np.asarray(source.resize((288, 216), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(alpha, expected)  # resampled with the image
    assert read_metadata(tmp_path / "out" / f"same.{fmt}")["alpha"] == "kept"


def test_jpeg_output_flattens_alpha_and_says_so_once(tmp_path, sd15_path):
    (tmp_path / "in").mkdir()
    rgba_image(seed=0).save(tmp_path / "in" / "a.png")
    rgba_image(seed=1).save(tmp_path / "in" / "b.png")
    result = stylize(
        tmp_path / "in", "-o", tmp_path / "out", "-f", "jpg", model=sd15_path, quiet=False
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("flattened on white") == 1
    for name in ("a.jpg", "b.jpg"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.mode == "RGB"
        assert read_metadata(tmp_path / "out" / name)["alpha"] == "flattened"


# --- IP-Adapter references ---------------------------------------------------------------------


def test_ip_adapter_references_are_capped_to_the_working_size(
    sd15_path, sd15_ip_adapter, monkeypatch
):
    from stylekit.engine import conditioning
    from stylekit.presets import Settings
    from stylekit.session import Runtime, open_session

    seen = []
    original = conditioning.with_style_images

    def spy(model, cond, images):
        seen.extend(im.size for im in images)
        return original(model, cond, images)

    monkeypatch.setattr(conditioning, "with_style_images", spy)
    settings = Settings(
        model=str(sd15_path),
        accelerator="none",
        ip_adapter=str(sd15_ip_adapter),
        style_mode="ipadapter",
    )
    refs = [Image.new("RGB", (1000, 600), "red"), Image.new("RGB", (64, 64), "blue")]
    open_session(settings, Runtime("cpu", "fp32"), style=refs)
    assert seen == [(328, 192), (64, 64)]


# --- inpaint -----------------------------------------------------------------------------------


def noise_photo(size, seed=0, mode="RGB") -> Image.Image:
    channels = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    return Image.fromarray(arr, mode)


def box_mask(size, box) -> Image.Image:
    grey = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    grey[top:bottom, left:right] = 255
    return Image.fromarray(grey)


def inpaint(tmp_path, model, image, mask, *flags):
    image_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    image.save(image_path)
    mask.save(mask_path)
    out = tmp_path / "out.png"
    args = ["inpaint", str(image_path), "--mask", str(mask_path), "-o", str(out), *flags]
    result = RUNNER.invoke(app, [*args, *tiny(model), "-q", "--overwrite"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture()
def working_sizes(monkeypatch):
    """The sizes of the images the inpaint engine is given."""
    from stylekit.engine import inpaint as engine

    sizes = []
    original = engine.inpaint

    def spy(model, cond, sampler, image, mask, **kwargs):
        sizes.append((image.size, tuple(mask.shape[-2:][::-1])))
        return original(model, cond, sampler, image, mask, **kwargs)

    monkeypatch.setattr(engine, "inpaint", spy)
    return sizes


def test_inpaint_keeps_an_odd_size_and_every_unmasked_byte(tmp_path, sd15_path, working_sizes):
    from stylekit.engine.inpaint import binarize, feather

    size, box = (1001, 750), (400, 300, 440, 330)
    image, mask = noise_photo(size), box_mask(size, box)
    out = inpaint(tmp_path, sd15_path, image, mask)
    result, original = np.asarray(Image.open(out)), np.asarray(image)
    assert result.shape == (750, 1001, 3)
    keep = feather(binarize(mask), 4) == 0  # outside the mask grown by --mask-blur
    np.testing.assert_array_equal(result[keep], original[keep])
    assert np.abs(result[~keep].astype(int) - original[~keep]).mean() > 10
    # the crop: the box grown by 4 px of feathering and 32 px of context, scaled to fill 256² px
    meta = read_metadata(out)
    assert meta["crop"] == "112x102+364+264" and meta["working_size"] == "264x240"
    assert meta["size"] == "1001x750" and meta["mask_padding"] == 32
    assert working_sizes == [((264, 240), (264, 240))]


def test_inpaint_a_huge_mask_is_bounded_by_the_working_size(tmp_path, sd15_path, working_sizes):
    size = (1001, 750)
    image = noise_photo(size, seed=2)
    out = inpaint(tmp_path, sd15_path, image, box_mask(size, (10, 10, 990, 740)))
    assert Image.open(out).size == size
    assert working_sizes == [((288, 216), (288, 216))]  # the whole image, at 256² px at most
    result, original = np.asarray(Image.open(out)), np.asarray(image)
    np.testing.assert_array_equal(result[:6], original[:6])  # beyond blur: exact


def test_inpaint_padding_size_and_alpha(tmp_path, sd15_path, working_sizes):
    size, box = (301, 203), (100, 80, 140, 110)
    image = noise_photo(size, seed=3, mode="RGBA")
    out = inpaint(tmp_path, sd15_path, image, box_mask(size, box), "--mask-padding", "0")
    meta = read_metadata(out)
    assert meta["crop"] == "48x38+96+76" and meta["mask_padding"] == 0  # box + 4 px blur
    with Image.open(out) as img:
        assert img.mode == "RGBA" and img.size == size
        np.testing.assert_array_equal(np.asarray(img)[..., 3], np.asarray(image)[..., 3])
    # --size widens the crop to its aspect ratio and runs it at exactly that size
    out = inpaint(
        tmp_path, sd15_path, image.convert("RGB"), box_mask(size, box), "--size", "128x64"
    )
    meta = read_metadata(out)
    assert meta["working_size"] == "128x64" and meta["crop"] == "204x102+18+44"
    assert working_sizes[-1] == ((128, 64), (128, 64))


def test_inpaint_bad_padding_is_a_usage_error(tmp_path):
    from stylekit.tasks.inpaint import inpaint as run

    noise_photo((64, 64)).save(tmp_path / "a.png")
    box_mask((64, 64), (8, 8, 16, 16)).save(tmp_path / "m.png")
    with pytest.raises(UsageError, match="--mask-padding"):
        run([str(tmp_path / "a.png")], mask=tmp_path / "m.png", mask_padding=-1)


def test_crop_box_table():
    from stylekit.engine.inpaint import crop_box

    region = np.zeros((100, 200), bool)
    region[40:50, 90:110] = True  # 20 wide, 10 high
    assert crop_box(region, 0) == (90, 40, 110, 50)
    assert crop_box(region, 10) == (80, 30, 120, 60)
    assert crop_box(region, 60) == (30, 0, 170, 100)  # clamped to the image
    assert crop_box(region, 0, aspect=(1, 1)) == (90, 35, 110, 55)  # taller, around the centre
    assert crop_box(region, 0, aspect=(4, 1)) == (80, 40, 120, 50)  # wider
    edge = np.zeros((100, 200), bool)
    edge[0:10, 0:20] = True
    assert crop_box(edge, 0, aspect=(1, 1)) == (0, 0, 20, 20)  # shifted inside, not cut
    assert crop_box(edge, 0, aspect=(1, 10)) == (0, 0, 20, 100)  # as far as the image allows
