"""Training data: images from folders and globs, frames sampled from videos, captions beside them.

A caption is the `.txt` file with the image's (or video's) stem, else `--prompt`. Every file is
decoded once when the data is scanned: a bad one is reported by name and skipped. Random crops and
flips are drawn from a generator seeded by (seed, epoch, index), so an example's pixels do not
depend on which process loads it or when.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from stylekit.errors import InputError, UsageError
from stylekit.media.batch import IMAGE_EXTS, collect_inputs

VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})


@dataclass(frozen=True)
class Example:
    """One training image: a file, or one frame of a video (decoded at scan time)."""

    path: Path
    caption: str
    frame: Image.Image | None = None


def caption_for(path: Path, prompt: str) -> str:
    """The `.txt` beside `path` (same stem), else `prompt`."""
    txt = path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else prompt


def scan(
    specs: list[str],
    *,
    prompt: str,
    frames_per_video: int,
    resolution: int,
    skipped: Callable[[str], None],
) -> list[Example]:
    """Every usable image and sampled video frame under `specs`; `skipped` hears each bad file."""
    from stylekit.media.images import open_rgb

    examples: list[Example] = []
    for item in collect_inputs(specs, kinds=IMAGE_EXTS | VIDEO_EXTS):
        path = item.path
        try:
            if path.suffix.lower() in VIDEO_EXTS:
                frames = video_frames(path, frames_per_video, resolution)
                examples += [Example(path, caption_for(path, prompt), f) for f in frames]
            else:
                open_rgb(path)  # decodes the whole file: a truncated one fails here
                examples.append(Example(path, caption_for(path, prompt)))
        except (InputError, OSError, UnicodeDecodeError) as exc:
            skipped(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
    if not examples:
        raise UsageError(f"no usable training images in {', '.join(specs)}")
    return examples


def video_frames(path: Path, count: int, resolution: int) -> list[Image.Image]:
    """`count` frames spread evenly over the video, shorter side scaled to `resolution`."""
    from stylekit.media.video import probe, read_frames

    info = probe(path)
    every = max(1, info.frame_count // count)
    frames = read_frames(path, every=every, max_frames=count, info=info)
    return [fit_short_side(Image.fromarray(f), resolution) for f in frames]


def fit_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` (up or down)."""
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


class TrainingImages(Dataset):
    """Examples as square crops: {"pixels": (3, R, R) in [−1, 1], "caption": str, "index": int}."""

    def __init__(self, examples: list[Example], *, resolution: int, seed: int, flip: bool = True):
        self.examples, self.resolution, self.seed, self.flip = examples, resolution, seed, flip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        from stylekit.media.images import open_rgb

        ex = self.examples[index]
        img = ex.frame if ex.frame is not None else open_rgb(ex.path)
        img = fit_short_side(img, self.resolution)
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        r = self.resolution
        top = int(torch.randint(img.height - r + 1, (), generator=g))
        left = int(torch.randint(img.width - r + 1, (), generator=g))
        img = img.crop((left, top, left + r, top + r))
        if self.flip and torch.rand((), generator=g) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
        pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, R, R)
        return {"pixels": pixels, "caption": ex.caption, "index": index}


class EpochPermutation(Sampler):
    """A fresh permutation of the examples every epoch, seeded by (seed, epoch).

    The epoch is set with `start_epoch`, not `set_epoch`: accelerate calls a sampler's
    `set_epoch` with its own count of passes, which restarts at 0 in a resumed run."""

    def __init__(self, data: TrainingImages, seed: int):
        self.data, self.seed = data, seed

    def start_epoch(self, epoch: int) -> None:
        self.data.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.data.epoch)
        return iter(torch.randperm(len(self.data), generator=g).tolist())
