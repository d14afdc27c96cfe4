"""Read any image as 8-bit RGB at a model-friendly size, and write outputs with their settings.

`load_image` applies the EXIF orientation, composites transparency on white (diffusion models
have no alpha channel, and white is what viewers show behind most transparent art), scales
16-bit images to 8 bits, and resizes with Lanczos to a multiple of 8, as diffusers does.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stylekit.errors import InputError, UsageError
from stylekit.media.batch import atomic_write, output_format
from stylekit.media.metadata import save_options

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
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
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return to_rgb(ImageOps.exif_transpose(img))
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
    if img.mode.endswith(("A", "a")) or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


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
    with atomic_write(path) as f:
        img.save(f, format=_PIL_FORMATS[fmt], **options)
    return path
