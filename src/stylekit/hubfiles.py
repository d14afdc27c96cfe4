"""What a run needs from the Hugging Face hub, file by file: pulled ahead, or checked in the cache.

`needs(settings, family, turbo, commands)` is the one place that says which repos and files a
preset (or flags) will load: the model (with its weight variant), the accelerator LoRA for every
η and sampler the commands may pick (`engine.models.choose_accelerator`, the loader's own rule),
LoRAs, the IP-Adapter and its image encoder, the tiny VAE or a replacement VAE, the ControlNet
of each `--control` (at the revision the loader asks for) and the depth model a computed depth map
takes. Each `Need` is resolved against a listing of a repo's files at a revision, from the hub (`hub_listing`: to pull) or from the
cache (`cached_listing`: what `HF_HUB_OFFLINE=1` will find), by the rules diffusers loads with.

    plan = resolve_all(settings, commands=COMMANDS, listing=cached_listing)  # (repo, revision)
    plan.missing  # [] when a machine can run these commands offline
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from stylekit.engine import hub
from stylekit.errors import ModelError, UsageError
from stylekit.presets import Settings

# Which task each command samples (`ModelSpec.task`), and the commands that may use IP-Adapter.
COMMAND_TASKS = {
    "stylize": "img2img",
    "inpaint": "img2img",
    "video": "video",
    "t2i-styled": "noise",
    "texture": "noise",
    "texture-expand": "noise",
}
COMMANDS = tuple(COMMAND_TASKS)
ADAPTER_COMMANDS = ("stylize", "inpaint", "video", "t2i-styled")  # textures guide by AD only
MAP_COMMANDS = ("stylize", "inpaint", "video")  # compute control maps from their content images
NOT_LOADED = {"safety_checker"}  # a pipeline component stylekit loads as None: never read
# Files a non-weight pipeline folder must have, by the class its model_index.json names.
CLIP_TOKENIZER = ("tokenizer_config.json", "vocab.json", "merges.txt")
REQUIRED = {
    "Scheduler": ("scheduler_config.json",),
    "Tokenizer": ("tokenizer_config.json",),
    "ImageProcessor": ("preprocessor_config.json",),
    "FeatureExtractor": ("preprocessor_config.json",),
}
WEIGHT_STEM = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


@dataclass(frozen=True)
class Need:
    """Files one part of a run loads from one hub repo.

    kind: `pipeline` (a diffusers pipeline: model_index.json and its components), `diffusers` or
    `transformers` (a model folder `path`: config.json and weights), `file` (exactly `path`), or
    `lora` (the LoRA file diffusers picks from a repo named without one). `revision`: the branch,
    ref or commit the loader asks for (None: main); `also`: files a model folder must have too
    (a transformers processor's config)."""

    repo: str
    what: str  # for the user: "model", "accelerator", "IP-Adapter", ...
    kind: str
    path: str = ""
    variant: str | None = None
    revision: str | None = None
    also: tuple[str, ...] = ()


@dataclass
class Listing:
    """A repo's files (path → bytes, None where unknown) and a way to read a small one."""

    repo: str
    files: dict[str, int | None]
    read: Callable[[str], str]
    revision: str | None = None

    def json(self, path: str) -> dict:
        try:
            return json.loads(self.read(path))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{where(self.repo, path, self.revision)}: not readable JSON ({exc})"
            ) from exc


