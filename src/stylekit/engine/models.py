"""The only place that loads weights: base models, LoRAs, the few-step accelerator, tiny VAE, IP-Adapter.

`--model` is a hub id, a local diffusers folder or a single `.safetensors` checkpoint (a pickled
`.ckpt` with `--allow-pickle`). The family (SD 1.x/2.x vs SDXL) is read from the model itself;
turbo (ADD) models are recognised by name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from stylekit.errors import ModelError, UsageError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
FAMILIES = ("sd15", "sdxl")
STD_REPO = "SecondComming/Single-Trajectory-Distillation"
STD_ETAS = (0.65, 0.75, 0.85, 0.95)
LCM_LORA = {
    "sd15": "latent-consistency/lcm-lora-sdv1-5",
    "sdxl": "latent-consistency/lcm-lora-sdxl",
}
TINY_VAE = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
IP_ADAPTER = {  # (repo, subfolder, weight file, image encoder folder relative to the repo root)
    "sd15": ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "models/image_encoder"),
    # STD's release: the ViT-H SDXL adapter, which needs the ViT-H encoder, not sdxl_models/image_encoder
    "sdxl": (
        "h94/IP-Adapter",
        "sdxl_models",
        "ip-adapter_sdxl_vit-h.safetensors",
        "models/image_encoder",
    ),
}
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
    tiny_vae: bool | str = False  # True: the family's TAESD from the hub; str: a path or hub id
    ip_adapter: str | None = None  # None: no style adapter; "auto": the family's default
    image_encoder: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None  # diffusers config folder/repo for a single-file checkpoint
    variant: str | None = None  # hub weight variant to try first ("fp16"); full weights if absent


@dataclass
class LoadedModel:
    """A loaded pipeline and the facts about it that the samplers need."""

    pipe: object
    family: str
    turbo: bool
    device: torch.device
    dtype: torch.dtype
    accelerator: str | None = None  # the few-step LoRA merged in, recorded in every output

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


def family_of_config(index: dict) -> str:
    """Read the family from a pipeline's model_index.json."""
    name = str(index.get("_class_name", ""))
    return "sdxl" if "XL" in name else "sd15"


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a `.safetensors` file (header only, no weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ModelError(f"model {path}: not a readable .safetensors checkpoint ({exc})") from exc


def pickle_keys(path: Path) -> list[str]:
    """The tensor names of a pickled checkpoint, loaded as diffusers loads it: weights only, memory-mapped."""
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
    return [str(k) for k in state] if isinstance(state, dict) else []


def family_of_checkpoint(path: Path, *, allow_pickle: bool = False) -> str:
    """Read the family from a single-file checkpoint's tensor names."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle("model", path)
        keys = pickle_keys(path)
    else:
        keys = safetensors_keys(path)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in keys):
        return "sd15"
    raise ModelError(f"model {path}: not a Stable Diffusion or SDXL checkpoint")


def detect_family(source: str, *, allow_pickle: bool = False) -> str:
    """Detect SD1.5-family vs SDXL-family from the model itself (folder, hub id or checkpoint)."""
    path = Path(source).expanduser()
    if path.is_file():
        return family_of_checkpoint(path, allow_pickle=allow_pickle)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelError(
                f"model {source}: folder has no model_index.json (not a diffusers pipeline)"
            )
        return family_of_config(json.loads(index.read_text()))
    from diffusers import DiffusionPipeline

    with hub_errors("model", source):
        return family_of_config(DiffusionPipeline.load_config(source))


def is_turbo(source: str) -> bool:
    """Recognise adversarially distilled turbo models (SD-Turbo, SDXL-Turbo and merges) by name."""
    return "turbo" in source.lower()


class hub_errors:
    """Turn hub, network and file errors while loading into one ModelError naming what was looked
    for: a weight of the wrong shape says which one and for which family's model; only a hub or
    network miss gets the offline hint."""

    def __init__(self, what: str, source: str, *, family: str | None = None):
        self.what, self.source, self.family = what, source, family

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
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
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    with hub_errors("model", spec.model):
        if Path(source).is_file():
            config = {"config": spec.model_config} if spec.model_config else {}
            return cls.from_single_file(source, dtype=dtype, **config)
        kwargs = dict(dtype=dtype, use_safetensors=not spec.allow_pickle, **extra)
        if spec.variant and not local:
            try:
                return cls.from_pretrained(source, variant=spec.variant, **kwargs)
            except (ValueError, OSError):  # no such variant (or not cached): take the full weights
                pass
        return cls.from_pretrained(source, **kwargs)


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
            kwargs = {"weight_name": weight} if weight else {}
            pipe.load_lora_weights(repo, adapter_name=name, **kwargs)


def accelerator_source(spec: ModelSpec, family: str, turbo: bool) -> str | None:
    """The few-step LoRA to load: STD for SDXL (η from strength), LCM-LoRA for SD1.5, none for turbo."""
    if spec.accelerator == "none" or (spec.accelerator == "auto" and turbo):
        return None
    if spec.accelerator != "auto":
        return spec.accelerator
    if family == "sdxl":
        eta = min(STD_ETAS, key=lambda e: abs(e - spec.strength))
        return f"{STD_REPO}/std_sdxl_i2i_eta{eta:.2f}.safetensors"
    return LCM_LORA[family]


def fuse_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Fuse the loaded adapters at their scales into the UNet weights and drop the LoRA layers."""
    if not loras:
        return
    names = [n for n, _ in loras]
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


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
    image_encoder: str


def adapter_files(spec: ModelSpec, family: str) -> AdapterFiles:
    """Resolve `--ip-adapter` (auto, a local file or folder, or a hub file) to load_ip_adapter arguments."""
    if spec.ip_adapter in (None, "auto"):
        repo, sub, weight, encoder = IP_ADAPTER[family]
        return AdapterFiles(repo, sub, weight, spec.image_encoder or encoder)
    check_source(spec.ip_adapter, what="IP-Adapter", allow_pickle=spec.allow_pickle)
    path = Path(spec.ip_adapter).expanduser()
    if path.is_dir():
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(weights) != 1:
            raise ModelError(
                f"IP-Adapter {path}: expected one weight file in the folder, found {weights}"
            )
        path = path / weights[0]
    if path.is_file():
        encoder = spec.image_encoder or str(path.parent / "image_encoder")
        return AdapterFiles(str(path.parent), "", path.name, encoder)
    repo, weight = split_hub_file(spec.ip_adapter)
    if weight is None:
        raise ModelError(
            f"IP-Adapter {spec.ip_adapter}: name the weight file, e.g. owner/repo/sub/file.safetensors"
        )
    sub, _, name = weight.rpartition("/")
    return AdapterFiles(repo, sub, name, spec.image_encoder or "models/image_encoder")


def load_ip_adapter(pipe, spec: ModelSpec, family: str) -> None:
    """Load the IP-Adapter and its CLIP image encoder (an explicit local encoder folder is loaded first)."""
    from transformers import CLIPVisionModelWithProjection

    files = adapter_files(spec, family)
    with hub_errors(
        "IP-Adapter",
        f"{files.repo}/{files.subfolder}/{files.weight_name}".replace("//", "/"),
        family=family,
    ):
        encoder = Path(files.image_encoder).expanduser()
        if encoder.is_dir() or is_local(files.image_encoder):
            if not encoder.is_dir():
                raise ModelError(f"image encoder {encoder}: no such folder (pass --image-encoder)")
            enc = CLIPVisionModelWithProjection.from_pretrained(str(encoder), dtype=pipe.unet.dtype)
            pipe.register_modules(image_encoder=enc.to(pipe.unet.device))
        pipe.load_ip_adapter(
            files.repo,
            subfolder=files.subfolder,
            weight_name=files.weight_name,
            image_encoder_folder=files.image_encoder,
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


def load(spec: ModelSpec) -> LoadedModel:
    """Load the base model with its LoRAs, accelerator, tiny VAE and IP-Adapter, ready for sampling."""
    quiet_libraries()
    check_source(spec.model, what="model", allow_pickle=spec.allow_pickle)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    family = detect_family(spec.model, allow_pickle=spec.allow_pickle)
    turbo = is_turbo(spec.model)
    pipe = load_pipeline(spec, family, dtype)
    accel = accelerator_source(spec, family, turbo)
    adapters = [(f"lora{i}", lora.source, lora.scale) for i, lora in enumerate(spec.loras)]
    if accel:
        adapters.insert(0, ("accelerator", accel, 1.0))
    for name, source, _ in adapters:
        load_lora(pipe, source, name=name, allow_pickle=spec.allow_pickle, family=family)
    fuse_loras(pipe, [(name, scale) for name, _, scale in adapters])
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
        accel,
    )
