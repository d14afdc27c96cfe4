"""The batch loop every image command shares: plan, skip finished work, process, save, report.

The library prints nothing: progress and results go to an `Events` object the CLI renders.
A file that fails is recorded with its reason and the batch goes on; KeyboardInterrupt stops it,
and atomic writes leave no half-written output behind.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stylekit.errors import StylekitError, UsageError
from stylekit.media.batch import BatchReport, Job, collect_inputs, plan_outputs, split_existing
from stylekit.media.images import save_image


@dataclass
class Record:
    """What happened to one job; `--json` prints one of these per line."""

    input: str | None
    output: str
    status: str  # done | skipped | failed | planned
    seconds: float = 0.0
    seed: int | None = None
    error: str | None = None
    settings: dict = field(default_factory=dict)


class Events:
    """Callbacks for progress; the default does nothing (library use)."""

    def planned(self, total: int, skipped: int) -> None: ...

    def loading(self, what: str) -> None: ...

    def started(self, job: Job) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def finished(self, record: Record) -> None: ...


@dataclass(frozen=True)
class Output:
    """Where and how a batch writes: folder or file, format, suffix, overwrite policy, seed."""

    out: Path | None = None
    fmt: str | None = None
    suffix: str = ""
    overwrite: bool = False
    seed: int | None = None
    dry_run: bool = False


def source(job: Job) -> str | None:
    """The job's input path as text (None for generated images)."""
    return str(job.input) if job.input is not None else None


def base_seed(seed: int | None) -> int:
    """The batch's base seed: the user's, or a fresh random one (recorded in every output)."""
    if seed is not None:
        if not 0 <= seed < 2**63:
            raise UsageError(f"--seed must be between 0 and 2^63-1, got {seed}")
        return seed
    return secrets.randbelow(2**32)


def plan_files(inputs: list[str], output: Output) -> list[Job]:
    """Expand inputs and name their outputs; usage errors surface before any model loads."""
    return plan_outputs(
        collect_inputs(inputs), out=output.out, fmt=output.fmt, suffix=output.suffix
    )


def run_jobs(
    jobs: list[Job],
    output: Output,
    process: Callable[[Job, int], tuple[Image.Image, dict]],
    *,
    prepare: Callable[[], None] | None = None,
    events: Events | None = None,
) -> BatchReport:
    """Run `process(job, seed) -> (image, settings)` for every job whose output is missing.

    `prepare` (model load, once-per-batch conditioning) runs only if there is work to do.
    Job i gets seed base + i, so a resumed batch gives every image the seed it would have had.
    """
    events = events or Events()
    report = BatchReport()
    to_do, skipped = split_existing(jobs, overwrite=output.overwrite)
    events.planned(len(to_do), len(skipped))
    for job in skipped:
        report.add_skipped(job)
        events.finished(Record(source(job), str(job.output), "skipped"))
    seed0 = base_seed(output.seed)
    if output.dry_run:
        for job in to_do:
            events.finished(Record(source(job), str(job.output), "planned", seed=seed0 + job.index))
        return report
    if to_do and prepare is not None:
        prepare()
    for job in to_do:
        run_one(job, seed0 + job.index, output, process, report, events)
    return report


def run_one(
    job: Job, seed: int, output: Output, process, report: BatchReport, events: Events
) -> None:
    """Process and save one job; a StylekitError or OS error fails this job only."""
    events.started(job)
    start = time.perf_counter()
    try:
        image, settings = process(job, seed)
        save_image(
            image, job.output, fmt=None if job.output.suffix else output.fmt, metadata=settings
        )
    except Exception as exc:  # one bad file must not end the batch; the reason is reported
        reason = (
            str(exc)
            if isinstance(exc, (StylekitError, OSError))
            else f"{type(exc).__name__}: {exc}"
        )
        report.add_failed(job, reason)
        events.finished(Record(source(job), str(job.output), "failed", error=reason, seed=seed))
        return
    report.add_done(job)
    seconds = time.perf_counter() - start
    events.finished(Record(source(job), str(job.output), "done", seconds, seed, settings=settings))
