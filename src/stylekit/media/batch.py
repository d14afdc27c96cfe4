"""Batch inputs and outputs: collect files, name outputs, skip finished ones, write atomically.

Naming rules, shared by every command that writes images:

- Outputs go to `-o OUT`; without it, to `./stylized/` (`DEFAULT_OUT_DIR`, under the current
  folder), never next to the inputs.
- An output keeps its input's stem, plus `suffix`, plus the format's extension: `a.jpg` with
  `--format png --suffix _s` gives `a_s.png`. A folder input mirrors its tree under OUT
  (`photos/x/a.jpg` -> `OUT/x/a.png`); a glob mirrors the tree under its fixed leading folder
  (`photos/**/*.jpg` -> relative to `photos`); a single file lands at the top of OUT.
- With exactly one input and `-o` ending in .png/.jpg/.jpeg/.webp, the output is exactly that
  file, in the format its extension names; a `--format` naming another format is refused.
- Two inputs that would get the same output name never overwrite each other: the first in input
  order keeps `name.ext`, each later one gets the first free `name-1.ext`, `name-2.ext`, ...
  Names are compared case-insensitively, so the rule also holds on macOS and Windows.
- An output that would replace one of the inputs is a `UsageError` for the whole batch, raised
  before any work starts: pick another `-o` or a `--suffix`.
- Folders and `**` globs follow links to folders but enter every folder once (by device and
  inode), so a link to `.` or `..` cannot loop; a file link that loops fails alone. The output
  folder is never searched for inputs, so `-o photos/styled` with input `photos/` resumes.
- A finished output is a regular file (a folder for a folder output, e.g. video frames); anything
  else at an output path (a folder where a file goes, a FIFO, ...) fails that input, even with
  `--overwrite`, and is left alone.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO

from stylekit.errors import InputError, StylekitError, UsageError

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
    folder: bool = False  # the output is a folder (video frames), not a file


# --- collecting inputs ---------------------------------------------------------------


def collect_inputs(
    specs: list[str], *, kinds: Iterable[str] = IMAGE_EXTS, exclude: Path | None = None
) -> list[InputItem]:
    """Expand files, folders (recursive) and globs into unique input files, in a stable order.

    Specs keep the order given; the files a folder or glob yields are sorted by relative path.
    Folders and globs skip hidden entries, files whose extension is not in `kinds`, and the
    folder `exclude` (the output folder) wherever it lies below them; they follow folder links
    but enter each folder once. A file named explicitly is taken as given. The same file reached
    twice is kept once.
    """
    if not specs:
        raise UsageError("no inputs given")
    exts = {ext.lower() for ext in kinds}
    skip = {fid} if exclude is not None and (fid := _file_id(Path(exclude))) else set()
    items: list[InputItem] = []
    seen: set[Path] = set()
    for spec in specs:
        for item in _expand(spec, exts, skip):
            key = _resolved(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def _resolved(path: Path) -> Path:
    """The absolute path with links resolved as far as they go: a link that loops gets the same
    key by every route and raises nothing here (it fails alone when read)."""
    return Path(os.path.realpath(path))  # Path.resolve raises RuntimeError on a loop (3.11)


def _expand(spec: str, exts: set[str], skip: set[tuple[int, int]]) -> list[InputItem]:
    """Turn one spec into input items; a spec that yields nothing is a UsageError."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return [InputItem(path, PurePath(path.name))]
    if path.is_dir():
        items = _walk(path, exts, skip)
        empty = "folder holds no"
    elif path.is_symlink():
        raise UsageError(f"{spec}: {link_problem(path)}")
    elif glob.has_magic(spec):
        items = _glob(os.path.expanduser(spec), exts, skip)
        empty = "pattern matches no"
    else:
        raise UsageError(f"{spec}: no such file or folder")
    if not items:
        raise UsageError(f"{spec}: {empty} input files ({', '.join(sorted(exts))})")
    return items


def link_problem(path: Path) -> str:
    """Say what is wrong with a link that leads to nothing: a loop, or a missing target."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
    return "broken symbolic link (its target does not exist)"


def _tree(
    root: Path,
    skip: set[tuple[int, int]],
    *,
    hidden: bool = False,
    seen: set[tuple[int, int] | None] | None = None,
) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root)` following folder links, but entering every folder once by (device, inode),
    so links to `.` or `..` end instead of looping; folders in `skip`, and hidden ones unless
    `hidden`, are left out. Yields (folder, subfolders, files), subfolders sorted. Walks that
    share `seen` enter a folder once between them (`root` is always walked)."""
    seen = set() if seen is None else seen
    seen.add(_file_id(root))
    for folder, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirs):
            fid = _file_id(Path(folder, name))
            if name.startswith(".") and not hidden or fid is None or fid in seen or fid in skip:
                continue
            seen.add(fid)
            keep.append(name)
        dirs[:] = keep
        yield folder, keep, files


