"""`stylekit sweep`: one input under a grid of settings, one contact sheet to choose from by eye.

    stylekit sweep photo.jpg --vary strength=0.4,0.6,0.8 --vary style_scale=0.5,1.0 -o sheet.png

The first `--vary` runs across the columns, the second down the rows, a third makes one sheet per
value. Every cell is the very run `stylekit stylize` (or `t2i-styled`, `texture-expand`) makes
with those settings, written with its metadata to a folder beside the sheet (`sheet/`, with
`cells.json` indexing them), so a rerun skips the cells already there.

The cells share one loaded model (`session.ModelPool`): only the keys that change what is loaded
(LOAD_KEYS) make a new load, and the cells are run grouped by them so each model loads once.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from PIL import Image

from stylekit.errors import UsageError
from stylekit.media.batch import BatchReport, Job, output_format
from stylekit.presets import Settings, load_preset
from stylekit.runner import Events, Output, Record, base_seed
from stylekit.session import ModelPool, Runtime

COMMANDS = ("stylize", "t2i-styled", "texture-expand")
ALIASES = {"lora": "loras", "adain": "ad_adain"}  # flag names → Settings fields
# Keys that change what `models.load` builds: a new value may mean a new load (strength and
# scheduler only through the accelerator they pick, style_mode by turning IP-Adapter on or off).
LOAD_KEYS = (
    "model",
    "variant",
    "turbo",
    "loras",
    "accelerator",
    "vae",
    "tiny_vae",
    "tiny_vae_model",
    "ip_adapter",
    "image_encoder",
    "style_mode",
    "mode",
    "scheduler",
    "strength",
)
MAX_AXES = 3
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Axis:
    """One varied setting and its values, in the order given."""

    key: str
    values: tuple

    def label(self, value) -> str:
        return f"{self.key} = {show(value)}"


def show(value) -> str:
    """A value as the sheet writes it: numbers short, None as none, long text cut."""
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ", ".join(map(show, value))
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if len(text) <= 40:
        return text
    return "…" + text[-39:] if "/" in text else text[:39] + "…"  # a path's end names it


def kinds() -> dict[str, str]:
    """Each key a sweep may vary → its type as text: every Settings field, and the seed."""
    return {f.name: str(f.type) for f in fields(Settings)} | {"seed": "int"}


def parse_axis(text: str) -> Axis:
    """`KEY=V1,V2,...` (or `KEY=V1|V2` when values hold commas, as prompts may)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    key = ALIASES.get(key, key)
    if not sep or not raw.strip():
        raise UsageError(f"--vary {text}: expected KEY=V1,V2,... (e.g. strength=0.4,0.6)")
    known = kinds()
    if key not in known:
        raise UsageError(
            f"--vary {text}: unknown key {key!r}; any setting or seed: {', '.join(known)}"
        )
    parts = raw.split("|") if "|" in raw else raw.split(",")
    values = tuple(coerce(key, v.strip(), known[key]) for v in parts)
    if len(set(values)) != len(values):
        raise UsageError(f"--vary {text}: a value is given twice")
    return Axis(key, values)


def coerce(key: str, text: str, kind: str):
    """One `--vary` value as its setting's type; a bad one names the key and the value."""
    if "None" in kind and text.lower() == "none":
        return None
    try:
        if kind.startswith("tuple"):
            return () if text.lower() == "none" else (text,)
        if kind.startswith("bool"):
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise UsageError(f"--vary {key}: {text!r} is not a {kind.split(' ')[0]}") from None
    return text


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its values, its place (sheet page, row, column) and its file."""

    values: dict
    page: int
    row: int
    col: int
    path: Path


@dataclass
class SweepReport:
    """The cells' outcome (a BatchReport), the sheets written and the model loads made."""

    cells: BatchReport = field(default_factory=BatchReport)
    sheets: list[Path] = field(default_factory=list)
    loads: int = 0

    def exit_code(self) -> int:
        return self.cells.exit_code()

    def summary(self) -> str:
        return f"{self.cells.summary()} (cells); {self.loads} model load(s)"


def slug(value) -> str:
    """A value as part of a file name."""
    text = re.sub(r"[^\w.+-]+", "-", show(value)).strip("-")
    return text[:32] or "x"


def plan_cells(axes: Sequence[Axis], sheet: Path) -> list[Cell]:
    """Every combination of the axes' values, in sheet order, with its file in `sheet`'s folder."""
    folder = cells_folder(sheet)
    cols, rows, pages = (list(a.values) if a else [None] for a in padded(axes))
    cells = []
    for n, (page, row, col) in enumerate(itertools.product(*map(enumerate, (pages, rows, cols)))):
        values = {}
        for axis, (_, value) in zip(axes, (col, row, page), strict=False):
            values[axis.key] = value
        name = "_".join(f"{k}-{slug(v)}" for k, v in values.items())
        cells.append(Cell(values, page[0], row[0], col[0], folder / f"{n:03d}_{name}.png"))
    return cells


def padded(axes: Sequence[Axis]) -> list[Axis | None]:
    """(columns, rows, pages), None where not varied."""
    return [*axes, *[None] * (MAX_AXES - len(axes))]


