"""`stylekit models pull|list` against a Hugging Face cache built by hand (no download).

The cache layout is huggingface_hub's: `models--owner--name/refs/main` holds a commit, the files
live under `snapshots/<commit>/`. The tests run offline (conftest sets HF_HUB_OFFLINE=1), where
`pull` checks the cache instead of fetching; which files it asks for is checked against
diffusers' own choice for `from_pretrained(variant=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from stylekit import hubfiles
from stylekit.cli import app
from stylekit.engine import hub
from stylekit.presets import load_preset

RUNNER = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PR4 = "fedcba9876543210fedcba9876543210fedcba98"  # the commit refs/pr/4 points at
COMMITS = {None: COMMIT, "refs/pr/4": PR4}
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def put(
    cache: Path,
    repo: str,
    files: dict[str, str | bytes],
    revision: str | None = None,
    commit: str = COMMIT,
) -> Path:
    """Write `files` into the cache as the snapshot of `repo` at `revision` (None: main), the
    ref kept under its own name as huggingface_hub does (`refs/refs/pr/4`); return it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / (revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    snap = folder / "snapshots" / commit
    for path, data in files.items():
        target = snap / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())
    return snap


def sd15_repo(*, fp16: bool = True) -> dict[str, str | bytes]:
    """An SD1.5 pipeline repo as released: every component, fp16 and full weights."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
    }
    files: dict[str, str | bytes] = {
        "model_index.json": json.dumps(index),
        "v1-5-pruned-emaonly.safetensors": b"w" * 50,
        "README.md": "x",
        "feature_extractor/preprocessor_config.json": "{}",
        "scheduler/scheduler_config.json": "{}",
        "tokenizer/merges.txt": "",
        "tokenizer/vocab.json": "{}",
        "tokenizer/special_tokens_map.json": "{}",
        "tokenizer/tokenizer_config.json": "{}",
        "unet/config.json": json.dumps({"cross_attention_dim": 768}),
        "vae/config.json": "{}",
        "text_encoder/config.json": "{}",
        "safety_checker/config.json": "{}",
        "safety_checker/model.safetensors": b"s" * 7,
    }
    for folder, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        files[f"{folder}/{stem}.safetensors"] = b"f" * 40
        files[f"{folder}/{stem}.bin"] = b"b" * 40
        if fp16:
            files[f"{folder}/{stem}.fp16.safetensors"] = b"h" * 20
    files["text_encoder/model.safetensors"] = b"f" * 30
    files["text_encoder/pytorch_model.bin"] = b"b" * 30
    if fp16:
        files["text_encoder/model.fp16.safetensors"] = b"h" * 15
    return files


def fill_lcm_sd15(cache: Path) -> None:
    """Everything preset lcm-sd15 needs: SD1.5 (fp16), LCM-LoRA, IP-Adapter SD1.5 + ViT-H."""
    put(cache, SD15, sd15_repo())
    put(cache, "latent-consistency/lcm-lora-sdv1-5", {"pytorch_lora_weights.safetensors": b"l"})
    put(
        cache,
        "h94/IP-Adapter",
        {
            "models/ip-adapter_sd15.safetensors": b"a" * 3,
            "models/image_encoder/config.json": "{}",
            "models/image_encoder/model.safetensors": b"e" * 5,
            "sdxl_models/ip-adapter_sdxl.safetensors": b"unused",
        },
    )


def models(*args: str):
    return RUNNER.invoke(app, ["models", *args])


def test_pull_offline_complete_lists_every_file_and_exits_0(tmp_path):
    fill_lcm_sd15(tmp_path)
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for path in (
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "pytorch_lora_weights.safetensors",
        "models/ip-adapter_sd15.safetensors",
        "models/image_encoder/model.safetensors",
    ):
        assert path in out
    # the full weights, the safety checker and the single-file checkpoint are never loaded
    for path in ("unet/diffusion_pytorch_model.safetensors", "safety_checker", "v1-5-pruned"):
        assert path not in out
    assert "complete" in out


def test_pull_offline_missing_is_one_line_and_exit_2(tmp_path):
    fill_lcm_sd15(tmp_path)
    snap = hub.snapshot(SD15, tmp_path)
    (snap / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    (snap / "unet/diffusion_pytorch_model.safetensors").unlink()
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{SD15}/unet/diffusion_pytorch_model.fp16.safetensors" in lines[0]
    assert "stylekit models pull" in lines[0]
    assert "Traceback" not in result.output


def test_full_weights_stand_in_for_a_missing_variant(tmp_path):
    """diffusers loads a component's full weights where it has no fp16 file."""
    fill_lcm_sd15(tmp_path)
    snap = hub.snapshot(SD15, tmp_path)
    (snap / "vae/diffusion_pytorch_model.fp16.safetensors").unlink()
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    assert "vae/diffusion_pytorch_model.safetensors" in result.stdout


