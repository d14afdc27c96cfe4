"""The only place that loads weights: base models, LoRAs, the few-step accelerator, VAEs, IP-Adapter.

`--model` is a hub id, a local diffusers folder or a single `.safetensors` checkpoint (a pickled
`.ckpt` with `--allow-pickle`). The family (SD 1.x, SD 2.x or SDXL) is read from the model itself;
turbo (ADD) models are the released SD-Turbo and SDXL-Turbo, or whatever `--turbo` says.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from stylekit.engine import hub
from stylekit.errors import ModelError, UsageError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
FAMILIES = ("sd15", "sd2", "sdxl")  # SD 1.x, SD 2.x (OpenCLIP ViT-H text encoder), SDXL
STD_REPO = "SecondComming/Single-Trajectory-Distillation"
STD_ETAS = (0.65, 0.75, 0.85, 0.95)  # one image LoRA (std_sdxl_i2i_eta*) and one video LoRA per η
ETA_TOLERANCE = 0.05  # a strength further than this from every released η gets a warning
LCM_LORA = {
    "sd15": "latent-consistency/lcm-lora-sdv1-5",
    "sdxl": "latent-consistency/lcm-lora-sdxl",
}
TCD_LORA = {"sd15": "h1t/TCD-SD15-LoRA", "sdxl": "h1t/TCD-SDXL-LoRA"}
FULL_TRAJECTORY_LORA = {"tcd": TCD_LORA, "lcm": LCM_LORA}  # distilled from pure noise, per sampler
TASKS = ("img2img", "noise", "video")  # where sampling starts: a noised image, pure noise, frames
TINY_VAE = {  # SD 1.x and 2.x share one VAE latent space, so TAESD serves both
    "sd15": "madebyollin/taesd",
    "sd2": "madebyollin/taesd",
    "sdxl": "madebyollin/taesdxl",
}
# SDXL's VAE finetuned to keep its activations within fp16 (same latents, scaling 0.13025): the
# usual cure for SDXL's fp16 NaNs. Loaded only when asked (`--vae`), never by default.
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
# The released adversarially distilled models (ADD): the hub repos and their checkpoint files.
TURBO_REPOS = ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo")
TURBO_FILES = {  # released checkpoint file -> its repo, whose config the file loads with
    "sd_turbo.safetensors": "stabilityai/sd-turbo",
    "sd_xl_turbo_1.0.safetensors": "stabilityai/sdxl-turbo",
    "sd_xl_turbo_1.0_fp16.safetensors": "stabilityai/sdxl-turbo",
}
IP_ADAPTER = {  # (repo, subfolder, weight file); the image encoder follows from them
    "sd15": ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
    "sdxl": ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors"),  # STD's
}
SD2_NO_ACCELERATOR = (
    "model {model} is SD 2.x: no few-step LoRA (LCM-LoRA, TCD-LoRA, STD) is released for it, so "
    "--accelerator auto loads none; few steps need a distilled model (stabilityai/sd-turbo) or a "
    "LoRA passed with --accelerator"
)
H94 = "h94/IP-Adapter"  # keeps two CLIP image encoders: ViT-H and ViT-bigG
VIT_H_ENCODER, VIT_BIGG_ENCODER = "models/image_encoder", "sdxl_models/image_encoder"
OFFLINE_HINT = (
    "check the name, run once with network access to fill the Hugging Face cache "
    "(HF_HUB_OFFLINE=1 then uses only the cache), or pass a local folder or .safetensors file"
)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to load and fuse: a local file/folder or a hub `owner/repo[/file.safetensors]`, and a scale."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """Parse `PATH_OR_HUB_FILE[:SCALE]`; a scale that is not a number is a usage error."""
        m = re.fullmatch(r"(.+?):(-?\d+(?:\.\d*)?|-?\.\d+)", text)
        if m and not Path(text).exists():
            return cls(m.group(1), float(m.group(2)))
        head, sep, tail = text.rpartition(":")
        if sep and head and not re.search(r"[\\/]", tail) and not Path(text).expanduser().exists():
            raise UsageError(f"--lora {text}: the scale {tail!r} is not a number (e.g. FILE:0.8)")
        return cls(text, 1.0)


@dataclass(frozen=True)
class ModelSpec:
    """What to load: the base model and everything fused or attached to it."""

    model: str
    loras: tuple[LoraSpec, ...] = ()
    accelerator: str = "auto"  # auto | none | a LoRA spec
    strength: float = 0.75  # picks the STD LoRA whose η matches
    task: str = "img2img"  # img2img | noise | video: what `auto` picks the accelerator for
    scheduler: str = "tcd"  # tcd | lcm: the sampler a full-trajectory accelerator is distilled for
    tiny_vae: bool | str = False  # True: the family's TAESD from the hub; str: a path or hub id
    vae: str | None = (
        None  # a full AutoencoderKL (folder, hub id or .safetensors) replacing the VAE
    )
    ip_adapter: str | None = None  # None: no style adapter; "auto": the family's default
    image_encoder: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None  # diffusers config folder/repo for a single-file checkpoint
    variant: str | None = None  # hub weight variant to try first ("fp16"); full weights if absent
    turbo: bool | None = None  # None: the released turbo models only (see `detect_turbo`)
    motion_adapter: str | None = None  # AnimateDiff MotionAdapter: a motion UNet (video)


@dataclass
class LoadedModel:
    """A loaded pipeline and the facts about it that the samplers need."""

    pipe: object
    family: str
    turbo: bool
    device: torch.device
    dtype: torch.dtype
    accelerator: str | None = None  # the few-step LoRA merged in, recorded in every output
    notices: tuple[str, ...] = ()  # one line each for the user: what `auto` chose
    warnings: tuple[str, ...] = ()  # choices the user should know may give weaker results

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def inpainting_unet(self) -> bool:
        return self.pipe.unet.config.in_channels == 9


def resolve_device(name: str = "auto") -> torch.device:
    """Pick the device: cuda, then mps, then cpu for `auto`; refuse one that is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Pick the dtype: fp16 on cuda and mps, bf16 on a CPU that supports it, else fp32."""
    if name == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose auto, fp32, fp16 or bf16")
    return DTYPES[name]


def auto_dtype_reason(device: torch.device) -> str:
    """Why `resolve_dtype("auto", device)` picks what it picks, in a few words."""
    if device.type in ("cuda", "mps"):
        return f"half precision on {device.type}"
    if cpu_has_bf16():
        return "this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)"
    return "this CPU has no native bf16 matrix instructions (AVX512-BF16 or AMX)"


def is_local(source: str) -> bool:
    """Whether `source` names something on disk rather than a hub id or hub file `owner/repo/file`."""
    path = Path(source)
    if path.exists() or source.startswith((".", "/", "~")):
        return True
    weights = path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
    return weights and len(path.parts) < 3  # owner/repo/file.safetensors is a hub file


def check_source(source: str, *, what: str, allow_pickle: bool) -> None:
    """Refuse missing local paths and pickle files (unless allowed) with one clear line."""
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        refuse_pickle(what, source)
    if is_local(source) and not path.exists():
        raise ModelError(f"{what} {source}: no such file or folder")
    if not is_local(source) and not re.fullmatch(r"[\w.\-]+/[\w.\-]+(/.+)?", source):
        raise ModelError(f"{what} {source!r}: not a local path or a hub id like owner/name")


def check_local_sources(spec: ModelSpec) -> None:
    """`check_source` for everything `spec` would load from disk, before anything loads."""
    allow = spec.allow_pickle
    check_source(spec.model, what="model", allow_pickle=allow)
    for lora in spec.loras:
        check_source(lora.source, what="LoRA", allow_pickle=allow)
    if spec.accelerator not in ("auto", "none"):
        check_source(spec.accelerator, what="accelerator", allow_pickle=allow)
    if spec.motion_adapter:
        check_source(spec.motion_adapter, what="motion adapter", allow_pickle=allow)
    if isinstance(spec.tiny_vae, str) and is_local(spec.tiny_vae):
        check_source(spec.tiny_vae, what="tiny VAE", allow_pickle=False)
    if spec.ip_adapter not in (None, "auto"):
        check_source(spec.ip_adapter, what="IP-Adapter", allow_pickle=allow)
    encoder = spec.image_encoder
    if spec.ip_adapter is not None and encoder and is_local(encoder):
        if not Path(encoder).expanduser().is_dir():
            raise ModelError(f"image encoder {encoder}: no such folder")


def refuse_pickle(what: str, source: str | Path) -> NoReturn:
    """A pickle file without --allow-pickle is a usage error: the user decides whether to trust it."""
    raise UsageError(
        f"{what} {source}: pickle checkpoints can run arbitrary code; convert it to .safetensors "
        "or pass --allow-pickle if you trust it"
    )


def family_of_unet(config: dict) -> str:
    """Read the family from a UNet config.

    SDXL has added text-time conditioning. Otherwise the cross-attention width is the text
    encoder's: 768 is SD 1.x (CLIP ViT-L), 1024 is SD 2.x (OpenCLIP ViT-H). Any other width (a
    tiny test model, an unusual fine-tune) falls back to structure: SD 2.x projects into its
    transformer blocks with linear layers (`use_linear_projection`), SD 1.x with 1x1 convolutions.
    """
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if width in (768, 1024):
        return "sd15" if width == 768 else "sd2"
    return "sd2" if config.get("use_linear_projection") else "sd15"


def family_of_config(index: dict, unet: dict | None = None) -> str:
    """Read the family from a pipeline's model_index.json and, for SD 1.x/2.x, its UNet config."""
    if "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    return family_of_unet(unet) if unet is not None else "sd15"


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a `.safetensors` file (header only, no weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ModelError(f"model {path}: not a readable .safetensors checkpoint ({exc})") from exc


def pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a pickled checkpoint, loaded as diffusers loads it: weights
    only, memory-mapped."""
    mmap = {"mmap": True} if zipfile.is_zipfile(path) else {}  # only the zip format maps
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, **mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model {path}: not a readable pickled checkpoint ({first[:300]})"
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style `.ckpt`, as diffusers unwraps it
    if not isinstance(state, dict):
        return {}
    return {str(k): tuple(getattr(v, "shape", ())) for k, v in state.items()}


def family_of_checkpoint(path: Path, *, allow_pickle: bool = False) -> str:
    """Read the family from a single-file checkpoint's tensor names and shapes, by the rule of
    `family_of_unet`: SDXL's second text encoder; else the cross-attention width (the input
    width of an `attn2.to_k`); else SD 2.x's OpenCLIP text encoder or linear `proj_in`."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle("model", path)
        shapes = pickle_shapes(path)
    else:
        shapes = safetensors_shapes(path)
    if any(k.startswith("conditioner.embedders.1") for k in shapes):
        return "sdxl"
    unet = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    widths = {v[-1] for k, v in unet.items() if k.endswith("attn2.to_k.weight") and v}
    if widths & {768, 1024}:
        return "sd2" if 1024 in widths else "sd15"
    open_clip = any(k.startswith("cond_stage_model.model.") for k in shapes)
    linear = any(k.endswith(".proj_in.weight") and len(v) == 2 for k, v in unet.items())
    if open_clip or linear:
        return "sd2"
    if unet or any(k.startswith("cond_stage_model.") for k in shapes):
        return "sd15"
    raise ModelError(f"model {path}: not a Stable Diffusion or SDXL checkpoint")