def cells_folder(sheet: Path) -> Path:
    """Where a sheet's cells go: a folder beside it named after it (`sheet.png` → `sheet/`)."""
    return sheet.with_suffix("")


def sheet_paths(axes: Sequence[Axis], sheet: Path) -> list[Path]:
    """One sheet, or one per value of the third axis (`sheet_KEY-VALUE.png`)."""
    if len(axes) < MAX_AXES:
        return [sheet]
    key = axes[2].key
    return [sheet.with_name(f"{sheet.stem}_{key}-{slug(v)}{sheet.suffix}") for v in axes[2].values]


def check_axes(axes: Sequence[Axis], given: dict, preset: str | None, sheet: Path) -> None:
    """Refuse no axis, too many, a key varied twice or also given as a flag, a bad sheet name,
    and any cell whose settings are out of range, before anything loads."""
    if not axes:
        raise UsageError("sweep needs at least one --vary KEY=V1,V2,...")
    if len(axes) > MAX_AXES:
        raise UsageError(f"--vary: at most {MAX_AXES} keys (columns, rows, one sheet per value)")
    keys = [a.key for a in axes]
    twice = {k for k in keys if keys.count(k) > 1} | (set(keys) & set(given))
    if twice:
        raise UsageError(
            f"{', '.join(sorted(twice))}: given twice (by --vary and a flag, or twice)"
        )
    output_format(sheet.suffix)
    base = load_preset(preset)
    settings = {k: v for k, v in given.items() if k != "seed"}
    for values in itertools.product(*(a.values for a in axes)):
        cell = dict(zip(keys, values, strict=True))
        if "seed" in cell:
            base_seed(cell.pop("seed"))
        base.with_overrides(**settings, **cell)


def load_order(cell: Cell, axes: Sequence[Axis]) -> tuple:
    """Cells that load the same model run together: sorted by the varied LOAD_KEYS."""
    return tuple(repr(cell.values[a.key]) for a in axes if a.key in LOAD_KEYS)


class CellEvents(Events):
    """A cell's run as part of the sweep: steps, notices and warnings go on to the sweep's
    display (each text once), the cell's own plan and record stay here."""

    def __init__(self, outer: Events, seen: set[str]):
        self.outer, self.seen, self.record = outer, seen, None

    def once(self, text: str) -> bool:
        new = text not in self.seen
        self.seen.add(text)
        return new

    def loading(self, what: str) -> None:
        if self.once(f"loading {what}"):
            self.outer.loading(what)

    def step(self, done: int, total: int) -> None:
        self.outer.step(done, total)

    def finished(self, record: Record) -> None:
        self.record = record

    def warning(self, message: str) -> None:
        if self.once(message):
            self.outer.warning(message)

    def notice(self, message: str) -> None:
        self.outer.notice(message)

    def error(self, exc: BaseException) -> None:
        self.outer.error(exc)


@dataclass(frozen=True)
class Options:
    """The size options of the command swept (`stylize`: size, max_size, max_pixels;
    `t2i-styled`: size; `texture-expand`: size (required), max_size, seamless)."""

    size: tuple[int, int] | None = None
    max_size: int | None = None
    max_pixels: int | None = None
    seamless: str | None = None

    def check(self, command: str) -> None:
        allowed = {
            "stylize": {"size", "max_size", "max_pixels"},
            "t2i-styled": {"size"},
            "texture-expand": {"size", "max_size", "seamless"},
        }[command]
        extra = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        extra = [k for k in extra if k not in allowed]
        if extra:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise UsageError(f"sweep --command {command} takes no {flags}")


def run_cell(
    command: str,
    source: str,
    cell: Cell,
    *,
    style: list[str],
    options: Options,
    overrides: dict,
    **run,
) -> BatchReport:
    """The cell's run: the task function the command's CLI calls, with the cell's values as
    flags; `run` is what every task takes alike (preset, output, runtime, events)."""
    from stylekit import api

    flags = overrides | {k: v for k, v in cell.values.items() if k != "seed"}
    if command == "stylize":
        sizes = {
            "size": options.size,
            "max_size": options.max_size,
            "max_pixels": options.max_pixels,
        }
        return api.stylize([source], style=style, **sizes, **run, **flags)
    if command == "t2i-styled":
        prompt = flags.pop("prompt", source)
        return api.t2i_styled(prompt, style=style, count=1, size=options.size, **run, **flags)
    sizes = {"size": options.size, "max_size": options.max_size, "seamless": options.seamless}
    return api.texture_expand([source], **sizes, **run, **flags)


