"""The Hugging Face cache read directly: which files of a hub repo are there, with no network.

The cache keeps one folder per repo, `CACHE/models--owner--name/`, with `refs/main` (the commit
the `main` branch pointed at when last fetched; another revision's ref under its own name, so a
pull request's `refs/pr/4` is the file `refs/refs/pr/4`) and `snapshots/<commit>/<path>` (links into
`blobs/`, or plain files). `HF_HUB_CACHE` (or `HF_HOME/hub`) says where CACHE is.
"""

from __future__ import annotations

import os
from pathlib import Path

LORA_WEIGHT = "pytorch_lora_weights.safetensors"  # the name diffusers saves a LoRA under


def cache_dir(path: str | Path | None = None) -> Path:
    """The hub cache folder: `path` if given, else huggingface_hub's (HF_HUB_CACHE, HF_HOME)."""
    if path is not None:
        return Path(path).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE=1): only the cache is read."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo: str, cache: str | Path | None = None) -> Path:
    """The cache folder of a model repo `owner/name`."""
    return cache_dir(cache) / ("models--" + repo.replace("/", "--"))


def snapshot(
    repo: str, cache: str | Path | None = None, revision: str | None = "main"
) -> Path | None:
    """The cached snapshot folder `revision` (None: main; a branch, a ref such as `refs/pr/4`,
    or a commit) points at, or None when the repo is not cached at that revision."""
    revision = revision or "main"
    folder = repo_folder(repo, cache)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    path = folder / "snapshots" / commit
    return path if path.is_dir() else None


def cached_files(
    repo: str, cache: str | Path | None = None, revision: str | None = None
) -> dict[str, int]:
    """Every complete file of the repo's cached snapshot of `revision` (None: main): its path in
    the repo → bytes.

    A link whose blob is gone (a cleaned cache) is left out: the file is not there to load."""
    root = snapshot(repo, cache, revision)
    if root is None:
        return {}
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file():  # follows the link into blobs/
                files[path.relative_to(root).as_posix()] = path.stat().st_size
    return files


def lora_weight(files: list[str] | dict) -> str | None:
    """The LoRA file diffusers loads from a repo named without a file: a top-level
    `.safetensors`, `pytorch_lora_weights.safetensors` if there is one; None if there is none."""
    top = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    top = [f for f in top if not any(s in f for s in ("scheduler", "optimizer", "checkpoint"))]
    if LORA_WEIGHT in top:
        return LORA_WEIGHT
    return top[0] if top else None


def cached_lora_weight(repo: str, cache: str | Path | None = None) -> str | None:
    """`lora_weight` of the cached snapshot: offline, diffusers cannot list the repo to guess."""
    return lora_weight(cached_files(repo, cache))