def detect_family(source: str, *, allow_pickle: bool = False) -> str:
    """Detect SD 1.x, SD 2.x or SDXL from the model itself (folder, hub id or checkpoint)."""
    path = Path(source).expanduser()
    if path.is_file():
        return family_of_checkpoint(path, allow_pickle=allow_pickle)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelError(
                f"model {source}: folder has no model_index.json (not a diffusers pipeline)"
            )
        unet = path / "unet" / "config.json"
        unet_config = json.loads(unet.read_text()) if unet.is_file() else None
        return family_of_config(json.loads(index.read_text()), unet_config)
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    with hub_errors("model", source):
        index = DiffusionPipeline.load_config(source)
        if "XL" in str(index.get("_class_name", "")):
            return "sdxl"
        return family_of_config(index, UNet2DConditionModel.load_config(source, subfolder="unet"))


def read_configs(source: str) -> tuple[dict | None, dict | None]:
    """The UNet's and VAE's configs of a diffusers folder or hub id, read without loading any
    weights (a hub id from the cache, or fetched like the load would); (None, None) for a
    single-file checkpoint, whose configs come with the load."""
    path = Path(source).expanduser()
    if path.is_file():
        return None, None
    if path.is_dir():
        parts = [path / part / "config.json" for part in ("unet", "vae")]
        unet, vae = (json.loads(p.read_text()) if p.is_file() else None for p in parts)
        return unet, vae
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with hub_errors("model", source):
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae = AutoencoderKL.load_config(source, subfolder="vae")
    return dict(unet), dict(vae)