@dataclass
class Resolved:
    """A need's files, found in a listing, and what the listing lacks."""

    need: Need
    files: dict[str, int | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def where(repo: str, path: str, revision: str | None) -> str:
    """`repo/path` for the user, with the revision when it is not main."""
    return f"{repo}/{path}" + (f" (revision {revision})" if revision else "")


def cached_listing(
    repo: str, revision: str | None = None, cache: str | Path | None = None
) -> Listing:
    """The repo's files in the hub cache at `revision` (None: main): what an offline run loads."""
    files: dict[str, int | None] = dict(hub.cached_files(repo, cache, revision))
    root = hub.snapshot(repo, cache, revision)

    def read(path: str) -> str:
        return (root / path).read_text(encoding="utf-8")

    return Listing(repo, files, read, revision)


def hub_listing(repo: str, revision: str | None = None, cache: str | Path | None = None) -> Listing:
    """The repo's files on the hub at `revision`, with sizes; reading one fetches it into the
    cache."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    from stylekit.engine.models import hub_errors

    with hub_errors("repo", repo):
        tree = HfApi().list_repo_tree(repo, recursive=True, revision=revision)
        files = {f.path: f.size for f in tree if isinstance(f, RepoFile)}

    def read(path: str) -> str:
        with hub_errors("file", f"{repo}/{path}"):
            local = hf_hub_download(
                repo, path, revision=revision, cache_dir=str(hub.cache_dir(cache))
            )
        return Path(local).read_text(encoding="utf-8")

    return Listing(repo, files, read, revision)


# --- what a run needs ---------------------------------------------------------------------------


def hub_source(source: str | None) -> bool:
    """Whether `source` names something on the hub (not a local path, not empty)."""
    from stylekit.engine.models import is_local

    return bool(source) and not is_local(source)


def lora_need(source: str, what: str) -> Need:
    """A LoRA named `owner/repo/file.safetensors` (that file) or `owner/repo` (diffusers' pick)."""
    from stylekit.engine.models import split_hub_file

    repo, weight = split_hub_file(source)
    return Need(repo, what, "file", weight) if weight else Need(repo, what, "lora")


def model_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """The base model: a diffusers pipeline repo, with the settings' weight variant."""
    if not hub_source(settings.model):
        return []
    return [Need(settings.model, "model", "pipeline", variant=settings.variant)]


def accelerator_needs(
    settings: Settings,
    family: str | None,
    turbo: bool,
    commands,
    strengths: Sequence[float] | None = None,
) -> list[Need]:
    """The accelerator LoRA(s) `--accelerator` resolves to for every command's task, at every
    strength in `strengths` (default: one per released STD η, since `--strength` picks one)."""
    from stylekit.engine.models import STD_ETAS, choose_accelerator
    from stylekit.session import Runtime, model_spec

    if family is None:
        return []
    tried = strengths or (settings.strength, *STD_ETAS)
    sources = []
    for task in dict.fromkeys(COMMAND_TASKS[c] for c in commands):
        base = model_spec(settings, Runtime(), ip_adapter=False, task=task)
        for strength in tried:
            source = choose_accelerator(replace(base, strength=strength), family, turbo).source
            if hub_source(source) and source not in sources:
                sources.append(source)
    return [lora_need(s, "accelerator") for s in sources]


def lora_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """LoRAs the settings fuse (`--lora`), where they are hub files."""
    from stylekit.engine.models import LoraSpec

    specs = [LoraSpec.parse(text) for text in settings.loras]
    return [lora_need(s.source, "LoRA") for s in specs if hub_source(s.source)]


def adapter_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """The IP-Adapter and the CLIP image encoder it takes, when a command injects style with it."""
    from stylekit.engine.models import IP_ADAPTER, adapter_files
    from stylekit.session import Runtime, model_spec

    uses = settings.style_mode in ("ipadapter", "both") and settings.mode == "sample"
    if not uses or family is None or not set(commands) & set(ADAPTER_COMMANDS):
        return []
    if settings.ip_adapter == "auto" and family not in IP_ADAPTER:
        return []  # SD 2.x: none released; the run refuses it with its own message
    files = adapter_files(model_spec(settings, Runtime(), ip_adapter=True), family)
    if Path(files.repo).is_absolute():
        return []
    weight = f"{files.subfolder}/{files.weight_name}".lstrip("/")
    out = [Need(files.repo, "IP-Adapter", "file", weight)]
    if not Path(files.image_encoder).is_absolute():
        out.append(Need(files.repo, "image encoder", "transformers", files.image_encoder))
    return out


def vae_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """The tiny VAE (`--tiny-vae`: TAESD/TAESDXL or `--tiny-vae-model`) or a `--vae` repo."""
    from stylekit.engine.models import TINY_VAE
    from stylekit.session import tiny_vae

    out = []
    tiny = tiny_vae(settings)
    source = TINY_VAE.get(family) if tiny is True else tiny
    if hub_source(source):
        out.append(Need(source, "tiny VAE", "diffusers"))
    if hub_source(settings.vae):
        owner, name, *sub = settings.vae.split("/")
        out.append(Need(f"{owner}/{name}", "VAE", "diffusers", "/".join(sub)))
    return out


def control_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """The ControlNet of each `--control` (`--controlnet`, else the family's default at the
    revision the loader asks for; its weight variant where it has one, as the loader tries), and
    the depth-estimation model when a command computes a depth map (not given by
    `--control-image`; t2i-styled and texture-expand only read given maps)."""
    from stylekit.control import control_specs, image_type
    from stylekit.engine.models import controlnet_source

    if settings.mode != "sample":
        return []  # the run refuses controls without sampling, and loads none
    specs = control_specs(settings, check_tools=False)
    out, v = [], settings.variant
    for spec in specs:
        if spec.controlnet is None and family is None:
            continue  # the family's default: known once the model is (plan note)
        source, revision = controlnet_source(spec.kind, family, spec.controlnet)
        if hub_source(source):
            out.append(Need(source, "ControlNet", "diffusers", variant=v, revision=revision))
    given = image_type(settings, [s.kind for s in specs])
    computes = set(commands) & set(MAP_COMMANDS)
    if computes and any(s.kind == "depth" and s.kind != given for s in specs):
        if hub_source(settings.depth_model):
            also = ("preprocessor_config.json",)
            out.append(Need(settings.depth_model, "depth model", "transformers", also=also))
    return out


def motion_needs(settings: Settings, family: str | None, turbo: bool, commands) -> list[Need]:
    """The AnimateDiff motion adapter (`--motion-adapter`, a diffusers folder), for `video`."""
    if "video" not in commands or not hub_source(settings.motion_adapter):
        return []
    return [Need(settings.motion_adapter, "motion adapter", "diffusers")]


# One function per part of a run; a new part is one more.
NEEDS = (
    model_needs,
    accelerator_needs,
    lora_needs,
    adapter_needs,
    vae_needs,
    control_needs,
    motion_needs,
)


def needs(
    settings: Settings,
    family: str | None,
    turbo: bool,
    commands: Sequence[str] = COMMANDS,
    *,
    strengths: Sequence[float] | None = None,
) -> list[Need]:
    """Everything `commands` load from the hub with `settings` on a model of `family` (None: not
    known yet, so only the model itself), each need once."""
    out: list[Need] = []
    for part in NEEDS:
        extra = {"strengths": strengths} if part is accelerator_needs else {}
        for need in part(settings, family, turbo, commands, **extra):
            if need not in out:
                out.append(need)
    return out


# --- resolving a need against a listing -------------------------------------------------------


def model_folder(listing: Listing, folder: str, stem: str, variant: str | None) -> Resolved:
    """config.json and the weights of a model folder: the variant's if the folder has them,
    else the full ones (a single `.safetensors` or a sharded index and its shards)."""
    pre = f"{folder}/" if folder else ""
    got = Resolved(Need(listing.repo, "", "folder", folder))
    config = pre + "config.json"
    add(got, listing, config)
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"]
    for name in names:
        if pre + name in listing.files:
            add(got, listing, pre + name)
            return got
        index = pre + name + ".index.json"
        if index in listing.files:
            add(got, listing, index)
            for shard in sorted(set(listing.json(index).get("weight_map", {}).values())):
                add(got, listing, pre + shard)
            return got
    got.missing.append(pre + names[0])
    return got


def add(got: Resolved, listing: Listing, path: str) -> None:
    """Record `path` as found (with its size) or missing."""
    if path in listing.files:
        got.files[path] = listing.files[path]
    else:
        got.missing.append(path)


def folder_kind(cls: str) -> tuple[str, ...] | None:
    """The files a non-weight component folder (scheduler, tokenizer, processor) must have;
    None for a model folder (config and weights)."""
    if cls.startswith("CLIPTokenizer"):
        return CLIP_TOKENIZER
    return next((files for key, files in REQUIRED.items() if key in cls), None)


def pipeline_files(listing: Listing, variant: str | None) -> Resolved:
    """A diffusers pipeline as `from_pretrained` loads it: model_index.json and the repo's other
    root configs, each component's folder (every file of a scheduler, tokenizer or processor
    folder; config and weights of a model folder, by `model_folder`). The safety checker, which
    stylekit loads as None, is left out."""
    got = Resolved(Need(listing.repo, "model", "pipeline", variant=variant))
    if "model_index.json" not in listing.files:
        got.missing.append("model_index.json")
        return got
    for path in listing.files:
        if "/" not in path and path.endswith(".json"):
            add(got, listing, path)
    for name, value in listing.json("model_index.json").items():
        if name.startswith("_") or name in NOT_LOADED or not isinstance(value, list):
            continue
        library, cls = value[0], value[-1]
        if library is None or cls is None:
            continue
        required = folder_kind(str(cls))
        if required is None:
            stem = WEIGHT_STEM.get(library, "diffusion_pytorch_model")
            part = model_folder(listing, name, stem, variant)
            got.files.update(part.files)
            got.missing.extend(part.missing)
            continue
        for path in listing.files:
            if path.startswith(f"{name}/"):
                add(got, listing, path)
        for file in required:
            if f"{name}/{file}" not in got.files:
                add(got, listing, f"{name}/{file}")
    return got


def resolve(need: Need, listing: Listing) -> Resolved:
    """The files of `need` in `listing`, and the ones it lacks."""
    if need.kind == "pipeline":
        got = pipeline_files(listing, need.variant)
    elif need.kind in WEIGHT_STEM:
        got = model_folder(listing, need.path, WEIGHT_STEM[need.kind], need.variant)
        pre = f"{need.path}/" if need.path else ""
        for name in need.also:
            add(got, listing, pre + name)
    elif need.kind == "lora":
        got = Resolved(need)
        weight = hub.lora_weight(listing.files)
        if weight is None:
            got.missing.append("a top-level .safetensors LoRA file")
        else:
            add(got, listing, weight)
    else:
        got = Resolved(need)
        add(got, listing, need.path)
    got.need = need
    return got


# --- a whole plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    """Every need of a run resolved: the files by need, what is missing, and the model's family."""

    resolved: list[Resolved]
    family: str | None
    turbo: bool
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        """`repo/path` of every missing file (with its revision where that is not main)."""
        return [where(r.need.repo, p, r.need.revision) for r in self.resolved for p in r.missing]

    def files(self) -> dict[tuple[str, str | None, str], int | None]:
        """(repo, revision, path) → bytes of every file found, each once."""
        return {
            (r.need.repo, r.need.revision, p): size
            for r in self.resolved
            for p, size in r.files.items()
        }

    def size(self) -> int:
        return sum(size or 0 for size in self.files().values())


def detect(settings: Settings, listing: Listing | None) -> tuple[str | None, bool]:
    """The model's family (None when its configs are not in `listing`) and whether it is turbo."""
    from stylekit.engine.models import detect_family, detect_turbo, family_of_config

    turbo = detect_turbo(settings.model, settings.turbo)[0]
    if listing is None:
        return detect_family(settings.model), turbo
    if "model_index.json" not in listing.files:
        return None, turbo
    index = listing.json("model_index.json")
    unet = listing.json("unet/config.json") if "unet/config.json" in listing.files else None
    return family_of_config(index, unet), turbo


def resolve_all(
    settings: Settings,
    *,
    commands: Sequence[str] = COMMANDS,
    listing: Callable[[str, str | None], Listing],
    strengths: Sequence[float] | None = None,
) -> Plan:
    """Resolve every need of `settings` for `commands`, listing each repo once per revision with
    `listing(repo, revision)` (revision None: main). A ControlNet made for another family than
    the model is refused here as the loader refuses it, from the two configs."""
    from stylekit.engine.models import check_source

    unknown = sorted(set(commands) - set(COMMANDS))
    if unknown:
        raise UsageError(
            f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}"
        )
    check_source(settings.model, what="model", allow_pickle=False)
    listings: dict[tuple[str, str | None], Listing] = {}

    def listed(repo: str, revision: str | None = None) -> Listing:
        if (repo, revision) not in listings:
            listings[repo, revision] = listing(repo, revision)
        return listings[repo, revision]

    model = listed(settings.model) if hub_source(settings.model) else None
    family, turbo = detect(settings, model)
    plan = Plan([], family, turbo)
    if family is None:
        plan.notes.append(
            f"model {settings.model} is not cached: its accelerator, adapter, VAE and default "
            "ControlNets follow from its family, known once it is"
        )
    for need in needs(settings, family, turbo, commands, strengths=strengths):
        got = resolve(need, listed(need.repo, need.revision))
        if need.what == "ControlNet" and family is not None:
            check_controlnet(settings, model, listed(need.repo, need.revision), family)
        plan.resolved.append(got)
    return plan


def check_controlnet(settings: Settings, model: Listing | None, net: Listing, family: str) -> None:
    """Refuse a ControlNet whose config does not fit the model's UNet config (the loader's rule,
    `engine.models.check_controlnet_family`), where both configs are at hand."""
    from stylekit.engine.models import check_controlnet_config

    unet_path = "unet/config.json"
    if model is None:  # a local model folder
        root = Path(settings.model).expanduser()
        files = {unet_path: None} if (root / unet_path).is_file() else {}
        model = Listing(settings.model, files, lambda p: (root / p).read_text(encoding="utf-8"))
    if unet_path not in model.files:
        return
    unet = model.json(unet_path)
    if "config.json" in net.files:
        check_controlnet_config(net.json("config.json"), unet, family, net.repo)


def settings_for(preset: str | None, **flags) -> Settings:
    """The preset's settings with the flags given (None: not given)."""
    from stylekit.presets import load_preset

    return load_preset(preset).with_overrides(**flags)


# --- pull, and what is cached -----------------------------------------------------------------


def download(plan: Plan, cache: str | Path | None = None) -> None:
    """Fetch every file of `plan` into the cache, one `snapshot_download` per repo and revision
    (only the files named; those already cached are not fetched again). A revision other than
    main is cached under its own ref, where the loader's `revision=` finds it offline."""
    from huggingface_hub import snapshot_download

    from stylekit.engine.models import hub_errors

    by_repo: dict[tuple[str, str | None], list[str]] = {}
    for repo, revision, path in plan.files():
        by_repo.setdefault((repo, revision), []).append(path)
    for (repo, revision), paths in by_repo.items():
        with hub_errors("repo", repo):
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=sorted(paths),
                cache_dir=str(hub.cache_dir(cache)),
            )


