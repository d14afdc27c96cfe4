"""Presets: TOML data files → one frozen `Settings`; unknown keys and bad values name the key and file.

Built-in presets live in the repository's `presets/` folder (installed as `stylekit.presets_data`);
`--preset` also takes a path. Precedence: built-in defaults < preset < command-line flags.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path

from stylekit.errors import PresetError

DEFAULT_PRESET = "std-sdxl"
STYLE_MODES = ("ipadapter", "ad", "both", "none")
# The Settings field of each command-line flag whose name differs (`--lora` sets `loras`).
SETTINGS_FIELD = {
    "lora": "loras",
    "adain": "ad_adain",
    "control": "controls",
    "controlnet": "controlnets",
}
# Settings a command fixes over any preset, unless a flag gives them: t2i-styled guides by AD;
# the texture commands use the AD release's texture settings (empty prompt, CFG 1, lr 0.05, AdaIN;
# see tasks/textures.py). `--help` shows these as the defaults of those commands.
_EXPAND = {"style_mode": "ad", "cfg": 1.0, "ad_lr": 0.05, "ad_iters": 2, "ad_adain": True}
COMMAND_DEFAULTS = {
    "t2i-styled": {"style_mode": "ad"},
    "texture-expand": _EXPAND,
    "texture": {**_EXPAND, "ad_iters": 3, "opt_steps": 300},
}


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; defaults are STD's released recipe (see `presets/std-sdxl.toml`)."""

    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    variant: str | None = None  # hub weight variant to prefer, e.g. "fp16" (halves the download)
    accelerator: str = "auto"  # auto: the LoRA for the command and its sampler (see README)
    # The model is a turbo (ADD) model: no accelerator, trailing timesteps. None: only the released
    # SD-Turbo / SDXL-Turbo are; a preset's value describes its own model (see with_overrides).
    turbo: bool | None = None
    loras: tuple[str, ...] = ()
    scheduler: str = "tcd"
    steps: int = 8  # UNet evaluations actually run (NFE); CFG doubles the batch, not the steps
    strength: float = 0.75  # η: how far the content image is noised (STD trains one LoRA per η)
    cfg: float = 6.0  # STD's best style/aesthetic trade-off in its CFG sweep (2–8)
    gamma: float = 0.0  # TCD γ; STD's release samples deterministically
    prompt: str = ""
    negative: str | None = None
    style_mode: str = "ipadapter"
    style_scale: float = 1.0
    ip_adapter: str = "auto"
    image_encoder: str | None = None
    tiny_vae: bool = False
    tiny_vae_model: str | None = None  # hub id or folder of the tiny VAE (default: TAESD / TAESDXL)
    vae: str | None = None  # full VAE replacing the model's, e.g. madebyollin/sdxl-vae-fp16-fix
    ad_iters: int = 3  # AD refinement iterations per step (upstream SD1.5 default)
    ad_lr: float = 0.015  # AD refinement Adam learning rate (upstream default)
    ad_adain: bool = True
    content_weight: float | None = None  # AD content loss; default 0 when sampling, 0.25 optimising
    # gradient checkpointing in AD refinement (less memory, slower); None: on, with one image per
    # refinement, only where the estimate exceeds free device memory (ad.memory_plan)
    ad_checkpointing: bool | None = None
    motion_adapter: str | None = None  # AnimateDiff MotionAdapter for `video` (motion-module mode)
    mode: str = "sample"  # sample: few-step sampling; optimize: AD's optimisation-based transfer
    opt_steps: int = 200  # optimisation timesteps (AD release: 200 style transfer, 300 texture)
    opt_lr: float = 0.05  # the AD release's optimisation learning rate
    # ControlNet (docs/controlnet.md): controls as TYPE[:SCALE] (canny, depth, tile), the nets
    # overriding the family's defaults (one per control, in order), and when the residuals apply
    controls: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    control_scale: float = 0.8  # diffusers' ControlNet img2img default and its LCM-LoRA recipe
    control_start: float = 0.0  # fraction of the steps run before the residuals start
    control_end: float = 1.0  # fraction of the steps run after which they stop
    control_image: str | None = None  # a precomputed map (file, or folder matched by stem)
    control_type: str | None = None  # the control the map is for (default: the only one)
    canny: str = "100,200"  # Canny's low,high hysteresis thresholds (diffusers' docs)
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # Apache-2.0, 99 MB
    description: str = ""
    purpose: str = ""  # what the preset is for, for `stylekit presets` (one sentence)

    def with_overrides(self, **values) -> Settings:
        """Return a copy with every non-None value replaced (command-line flags over the preset).

        `turbo` describes the model: another `model` without a `turbo` of its own resets it to
        None (detect), so `--preset sd-turbo --model other/model` is not taken for a turbo model.
        """
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise PresetError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        new_model = given.get("model", self.model) != self.model
        given.setdefault("turbo", None if new_model else self.turbo)
        return check(replace(self, **given), source="command line")


