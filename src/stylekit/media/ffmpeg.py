"""ffmpeg helpers that both writing and reading media need: the binary, its error line, and the
global tags of its `ffmetadata` output (where a video carries stylekit's settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator

import imageio_ffmpeg

from stylekit.errors import InputError


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_reason(stderr: str) -> str:
    """ffmpeg's last error line without its `[ctx @ 0x..]` prefix."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "ffmpeg failed"
    reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1])
    return re.sub(r"^Error opening (input|output) files?:\s*", "", reason) or "ffmpeg failed"


def read_video_settings(path: str | os.PathLike) -> dict:
    """The stylekit settings a video carries in its `comment` tag; {} when it has none."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    proc = subprocess.run([*cmd, "-f", "ffmetadata", "-"], capture_output=True)
    if proc.returncode != 0:
        reason = ffmpeg_reason(proc.stderr.decode("utf-8", "replace"))
        raise InputError(f"{path}: cannot read metadata ({reason})")
    text = ffmetadata_tags(proc.stdout.decode("utf-8", "replace")).get("comment")
    try:
        settings = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return settings if isinstance(settings, dict) else {}


def ffmetadata_tags(text: str) -> dict[str, str]:
    """The global tags of ffmpeg's `ffmetadata` text, keys lowercased: `key=value` lines, where
    a backslash escapes the next character (a newline too) and `;`/`#` lines are comments."""
    tags: dict[str, str] = {}
    for line in _ffmetadata_lines(text):
        if not line or line[0] in (";", "#"):
            continue
        if line[0] == "[":
            break  # a [STREAM] or [CHAPTER] section: the global tags are over
        if "=" in line:
            cut = line.index("=")
            key = "".join(ch[-1] for ch in line[:cut]).lower()
            tags[key] = "".join(ch[-1] for ch in line[cut + 1 :])
    return tags


def _ffmetadata_lines(text: str) -> Iterator[list[str]]:
    """Lines as lists of characters; an escaped one is kept as backslash + it, so that it never
    counts as a separator."""
    line: list[str] = []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            line.append(c + next(chars, ""))
        elif c == "\n":
            yield line
            line = []
        else:
            line.append(c)
    yield line
