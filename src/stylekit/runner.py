"""The batch loop every image command shares: plan, skip finished work, process, save, report.

The library prints nothing: progress and results go to an `Events` object the CLI renders.
A file that fails is recorded with its reason and the batch goes on; KeyboardInterrupt stops it,
and atomic writes leave no half-written output behind.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stylekit.errors import SetupError, StylekitError, UsageError, one_line
from stylekit.media.batch import (
    BatchReport,
    Job,
    check_writable,
    collect_inputs,
    output_format,
    output_root,
    plan_outputs,
    split_existing,
)
from stylekit.media.images import save_image
from stylekit.shards import in_shard


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
    size: str | None = None  # WxH of the output: written, or planned (None: known once it loads)


class Events:
    """Callbacks for progress; the default does nothing (library use)."""

    def planned(self, total: int, skipped: int) -> None: ...

    def loading(self, what: str) -> None: ...

    def started(self, job: Job) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def finished(self, record: Record) -> None: ...

    def warning(self, message: str) -> None: ...

    def notice(self, message: str) -> None:
        """Something the user should know about the run (a console shows each text once)."""

    def error(self, exc: BaseException) -> None:
        """The exception behind a failure (the CLI prints its traceback with --debug)."""


class SayOnce:
    """Pass a run's first notice of each kind to `events` and drop the later ones: a notice that
    names its case (75x53 → 72x48) would otherwise be said once per input."""

    def __init__(self, events: Events):
        self.events, self.said = events, set()

    def __call__(self, kind: str, message: str | None) -> None:
        if message and kind not in self.said:
            self.said.add(kind)
            self.events.notice(message)


@dataclass(frozen=True)
class Output:
    """Where and how a batch writes: folder or file, format, suffix, overwrite policy, seed."""

    out: Path | None = None
    fmt: str | None = None
    suffix: str = ""
    overwrite: bool = False
    seed: int | None = None
    dry_run: bool = False
    seed_drawn: bool = False  # `seed` was drawn for this run (`session.with_seed`), not given
    shard: tuple[int, int] | None = None  # (K, N): only shard K of N runs (`stylekit.shards`)


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
    """Expand inputs and name their outputs; usage errors surface before any model loads.

    The output folder is left out of the inputs, so a rerun into a folder inside an input
    folder resumes instead of taking its own outputs as inputs."""
    items = collect_inputs(inputs, exclude=output_root(output.out))
    return plan_outputs(items, out=output.out, fmt=output.fmt, suffix=output.suffix)


def begin(
    jobs: list[Job],
    output: Output,
    events: Events,
    *,
    check: Callable[[], None] | None = None,
    plan_size: Callable[[Job], tuple[int, int] | None] | None = None,
) -> tuple[BatchReport, list[Job], int]:
    """Report skipped and blocked jobs, fix the base seed, check that the outputs can be written,
    and return what is left to do (nothing on --dry-run).

    When there is work, `check` (what the run refuses before loading a model: a size that will
    not fit) runs on a dry run too, so that a dry run stops (exit 2) where the real run would.
    A dry run reports each job "planned" with its seed and `plan_size(job)`; a job whose size
    cannot be read (an unreadable input) is reported failed, as the real run would fail it.
    """
    report = BatchReport()
    if output.shard is not None:
        jobs = in_shard(jobs, *output.shard)
    to_do, skipped, blocked = split_existing(jobs, overwrite=output.overwrite)
    seed0 = base_seed(output.seed)
    if to_do:
        check_writable(job.output for job in to_do)  # writes nothing: a probe file, removed
        if check is not None:
            check()
    events.planned(len(to_do) + len(blocked), len(skipped))
    for job in skipped:
        report.add_skipped(job)
        events.finished(Record(source(job), str(job.output), "skipped"))
    for job, reason in blocked:
        fail(job, seed0 + job.index, reason, report, events)
    if not output.dry_run:
        return report, to_do, seed0
    if to_do and output.seed_drawn:
        events.notice(
            f"seeds drawn for this plan (base {seed0}); a run without --seed draws new ones: "
            f"add --seed {seed0} to get these"
        )
    for job in to_do:
        seed = seed0 + job.index
        try:
            size = plan_size(job) if plan_size is not None else None
        except UsageError:
            raise
        except Exception as exc:  # the real run would fail this input alone
            fail(job, seed, exc, report, events)
            continue
        wh = f"{size[0]}x{size[1]}" if size is not None else None
        events.finished(Record(source(job), str(job.output), "planned", seed=seed, size=wh))
    return report, [], seed0


def start_run(prepare: Callable[[], None] | None) -> None:
    """Run the batch's `prepare` (model load, conditioning). Whatever fails there, nothing could
    start: our errors become a SetupError (exit 2), not a failed input; any other exception goes
    up as it is (the CLI prints it as one line, exit 2)."""
    if prepare is None:
        return
    try:
        prepare()
    except StylekitError as exc:
        if exc.exit_code == 2:
            raise
        raise SetupError(str(exc)) from exc


FLATTENED = (
    "JPEG has no alpha channel: transparent inputs are flattened on white (png or webp keep it)"
)


def write_image(job: Job, result: tuple[Image.Image, dict], output: Output) -> dict:
    """Save an (image, settings) result atomically with its settings embedded; return the settings.

    An RGBA image keeps its alpha in PNG and WebP; JPEG flattens it on white, and the settings
    say which (`alpha`: kept or flattened).
    """
    image, settings = result
    fmt = output_format(job.output.suffix or output.fmt)
    if image.mode == "RGBA":
        settings = settings | {"alpha": "flattened" if fmt == "jpg" else "kept"}
    save_image(image, job.output, fmt=fmt, metadata=settings)
    return settings


def run_jobs(
    jobs: list[Job],
    output: Output,
    process: Callable[[Job, int], object],
    *,
    prepare: Callable[[], None] | None = None,
    check: Callable[[], None] | None = None,
    plan_size: Callable[[Job], tuple[int, int] | None] | None = None,
    events: Events | None = None,
    write: Callable[[Job, object, Output], dict] = write_image,
) -> BatchReport:
    """Run `process(job, seed)` for every job whose output is missing, and `write` its result.

    By default the result is (image, settings), saved as an image; a task that writes its own
    output (video) passes a `write` that only returns the settings. `prepare` (model load,
    once-per-batch conditioning) runs only if there is work to do; `check` and `plan_size` are
    `begin`'s (the checks that need no model; each output's size on --dry-run). Job i gets seed
    base + i, so a resumed batch gives every job the seed it would have had. A UsageError stops
    the batch (it would fail every job alike); any other error fails its job only.
    """
    events = events or Events()

    def run(items: list[tuple[Job, int]], report: BatchReport) -> None:
        for job, seed in items:
            events.started(job)
            start = time.perf_counter()
            try:
                result = process(job, seed)
            except UsageError:
                raise
            except Exception as exc:  # one bad file must not end the batch; the reason is reported
                fail(job, seed, exc, report, events)
                continue
            seconds = time.perf_counter() - start
            save(job, seed, result, seconds, output, report, events, write)

    return execute(Batch(jobs, output, events, prepare, run, check=check, plan_size=plan_size))


def run_batched(
    jobs: list[Job],
    output: Output,
    *,
    load: Callable[[Job], object],
    process: Callable[[list[tuple[Job, int, object]]], list[tuple[Image.Image, dict]]],
    batch_size: int,
    key: Callable[[object], object] = lambda item: None,
    prepare: Callable[[], None] | None = None,
    check: Callable[[], None] | None = None,
    plan_size: Callable[[Job], tuple[int, int] | None] | None = None,
    events: Events | None = None,
) -> BatchReport:
    """Like `run_jobs`, but loaded inputs with equal `key` (e.g. size) go `batch_size` at a time:
    the jobs to do are cut into runs of `batch_size`, and each run into batches of equal key.

    `load(job)` fails only its job; `process` gets [(job, seed, item)] and returns one
    (image, settings) per entry, in order; if it raises, every job of that batch fails.
    """
    events = events or Events()
    pending: list[tuple[Job, int, object]] = []

    def flush(report: BatchReport) -> None:
        if not pending:
            return
        start = time.perf_counter()
        try:
            results = process(list(pending))
        except UsageError:
            raise
        except Exception as exc:  # the batch failed as a whole; each of its files says why
            for job, seed, _ in pending:
                fail(job, seed, exc, report, events)
        else:
            seconds = (time.perf_counter() - start) / len(pending)
            for (job, seed, _), result in zip(pending, results, strict=True):
                save(job, seed, result, seconds, output, report, events)
        pending.clear()

    def run(items: list[tuple[Job, int]], report: BatchReport) -> None:
        for job, seed in items:
            events.started(job)
            try:
                item = load(job)
            except Exception as exc:
                fail(job, seed, exc, report, events)
                continue
            if pending and key(pending[0][2]) != key(item):
                flush(report)
            pending.append((job, seed, item))
            if len(pending) >= batch_size:
                flush(report)
        flush(report)

    return execute(
        Batch(
            jobs, output, events, prepare, run, chunk=batch_size, check=check, plan_size=plan_size
        )
    )


@dataclass(frozen=True)
class Batch:
    """A planned batch as an engine runs it: `run(items, report)` processes (job, seed) pairs,
    reporting each job through `events` and `report`; `prepare` (model load) runs once in every
    process that runs jobs. `run` gets at most `chunk` jobs at a time (the UNet batch), so the
    same images share a UNet call whichever engine runs them."""

    jobs: list[Job]
    output: Output
    events: Events
    prepare: Callable[[], None] | None
    run: Callable[[list[tuple[Job, int]], BatchReport], None]
    chunk: int = 1
    check: Callable[[], None] | None = None  # `begin`'s checks that need no model
    plan_size: Callable[[Job], tuple[int, int] | None] | None = None  # sizes on --dry-run


# The engine that runs batches in this context; None runs them here (`stylekit.distributed`
# sets one for `--engine ray`, on the driver and in each worker).
ENGINE: ContextVar[Callable[[Batch], BatchReport] | None] = ContextVar("engine", default=None)


def execute(batch: Batch) -> BatchReport:
    """Run a planned batch in this process, or hand it to the engine set in `ENGINE`."""
    engine = ENGINE.get()
    if engine is not None:
        return engine(batch)
    report, to_do, seed0 = begin(
        batch.jobs, batch.output, batch.events, check=batch.check, plan_size=batch.plan_size
    )
    if to_do:
        start_run(batch.prepare)
    for items in chunks([(job, seed0 + job.index) for job in to_do], batch.chunk):
        batch.run(items, report)
    return report


def chunks(items: list, size: int) -> list[list]:
    """`items` cut into consecutive lists of `size` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def reason_of(exc: BaseException | str) -> str:
    """One line for the user: our errors and OS errors as they are, others with their type."""
    return exc if isinstance(exc, str) else one_line(exc)


def fail(
    job: Job, seed: int, exc: BaseException | str, report: BatchReport, events: Events
) -> None:
    """Record a failed job (with the exception behind it, for --debug)."""
    reason = reason_of(exc)
    report.add_failed(job, reason)
    if isinstance(exc, BaseException):
        events.error(exc)
    events.finished(Record(source(job), str(job.output), "failed", error=reason, seed=seed))


def save(
    job: Job, seed: int, result, seconds: float, output: Output, report, events, write=write_image
) -> None:
    """Write one result (atomically, by `write`); a write error fails this job only."""
    try:
        settings = write(job, result, output)
    except Exception as exc:
        fail(job, seed, exc, report, events)
        return
    if settings.get("alpha") == "flattened":
        events.notice(FLATTENED)
    report.add_done(job)
    size = settings.get("size")
    record = Record(
        source(job), str(job.output), "done", seconds, seed, settings=settings, size=size
    )
    events.finished(record)