def test_pull_offline_without_the_adapter_when_the_command_does_not_use_it(tmp_path):
    fill_lcm_sd15(tmp_path)
    (hub.snapshot("h94/IP-Adapter", tmp_path) / "models/ip-adapter_sd15.safetensors").unlink()
    assert models("pull", "lcm-sd15", "--cache-dir", str(tmp_path)).exit_code == 2
    textures = models("pull", "lcm-sd15", "--command", "texture", "--cache-dir", str(tmp_path))
    assert textures.exit_code == 0, textures.stderr
    assert "IP-Adapter" not in textures.stdout


def test_list_shows_complete_and_missing_presets_and_disk_used(tmp_path):
    fill_lcm_sd15(tmp_path)
    result = models("list", "--cache-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["preset"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"animatediff-sd15", "animatelcm-sd15", "lcm-sd15", "sd-turbo", "std-sdxl"}
    assert rows["lcm-sd15"]["complete"] and rows["lcm-sd15"]["missing"] == []
    # fp16 unet 20 + vae 20 + text encoder 15 + LoRA 1 + adapter 3 + encoder 5, and the configs
    configs = sum(
        len(v if isinstance(v, bytes) else v.encode())
        for k, v in sd15_repo().items()
        if k.endswith((".json", ".txt")) and not k.startswith("safety_checker")
    )
    assert (
        rows["lcm-sd15"]["bytes"] == 20 + 20 + 15 + 1 + 3 + 5 + configs + 2
    )  # + 2: image encoder config
    assert not rows["std-sdxl"]["complete"]
    assert rows["std-sdxl"]["missing"] == [
        "stabilityai/stable-diffusion-xl-base-1.0/model_index.json"
    ]
    text = models("list", "--cache-dir", str(tmp_path))
    assert text.exit_code == 0
    assert "lcm-sd15     complete" in text.stdout
    assert "std-sdxl     model not cached" in text.stdout


def sdxl_index() -> str:
    return json.dumps(
        {
            "_class_name": "StableDiffusionXLPipeline",
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    )


def test_std_sdxl_needs_one_std_lora_per_eta_and_the_vit_h_encoder(tmp_path):
    """std-sdxl's image commands may pick any released η; from noise TCD-LoRA (its sampler)."""
    put(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0", {"model_index.json": sdxl_index()})
    plan = hubfiles.resolve_all(
        load_preset("std-sdxl"), listing=lambda r, rev: hubfiles.cached_listing(r, rev, tmp_path)
    )
    assert plan.family == "sdxl"
    missing = set(plan.missing)
    for eta in ("0.65", "0.75", "0.85", "0.95"):
        assert (
            f"SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta{eta}.safetensors"
            in missing
        )
    assert "h1t/TCD-SDXL-LoRA/a top-level .safetensors LoRA file" in missing
    assert "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors" in missing
    assert "h94/IP-Adapter/models/image_encoder/config.json" in missing
    one = hubfiles.resolve_all(
        load_preset("std-sdxl"),
        commands=["stylize"],
        strengths=[0.6],
        listing=lambda r, rev: hubfiles.cached_listing(r, rev, tmp_path),
    )
    stds = [m for m in one.missing if "std_sdxl" in m]
    assert stds == ["SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.65.safetensors"]
    assert not any("TCD" in m for m in one.missing)


def test_turbo_preset_needs_no_accelerator_or_adapter(tmp_path):
    plan = hubfiles.resolve_all(
        load_preset("sd-turbo"), listing=lambda r, rev: hubfiles.cached_listing(r, rev, tmp_path)
    )
    assert [r.need.what for r in plan.resolved] == ["model"]


def test_a_motion_preset_needs_its_motion_adapter_and_lora_for_video_only(tmp_path):
    """animatelcm-sd15: the AnimateLCM adapter folder (config and weights) and its LoRA file
    for `video`; an image command loads no motion adapter, so does not need it."""
    fill_lcm_sd15(tmp_path)

    def plan(commands):
        return hubfiles.resolve_all(
            load_preset("animatelcm-sd15"),
            commands=commands,
            listing=lambda r, rev: hubfiles.cached_listing(r, rev, tmp_path),
        )

    lora = "wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors"
    video = plan(["video"])
    assert [r.need.what for r in video.resolved] == [
        "model",
        "LoRA",
        "IP-Adapter",
        "image encoder",
        "motion adapter",
    ]
    assert "wangfuyun/AnimateLCM/config.json" in video.missing and lora in video.missing
    assert "motion adapter" not in [r.need.what for r in plan(["stylize"]).resolved]
    put(
        tmp_path,
        "wangfuyun/AnimateLCM",
        {
            "config.json": "{}",
            "diffusion_pytorch_model.safetensors": b"m",
            "AnimateLCM_sd15_t2v_lora.safetensors": b"l",
            "AnimateLCM_sd15_t2v.ckpt": b"unused",
        },
    )
    again = plan(["video"])
    assert again.missing == []
    got = {path for repo, _, path in again.files() if repo == "wangfuyun/AnimateLCM"}
    assert got == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "AnimateLCM_sd15_t2v_lora.safetensors",
    }


def test_tiny_vae_and_lora_flags_add_their_repos(tmp_path):
    fill_lcm_sd15(tmp_path)
    result = models(
        "pull",
        "lcm-sd15",
        "--tiny-vae",
        "--lora",
        "someone/style-lora/style.safetensors:0.8",
        "--cache-dir",
        str(tmp_path),
    )
    assert result.exit_code == 2
    assert "someone/style-lora/style.safetensors" in result.stderr
    assert "tiny VAE: madebyollin/taesd" in result.stdout
    assert "missing   diffusion_pytorch_model.safetensors" in result.stdout
    put(
        tmp_path,
        "madebyollin/taesd",
        {"config.json": "{}", "diffusion_pytorch_model.safetensors": b"t"},
    )
    put(tmp_path, "someone/style-lora", {"style.safetensors": b"s"})
    again = models(
        "pull",
        "lcm-sd15",
        "--tiny-vae",
        "--lora",
        "someone/style-lora/style.safetensors:0.8",
        "--cache-dir",
        str(tmp_path),
    )
    assert again.exit_code == 0, again.stderr


def test_lora_without_a_file_name_loads_offline_from_the_cache(tmp_path, monkeypatch):
    """Offline, diffusers cannot list a repo to guess its LoRA file: the loader names it."""
    put(
        tmp_path,
        "latent-consistency/lcm-lora-sdv1-5",
        {"README.md": "", "pytorch_lora_weights.safetensors": b"l"},
    )
    assert hub.cached_lora_weight("latent-consistency/lcm-lora-sdv1-5", tmp_path) == (
        "pytorch_lora_weights.safetensors"
    )
    assert (
        hub.lora_weight(["b.safetensors", "a.safetensors", "sub/x.safetensors"]) == "a.safetensors"
    )
    assert hub.lora_weight(["README.md"]) is None


@pytest.mark.parametrize("variant", ["fp16", None])
def test_pipeline_files_match_what_diffusers_downloads(tmp_path, monkeypatch, variant):
    """Parity: the files `pull` fetches for a pipeline are the ones diffusers' own
    `download(variant=..., use_safetensors=True, safety_checker=None)` asks the hub for."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines import pipeline_utils
    from huggingface_hub.utils import filter_repo_objects

    repo = sd15_repo()
    index = tmp_path / "model_index.json"
    index.write_text(repo["model_index.json"])
    asked = {}

    class Asked(Exception):
        pass

    def snapshot_download(name, **kwargs):
        asked.update(kwargs)
        raise Asked

    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in repo])
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: info)
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda *a, **k: str(index))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
    with pytest.raises(Asked):
        StableDiffusionImg2ImgPipeline.download(
            SD15, variant=variant, use_safetensors=True, safety_checker=None
        )
    theirs = set(
        filter_repo_objects(
            list(repo),
            allow_patterns=asked["allow_patterns"],
            ignore_patterns=asked["ignore_patterns"],
        )
    )
    listing = hubfiles.Listing(SD15, {k: len(v) for k, v in repo.items()}, lambda p: repo[p])
    ours = hubfiles.resolve(hubfiles.Need(SD15, "model", "pipeline", variant=variant), listing)
    assert ours.missing == []
    assert set(ours.files) == theirs


def test_an_accelerator_repo_without_a_file_name_loads_offline(
    tmp_path, monkeypatch, sd15_path, sd15_lora
):
    """The run after `pull`: HF_HUB_OFFLINE=1, a LoRA repo named without its file (as
    LCM-LoRA and TCD-LoRA are), found in the cache and fused."""
    import torch
    from huggingface_hub import constants

    from stylekit.engine import models

    put(tmp_path, "someone/fast-lora", {"pytorch_lora_weights.safetensors": sd15_lora.read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    spec = models.ModelSpec(str(sd15_path), accelerator="none", device="cpu", dtype="fp32")
    plain = models.load(spec)
    fused = models.load(
        models.ModelSpec(
            str(sd15_path), accelerator="someone/fast-lora", device="cpu", dtype="fp32"
        )
    )
    assert fused.accelerator == "someone/fast-lora"
    changed = [
        not torch.equal(a, b)
        for a, b in zip(
            plain.unet.state_dict().values(), fused.unet.state_dict().values(), strict=True
        )
    ]
    assert any(changed)


class FakeHub:
    """The hub's side of `pull`, in memory: repo listings, single-file and snapshot downloads
    (written into the cache the way huggingface_hub lays it out)."""

    def __init__(self, repos: dict[str, dict[str, str | bytes]]):
        self.repos, self.snapshots = repos, []

    def api(self):
        from huggingface_hub.errors import RepositoryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        hub_ = self

        class Api:
            def list_repo_tree(self, repo, recursive=False, revision=None, **kw):
                if hub_.key(repo, revision) not in hub_.repos:
                    raise RepositoryNotFoundError(f"404: {repo}")
                for path, data in hub_.repos[hub_.key(repo, revision)].items():
                    yield RepoFile(path=path, size=len(data), oid="0")

        return Api

    @staticmethod
    def key(repo, revision):
        """A repo's files at a revision other than main are held as `repo@revision`."""
        return f"{repo}@{revision}" if revision else repo

    def files(self, repo, revision, paths):
        return {p: self.repos[self.key(repo, revision)][p] for p in paths}

    def hf_hub_download(self, repo, path, cache_dir=None, revision=None, **kw):
        snap = put(
            Path(cache_dir), repo, self.files(repo, revision, [path]), revision, COMMITS[revision]
        )
        return str(snap / path)

    def snapshot_download(self, repo, allow_patterns=None, cache_dir=None, revision=None, **kw):
        self.snapshots.append((self.key(repo, revision), sorted(allow_patterns)))
        files = self.files(repo, revision, allow_patterns)
        put(Path(cache_dir), repo, files, revision, COMMITS[revision])
        return str(hub.snapshot(repo, cache_dir, revision))


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub answering from a FakeHub holding what lcm-sd15 needs, not offline."""
    import huggingface_hub
    from huggingface_hub import constants

    repos = {
        SD15: sd15_repo(),
        "latent-consistency/lcm-lora-sdv1-5": {
            "README.md": "",
            "pytorch_lora_weights.safetensors": b"l" * 9,
        },
        "h94/IP-Adapter": {
            "models/ip-adapter_sd15.safetensors": b"a" * 3,
            "models/image_encoder/config.json": "{}",
            "models/image_encoder/model.safetensors": b"e" * 5,
            "models/image_encoder/pytorch_model.bin": b"e" * 5,
            "sdxl_models/ip-adapter_sdxl.safetensors": b"unused",
        },
    }
    fake = FakeHub(repos)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_pull_fetches_exactly_the_needed_files_per_repo(tmp_path, online):
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    fetched = dict(online.snapshots)
    assert fetched["h94/IP-Adapter"] == [
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",
        "models/ip-adapter_sd15.safetensors",
    ]
    assert fetched["latent-consistency/lcm-lora-sdv1-5"] == ["pytorch_lora_weights.safetensors"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched[SD15]
    assert not any(
        "safety_checker" in p or p.endswith((".bin", "model.safetensors")) and "fp16" not in p
        for p in fetched[SD15]
    )
    assert "9 B  to fetch  pytorch_lora_weights.safetensors" in result.stdout
    assert "complete:" in result.stdout
    assert hubfiles.preset_status("lcm-sd15", tmp_path).complete  # what an offline run finds


def test_dry_run_lists_sizes_and_fetches_no_weights(tmp_path, online):
    result = models("pull", "lcm-sd15", "--dry-run", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert online.snapshots == []
    assert "20 B  to fetch  unet/diffusion_pytorch_model.fp16.safetensors" in result.stdout
    assert "total " in result.stdout
    assert not hub.cached_files("h94/IP-Adapter", tmp_path)


def test_a_file_the_hub_lacks_is_one_line_and_exit_2(tmp_path, online):
    del online.repos["h94/IP-Adapter"]["models/ip-adapter_sd15.safetensors"]
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "not on the hub: h94/IP-Adapter/models/ip-adapter_sd15.safetensors" in result.stderr
    assert online.snapshots == []


def test_a_corrupt_cached_config_is_named(tmp_path):
    fill_lcm_sd15(tmp_path)
    (hub.snapshot(SD15, tmp_path) / "model_index.json").write_text("{not json")
    result = models("pull", "lcm-sd15", "--cache-dir", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert f"{SD15}/model_index.json: not readable JSON" in result.stderr


# --- structure control: ControlNets and the depth model ------------------------------------------

CANNY = "lllyasviel/control_v11p_sd15_canny"
TILE = "lllyasviel/control_v11f1e_sd15_tile"  # its safetensors weights are on refs/pr/4 only
DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def controlnet_repo(width: int = 768, *, fp16: bool = True) -> dict[str, str | bytes]:
    """A ControlNet repo as released: config, full (and fp16) safetensors and .bin weights."""
    config = {"_class_name": "ControlNetModel", "cross_attention_dim": width}
    if width == 2048:
        config["addition_embed_type"] = "text_time"
    files: dict[str, str | bytes] = {
        "config.json": json.dumps(config),
        "diffusion_pytorch_model.safetensors": b"c" * 60,
        "diffusion_pytorch_model.bin": b"b" * 60,
        "README.md": "",
    }
    if fp16:
        files["diffusion_pytorch_model.fp16.safetensors"] = b"h" * 30
    return files


def depth_repo() -> dict[str, str | bytes]:
    return {
        "config.json": "{}",
        "model.safetensors": b"d" * 11,
        "preprocessor_config.json": "{}",
        "README.md": "",
    }


def pull_sd15(cache: Path, *flags: str):
    return models("pull", "lcm-sd15", "--command", "stylize", *flags, "--cache-dir", str(cache))


def test_control_canny_pulls_the_sd15_canny_controlnet(tmp_path):
    fill_lcm_sd15(tmp_path)
    missing = pull_sd15(tmp_path, "--control", "canny")
    assert missing.exit_code == 2
    assert f"{CANNY}/config.json" in missing.stderr
    assert missing.stderr.count("\n") == 1
    put(tmp_path, CANNY, controlnet_repo())
    result = pull_sd15(tmp_path, "--control", "canny:0.7")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"ControlNet: {CANNY}, variant fp16" in out
    assert "cached    diffusion_pytorch_model.fp16.safetensors" in out
    assert "diffusion_pytorch_model.safetensors" not in out  # the variant stands in for it
    assert "depth model" not in out


def test_a_preset_with_controls_names_its_controlnet_in_models_list_too(tmp_path):
    """A preset file may set controls: its plan (pull, doctor, list) holds their ControlNets."""
    preset = tmp_path / "edges.toml"
    preset.write_text(
        'model = "stable-diffusion-v1-5/stable-diffusion-v1-5"\nvariant = "fp16"\n'
        'accelerator = "auto"\nscheduler = "lcm"\nstyle_mode = "ad"\ncontrols = ["canny"]\n'
    )
    cache = tmp_path / "cache"
    fill_lcm_sd15(cache)
    plan = hubfiles.resolve_all(
        load_preset(str(preset)), listing=lambda r, rev: hubfiles.cached_listing(r, rev, cache)
    )
    assert plan.missing == [
        f"{CANNY}/config.json",
        f"{CANNY}/diffusion_pytorch_model.fp16.safetensors",
    ]
    put(cache, CANNY, controlnet_repo(fp16=False))  # no fp16 file: the full weights, as loaded
    result = models("pull", str(preset), "--cache-dir", str(cache))
    assert result.exit_code == 0, result.stderr
    assert "cached    diffusion_pytorch_model.safetensors" in result.stdout
    assert "pytorch_model.bin" not in result.stdout


def test_control_tile_needs_its_refs_pr_4_revision(tmp_path):
    """SD1.5's tile ControlNet loads at revision refs/pr/4: main does not count offline."""
    fill_lcm_sd15(tmp_path)
    put(tmp_path, TILE, controlnet_repo(fp16=False))  # main only
    result = pull_sd15(tmp_path, "--control", "tile")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{TILE}/config.json (revision refs/pr/4)" in lines[0]
    assert f"ControlNet: {TILE}, variant fp16, revision refs/pr/4" in result.stdout
    put(tmp_path, TILE, controlnet_repo(fp16=False), revision="refs/pr/4", commit=PR4)
    assert (tmp_path / f"models--{TILE.replace('/', '--')}/refs/refs/pr/4").read_text() == PR4
    again = pull_sd15(tmp_path, "--control", "tile")
    assert again.exit_code == 0, again.stderr
    assert "complete" in again.stdout


def test_computed_depth_needs_the_depth_model_a_given_map_does_not(tmp_path):
    fill_lcm_sd15(tmp_path)
    put(tmp_path, "lllyasviel/control_v11f1p_sd15_depth", controlnet_repo())
    computed = pull_sd15(tmp_path, "--control", "depth")
    assert computed.exit_code == 2
    assert f"depth model: {DEPTH_MODEL}" in computed.stdout
    for path in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert f"missing   {path}" in computed.stdout
    put(tmp_path, DEPTH_MODEL, depth_repo())
    assert pull_sd15(tmp_path, "--control", "depth").exit_code == 0
    other = pull_sd15(tmp_path, "--control", "depth", "--depth-model", "someone/depth")
    assert other.exit_code == 2
    assert "someone/depth/config.json" in other.stderr
    given = ("--control", "depth", "--depth-model", "someone/depth", "--control-image", "maps/")
    mapped = pull_sd15(tmp_path, *given)
    assert mapped.exit_code == 0, mapped.stderr
    assert "depth model" not in mapped.stdout
    assert "ControlNet: lllyasviel/control_v11f1p_sd15_depth" in mapped.stdout
    # t2i-styled reads a given map only: no depth model whatever the flags
    t2i = models(
        "pull", "lcm-sd15", "--command", "t2i-styled", "--control", "depth",
        "--depth-model", "someone/depth", "--cache-dir", str(tmp_path),
    )  # fmt: skip
    assert t2i.exit_code == 0, t2i.stderr


def test_a_controlnet_for_another_family_is_refused_as_the_loader_refuses_it(tmp_path):
    fill_lcm_sd15(tmp_path)
    sdxl_net = "diffusers/controlnet-canny-sdxl-1.0"
    put(tmp_path, sdxl_net, controlnet_repo(2048))
    result = pull_sd15(tmp_path, "--control", "canny", "--controlnet", sdxl_net)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"ControlNet {sdxl_net} is for sdxl models" in lines[0]
    assert "the model is sd15" in lines[0]
    wrong = pull_sd15(tmp_path, "--control", "canny", "--controlnet", "a/b", "--controlnet", "c/d")
    assert wrong.exit_code == 2
    assert "--controlnet given 2 time(s) for 1 control(s)" in wrong.stderr


def test_sd2_without_a_controlnet_is_the_loaders_usage_error(tmp_path):
    put(
        tmp_path,
        "stabilityai/sd-turbo",
        {
            "model_index.json": json.dumps({}),
            "unet/config.json": json.dumps({"cross_attention_dim": 1024}),
        },
    )
    result = models("pull", "sd-turbo", "--control", "canny", "--cache-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "no default canny ControlNet for SD 2.x models" in result.stderr


def test_pull_fetches_the_tile_controlnet_at_its_revision(tmp_path, online):
    """Online: the tile net is listed and fetched at refs/pr/4 and cached under that ref, where
    an offline run (and `models list`) finds it; main's .bin-only tree is never asked for."""
    online.repos[TILE] = {"config.json": "{}", "diffusion_pytorch_model.bin": b"b"}
    online.repos[f"{TILE}@refs/pr/4"] = controlnet_repo(fp16=False)
    result = pull_sd15(tmp_path, "--control", "tile")
    assert result.exit_code == 0, result.output
    fetched = dict(online.snapshots)
    assert fetched[f"{TILE}@refs/pr/4"] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert TILE not in fetched
    assert hub.snapshot(TILE, tmp_path, "refs/pr/4").parent.name == "snapshots"
    assert hub.snapshot(TILE, tmp_path, "refs/pr/4").name == PR4
    assert hub.snapshot(TILE, tmp_path) is None  # main was never cached


def test_the_loader_finds_offline_exactly_the_controlnet_files_pull_fetched(
    tmp_path, monkeypatch, sd15_path, sd15_controlnet
):
    """Parity with the loader: only the files the plan names, cached at refs/pr/4, and
    `models.load_controlnet(revision="refs/pr/4", variant="fp16")` loads them offline."""
    import torch
    from diffusers import ControlNetModel
    from huggingface_hub import constants

    from stylekit.engine import models

    folder = Path(sd15_controlnet)
    repo_files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    repo_files["diffusion_pytorch_model.bin"] = b"never loaded"
    listing = hubfiles.Listing(
        TILE, {k: len(v) for k, v in repo_files.items()}, lambda p: repo_files[p].decode()
    )
    need = hubfiles.Need(TILE, "ControlNet", "diffusers", variant="fp16", revision="refs/pr/4")
    got = hubfiles.resolve(need, listing)
    assert got.missing == [] and set(got.files) == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    put(tmp_path, TILE, {p: repo_files[p] for p in got.files}, revision="refs/pr/4", commit=PR4)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = models.load(
        models.ModelSpec(str(sd15_path), accelerator="none", device="cpu", dtype="fp32")
    )
    net = models.load_controlnet(model, TILE, revision="refs/pr/4", variant="fp16")
    want = ControlNetModel.from_pretrained(folder)
    for (name, a), b in zip(net.state_dict().items(), want.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_depth_pipeline_finds_offline_exactly_the_files_pull_fetched(
    tmp_path, monkeypatch, depth_model_path
):
    """Parity with transformers: the depth model's planned files (config, weights, processor
    config), alone in the cache, load through `models.load_depth_estimator` offline."""
    import torch
    from huggingface_hub import constants
    from PIL import Image

    from stylekit.engine import models

    folder = Path(depth_model_path)
    repo_files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    listing = hubfiles.Listing(
        DEPTH_MODEL, {k: len(v) for k, v in repo_files.items()}, lambda p: repo_files[p].decode()
    )
    settings = load_preset("lcm-sd15").with_overrides(controls=("depth",))
    need = next(
        n for n in hubfiles.needs(settings, "sd15", False, ["stylize"]) if n.what == "depth model"
    )
    got = hubfiles.resolve(need, listing)
    assert got.missing == []
    assert set(got.files) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    put(tmp_path, DEPTH_MODEL, {p: repo_files[p] for p in got.files})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    estimator = models.load_depth_estimator(DEPTH_MODEL, torch.device("cpu"))
    depth = estimator(Image.new("RGB", (56, 56), "gray"))["depth"]
    assert depth.size == (56, 56)