@dataclass(frozen=True)
class PresetStatus:
    """A built-in preset's files in the cache: complete or not, what is missing, bytes on disk."""

    name: str
    model: str
    missing: tuple[str, ...]
    bytes: int
    model_cached: bool = True  # False: not even the model's configs, so the rest is unknown

    @property
    def complete(self) -> bool:
        return not self.missing


def preset_status(
    name: str, cache: str | Path | None = None, commands: Sequence[str] = COMMANDS
) -> PresetStatus:
    """What the cache holds of what preset `name` needs for `commands`."""
    from stylekit.presets import load_preset

    settings = load_preset(name)
    plan = resolve_all(
        settings, commands=commands, listing=lambda r, rev: cached_listing(r, rev, cache)
    )
    missing, cached = tuple(plan.missing), plan.family is not None
    return PresetStatus(name, settings.model, missing, plan.size(), model_cached=cached)


def missing_line(plan: Plan, what: str) -> str:
    """The one line an offline pull or check says when files are missing."""
    missing = plan.missing
    first = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
    return (
        f"{what}: {len(missing)} file(s) not in the Hugging Face cache ({first}); run "
        "`stylekit models pull` with the same preset and flags on a machine with network access"
    )


def plan_lines(plan: Plan, cached: Callable[[str, str | None], dict]) -> list[str]:
    """The plan for the user: each need, then its files with sizes, marked cached or to fetch."""
    lines, seen = [], set()
    for r in plan.resolved:
        need = r.need
        have = cached(need.repo, need.revision)
        variant = f", variant {need.variant}" if need.variant else ""
        revision = f", revision {need.revision}" if need.revision else ""
        lines.append(f"{need.what}: {need.repo}{variant}{revision}")
        for path, size in sorted(r.files.items()):
            if (need.repo, need.revision, path) in seen:
                continue
            seen.add((need.repo, need.revision, path))
            state = "cached" if path in have else "to fetch"
            lines.append(f"  {human(size):>9}  {state:<8}  {path}")
        lines.extend(f"  {'':>9}  missing   {path}" for path in r.missing)
    fetch = {k: v for k, v in plan.files().items() if k[2] not in cached(k[0], k[1])}
    lines.append(
        f"total {human(plan.size())} in {len(plan.files())} files; "
        f"{human(sum(v or 0 for v in fetch.values()))} in {len(fetch)} files to fetch"
    )
    lines.extend(plan.notes)
    return lines