def is_turbo(source: str) -> bool:
    """Whether `source` is a released turbo (ADD) model: the SD-Turbo or SDXL-Turbo hub repo or a
    file in it, a local copy of the repo (its Hugging Face cache folder `models--stabilityai--…`,
    or a folder named `stabilityai/sd-turbo`), or a checkpoint file under its released name."""
    text = source.rstrip("/")
    if not is_local(text):
        return split_hub_file(text)[0].lower() in TURBO_REPOS
    parts = [p.lower() for p in Path(text).expanduser().parts]
    cache = {"models--" + repo.replace("/", "--") for repo in TURBO_REPOS}
    return (
        any(p in cache for p in parts)
        or "/".join(parts[-2:]) in TURBO_REPOS
        or (bool(parts) and parts[-1] in TURBO_FILES)
    )


def detect_turbo(source: str, flag: bool | None = None) -> tuple[bool, str | None]:
    """Return (turbo, notice): `flag` when given, else whether `source` is a released turbo model.

    A name that merely contains "turbo" (a merge, a renamed folder) changes nothing silently: it
    gets a one-line notice instead, since turbo means no accelerator LoRA and trailing timesteps.
    """
    if flag is not None:
        return flag, None
    if is_turbo(source):
        return True, None
    if "turbo" in source.lower():
        return False, (
            f"model {source} looks like a turbo model by name; pass --turbo if it is "
            "(no accelerator LoRA, trailing timesteps)"
        )
    return False, None