def _walk(
    root: Path, exts: set[str], skip: set[tuple[int, int]], seen: set | None = None
) -> list[InputItem]:
    """List the wanted files under `root` (see `_tree`)."""
    items = []
    for folder, _, files in _tree(root, skip, seen=seen):
        for name in files:
            if _wanted(name, exts):
                path = Path(folder, name)
                items.append(InputItem(path, PurePath(path.relative_to(root))))
    return sorted(items, key=lambda item: item.rel.as_posix())


def _glob(pattern: str, exts: set[str], skip: set[tuple[int, int]]) -> list[InputItem]:
    """List the wanted files a glob matches, relative to its leading folder without wildcards.

    A `**` pattern is matched on a `_tree` walk (Python's glob follows links into cycles);
    others, which cannot recurse, go through `glob.glob`, dropping matches in a `skip` folder.
    """
    base = _glob_base(pattern)
    if "**" in PurePath(pattern).parts:
        matches = _recursive_glob(pattern, base, skip)
    else:
        matches = [m for m in glob.glob(pattern) if not _below(Path(m), base, skip)]
    items, seen = [], set()  # matched folders (parents first) are walked once between them
    for match in sorted(matches):
        path = Path(match)
        if path.is_dir():
            found = _walk(path, exts, skip, seen)
            items += [InputItem(i.path, path.relative_to(base) / i.rel) for i in found]
        elif (path.is_file() or path.is_symlink()) and _wanted(path.name, exts):
            items.append(InputItem(path, PurePath(path.relative_to(base))))  # a loop fails alone
    return sorted(items, key=lambda item: item.rel.as_posix())


def _recursive_glob(pattern: str, base: Path, skip: set[tuple[int, int]]) -> list[str]:
    """What `glob.glob(pattern, recursive=True)` matches, found on a walk that cannot loop.

    Hidden folders are walked only when the pattern names a hidden part (wildcards skip them)."""
    rest = PurePath(pattern).parts[len(base.parts) :]
    found = [str(base)] if base.parts and _match(rest, ()) else []
    hidden = any(part.startswith(".") for part in rest)
    for folder, dirs, files in _tree(base, skip, hidden=hidden):
        rel = Path(folder).relative_to(base).parts
        found += [str(Path(folder, n)) for n in (*dirs, *files) if _match(rest, (*rel, n))]
    return found


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Glob matching of path parts: `**` takes zero or more (non-hidden) parts, as glob's does."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        deeper = bool(parts) and not parts[0].startswith(".") and _match(pattern, parts[1:])
        return _match(pattern[1:], parts) or deeper
    return bool(parts) and _match_name(pattern[0], parts[0]) and _match(pattern[1:], parts[1:])


def _match_name(pattern: str, name: str) -> bool:
    """One part: wildcards do not match hidden names unless the pattern starts with '.'."""
    if name.startswith(".") and not pattern.startswith(".") and glob.has_magic(pattern):
        return False
    return fnmatch.fnmatch(name, pattern)


def _below(path: Path, base: Path, skip: set[tuple[int, int]]) -> bool:
    """Whether `path` is or lies in a `skip` folder below `base`."""
    parts = path.relative_to(base).parts
    return bool(skip) and any(
        _file_id(base.joinpath(*parts[:n])) in skip for n in range(1, len(parts) + 1)
    )


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
        check_file_format(out, fmt)
        jobs = [Job(items[0].path, out, items[0].rel, 0)]
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"-o {out}: is a file, not a folder")
        ext = FORMAT_EXTS[output_format(fmt)]
        paths = unique_outputs(items, out, ext, suffix)
        jobs = [Job(i.path, p, i.rel, n) for n, (i, p) in enumerate(zip(items, paths, strict=True))]
    refuse_overwriting_inputs(jobs)
    return jobs


def check_file_format(out: Path, fmt: str | None) -> str:
    """The format of `-o FILE` (rejects .bmp, .gif, ...); a `--format` naming another one is a
    UsageError, not a silent choice between them."""
    named = output_format(out.suffix)
    if fmt is not None and output_format(fmt) != named:
        raise UsageError(
            f"-o {out} is a {named} file but --format is {fmt}; "
            "drop --format or give -o the extension you want"
        )
    return named


