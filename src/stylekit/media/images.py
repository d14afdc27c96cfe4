"""Read any image as 8-bit RGB at a model-friendly size, and write outputs with their settings.

`load_image` applies the EXIF orientation, composites transparency on white (diffusion models
have no alpha channel, and white is what viewers show behind most transparent art), scales
16-bit images to 8 bits, and resizes with Lanczos to a multiple of 8, as diffusers does.
`read_image` does the same at the input's own size and keeps the alpha channel apart, so that
`finish` can give it back to the output (resampled with it), as Real-ESRGAN's CLI does.

`Sizing` is the working-size rule: the size an input runs through the model at. By default an
image is scaled down (never up) to the model's native pixel budget, native² pixels (512² for
SD1.5, 1024² for SDXL), keeping its aspect ratio, both sides rounded down to multiples of 8: a
4032x3024 phone photo runs at 1176x880 on SDXL, not at 12 megapixels. Multiples of 8 are enough
for every family: the VAE downsamples by 8, and diffusers' UNet sizes each upsampling to its skip
connection, so a latent side need not be a multiple of the UNet's own downsampling (4 or 8).
"""

from __future__ import annotations

import errno
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stylekit.errors import InputError, UsageError
from stylekit.media.batch import atomic_write, output_format
from stylekit.media.metadata import save_options

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ORIENTATION = 0x0112  # EXIF tag: its values 5 to 8 turn the image by 90 degrees
_SIZE = re.compile(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?")


def parse_size(text: str, *, multiple: int = 8) -> tuple[int, int]:
    """Parse "WxH" (or "N" for NxN) into (W, H), both positive multiples of `multiple`."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise UsageError(f"bad size {text!r}; write it as WIDTHxHEIGHT, e.g. 768x512")
    width = int(match[1])
    height = int(match[2] or match[1])
    _check_size((width, height), multiple=multiple)
    return width, height


def _check_size(size: tuple[int, int], *, multiple: int) -> None:
    """Raise a UsageError unless both sides are positive multiples of `multiple`."""
    width, height = size
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise UsageError(f"size {width}x{height}: width and height must be multiples of {multiple}")


def load_image(
    path: Path,
    *,
    size: tuple[int, int] | None = None,
    max_size: int | None = None,
    multiple: int = 8,
) -> Image.Image:
    """Load an image as RGB, upright, resized to `size` or to its own size rounded down to 8.

    `size=(W, H)` resizes exactly; `max_size=N` first scales the longer side down to N (never
    up). Unreadable, truncated or too-small files raise an InputError naming the file.
    """
    if size is not None:
        _check_size(size, multiple=multiple)
    if max_size is not None and max_size < multiple:
        raise UsageError(f"max size {max_size} is below the minimum of {multiple} px")
    img = open_rgb(Path(path))
    target = size or _fit(img.size, max_size=max_size, multiple=multiple, name=str(path))
    if target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS)
    return img


def open_rgb(path: Path) -> Image.Image:
    """Decode the whole file, apply its EXIF orientation and convert to 8-bit RGB."""
    return to_rgb(_open(path))


def _open(path: Path) -> Image.Image:
    """Decode the whole file and apply its EXIF orientation; errors name the file."""
    with _read_errors(path):
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return ImageOps.exif_transpose(img)  # a copy: valid after the file closes


def image_size(path: Path) -> tuple[int, int]:
    """An image's upright (W, H), read from its header without decoding it (a dry run's plan,
    the notice of a rounded size); errors name the file."""
    with _read_errors(path):
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(ORIENTATION)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn what reading an image raises into one InputError that names the file."""
    try:
        yield
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image (cannot identify image file)") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: image too large ({exc})") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a folder, not an image") from exc
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated image" if "truncated" in str(exc) else f"cannot decode image ({exc})"
        if getattr(exc, "errno", None) == errno.ELOOP:
            reason = "symbolic link loop"
        raise InputError(f"{path}: {reason}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled, not clipped."""
    if img.mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_rgb(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode.endswith(("A", "a")) or "transparency" in img.info


def alpha_of(img: Image.Image) -> Image.Image | None:
    """The image's alpha channel as "L", or None when it has none or is fully opaque."""
    if img.mode in _SIXTEEN_BIT or not _has_alpha(img):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


@dataclass(frozen=True)
class SourceImage:
    """An input at its own size: 8-bit RGB (transparency over white) and its alpha channel."""

    rgb: Image.Image
    alpha: Image.Image | None  # "L" at the same size; None when the input is opaque

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def read_image(path: Path) -> SourceImage:
    """Read an input at its own size, upright, as RGB plus its alpha (see `SourceImage`)."""
    img = _open(Path(path))
    return SourceImage(to_rgb(img), alpha_of(img))


def resized(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` at `size` (Lanczos), or `img` itself when it already has that size."""
    return img if img.size == tuple(size) else img.resize(size, Image.Resampling.LANCZOS)


def with_alpha(img: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """`img` as RGBA with `alpha` (resampled to its size with Lanczos); `img` when alpha is None."""
    if alpha is None:
        return img
    rgba = img.convert("RGB")
    rgba.putalpha(resized(alpha, rgba.size))
    return rgba


def finish(out: Image.Image, source: SourceImage, *, keep_size: bool) -> Image.Image:
    """An output as written: at the input's size with `keep_size` (Lanczos), with its alpha."""
    return with_alpha(resized(out, source.size) if keep_size else out, source.alpha)


# --- the working size --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """How big inputs run through the model (the working size) and how big outputs are written.

    At most one of `size` and (`max_size`, `max_pixels`) is given:

    - `size` (W, H): exactly that size.
    - `max_pixels` N: at most N pixels (W·H); 0: no cap. None: the model's native budget,
      native² pixels, unless `max_size` is given, which then replaces it.
    - `max_size` N: the longer side at most N px.
    - `keep_size`: write image outputs at the input's size, resampled back from the working size.

    An input smaller than these bounds keeps its size (rounded down to multiples of 8) unless the
    caller asks to `fill` them (inpainting's crop, which the output never shows at that size).
    """

    size: tuple[int, int] | None = None
    max_size: int | None = None
    max_pixels: int | None = None
    keep_size: bool = False

    def check(self) -> Sizing:
        """Refuse bad or conflicting values (a UsageError naming the flag)."""
        if self.size is not None:
            _check_size(self.size, multiple=8)
            if self.max_size is not None or self.max_pixels is not None:
                raise UsageError("give --size or --max-size/--max-pixels, not both")
        if self.max_size is not None and self.max_size < 8:
            raise UsageError(f"--max-size must be at least 8, got {self.max_size}")
        if self.max_pixels is not None and self.max_pixels != 0 and self.max_pixels < 64:
            raise UsageError(
                f"--max-pixels must be 0 (no cap) or at least 64, got {self.max_pixels}"
            )
        return self

    def budget(self, native: int) -> int | None:
        """The cap on W·H for a model of `native` px: --max-pixels, else native² unless
        --max-size is given; None for no cap."""
        if self.max_pixels is not None:
            return self.max_pixels or None
        return None if self.max_size is not None else native * native

    def scale(self, size: tuple[int, int], native: int, *, fill: bool = False) -> float:
        """The factor that brings `size` within the bounds (≤ 1 unless `fill`)."""
        width, height = size
        scales = [] if fill else [1.0]
        budget = self.budget(native)
        if budget is not None:
            scales.append(math.sqrt(budget / (width * height)))
        if self.max_size is not None:
            scales.append(self.max_size / max(width, height))
        return min(scales, default=1.0)

    def working(self, size: tuple[int, int], native: int, *, fill: bool = False) -> tuple[int, int]:
        """The working size of a (W, H) input on a model of `native` px, multiples of 8."""
        if self.size is not None:
            return self.size
        if min(size) < 8:
            raise InputError(f"image is {size[0]}x{size[1]}, smaller than 8 px")
        factor = self.scale(size, native, fill=fill)
        width, height = (math.floor(side * factor + 1e-6) // 8 * 8 for side in size)
        if width < 8 or height < 8:
            raise InputError(f"too thin to scale within the working size ({size[0]}x{size[1]})")
        return width, height

    def rounded(self, size: tuple[int, int], native: int) -> str | None:
        """The notice for an output that comes out smaller than its input only because sides are
        rounded down to multiples of 8 (75x53 → 72x48), or None (scaled, or no rounding)."""
        if self.size is not None or self.keep_size or self.scale(size, native) < 1.0:
            return None
        working = self.working(size, native)
        if working == tuple(size):
            return None
        return (
            f"sizes are rounded down to multiples of 8 ({size[0]}x{size[1]} → "
            f"{working[0]}x{working[1]}); outputs record their input's size, and --keep-size "
            "writes them at it"
        )

    def describe(self, native: int, *, fill: bool = False) -> str:
        """The rule in words, for the run's notice."""
        if self.size is not None:
            return f"{self.size[0]}x{self.size[1]} (--size)"
        budget, bounds = self.budget(native), []
        if budget is not None:
            default = self.max_pixels is None
            bounds.append(
                f"{budget:,} px"
                + (f" ({native}x{native}, the model's native size)" if default else "")
            )
        if self.max_size is not None:
            bounds.append(f"a longer side of {self.max_size} px")
        if not bounds:
            return "the input's size, rounded down to multiples of 8 (no cap)"
        verb = "scaled to fill" if fill else "at most"
        return f"{verb} {' and '.join(bounds)}, aspect ratio kept"


def fitted_size(path: Path, *, max_size: int | None, multiple: int = 8) -> tuple[int, int]:
    """The size `load_image(path, max_size=...)` gives, read from the file's header only."""
    return _fit(image_size(path), max_size=max_size, multiple=multiple, name=str(path))


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Map 16-bit grey (0..65535) to 8-bit grey (0..255), rounding, then to RGB."""
    values = np.asarray(img).astype(np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _fit(
    native: tuple[int, int], *, max_size: int | None, multiple: int, name: str
) -> tuple[int, int]:
    """Return the native size, shrunk to `max_size` if set, rounded down to `multiple`."""
    width, height = native
    if width < multiple or height < multiple:
        raise InputError(f"{name}: image is {width}x{height}, smaller than {multiple} px")
    if max_size is not None and max(width, height) > max_size:
        scale = max_size / max(width, height)
        width, height = round(width * scale), round(height * scale)
    width, height = width // multiple * multiple, height // multiple * multiple
    if width == 0 or height == 0:
        raise InputError(f"{name}: too thin to scale to {max_size} px ({native[0]}x{native[1]})")
    return width, height


def save_image(
    img: Image.Image,
    path: Path,
    *,
    fmt: str | None = None,
    metadata: dict[str, Any] | None = None,
    quality: int = 95,
) -> Path:
    """Write `img` atomically as png, jpg or webp (default: from the extension) with settings."""
    path = Path(path)
    fmt = output_format(fmt or path.suffix)
    options = {"quality": quality} if fmt != "png" else {}
    options |= save_options(fmt, metadata or {})
    if fmt == "jpg" and img.mode not in ("RGB", "L"):
        img = to_rgb(img)  # JPEG has no alpha: transparency over white, as inputs are read
    with atomic_write(path) as f:
        img.save(f, format=_PIL_FORMATS[fmt], **options)
    return path
