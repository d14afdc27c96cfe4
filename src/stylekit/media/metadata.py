"""Generation settings embedded in output images, as A1111 "parameters" text and as JSON.

Where the settings go, per format:

- PNG: text chunk `parameters` (the A1111 text, read by A1111, ComfyUI and civitai) and text
  chunk `stylekit` (JSON of the full settings, sorted keys). Non-Latin-1 text goes in iTXt.
- JPEG and WebP: EXIF UserComment (0x9286, in the Exif IFD) holds the A1111 text, encoded as
  `UNICODE\\0` + UTF-16BE like A1111 writes it; EXIF ImageDescription (0x010E) holds the
  stylekit JSON (ASCII, non-ASCII characters escaped).
- Videos (mp4, m4v, mov, mkv, webm): the container's `comment` tag holds the stylekit JSON (what
  `ffprobe` shows as `comment`); PNG frames (`--frames-out`) carry the PNG chunks above, plus
  their `frame` number.

Nothing time-dependent is written, so the same settings always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from stylekit.errors import InputError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
IMAGE_DESCRIPTION = 0x010E
_UNICODE = b"UNICODE\0"
_ASCII = b"ASCII\0\0\0"

# A1111 labels, in the order A1111 writes them; other keys follow, sorted.
_LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "cfg_scale": "CFG scale",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
    "strength": "Denoising strength",
    "denoising_strength": "Denoising strength",
}
_NOT_PARAMS = {"prompt", "negative_prompt", "width", "height"}


def a1111_parameters(settings: dict[str, Any]) -> str:
    """Format settings as A1111 "parameters": prompt, `Negative prompt: ...`, `Key: value, ...`."""
    lines = [str(settings.get("prompt") or "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [f"{label}: {_quote(_text(value))}" for label, value in _param_fields(settings)]
    lines.append(", ".join(fields))
    return "\n".join(line for line in lines if line)


def _param_fields(settings: dict[str, Any]) -> list[tuple[str, Any]]:
    """Return (label, value) pairs: the A1111 keys in A1111 order, then the rest by key."""
    values = {k: v for k, v in settings.items() if k not in _NOT_PARAMS and not _blank(v)}
    if "size" not in values and settings.get("width") and settings.get("height"):
        values["size"] = (settings["width"], settings["height"])
    if isinstance(values.get("size"), (tuple, list)):
        values["size"] = "x".join(str(v) for v in values["size"])
    known = [(_LABELS[k], values.pop(k)) for k in _LABELS if k in values]
    rest = [(k.replace("_", " ").capitalize(), values[k]) for k in sorted(values)]
    return known + rest


def _blank(value: Any) -> bool:
    """Say whether a setting is unset (None or empty text) and so left out of the text."""
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str:
    """Render one parameter value: containers as JSON, the rest with str()."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return str(value)


def _quote(text: str) -> str:
    """Quote a value as JSON when it holds a character that would split the A1111 list."""
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def settings_json(settings: dict[str, Any]) -> str:
    """Serialize settings as compact ASCII JSON with sorted keys (paths become strings)."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def save_options(fmt: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Return the Pillow `save()` keywords that embed `settings` in a png, jpg or webp file."""
    if not settings:
        return {}
    if fmt == "png":
        return {"pnginfo": _png_info(settings)}
    return {"exif": _exif(settings).tobytes()}


def _png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """Build the PNG text chunks `parameters` and `stylekit`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text("stylekit", settings_json(settings))
    return info


def _exif(settings: dict[str, Any]) -> Image.Exif:
    """Build EXIF with the A1111 text in UserComment and the JSON in ImageDescription."""
    exif = Image.Exif()
    exif[IMAGE_DESCRIPTION] = settings_json(settings)
    exif[EXIF_IFD] = {USER_COMMENT: _UNICODE + a1111_parameters(settings).encode("utf-16-be")}
    return exif


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm")


def read_metadata(path: Path) -> dict[str, Any]:
    """Read the stylekit settings back from a png, jpg, webp or video file; {} when it has none."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        from stylekit.media.ffmpeg import read_video_settings

        return read_video_settings(path)
    text = _read_fields(path)[1]
    if not text:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return settings if isinstance(settings, dict) else {}


def read_parameters(path: Path) -> str | None:
    """Read the A1111 "parameters" text back from a png, jpg or webp file, if there is one."""
    return _read_fields(path)[0]


def _read_fields(path: Path) -> tuple[str | None, str | None]:
    """Return (A1111 text, stylekit JSON) stored in an image file."""
    try:
        with Image.open(path) as img:
            if isinstance(img, PngImagePlugin.PngImageFile):
                return img.text.get("parameters"), img.text.get("stylekit")
            exif = img.getexif()
            comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
            description = exif.get(IMAGE_DESCRIPTION)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read metadata ({exc})") from exc
    return _decode_comment(comment), description if isinstance(description, str) else None


def _decode_comment(raw: bytes | str | None) -> str | None:
    """Decode an EXIF UserComment: an 8-byte charset code, then the text."""
    if raw is None or isinstance(raw, str):
        return raw
    if raw.startswith(_UNICODE):
        return raw[len(_UNICODE) :].decode("utf-16-be", errors="replace")
    if raw.startswith(_ASCII):
        return raw[len(_ASCII) :].decode("ascii", errors="replace")
    return raw.decode("utf-8", errors="replace").strip("\0")