def output_root(out: Path | None) -> Path | None:
    """The folder `-o` writes into (default ./stylized), or None when it names one file."""
    out = DEFAULT_OUT_DIR if out is None else Path(out)
    return None if _names_file(out) else out


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


def split_existing(
    jobs: list[Job], *, overwrite: bool = False
) -> tuple[list[Job], list[Job], list[tuple[Job, str]]]:
    """Split jobs into (to_do, skipped, blocked).

    Skipped jobs have their finished output (a regular file; a folder for a folder job), unless
    `overwrite`; blocked ones have something else at their output path, with the reason: they
    fail, since it is neither finished work nor anything stylekit may replace.
    """
    to_do, skipped, blocked = [], [], []
    for job in jobs:
        state = output_state(job)
        if state == "missing" or (state == "done" and overwrite):
            to_do.append(job)
        elif state == "done":
            skipped.append(job)
        else:
            blocked.append((job, f"{job.output} {state}; move it away or choose another -o"))
    return to_do, skipped, blocked


def output_state(job: Job) -> str:
    """ "missing", "done" (a finished output is there), or what else is at the output path."""
    try:
        mode = job.output.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a file above it: check_writable says so
        return "missing"
    except OSError as exc:
        return f"cannot be checked ({exc.strerror or exc})"
    if job.folder:
        return "done" if stat.S_ISDIR(mode) else "exists and is not a folder"
    if stat.S_ISREG(mode):
        return "done"
    return "exists and is a folder" if stat.S_ISDIR(mode) else "exists and is not a regular file"


def check_writable(paths: Iterable[Path]) -> None:
    """Refuse outputs whose folder cannot be made or written in (UsageError), before any work.

    Each output's nearest existing folder gets a probe file, created and removed at once (the
    only check that holds for root, read-only mounts and ACLs alike).
    """
    checked: set[Path] = set()
    for path in paths:
        folder = Path(path).parent
        while not os.path.exists(folder) and folder != folder.parent:
            folder = folder.parent
        if folder in checked:
            continue
        checked.add(folder)
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {path}: {folder} is a file, not a folder")
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".stylekit-", suffix=".probe")
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            message = f"cannot write {path}: folder {folder} is not writable ({reason})"
            raise UsageError(message) from exc
        os.close(fd)
        os.unlink(probe)


# --- writing -------------------------------------------------------------------------


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a hidden temp file beside `path` and move it into place only if the block succeeds.

    Missing parent folders are created. The temp file is `.NAME.XXXXXXXX.part`; it is flushed
    and fsynced, then `os.replace`d over `path`. On any exception, KeyboardInterrupt included,
    the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_temp(path)
    except OSError as exc:  # name the folder, not the hidden temp file
        raise StylekitError(f"cannot write {path}: {_reason(exc)} (folder {path.parent})") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise StylekitError(f"cannot write {path}: {_reason(exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(exc: OSError) -> str:
    """An OS error's reason without the file names it carries, e.g. "permission denied"."""
    return (exc.strerror or type(exc).__name__).lower()


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


def stem_finder(
    mask: str | Path, *, flag: str, what: str
) -> tuple[Callable[[Job], Path], set[Path]]:
    """Return (job → its file, every such file) for one file (every job's) or a folder matched to
    the jobs by relative path, else by file stem: inpaint masks and control images. `flag` and
    `what` name them in errors."""
    path = Path(mask).expanduser()
    if path.is_file():
        return (lambda job: path), {Path(os.path.realpath(path))}
    if not path.is_dir():
        raise UsageError(f"{flag} {mask}: no such file or folder")
    try:
        items = collect_inputs([str(path)])
    except UsageError as exc:
        raise UsageError(f"{flag} {mask}: folder holds no {what} images") from exc
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for item in items:
        by_rel.setdefault(item.rel.with_suffix("").as_posix(), []).append(item.path)
        by_stem.setdefault(item.rel.stem, []).append(item.path)

    def find(job: Job) -> Path:
        found = by_rel.get(job.rel.with_suffix("").as_posix()) or by_stem.get(job.rel.stem, [])
        if not found:
            raise InputError(f"{job.input}: no {what} named {job.rel.stem}.* in {path}")
        if len(found) > 1:
            names = ", ".join(str(p) for p in found)
            raise InputError(f"{job.input}: more than one {what} matches ({names})")
        return found[0]

    return find, {Path(os.path.realpath(item.path)) for item in items}
