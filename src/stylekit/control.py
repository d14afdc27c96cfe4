"""Structure control: the `--control` specs of a run, their ControlNets, and the control maps.

A control is a ControlNet and the map it reads: Canny edges of the content image (OpenCV), a
depth map from a transformers depth-estimation model, the content image itself (tile), or a
precomputed map (`--control-image`, a file or a folder matched to the inputs by stem). The
residuals enter the sampling in `engine.controlnet`; docs/controlnet.md explains the whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from stylekit.errors import UsageError
from stylekit.media.batch import stem_finder
from stylekit.media.images import open_rgb, resized
from stylekit.presets import Settings

CONTROL_TYPES = ("canny", "depth", "tile")  # the maps stylekit computes itself
OPENCV_HINT = "canny edges need OpenCV: pip install 'stylekit[control]'"


@dataclass(frozen=True)
class ControlSpec:
    """One control of a run: its type, scale and ControlNet (None: the family's default)."""

    kind: str
    scale: float
    controlnet: str | None = None


def parse_control(text: str, default_scale: float) -> tuple[str, float]:
    """`TYPE[:SCALE]` → (type, scale); a bad scale or unknown type is a usage error."""
    kind, sep, scale = text.partition(":")
    kind = kind.strip().lower()
    if not re.fullmatch(r"[a-z][\w-]*", kind):
        raise UsageError(f"--control {text}: expected TYPE[:SCALE], e.g. canny:0.8")
    if not sep:
        return kind, default_scale
    try:
        value = float(scale)
    except ValueError:
        raise UsageError(f"--control {text}: the scale {scale!r} is not a number") from None
    if not 0 <= value <= 5:
        raise UsageError(f"--control {text}: the scale must be in 0..5")
    return kind, value


def control_specs(settings: Settings, *, check_tools: bool = True) -> list[ControlSpec]:
    """The run's controls, checked: `--control` entries, plus the `--control-type` of a
    `--control-image` when no `--control` names it; `--controlnet`s pair with them in order.

    Types other than canny, depth and tile have no map stylekit computes: they need a
    `--control-image` and a `--controlnet`. `check_tools=False` skips the check that OpenCV is
    installed (`models pull` fetches for a run that may be on another machine)."""
    s = settings
    parsed = [parse_control(c, s.control_scale) for c in s.controls]
    kind = image_type(s, [k for k, _ in parsed])
    if kind is not None and kind not in [k for k, _ in parsed]:
        parsed.append((kind, s.control_scale))
    if s.controlnets and len(s.controlnets) != len(parsed):
        raise UsageError(
            f"--controlnet given {len(s.controlnets)} time(s) for {len(parsed)} control(s): "
            "pass one per --control, in order"
        )
    nets = list(s.controlnets) or [None] * len(parsed)
    specs = [ControlSpec(k, v, n) for (k, v), n in zip(parsed, nets, strict=True)]
    for spec in specs:
        if spec.kind not in CONTROL_TYPES and (spec.kind != kind or spec.controlnet is None):
            raise UsageError(
                f"--control {spec.kind}: stylekit computes {', '.join(CONTROL_TYPES)}; "
                "another type needs its map (--control-image, --control-type) and --controlnet"
            )
    if any(k == "canny" and k != kind for k, _ in parsed):
        canny_thresholds(s.canny)
        if check_tools:
            require_opencv()
    return specs


def image_type(settings: Settings, kinds: Sequence[str]) -> str | None:
    """The control a `--control-image` is for: `--control-type`, else the only `--control`."""
    if settings.control_image is None:
        if settings.control_type is not None:
            raise UsageError("--control-type names the type of a --control-image: pass one")
        return None
    if settings.control_type:
        return settings.control_type.strip().lower()
    if len(kinds) == 1:
        return kinds[0]
    raise UsageError("--control-image needs --control-type (which control the map is for)")


def canny_thresholds(text: str) -> tuple[int, int]:
    """`LOW,HIGH` → (low, high), whole numbers with 0 ≤ low ≤ high."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) > int(m.group(2)):
        raise UsageError(f"--canny {text}: expected LOW,HIGH with LOW ≤ HIGH, e.g. 100,200")
    return int(m.group(1)), int(m.group(2))


def require_opencv():
    """The cv2 module, or a one-line usage error naming the extra that installs it."""
    try:
        import cv2
    except ImportError:
        raise UsageError(OPENCV_HINT) from None
    return cv2


# --- maps ------------------------------------------------------------------------------------


def canny_map(image: Image.Image, low: int, high: int) -> Image.Image:
    """Canny edges of the RGB image as diffusers' documentation computes them: `cv2.Canny` on the
    RGB array (it takes the strongest gradient over the channels), white edges on black, 3 channels.
    """
    edges = require_opencv().Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) {0, 255}
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def depth_map(estimator, image: Image.Image) -> Image.Image:
    """Relative inverse depth (near is bright) from a transformers depth-estimation pipeline:
    its "L" map at the image's size, min–max scaled to 0..255, as 3 channels."""
    depth = estimator(image.convert("RGB"))["depth"]
    return resized(depth, image.size).convert("RGB")


def tile_map(image: Image.Image) -> Image.Image:
    """The tile ControlNet reads the content image itself."""
    return image.convert("RGB")


def control_map(kind: str, image: Image.Image, settings: Settings, depth: Callable) -> Image.Image:
    """The map of control `kind` computed from `image` (`depth()` gives the loaded estimator)."""
    if kind == "canny":
        return canny_map(image, *canny_thresholds(settings.canny))
    if kind == "depth":
        return depth_map(depth(), image)
    return tile_map(image)


# --- precomputed maps --------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlImage:
    """A precomputed map read for one input: the map at the working size, and the size it had
    when it was resized to that (recorded in the output)."""

    image: Image.Image
    name: str
    resized_from: str | None = None

    def at(self, size: tuple[int, int]) -> ControlImage:
        """This map at `size` (W, H), Lanczos-resized when it differs (the read once, reused)."""
        if self.image.size == tuple(size):
            return self
        before = self.resized_from or f"{self.image.width}x{self.image.height}"
        return replace(self, image=resized(self.image, tuple(size)), resized_from=before)

    def settings(self) -> dict:
        note = {"control_image": self.name}
        if self.resized_from:
            note["control_image_resized_from"] = self.resized_from
        return note


def map_only_controls(settings: Settings, command: str) -> list[ControlSpec]:
    """The controls of a command that makes images from noise (t2i-styled, texture-expand):
    there is no content image to compute a map from, so a `--control-image` is required and
    every control must be its type."""
    specs = control_specs(settings)
    if specs and settings.control_image is None:
        raise UsageError(
            f"{command} --control needs --control-image (a map to generate from: there is no "
            "content image to compute one from)"
        )
    kinds = sorted({s.kind for s in specs})
    if len(kinds) > 1:
        raise UsageError(
            f"{command} --control {', '.join(kinds)}: generating from noise takes one control "
            "type, the --control-image's"
        )
    return specs


def control_image_finder(settings: Settings):
    """(job → its map file) for `--control-image` (a file, or a folder matched by stem like
    inpaint masks), and every such file; (None, set()) without one."""
    if settings.control_image is None:
        return None, set()
    return stem_finder(settings.control_image, flag="--control-image", what="control image")


def read_control_image(path: Path, size: tuple[int, int] | None) -> ControlImage:
    """Read a map as RGB at `size` (W, H; None: its own), Lanczos-resized when it differs; a
    file that cannot be read fails its input (InputError naming it)."""
    read = ControlImage(open_rgb(Path(path)), Path(path).name)
    return read if size is None else read.at(size)


def describe(spec: ControlSpec, source: str, settings: Settings, given: str | None) -> dict:
    """What an output records of one control, enough to reproduce it."""
    entry = {"type": spec.kind, "scale": spec.scale, "controlnet": source}
    entry |= {"start": settings.control_start, "end": settings.control_end}
    if spec.kind == given:
        entry["map"] = "control image"
    elif spec.kind == "canny":
        entry["canny"] = list(canny_thresholds(settings.canny))
    elif spec.kind == "depth":
        entry["depth_model"] = settings.depth_model
    return entry


# --- a run's loaded controls -------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedControl:
    """A control with its loaded ControlNet and where that came from."""

    spec: ControlSpec
    source: str
    net: object


def check_control_sources(settings: Settings, *, allow_pickle: bool) -> None:
    """Refuse bad control flags, a missing local ControlNet or depth model, before any load."""
    from stylekit.engine import models

    specs = control_specs(settings)
    if specs and settings.mode != "sample":
        raise UsageError("--control needs sampling (--mode sample): optimisation has no steps")
    for spec in specs:
        if spec.controlnet is not None:
            models.check_source(spec.controlnet, what="ControlNet", allow_pickle=allow_pickle)
    if any(s.kind == "depth" for s in specs) and models.is_local(settings.depth_model):
        models.check_source(settings.depth_model, what="depth model", allow_pickle=False)


def load_controls(model, settings: Settings, *, allow_pickle: bool) -> list[LoadedControl]:
    """Load each control's ControlNet once for the run (the family's default unless given)."""
    from stylekit.engine import models

    loaded = []
    for spec in control_specs(settings):
        source, revision = models.controlnet_source(spec.kind, model.family, spec.controlnet)
        net = models.load_controlnet(
            model, source, revision=revision, allow_pickle=allow_pickle, variant=settings.variant
        )
        loaded.append(LoadedControl(spec, source, net))
    return loaded
