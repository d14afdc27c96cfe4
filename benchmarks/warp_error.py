"""Warping error of a stylised video: how much it flickers where the input video does not move.

    python benchmarks/warp_error.py input.mp4 output.mp4 [--max-frames N] [--json] [--clip MODEL]

The optical flow comes from the *input* video (OpenCV Farneback, both directions). Each previous
output frame is warped to the current one along the backward flow; pixels whose forward and
backward flows disagree (occlusions, flow failures; the test of Ruder et al. 2016) or that warp
from outside the frame are left out. The error is the mean absolute difference between the warped
previous output and the current output over the remaining pixels, RGB in [0, 1], pooled over all
frame pairs. The same number for the input against itself (`input_warp_error`) is the floor the
flow allows: a perfectly stable stylisation scores close to it.

With `--clip MODEL` (a CLIP hub id or folder, e.g. openai/clip-vit-large-patch14) it also reports
CLIP frame consistency, as StreamV2V and Rerender-A-Video do: the mean cosine similarity of
consecutive frames' CLIP image embeddings (1.0: every frame looks the same to CLIP), for the
output and, as a reference, for the input. It needs transformers (stylekit's own dependency).

Either path may be a video file or a folder of frames (PNG/JPG, sorted by name, e.g. the
`--frames-out` folders of `stylekit video`). Outputs of a different size are resized to the
input's size (a note says so). Needs numpy, opencv-python(-headless) and imageio-ffmpeg.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:
    import cv2
except ModuleNotFoundError:  # one line, not a traceback: the bench extra brings OpenCV
    sys.exit("warp_error.py needs OpenCV: pip install -e '.[bench]' (opencv-python-headless)")

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FARNEBACK = dict(
    pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
)


@dataclass
class WarpError:
    """Warping error of an output video, and of its input (the flow's floor)."""

    warp_error: float  # mean |warp(prev output) − output| on non-occluded pixels, RGB in [0, 1]
    input_warp_error: float  # the same for the input video
    frames: int
    valid_fraction: float  # share of pixels kept by the occlusion mask, over all pairs


def read_video(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames of a video file or a folder of images, streaming."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        for file in files[:max_frames]:
            frame = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if frame is None:
                raise SystemExit(f"{file}: not a readable image")
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        width, height = next(reader)["size"]
        for count, data in enumerate(reader):
            if max_frames is not None and count >= max_frames:
                return
            yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow from gray frame a to gray frame b: (H, W, 2), a(x) ≈ b(x + flow(x))."""
    return cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK)


def backward_warp(image: np.ndarray, flow_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample `image` at x + flow_to(x); also return where that point lies inside the frame."""
    h, w = flow_to.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = grid_x + flow_to[..., 0], grid_y + flow_to[..., 1]
    warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return warped, inside


def valid_mask(forward: np.ndarray, backward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward-backward consistency at the current frame; also the inside-the-frame mask.

    `backward` maps current → previous, `forward` previous → current; a pixel is kept when
    |b + f(x + b)|² ≤ 0.01 (|b|² + |f(x + b)|²) + 0.5 (Ruder et al. 2016).
    """
    forward_back, inside = backward_warp(forward, backward)
    total = backward + forward_back
    bound = 0.01 * ((backward**2).sum(-1) + (forward_back**2).sum(-1)) + 0.5
    return ((total**2).sum(-1) <= bound) & inside, inside


def pair_errors(
    prev_in: np.ndarray, cur_in: np.ndarray, prev_out: np.ndarray, cur_out: np.ndarray
) -> tuple[float, float, int, int]:
    """(output error sum, input error sum, valid pixels, all pixels) for one frame pair."""
    gray_prev = cv2.cvtColor(prev_in, cv2.COLOR_RGB2GRAY)
    gray_cur = cv2.cvtColor(cur_in, cv2.COLOR_RGB2GRAY)
    backward = flow(gray_cur, gray_prev)  # current → previous
    forward = flow(gray_prev, gray_cur)
    mask, _ = valid_mask(forward, backward)
    errors = []
    for prev, cur in ((prev_out, cur_out), (prev_in, cur_in)):
        warped, _ = backward_warp(prev.astype(np.float32) / 255, backward)
        diff = np.abs(warped - cur.astype(np.float32) / 255).mean(-1)  # (H, W)
        errors.append(float(diff[mask].sum()))
    return errors[0], errors[1], int(mask.sum()), mask.size


def warp_error(inputs: Iterable[np.ndarray], outputs: Iterable[np.ndarray]) -> WarpError:
    """Warping error of `outputs` along the flow of `inputs` (equal lengths), streaming."""
    out_sum = in_sum = valid = total = frames = 0
    prev = None
    for cur_in, cur_out in zip(inputs, outputs, strict=True):
        if cur_out.shape != cur_in.shape:
            cur_out = cv2.resize(cur_out, cur_in.shape[1::-1], interpolation=cv2.INTER_AREA)
        if prev is not None:
            o, i, v, n = pair_errors(prev[0], cur_in, prev[1], cur_out)
            out_sum, in_sum, valid, total = out_sum + o, in_sum + i, valid + v, total + n
        prev, frames = (cur_in, cur_out), frames + 1
    if frames < 2:
        raise ValueError("warping error needs at least two frames")
    return WarpError(out_sum / max(valid, 1), in_sum / max(valid, 1), frames, valid / total)


@dataclass
class ClipConsistency:
    """Mean cosine similarity of consecutive frames' CLIP image embeddings."""

    clip_consistency: float  # of the output video
    input_clip_consistency: float  # of the input video, for reference
    clip_model: str


def clip_embedder(model: str, device: str = "cpu", batch: int = 16):
    """Return embed(frames) → iterator of unit-norm CLIP image embeddings (D,), streaming.

    Loads the vision tower of `model` with its projection (`image_embeds`); a vision model without
    one uses its pooled output.
    """
    import torch
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    processor = AutoImageProcessor.from_pretrained(model)
    net = CLIPVisionModelWithProjection.from_pretrained(model).to(device).eval()

    @torch.no_grad()
    def embed_batch(frames: list[np.ndarray]) -> torch.Tensor:
        pixels = processor(images=frames, return_tensors="pt")["pixel_values"].to(device)
        out = net(pixel_values=pixels).image_embeds  # (B, D)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def embed(frames: Iterable[np.ndarray]) -> Iterator:
        chunk = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == batch:
                yield from embed_batch(chunk)
                chunk = []
        if chunk:
            yield from embed_batch(chunk)

    return embed


def clip_consistency(frames: Iterable[np.ndarray], embed) -> float:
    """Mean cosine similarity of consecutive frames' embeddings (`clip_embedder`), streaming."""
    total, pairs, prev = 0.0, 0, None
    for cur in embed(frames):
        if prev is not None:
            total, pairs = total + float(prev @ cur), pairs + 1
        prev = cur
    if pairs == 0:
        raise ValueError("CLIP frame consistency needs at least two frames")
    return total / pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="the input video (file or frames folder)")
    parser.add_argument("output", help="the stylised video (file or frames folder)")
    parser.add_argument("--max-frames", type=int, default=None, help="compare the first N frames")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--clip", metavar="MODEL", default=None, help="also CLIP frame consistency with MODEL"
    )
    parser.add_argument("--device", default="cpu", help="device for the CLIP model")
    args = parser.parse_args(argv)
    first_in = next(read_video(args.input, 1))
    first_out = next(read_video(args.output, 1))
    if first_in.shape != first_out.shape:
        print(
            f"note: output {first_out.shape[1]}x{first_out.shape[0]} resized to the input's "
            f"{first_in.shape[1]}x{first_in.shape[0]}",
            file=sys.stderr,
        )
    try:
        result = warp_error(
            read_video(args.input, args.max_frames), read_video(args.output, args.max_frames)
        )
    except ValueError as exc:  # zip(strict=True): different frame counts
        print(f"error: {exc} (input and output must have the same frames)", file=sys.stderr)
        return 2
    fields = asdict(result)
    if args.clip is not None:
        embed = clip_embedder(args.clip, args.device)
        scores = [
            clip_consistency(read_video(path, args.max_frames), embed)
            for path in (args.output, args.input)
        ]
        fields |= asdict(ClipConsistency(*scores, args.clip))
    if args.json:
        print(json.dumps(fields))
    else:
        print(f"warp error   {result.warp_error:.4f}  (input's own: {result.input_warp_error:.4f})")
        print(f"frames       {result.frames}, {result.valid_fraction:.1%} of pixels non-occluded")
        if args.clip is not None:
            own = fields["input_clip_consistency"]
            print(f"CLIP consistency {fields['clip_consistency']:.4f}  (input's own: {own:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