def check_complete(plan: Plan, what: str) -> None:
    """Refuse (exit 2) a plan with missing files."""
    if plan.missing:
        raise ModelError(missing_line(plan, what))


def human(size: int | None) -> str:
    """Bytes as a short human figure (1.2 GB)."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def pull(
    settings: Settings,
    *,
    commands: Sequence[str] = COMMANDS,
    strengths: Sequence[float] | None = None,
    cache: str | Path | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> Plan:
    """Fetch what `settings` need for `commands` into the cache and check that all of it is there.

    Offline (HF_HUB_OFFLINE=1) nothing can be fetched: the cache is checked instead, and a
    missing file is a ModelError (exit 2). `dry_run` lists the files and sizes only."""

    def cached(repo: str, revision: str | None = None) -> dict:
        return hub.cached_files(repo, cache, revision)

    def from_cache(repo: str, revision: str | None) -> Listing:
        return cached_listing(repo, revision, cache)

    if hub.offline():
        plan = resolve_all(settings, commands=commands, listing=from_cache, strengths=strengths)
        for line in plan_lines(plan, cached):
            echo(line)
        check_complete(plan, f"model {settings.model} (offline: HF_HUB_OFFLINE is set)")
        echo(f"complete: {human(plan.size())} in the cache at {hub.cache_dir(cache)}")
        return plan

    def from_hub(repo: str, revision: str | None) -> Listing:
        return hub_listing(repo, revision, cache)

    plan = resolve_all(settings, commands=commands, listing=from_hub, strengths=strengths)
    if plan.missing:
        raise ModelError(
            f"not on the hub: {', '.join(plan.missing[:3])}; check the names and the variant"
        )
    for line in plan_lines(plan, cached):
        echo(line)
    if dry_run:
        return plan
    download(plan, cache)
    after = resolve_all(settings, commands=commands, listing=from_cache, strengths=strengths)
    check_complete(after, f"model {settings.model} after pulling")
    echo(f"complete: {human(after.size())} in the cache at {hub.cache_dir(cache)}")
    return after