class hub_errors:
    """Turn hub, network and file errors while loading into one ModelError naming what was looked
    for: a weight of the wrong shape says which one and for which family's model; only a hub or
    network miss gets the offline hint."""

    def __init__(self, what: str, source: str, *, family: str | None = None):
        self.what, self.source, self.family = what, source, family
        self.logger, self.level = logging.getLogger("diffusers"), logging.NOTSET

    def __enter__(self):
        # diffusers logs some load errors in full before raising them (a LoRA's state-dict
        # error, many lines): the raised error is what the user sees, as one line
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, kind, exc, tb):
        self.logger.setLevel(self.level)
        if exc is None or isinstance(exc, (ModelError, UsageError, KeyboardInterrupt)):
            return False
        if not isinstance(exc, (OSError, ValueError, RuntimeError, KeyError)):
            if not _is_hub_error(exc):
                return False
        mismatch = shape_mismatch(exc)
        if mismatch:
            model = f"this {self.family} model" if self.family else "this model"
            raise ModelError(
                f"{self.what} {self.source} does not fit {model}: {mismatch}; "
                "it was made for another model family or size"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not network_miss(exc):
            raise ModelError(f"{self.what} {self.source}: could not load: {first[:300]}") from exc
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelError(
            f"{self.what} {self.source}: could not load{offline}: {first[:300]}; {OFFLINE_HINT}"
        ) from exc


def _is_hub_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx"))


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (diffusers re-raises hub
    errors as OSError), outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def network_miss(exc: BaseException) -> bool:
    """Whether a load failed for want of the hub: not cached offline, no connection, no such
    repository or file on the hub (what running once with network access can fix)."""
    from huggingface_hub import errors as hub

    misses = (
        hub.LocalEntryNotFoundError,
        hub.OfflineModeIsEnabled,
        hub.RepositoryNotFoundError,
        hub.RevisionNotFoundError,
        hub.EntryNotFoundError,
        hub.HfHubHTTPError,
        ConnectionError,
        TimeoutError,
    )
    for e in _chain(exc):
        if isinstance(e, misses) or type(e).__module__.startswith(("requests", "httpx")):
            return True
        if re.search(r"couldn't connect to|offline mode|cached files|huggingface\.co", str(e)):
            return True
    return False


SIZE_MISMATCH = (  # (pattern, group of the file's shape, group of the model's shape)
    (
        r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
        r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        2,
        3,
    ),
    (
        r"because ([\w.]+) expected shape torch\.Size\((\[[^\]]*\])\), "
        r"but got torch\.Size\((\[[^\]]*\])\)",
        3,
        2,
    ),
)


def shape_mismatch(exc: BaseException) -> str | None:
    """'NAME is [a, b] in the file but [c, d] in the model (COMPONENT)' from torch's or diffusers'
    size-mismatch message anywhere in the chain, or None."""
    for e in _chain(exc):
        text = str(e)
        for pattern, file_group, model_group in SIZE_MISMATCH:
            m = re.search(pattern, text)
            if m:
                owner = re.search(r"state_dict for (\w+)", text)
                where = f" ({owner.group(1)})" if owner else ""
                return (
                    f"{m.group(1)} is {m.group(file_group)} in the file but "
                    f"{m.group(model_group)} in the model{where}"
                )
    return None


def pipeline_class(family: str):
    """The diffusers pipeline class whose components and prompt encoding stylekit uses."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline


def load_pipeline(spec: ModelSpec, family: str, dtype: torch.dtype):
    """Load the base pipeline from a folder, a hub id or a single-file checkpoint."""
    cls = pipeline_class(family)
    local = is_local(spec.model)
    source = str(Path(spec.model).expanduser()) if local else spec.model
    extra = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    with hub_errors("model", spec.model):
        if Path(source).is_file():
            config = single_file_config(spec)
            return cls.from_single_file(
                source, dtype=dtype, **({"config": config} if config else {})
            )
        kwargs = dict(dtype=dtype, use_safetensors=not spec.allow_pickle, **extra)
        if spec.variant and not local:
            try:
                return cls.from_pretrained(source, variant=spec.variant, **kwargs)
            except (ValueError, OSError):  # no such variant (or not cached): take the full weights
                pass
        return cls.from_pretrained(source, **kwargs)


def single_file_config(spec: ModelSpec) -> str | None:
    """The diffusers config of a single-file checkpoint: `--model-config`, else the released turbo
    repo for a released turbo file name, else None (diffusers infers one from the tensor shapes)."""
    return spec.model_config or TURBO_FILES.get(Path(spec.model).name.lower())


def split_hub_file(source: str) -> tuple[str, str | None]:
    """Split `owner/repo/path/file.safetensors` into (repo, file path); a plain repo gives (repo, None)."""
    parts = source.split("/")
    if len(parts) > 2 and parts[-1].endswith((".safetensors", *PICKLE_SUFFIXES)):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return source, None


def load_lora(
    pipe, source: str, *, name: str, allow_pickle: bool, family: str | None = None
) -> None:
    """Load one LoRA (local file/folder or hub file) into the pipeline as adapter `name`."""
    check_source(source, what="LoRA", allow_pickle=allow_pickle)
    with hub_errors("LoRA", source, family=family):
        path = Path(source).expanduser()
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        elif path.is_dir():
            pipe.load_lora_weights(str(path), adapter_name=name)
        else:
            repo, weight = split_hub_file(source)
            if weight is None and hub.offline():  # diffusers cannot list the repo to guess it
                weight = hub.cached_lora_weight(repo)
            kwargs = {"weight_name": weight} if weight else {}
            pipe.load_lora_weights(repo, adapter_name=name, **kwargs)


@dataclass(frozen=True)
class Accelerator:
    """The few-step LoRA `--accelerator` resolves to, and what to tell the user about the choice."""

    source: str | None
    notice: str | None = None
    warning: str | None = None


def eta_distance(strength: float, eta: float) -> float:
    """|strength − η| rounded to 1e-6: float error makes |0.7 − 0.65| 0.04999… but |0.75 − 0.7| 0.05000…1."""
    return round(abs(strength - eta), 6)


def std_eta(strength: float) -> float:
    """The released η nearest to `strength`; a tie (0.7, 0.8, 0.9) goes to the higher η.

    STD distils the trajectory from η down to 0: the higher η's LoRA has been trained on the whole
    of a trajectory that starts at the tied strength, the lower one has not seen its first part.
    """
    return min(STD_ETAS, key=lambda eta: (eta_distance(strength, eta), -eta))


def std_choice(strength: float, task: str) -> Accelerator:
    """STD's image LoRA for the η nearest `strength` (video too: the v2v files need a motion module)."""
    eta = std_eta(strength)
    name = f"std_sdxl_i2i_eta{eta:.2f}.safetensors"
    frames = ", per frame: the v2v LoRAs need a motion module" if task == "video" else ""
    notice = f"accelerator: STD {name} (η {eta:.2f} for strength {strength:g}{frames})"
    warning = None
    if eta_distance(strength, eta) > ETA_TOLERANCE:
        released = ", ".join(f"{e:.2f}" for e in STD_ETAS)
        warning = (
            f"strength {strength:g} is {eta_distance(strength, eta):g} from the nearest STD LoRA "
            f"(η {eta:.2f}; released: {released}): results may be weaker; choose a strength "
            "near one of them, or pass --accelerator"
        )
    return Accelerator(f"{STD_REPO}/{name}", notice, warning)


def choose_accelerator(spec: ModelSpec, family: str, turbo: bool) -> Accelerator:
    """The few-step LoRA for this model, task and sampler.

    SDXL from a noised image or frames: STD's LoRA for the η nearest the strength. From pure noise
    (`t2i-styled`, textures), off STD's trajectory, and on SD1.5, which has no STD LoRA: the LoRA
    distilled over the full trajectory for the sampler in use (TCD-LoRA or LCM-LoRA). SD 2.x has
    none of these: nothing, with a warning. Turbo models are few-step already; `none` and an
    explicit LoRA are taken as given.
    """
    if spec.task not in TASKS:
        raise UsageError(f"unknown task {spec.task!r}; choose one of {', '.join(TASKS)}")
    if spec.accelerator == "none":
        return Accelerator(None)
    if spec.accelerator != "auto":
        return Accelerator(spec.accelerator)
    if turbo:
        return Accelerator(None, "accelerator: none (turbo models need no few-step LoRA)")
    if family == "sdxl" and spec.task in ("img2img", "video"):
        return std_choice(spec.strength, spec.task)
    source = FULL_TRAJECTORY_LORA[spec.scheduler].get(family)
    if source is None:  # SD 2.x: no LCM-LoRA, TCD-LoRA or STD LoRA is released for it
        return Accelerator(None, warning=SD2_NO_ACCELERATOR.format(model=spec.model))
    why = "from pure noise" if family == "sdxl" else f"no STD LoRA for {family}"
    kind = "TCD-LoRA" if spec.scheduler == "tcd" else "LCM-LoRA"
    return Accelerator(source, f"accelerator: {kind} {source} ({why}; {spec.scheduler} sampler)")


def accelerator_source(spec: ModelSpec, family: str, turbo: bool) -> str | None:
    """The few-step LoRA to load (see `choose_accelerator`)."""
    return choose_accelerator(spec, family, turbo).source


def check_family(spec: ModelSpec, family: str) -> None:
    """Refuse, before the weights load, what the family cannot do: the default IP-Adapters are
    built for 768- (SD 1.x) and 2048-wide (SDXL) cross-attention, SD 2.x's is 1024 wide."""
    if spec.ip_adapter == "auto" and family not in IP_ADAPTER:
        raise UsageError(
            f"model {spec.model} is SD 2.x: no IP-Adapter is released for its 1024-wide "
            "cross-attention; use --style-mode ad (attention distillation works on any UNet), "
            "or pass an SD 2.x adapter with --ip-adapter"
        )


def family_warnings(spec: ModelSpec, family: str) -> list[str]:
    """Warnings about what the weights of an SD 2.x checkpoint cannot tell."""
    if family != "sd2" or not Path(spec.model).expanduser().is_file() or single_file_config(spec):
        return []
    return [  # the weights do not say whether the model predicts ε or v
        f"model {spec.model}: diffusers reads an SD 2.x checkpoint with stable-diffusion-2-1's "
        "config (768 px, v-prediction); for a 512 px ε model (SD 2.x base and its fine-tunes) "
        "pass --model-config stabilityai/stable-diffusion-2-1-base"
    ]


def fuse_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Fuse the loaded adapters at their scales into the UNet weights and drop the LoRA layers."""
    if not loras:
        return
    names = [n for n, _ in loras]
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def load_vae(pipe, source: str, dtype: torch.dtype, *, allow_pickle: bool) -> None:
    """Replace the pipeline's VAE with an `AutoencoderKL` (e.g. SDXL_FP16_VAE) of the same latents.

    `source` is a hub id (`owner/repo` or `owner/repo/subfolder`), a folder with the VAE's
    config.json (or a pipeline folder with `vae/`), or a single-file `.safetensors` VAE."""
    from diffusers import AutoencoderKL

    check_source(source, what="VAE", allow_pickle=allow_pickle)
    path = Path(source).expanduser()
    with hub_errors("VAE", source):
        if path.is_file():
            vae = AutoencoderKL.from_single_file(str(path), dtype=dtype)
        elif path.is_dir():
            sub = "vae" if not (path / "config.json").exists() and (path / "vae").is_dir() else None
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, dtype=dtype)
        else:
            owner, repo, *sub = source.split("/")
            vae = AutoencoderKL.from_pretrained(
                f"{owner}/{repo}", subfolder="/".join(sub) or None, dtype=dtype
            )
    want, got = pipe.vae.config.latent_channels, vae.config.latent_channels
    if got != want:
        raise ModelError(f"VAE {source}: {got} latent channels, this model's VAE has {want}")
    pipe.vae = vae


def load_tiny_vae(pipe, family: str, source: bool | str, dtype: torch.dtype) -> None:
    """Swap the pipeline's VAE for TAESD / TAESDXL (`AutoencoderTiny`)."""
    from diffusers import AutoencoderTiny

    src = TINY_VAE[family] if source is True else str(source)
    if is_local(src):
        check_source(src, what="tiny VAE", allow_pickle=False)
    with hub_errors("tiny VAE", src, family=family):
        pipe.vae = AutoencoderTiny.from_pretrained(src, dtype=dtype)


@dataclass(frozen=True)
class AdapterFiles:
    """Where an IP-Adapter's weights and image encoder are."""

    repo: str
    subfolder: str
    weight_name: str
    image_encoder: str  # a local folder, or a folder of `repo` from its root


def image_encoder_folder(repo: str, subfolder: str, weight_name: str) -> str:
    """The CLIP image encoder an adapter in a hub repo needs: a folder from the repo's root.

    h94/IP-Adapter keeps ViT-H in `models/image_encoder` and ViT-bigG in
    `sdxl_models/image_encoder`: its SD1.5 adapters and the SDXL `*_vit-h` ones take ViT-H,
    `sdxl_models/ip-adapter_sdxl.*` and the `*vit-G*` ones bigG. Any other repo: the adapter
    folder's `image_encoder`, diffusers' default (OzzyGT/sdxl-ip-adapter keeps its ViT-H there).
    """
    if repo.lower() == H94.lower():
        name = weight_name.lower()
        bigg = "vit-g" in name or (subfolder == "sdxl_models" and "vit-h" not in name)
        return VIT_BIGG_ENCODER if bigg else VIT_H_ENCODER
    return f"{subfolder}/image_encoder" if subfolder else "image_encoder"


def adapter_files(spec: ModelSpec, family: str) -> AdapterFiles:
    """Resolve `--ip-adapter` (auto, a local file or folder, or a hub file) and its image encoder.

    `--image-encoder` is a local folder, or else a folder of the adapter's hub repo.
    """
    user = spec.image_encoder
    if user and is_local(user):
        user = str(Path(user).expanduser().absolute())
    if spec.ip_adapter in (None, "auto"):
        repo, sub, weight = IP_ADAPTER[family]
        return AdapterFiles(repo, sub, weight, user or image_encoder_folder(repo, sub, weight))
    check_source(spec.ip_adapter, what="IP-Adapter", allow_pickle=spec.allow_pickle)
    path = Path(spec.ip_adapter).expanduser().absolute()
    if path.is_dir():
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(weights) != 1:
            raise ModelError(
                f"IP-Adapter {path}: expected one weight file in the folder, found {weights}"
            )
        path = path / weights[0]
    if path.is_file():
        return AdapterFiles(
            str(path.parent), "", path.name, user or str(path.parent / "image_encoder")
        )
    repo, weight = split_hub_file(spec.ip_adapter)
    if weight is None:
        raise ModelError(
            f"IP-Adapter {spec.ip_adapter}: name the weight file, e.g. owner/repo/sub/file.safetensors"
        )
    sub, _, name = weight.rpartition("/")
    return AdapterFiles(repo, sub, name, user or image_encoder_folder(repo, sub, name))


def load_image_encoder(pipe, files: AdapterFiles) -> None:
    """Load the adapter's CLIP image encoder from a local folder or from its folder in the hub repo.

    Loaded here rather than by diffusers' `load_ip_adapter`, which reads a folder name without a
    slash as relative to the adapter's subfolder, not to the repo's root.
    """
    from transformers import CLIPVisionModelWithProjection

    local = Path(files.image_encoder).is_absolute()
    if local and not Path(files.image_encoder).is_dir():
        raise ModelError(
            f"image encoder {files.image_encoder}: no such folder (pass --image-encoder)"
        )
    where = files.image_encoder if local else f"{files.repo}/{files.image_encoder}"
    source = {"pretrained_model_name_or_path": files.image_encoder}
    if not local:
        source = {"pretrained_model_name_or_path": files.repo, "subfolder": files.image_encoder}
    with hub_errors("image encoder", where):
        enc = CLIPVisionModelWithProjection.from_pretrained(**source, dtype=pipe.unet.dtype)
    pipe.register_modules(image_encoder=enc.to(pipe.unet.device))


def load_ip_adapter(pipe, spec: ModelSpec, family: str) -> None:
    """Load the IP-Adapter and the CLIP image encoder chosen for it (`image_encoder_folder`)."""
    files = adapter_files(spec, family)
    load_image_encoder(pipe, files)
    with hub_errors(
        "IP-Adapter",
        f"{files.repo}/{files.subfolder}/{files.weight_name}".replace("//", "/"),
        family=family,
    ):
        pipe.load_ip_adapter(
            files.repo,
            subfolder=files.subfolder,
            weight_name=files.weight_name,
            image_encoder_folder=None,  # loaded above
        )


def quiet_libraries() -> None:
    """Silence diffusers/transformers info logs and loading bars: stylekit draws its own progress."""
    import warnings

    import diffusers
    import transformers

    for module in ("huggingface_hub", "diffusers", "transformers", "peft"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def speed_up(pipe, device: torch.device) -> None:
    """Channels-last UNet and VAE: oneDNN and cuDNN convolutions run faster in NHWC (not on MPS)."""
    if device.type in ("cpu", "cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def vae_notice(vae, family: str, dtype: torch.dtype) -> str | None:
    """One line when the VAE must run in fp32 under fp16 (`force_upcast`, SDXL's own), naming
    the fix. The fp16-fix VAE is not loaded unasked: it is another download (a surprise offline)
    and a different VAE (outputs change slightly); the fp32 upcast is correct, only slower."""
    if dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return None
    fix = f" (--vae {SDXL_FP16_VAE} runs in fp16)" if family == "sdxl" else ""
    return f"the VAE overflows in fp16, so it encodes and decodes in fp32{fix}"


def load(spec: ModelSpec) -> LoadedModel:
    """Load the base model with its LoRAs, accelerator, tiny VAE and IP-Adapter, ready for sampling."""
    quiet_libraries()
    if spec.vae and spec.tiny_vae:
        raise UsageError("--vae and --tiny-vae both replace the VAE: pass one of them")
    check_source(spec.model, what="model", allow_pickle=spec.allow_pickle)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    family = detect_family(spec.model, allow_pickle=spec.allow_pickle)
    check_family(spec, family)
    turbo, turbo_warning = detect_turbo(spec.model, spec.turbo)
    checkpoint = family_warnings(spec, family)
    pipe = load_pipeline(spec, family, dtype)
    accel = choose_accelerator(spec, family, turbo)
    adapters = [(f"lora{i}", lora.source, lora.scale) for i, lora in enumerate(spec.loras)]
    if accel.source:
        adapters.insert(0, ("accelerator", accel.source, 1.0))
    motion_notes: list[str] = []
    if spec.motion_adapter:
        load_motion_adapter(pipe, spec.motion_adapter, dtype, allow_pickle=spec.allow_pickle)
        motion_notes = motion_scheduler(pipe, spec.motion_adapter, [s for _, s, _ in adapters])
        if family == "sdxl" and spec.accelerator == "auto":
            motion_notes.append(STD_VIDEO_NOTE)
    for name, source, _ in adapters:
        if spec.motion_adapter:  # may skip keys the motion UNet lacks: report them
            report = load_motion_lora(pipe, source, name=name, allow_pickle=spec.allow_pickle)
            motion_notes.append(report)
        else:
            load_lora(pipe, source, name=name, allow_pickle=spec.allow_pickle, family=family)
    fuse_loras(pipe, [(name, scale) for name, _, scale in adapters])
    if spec.vae:
        load_vae(pipe, spec.vae, dtype, allow_pickle=spec.allow_pickle)
    if spec.tiny_vae:
        load_tiny_vae(pipe, family, spec.tiny_vae, dtype)
    if spec.ip_adapter is not None:
        load_ip_adapter(pipe, spec, family)
    pipe.to(device)
    speed_up(pipe, device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe,
        family,
        turbo,
        device,
        dtype,
        accel.source,
        notices=tuple(
            n for n in (accel.notice, vae_notice(pipe.vae, family, dtype), *motion_notes) if n
        ),
        warnings=tuple(w for w in (turbo_warning, accel.warning, *checkpoint) if w),
    )


# --- motion modules (AnimateDiff; `stylekit video --motion-adapter`) ----------------------------

# Scheduler settings the model cards of motion checkpoints give, keyed by a hub repo the adapter
# or one of the LoRAs comes from: AnimateLCM samples with linear betas; MCM also with LCM's
# boundary condition at timestep scaling 4.
MOTION_SCHEDULER = {
    "wangfuyun/animatelcm": {"beta_schedule": "linear"},
    "yhzhai/mcm": {"beta_schedule": "linear", "timestep_scaling": 4.0},
}
PEFT_PREFIX = "base_model.model."
STD_VIDEO_NOTE = (
    "motion: STD's std_sdxl_v2v_eta* video LoRAs were trained with a motion module that was not "
    "released; --accelerator auto keeps the image LoRA. Passing a v2v LoRA as --accelerator is "
    "experimental: its layers are matched by name and the skipped ones reported"
)  # a PEFT adapter's UNet keys (MCM), read as diffusers' "unet."


def load_motion_adapter(pipe, source: str, dtype: torch.dtype, *, allow_pickle: bool) -> None:
    """Turn the pipeline's 2-D UNet into diffusers' `UNetMotionModel` with `source`'s adapter."""
    from diffusers import MotionAdapter, UNetMotionModel

    check_source(source, what="motion adapter", allow_pickle=allow_pickle)
    path = Path(source).expanduser()
    with hub_errors("motion adapter", source):
        if path.is_file():
            adapter = MotionAdapter.from_single_file(str(path))
        else:
            adapter = MotionAdapter.from_pretrained(str(path) if path.is_dir() else source)
    try:
        unet = UNetMotionModel.from_unet2d(pipe.unet, adapter)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"motion adapter {source} does not fit this model's UNet: {first}"
        ) from exc
    pipe.register_modules(unet=unet.to(dtype))


def motion_scheduler(pipe, adapter: str, loras: list[str]) -> list[str]:
    """Apply the model card's scheduler settings of a known motion checkpoint; say so."""
    repos = {split_hub_file(s)[0].lower() for s in (adapter, *loras) if not is_local(s)}
    notes = []
    for repo in sorted(r for r in repos if r in MOTION_SCHEDULER):
        pipe.scheduler.register_to_config(**MOTION_SCHEDULER[repo])
        shown = ", ".join(f"{k} {v}" for k, v in MOTION_SCHEDULER[repo].items())
        notes.append(f"motion: {shown} (the model card of {repo})")
    return notes


def lora_unet_keys(state: dict) -> dict:
    """A LoRA state dict's UNet part as `unet.`-prefixed diffusers keys (PEFT adapters renamed)."""
    out = {}
    for key, value in state.items():
        if key.startswith(PEFT_PREFIX):
            key = "unet." + key[len(PEFT_PREFIX) :]
        if key.startswith("unet."):
            out[key] = value
    return out


def lora_module(key: str) -> str:
    """The module a LoRA key adapts: 'unet.a.b.to_q.lora_A.weight' → 'a.b.to_q'."""
    name = key[len("unet.") :]
    return re.sub(r"\.(lora(_[AB])?|lora\.(up|down))(\.\w+)?\.weight$|\.alpha$", "", name)


def split_lora(unet, state: dict) -> tuple[dict, list[str]]:
    """(the keys whose module exists in `unet` as a linear/conv layer, the skipped modules)."""
    modules = dict(unet.named_modules())
    kept, skipped = {}, set()
    for key, value in state.items():
        name = lora_module(key)
        if hasattr(modules.get(name), "weight"):
            kept[key] = value
        else:
            skipped.add(name)
    return kept, sorted(skipped)


def lora_location(source: str) -> tuple[str, str | None]:
    """(folder or hub repo, weight file in it or None) of a LoRA; a PEFT adapter folder's
    `adapter_model.safetensors` is named, since diffusers looks for its own file name."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        peft = path / "adapter_model.safetensors"
        return str(path), peft.name if peft.is_file() else None
    return split_hub_file(source)


def peft_config(folder: str, weight: str | None) -> dict:
    """The `adapter_config.json` beside a PEFT adapter's weights (local or on the hub), or {}."""
    sub = str(Path(weight).parent) if weight else "."
    local = Path(folder) / sub / "adapter_config.json"
    if Path(folder).is_dir():
        return json.loads(local.read_text()) if local.is_file() else {}
    from huggingface_hub import hf_hub_download

    name = "adapter_config.json" if sub == "." else f"{sub}/adapter_config.json"
    return json.loads(Path(hf_hub_download(folder, name)).read_text())


def peft_scaled(state: dict, config: dict) -> dict:
    """PEFT scales a LoRA by lora_alpha / r, which its weights do not carry: fold it into B."""
    scale = float(config.get("lora_alpha", 1)) / float(config.get("r", 1)) if config else 1.0
    if scale == 1.0:
        return state
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def load_motion_lora(pipe, source: str, *, name: str, allow_pickle: bool) -> str:
    """Load a LoRA's UNet keys into the motion UNet, skipping modules it lacks; return a report.

    STD's video LoRAs were trained on a motion module that was not released: on another adapter
    only the keys whose layers exist can load, and the report says how many did.
    """
    check_source(source, what="LoRA", allow_pickle=allow_pickle)
    with hub_errors("LoRA", source):
        folder, weight = lora_location(source)
        state, alphas = pipe.lora_state_dict(folder, **({"weight_name": weight} if weight else {}))
        unet_state = lora_unet_keys(state)
        if any(k.startswith(PEFT_PREFIX) for k in state):
            unet_state = peft_scaled(unet_state, peft_config(folder, weight))
        kept, skipped = split_lora(pipe.unet, unet_state)
        if not kept:
            raise ModelError(f"LoRA {source}: none of its UNet keys fit the motion UNet")
        pipe.load_lora_into_unet(kept, alphas, unet=pipe.unet, adapter_name=name, _pipeline=pipe)
    matched = len({lora_module(k) for k in kept})
    other = len(state) - len(unet_state)
    text = f"LoRA {source}: {matched} layers loaded into the motion UNet"
    if skipped:
        text += f", {len(skipped)} skipped (no such layer: {', '.join(skipped[:3])}, ...)"
    if other:
        text += f", {other} text-encoder keys not loaded"
    return text


# --- ControlNet and depth estimation (docs/controlnet.md) ----------------------------------------
# The default ControlNet per family and control type: (hub id, revision). The SD1.5 tile net keeps
# only a pickled `.bin` on main; its safetensors conversion lives in the repo's PR ref.
CONTROLNETS = {
    "sd15": {
        "canny": ("lllyasviel/control_v11p_sd15_canny", None),
        "depth": ("lllyasviel/control_v11f1p_sd15_depth", None),
        "tile": ("lllyasviel/control_v11f1e_sd15_tile", "refs/pr/4"),
    },
    "sdxl": {
        "canny": ("diffusers/controlnet-canny-sdxl-1.0", None),
        "depth": ("diffusers/controlnet-depth-sdxl-1.0", None),
        "tile": ("xinsir/controlnet-tile-sdxl-1.0", None),
    },
}
DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"  # Apache-2.0, 99 MB


def controlnet_source(kind: str, family: str, source: str | None) -> tuple[str, str | None]:
    """(source, revision) of the ControlNet for control `kind`: `source` when given, else the
    family's default; SD 2.x has none released here, so it needs `--controlnet`."""
    if source:
        return source, None
    defaults = CONTROLNETS.get(family)
    if defaults is None:
        raise UsageError(
            f"no default {kind} ControlNet for SD 2.x models; pass one with --controlnet"
        )
    return defaults[kind]


def load_controlnet(
    model: LoadedModel,
    source: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
):
    """Load a `ControlNetModel` (hub id, diffusers folder or `.safetensors` file) on the model's
    device and dtype. A net built for another family (its cross-attention width or SDXL's
    added conditioning differ from the UNet's) is a usage error naming both."""
    from diffusers import ControlNetModel

    check_source(source, what="ControlNet", allow_pickle=allow_pickle)
    path = Path(source).expanduser()
    where = str(path) if path.is_dir() else source
    kwargs = dict(dtype=model.dtype, use_safetensors=not allow_pickle, revision=revision)
    with hub_errors("ControlNet", source, family=model.family):
        if not path.is_file():  # the config first: a wrong family stops before the weights
            config = ControlNetModel.load_config(where, revision=revision)
            check_controlnet_family(config, model, source)
        if path.is_file():
            net = ControlNetModel.from_single_file(str(path), dtype=model.dtype)
        elif path.is_dir() or not variant:
            net = ControlNetModel.from_pretrained(where, **kwargs)
        else:
            try:
                net = ControlNetModel.from_pretrained(source, variant=variant, **kwargs)
            except (ValueError, OSError):  # no such variant: the full weights
                net = ControlNetModel.from_pretrained(source, **kwargs)
    check_controlnet_family(net.config, model, source)
    return net.to(model.device).eval().requires_grad_(False)


def check_controlnet_family(config, model: LoadedModel, source: str) -> None:
    """Refuse a ControlNet (its config, a mapping) whose conditioning does not fit the UNet: its
    cross-attention width or SDXL's added conditioning differ (an SD1.5 net on SDXL)."""
    check_controlnet_config(config, model.unet.config, model.family, source)


def check_controlnet_config(config, unet_config, family: str, source: str) -> None:
    """`check_controlnet_family` from the two configs alone (what `models pull` has at hand)."""
    config, unet = dict(config), dict(unet_config)
    keys = ("cross_attention_dim", "addition_embed_type")
    if all(config.get(k) == unet.get(k) for k in keys):
        return
    raise UsageError(
        f"ControlNet {source} is for {family_of_unet(config)} models (cross-attention "
        f"{config.get('cross_attention_dim')}), but the model is {family} (cross-attention "
        f"{unet.get('cross_attention_dim')}); pass a {family} ControlNet with --controlnet"
    )


def load_depth_estimator(source: str, device: torch.device):
    """A transformers `depth-estimation` pipeline (hub id or local folder) on `device`."""
    from transformers import pipeline

    if is_local(source):
        check_source(source, what="depth model", allow_pickle=False)
        source = str(Path(source).expanduser())
    with hub_errors("depth model", source):
        return pipeline("depth-estimation", model=source, device=device)


FEATURE_NET = "facebook/dinov2-small"  # DINOv2 ViT-S/14: the discriminator features STD and ADD use


def load_feature_net(source: str, *, device: torch.device, dtype: torch.dtype):
    """Load the frozen DINOv2 feature network of `stylekit distill` (a hub id or local folder)."""
    from transformers import Dinov2Model

    if is_local(source):
        check_source(source, what="feature network", allow_pickle=False)
        source = str(Path(source).expanduser())
    with hub_errors("feature network", source):
        net = Dinov2Model.from_pretrained(source, dtype=dtype)
    return net.to(device).requires_grad_(False).eval()
