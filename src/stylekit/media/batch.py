"""Batch inputs and outputs: collect files, name outputs, skip finished ones, write atomically.

Naming rules, shared by every command that writes images:

- Outputs go to `-o OUT`; without it, to `./stylized/` (`DEFAULT_OUT_DIR`, under the current
  folder), never next to the inputs.
- An output keeps its input's stem, plus `suffix`, plus the format's extension: `a.jpg` with
  `--format png --suffix _s` gives `a_s.png`. A folder input mirrors its tree under OUT
  (`photos/x/a.jpg` -> `OUT/x/a.png`); a glob mirrors the tree under its fixed leading folder
  (`photos/**/*.jpg` -> relative to `photos`); a single file lands at the top of OUT.
- With exactly one input and `-o` ending in .png/.jpg/.jpeg/.webp, the output is exactly that
  file, in the format its extension names.
- Two inputs that would get the same output name never overwrite each other: the first in input
  order keeps `name.ext`, each later one gets the first free `name-1.ext`, `name-2.ext`, ...
  Names are compared case-insensitively, so the rule also holds on macOS and Windows.
- An output that would replace one of the inputs is a `UsageError` for the whole batch, raised
  before any work starts: pick another `-o` or a `--suffix`.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO

from stylekit.errors import UsageError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FORMAT_EXTS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_OUT_DIR = Path("stylized")  # a fresh folder, so outputs never mix with the inputs


@dataclass(frozen=True)
class InputItem:
    """One input file: `path` as the user named it, `rel` where its output goes under OUT."""

    path: Path
    rel: PurePath


@dataclass(frozen=True)
class Job:
    """One input file and the output file it becomes; `index` is its place in the batch."""

    input: Path
    output: Path
    rel: PurePath
    index: int


# --- collecting inputs ---------------------------------------------------------------


def collect_inputs(specs: list[str], *, kinds: Iterable[str] = IMAGE_EXTS) -> list[InputItem]:
    """Expand files, folders (recursive) and globs into unique input files, in a stable order.

    Specs keep the order given; the files a folder or glob yields are sorted by relative path.
    Folders and globs skip hidden entries and files whose extension is not in `kinds`; a file
    named explicitly is taken as given. The same file reached twice is kept once.
    """
    if not specs:
        raise UsageError("no inputs given")
    exts = {ext.lower() for ext in kinds}
    items: list[InputItem] = []
    seen: set[Path] = set()
    for spec in specs:
        for item in _expand(spec, exts):
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def _expand(spec: str, exts: set[str]) -> list[InputItem]:
    """Turn one spec into input items; a spec that yields nothing is a UsageError."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return [InputItem(path, PurePath(path.name))]
    if path.is_dir():
        items = _walk(path, exts)
        empty = "folder holds no"
    elif glob.has_magic(spec):
        items = _glob(os.path.expanduser(spec), exts)
        empty = "pattern matches no"
    else:
        raise UsageError(f"{spec}: no such file or folder")
    if not items:
        raise UsageError(f"{spec}: {empty} input files ({', '.join(sorted(exts))})")
    return items


def _walk(root: Path, exts: set[str]) -> list[InputItem]:
    """List the wanted files under `root`, skipping hidden files and folders."""
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if _wanted(name, exts):
                path = Path(folder, name)
                items.append(InputItem(path, PurePath(path.relative_to(root))))
    return sorted(items, key=lambda item: item.rel.as_posix())


def _glob(pattern: str, exts: set[str]) -> list[InputItem]:
    """List the wanted files a glob matches, relative to its leading folder without wildcards."""
    base = _glob_base(pattern)
    items = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            items += [InputItem(i.path, path.relative_to(base) / i.rel) for i in _walk(path, exts)]
        elif path.is_file() and _wanted(path.name, exts):
            items.append(InputItem(path, PurePath(path.relative_to(base))))
    return sorted(items, key=lambda item: item.rel.as_posix())