RANGES = {
    "steps": (1, 50),
    "strength": (0.0, 1.0),
    "cfg": (0.0, 30.0),
    "gamma": (0.0, 1.0),
    "style_scale": (0.0, 10.0),
    "ad_iters": (0, 100),
    "ad_lr": (0.0, 10.0),
    "content_weight": (0.0, 100.0),
    "opt_steps": (1, 5000),
    "opt_lr": (0.0, 10.0),
    "control_scale": (0.0, 5.0),
    "control_start": (0.0, 1.0),
    "control_end": (0.0, 1.0),
}
CHOICES = {"scheduler": ("tcd", "lcm"), "style_mode": STYLE_MODES, "mode": ("sample", "optimize")}


def check(settings: Settings, *, source: str) -> Settings:
    """Validate ranges and choices; the error names the key, the value and where it came from."""
    for key, (lo, hi) in RANGES.items():
        value = getattr(settings, key)
        if value is None:
            continue
        if not lo <= value <= hi or (key == "strength" and value == 0):
            raise PresetError(f"{source}: {key} = {value!r} is outside {lo}..{hi}")
    if settings.control_start >= settings.control_end:
        raise PresetError(
            f"{source}: control_start = {settings.control_start!r} must be below "
            f"control_end = {settings.control_end!r}"
        )
    for key, allowed in CHOICES.items():
        if getattr(settings, key) not in allowed:
            raise PresetError(
                f"{source}: {key} = {getattr(settings, key)!r}; choose one of {', '.join(allowed)}"
            )
    return settings


def coerce(key: str, value, kind, source: str):
    """Check one TOML value against the field's type (ints are accepted for floats)."""
    text = str(kind)
    if "tuple" in text:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PresetError(f"{source}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if text.startswith("bool"):
        ok = isinstance(value, bool)
    elif text.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif text.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise PresetError(f"{source}: {key} = {value!r} has the wrong type (expected {text})")
    return value


def from_dict(data: dict, *, source: str) -> Settings:
    """Build Settings from a preset's table, rejecting unknown keys."""
    kinds = {f.name: f.type for f in fields(Settings)}
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise PresetError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(kinds)}"
        )
    values = {k: coerce(k, v, kinds[k], source) for k, v in data.items()}
    return check(Settings(**values), source=source)


def builtin_dir():
    """The folder of built-in presets."""
    return resources.files("stylekit.presets_data")


def builtin_names() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.name[:-5] for p in builtin_dir().iterdir() if p.name.endswith(".toml"))


def read_preset(name_or_path: str) -> tuple[dict, str]:
    """Return (table, source) for a built-in name or a TOML file path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise PresetError(f"preset {name_or_path}: no such file")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = builtin_dir() / f"{name_or_path}.toml"
        if not entry.is_file():
            raise PresetError(
                f"unknown preset {name_or_path!r}; built-in: {', '.join(builtin_names())}"
            )
        text, source = entry.read_text(encoding="utf-8"), f"preset {name_or_path}"
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{source}: not valid TOML ({exc})") from exc


def load_preset(name_or_path: str | None = None) -> Settings:
    """Load a preset by built-in name or path (default: std-sdxl)."""
    data, source = read_preset(name_or_path or DEFAULT_PRESET)
    return from_dict(data, source=source)


def list_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in preset."""
    return [(name, load_preset(name).description) for name in builtin_names()]


def preset_summary(name: str) -> dict:
    """What `stylekit presets` shows of a built-in preset: whether it is the default, its model,
    steps, strength and what it is for."""
    s = load_preset(name)
    keys = (
        "model",
        "steps",
        "strength",
        "cfg",
        "scheduler",
        "style_mode",
        "purpose",
        "description",
    )
    return {"name": name, "default": name == DEFAULT_PRESET} | {k: getattr(s, k) for k in keys}