def sweep(
    source: str,
    *,
    axes: Sequence[Axis],
    command: str = "stylize",
    sheet: Path = Path("sweep.png"),
    style: Sequence[str] = (),
    preset: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    runtime: Runtime = Runtime(),
    options: Options = Options(),
    events: Events | None = None,
    **overrides,
) -> SweepReport:
    """Run `command` on `source` (an image; the prompt for t2i-styled) for every combination of
    the axes' values, then draw the contact sheet(s); returns the SweepReport."""
    if command not in COMMANDS:
        raise UsageError(f"sweep --command {command!r}; choose one of {', '.join(COMMANDS)}")
    if command == "texture-expand" and options.size is None:
        raise UsageError("sweep --command texture-expand needs --size WxH (the texture to make)")
    if command == "texture-expand" and style:
        raise UsageError("sweep --command texture-expand: the exemplar is the style; drop --style")
    if command == "t2i-styled" and "prompt" in overrides:
        raise UsageError("sweep --command t2i-styled: the prompt is the argument, not --prompt")
    options.check(command)
    sheet = Path(sheet)
    check_axes(axes, overrides | ({"seed": seed} if seed is not None else {}), preset, sheet)
    if command != "t2i-styled" and not Path(source).is_file():
        raise UsageError(f"{source}: no such image file")
    seed0 = base_seed(seed)
    events = events or Events()
    pool = ModelPool()
    runtime = replace(runtime, models=pool)
    cells = plan_cells(axes, sheet)
    cells_folder(sheet).mkdir(parents=True, exist_ok=True)
    report, seen, rows = SweepReport(), set(), []
    events.planned(len(cells), 0)
    for n, cell in enumerate(sorted(cells, key=lambda c: load_order(c, axes))):
        seed_n = cell.values.get("seed", seed0)
        events.started(Job(None, cell.path, Path(cell.path.name), n))  # shown by its file name
        inner = CellEvents(events, seen)
        start = time.perf_counter()
        output = Output(cell.path, overwrite=overwrite, seed=seed_n)
        run_cell(
            command, source, cell, style=list(style), preset=preset, output=output,
            runtime=runtime, events=inner, options=options, overrides=dict(overrides),
        )  # fmt: skip
        rows.append(record_cell(cell, inner.record, seed_n, time.perf_counter() - start, report))
        events.finished(rows[-1])
    report.loads = pool.loads
    write_index(axes, cells, rows, sheet, command, source)
    report.sheets = write_sheets(axes, cells, sheet)
    return report


def record_cell(cell: Cell, inner: Record | None, seed: int, seconds: float, report) -> Record:
    """The sweep's record of a cell: the run's status and settings, with the cell's place."""
    status = inner.status if inner is not None else "failed"
    job = Job(None, cell.path, Path(cell.path.name), 0)
    if status == "failed":
        report.cells.add_failed(job, inner.error if inner else "no output")
    elif status == "skipped":
        report.cells.add_skipped(job)
    else:
        report.cells.add_done(job)
    settings = dict(inner.settings) if inner is not None and inner.settings else {}
    if status == "skipped":
        from stylekit.media.metadata import read_metadata

        settings = read_metadata(cell.path) or {}
    place = {"values": jsonable(cell.values), "page": cell.page, "row": cell.row, "col": cell.col}
    return Record(
        inner.input if inner else None,
        str(cell.path),
        status,
        round(seconds, 3),
        seed,
        inner.error if inner else None,
        {"sweep": place} | settings,
    )


def jsonable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def write_index(axes, cells, rows: list[Record], sheet: Path, command: str, source: str) -> None:
    """`cells.json` in the cells' folder: the axes and every cell's file, place and settings."""
    from stylekit.media.batch import atomic_write

    index = {
        "command": command,
        "input": source,
        "axes": [
            {"key": a.key, "values": list(jsonable({"v": v})["v"] for v in a.values)} for a in axes
        ],
        "sheets": [str(p) for p in sheet_paths(axes, sheet)],
        "cells": [
            {"file": Path(r.output).name, "status": r.status, "seed": r.seed, "error": r.error}
            | {"settings": r.settings}
            for r in sorted(rows, key=lambda r: r.output)
        ],
    }
    with atomic_write(cells_folder(sheet) / "cells.json") as f:
        f.write(json.dumps(index, indent=1, default=str).encode())


def write_sheets(axes: Sequence[Axis], cells: list[Cell], sheet: Path) -> list[Path]:
    """Draw and save each sheet: the cells written, grey where one failed."""
    from stylekit.media.images import save_image
    from stylekit.media.sheet import contact_sheet

    cols, rows, pages = padded(axes)
    col_labels = [cols.label(v) for v in cols.values]
    row_labels = [rows.label(v) for v in rows.values] if rows else []
    written = []
    for page, path in enumerate(sheet_paths(axes, sheet)):
        grid = [[None] * len(col_labels) for _ in range(max(len(row_labels), 1))]
        for cell in cells:
            if cell.page == page and cell.path.is_file():
                with Image.open(cell.path) as im:
                    grid[cell.row][cell.col] = im.convert("RGB")
        title = pages.label(pages.values[page]) if pages else None
        image, _ = contact_sheet(grid, col_labels, row_labels, title=title)
        meta = {
            "sweep": [a.key for a in axes],
            "columns": col_labels,
            "rows": row_labels,
            "sheet": title,
            "cells": str(cells_folder(sheet)),
        }
        save_image(image, path, metadata=meta)
        written.append(path)
    return written