def _glob_base(pattern: str) -> Path:
    """Return the leading folders of a glob up to its first wildcard part."""
    parts = PurePath(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _wanted(name: str, exts: set[str]) -> bool:
    """Say whether a file found in a folder or glob is an input: not hidden, right extension."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in exts


# --- planning outputs ----------------------------------------------------------------


def output_format(fmt: str | None) -> str:
    """Normalize a format name to png, jpg or webp; None and "auto" mean png."""
    name = (fmt or "auto").lower().lstrip(".")
    name = {"auto": "png", "jpeg": "jpg"}.get(name, name)
    if name not in FORMAT_EXTS:
        raise UsageError(f"unknown output format {fmt!r}; use one of: png, jpg, webp")
    return name


def plan_outputs(
    items: list[InputItem],
    *,
    out: Path | None,
    fmt: str | None,
    suffix: str = "",
    single_file_ok: bool = True,
) -> list[Job]:
    """Give every input its output path under the naming rules in this module's docstring."""
    out = DEFAULT_OUT_DIR if out is None else Path(out)
    if _names_file(out):
        if not single_file_ok:
            raise UsageError(f"-o {out}: this command writes a folder; give a folder name")
        if len(items) != 1:
            raise UsageError(f"-o {out} names one file but there are {len(items)} inputs")
        output_format(out.suffix)  # rejects .bmp, .gif, ...
        jobs = [Job(items[0].path, out, items[0].rel, 0)]
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"-o {out}: is a file, not a folder")
        ext = FORMAT_EXTS[output_format(fmt)]
        paths = unique_outputs(items, out, ext, suffix)
        jobs = [Job(i.path, p, i.rel, n) for n, (i, p) in enumerate(zip(items, paths, strict=True))]
    refuse_overwriting_inputs(jobs)
    return jobs


def _names_file(out: Path) -> bool:
    """Say whether `-o` names an image file rather than a folder."""
    return out.suffix.lower() in IMAGE_EXTS and not out.is_dir()


def unique_outputs(items: list[InputItem], out: Path, ext: str, suffix: str) -> list[Path]:
    """Name each item's output under `out`; later duplicates get -1, -2, ..."""
    taken: set[str] = set()
    paths = []
    for item in items:
        stem = item.rel.parent / f"{PurePath(item.rel.name).stem}{suffix}"
        rel = PurePath(f"{stem}{ext}")
        n = 0
        while rel.as_posix().lower() in taken:
            n += 1
            rel = PurePath(f"{stem}-{n}{ext}")
        taken.add(rel.as_posix().lower())
        paths.append(out / rel)
    return paths


def refuse_overwriting_inputs(jobs: list[Job]) -> None:
    """Raise a UsageError if any output would replace any input of the batch."""
    inputs = {fid: job.input for job in jobs if (fid := _file_id(job.input))}
    clashes = [(job.output, inputs[fid]) for job in jobs if (fid := _file_id(job.output)) in inputs]
    if clashes:
        output, source = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise UsageError(
            f"output {output} would overwrite input {source}{more}; choose another -o or a --suffix"
        )


def refuse_overwriting_files(jobs: list[Job], files: Iterable[str | Path], flag: str) -> None:
    """Raise a UsageError if any output would replace one of `files` (the run's `flag` files,
    e.g. style references or masks), which would destroy what the run reads."""
    ids = {fid: Path(f) for f in files if (fid := _file_id(Path(f)))}
    for job in jobs:
        if (fid := _file_id(job.output)) in ids:
            raise UsageError(
                f"output {job.output} would overwrite {flag} {ids[fid]}; choose another -o or a --suffix"
            )


def _file_id(path: Path) -> tuple[int, int] | None:
    """Return (device, inode) of an existing file, so hard links and case variants compare equal."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def split_existing(jobs: list[Job], *, overwrite: bool = False) -> tuple[list[Job], list[Job]]:
    """Split jobs into (to_do, skipped): skipped ones already have their output file."""
    if overwrite:
        return list(jobs), []
    to_do = [job for job in jobs if not job.output.exists()]  # a file, or a folder of frames
    skipped = [job for job in jobs if job.output.exists()]
    return to_do, skipped


# --- writing -------------------------------------------------------------------------


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a hidden temp file beside `path` and move it into place only if the block succeeds.

    Missing parent folders are created. The temp file is `.NAME.XXXXXXXX.part`; it is flushed
    and fsynced, then `os.replace`d over `path`. On any exception, KeyboardInterrupt included,
    the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a new hidden `.part` file beside `path` with the usual permissions (umask applies)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


# --- reporting -----------------------------------------------------------------------


@dataclass
class BatchReport:
    """What happened to each job of a batch: done, skipped (output existed) or failed (why)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def add_done(self, job: Job) -> None:
        """Record a job whose output was written."""
        self.done.append(job.output)

    def add_skipped(self, job: Job) -> None:
        """Record a job left alone because its output already existed."""
        self.skipped.append(job.output)

    def add_failed(self, job: Job, reason: str | BaseException) -> None:
        """Record a job that failed, with a one-line reason."""
        text = str(reason) or type(reason).__name__
        self.failed.append((job.input if job.input is not None else job.output, text))

    def summary(self) -> str:
        """Return e.g. "3 done, 1 skipped, 2 failed"."""
        return f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"

    def exit_code(self) -> int:
        """Return 0 when nothing failed (skips are fine), else 1."""
        return 1 if self.failed else 0
