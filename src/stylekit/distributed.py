"""`--engine ray`: one batch over a pool of Ray workers, with the batch contract of `runner`.

    from stylekit.distributed import Ray, run
    report = run(stylize, ["photos/"], engine=Ray(workers=4), events=events, output=Output("out/"))

The driver calls the task function as `--engine local` would: it plans the batch (inputs,
outputs, skip/resume, shards, the seed of every job) and then, in place of the runner's loop,
hands the jobs to Ray Data. Each worker is an actor that calls the same task function on the
same arguments to build the same batch (`runner.Batch`: its `prepare` loads the model once per
worker, through `session.open_session` like every run) and then processes the jobs the driver
sends it, chunk by chunk (one UNet batch each, so results equal a local run's), writing every
output atomically where the driver named it. The records stream back; the driver shows them, adds
them up in the report and picks the exit code, as the local loop does.

Choices, with their reasons:

- Workers run in the driver's working folder, so relative inputs, masks, style references,
  presets and outputs mean the same files on every node: a cluster needs them on a shared
  filesystem mounted at the same path (the model may come from each node's own cache).
- A worker that dies (killed, out of memory) is restarted by Ray and its unfinished chunks run
  again (Ray Data's actor restarts and task retries, unlimited). Outputs are written by atomic
  rename, so a retried job replaces nothing half-written; the temp files of a killed writer are
  removed when the batch ends. Each chunk's records come back once, with the attempt that finished.
- Without `address` a local Ray instance (all CPUs and GPUs) is started for the batch and shut
  down after it; a Ray connection the caller already holds is used and left open.
- Default pool: one worker per GPU (`gpus_per_worker` 1) when the cluster has GPUs, else one
  CPU worker (each CPU worker loads its own copy of the model: give `workers` for more).
- Ray's object store carries only the job list and the records (images go straight to disk), so
  a local instance gets a small one (`LOCAL_OBJECT_STORE`), not Ray's 30 % of memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePath

import numpy as np

from stylekit.errors import SetupError, UsageError, one_line
from stylekit.media.batch import BatchReport, Job
from stylekit.runner import (
    ENGINE,
    Batch,
    Events,
    Output,
    Record,
    begin,
    chunks,
    start_run,
)

LOCAL_OBJECT_STORE = 128 * 2**20  # bytes: job lists and records only
MISSING = "--engine ray needs Ray: pip install 'stylekit[ray]'"
PART = re.compile(r"\.(.+)\.[0-9a-f]{8}\.part")  # media.batch.atomic_write's temp files


@dataclass(frozen=True)
class Ray:
    """Where and how wide a batch runs: a cluster `address` (None: a local instance for this
    batch), `workers` (None: see the module docstring) and GPUs per worker (fractions share one)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    def check(self) -> Ray:
        """Refuse bad pool sizes before anything is planned or started."""
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        return self


@dataclass(frozen=True)
class Call:
    """A task function (e.g. `tasks.stylize.stylize`) and its arguments, less `events`: what a
    worker calls to build the driver's batch."""

    task: Callable
    args: tuple
    kwargs: dict


def import_ray():
    """The `ray` module with Ray Data, or a SetupError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SetupError(MISSING) from exc
    return ray


def run(task: Callable, *args, engine: Ray | None, events: Events | None = None, **kwargs):
    """Call `task(*args, events=events, **kwargs)`, its batch run on `engine` (None: here).

    The batch's base seed is fixed here (random if the output gives none), so the driver and
    every worker plan the same seeds."""
    if engine is None:
        return task(*args, events=events, **kwargs)
    engine.check()
    import_ray()
    from stylekit.session import with_seed

    kwargs["output"] = with_seed(kwargs.get("output") or Output())
    events = events or Events()
    token = ENGINE.set(partial(drive, Call(task, args, kwargs), engine))
    try:
        return task(*args, events=events, **kwargs)
    finally:
        ENGINE.reset(token)


# --- the driver ------------------------------------------------------------------------------


def drive(call: Call, engine: Ray, batch: Batch) -> BatchReport:
    """Plan and report like `runner.execute`, but run the jobs on a pool of Ray workers."""
    events = batch.events
    report, to_do, seed0 = begin(
        batch.jobs, batch.output, events, check=batch.check, plan_size=batch.plan_size
    )
    if not to_do:
        return report
    ray = import_ray()
    jobs = {str(job.output): job for job in to_do}
    rows = [
        {"jobs": json.dumps([encode(job, seed0 + job.index) for job in chunk])}
        for chunk in chunks(to_do, batch.chunk)
    ]
    started = connect(ray, engine.address)
    results = None  # the record stream: closed on the way out, which stops the pool
    try:
        workers, gpus = pool(ray, engine, len(rows))
        events.loading(f"the model on {workers} Ray worker{'s' if workers > 1 else ''}")
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            Worker,
            fn_constructor_args=(call, os.getcwd()),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=1,
            num_gpus=gpus,  # Ray Data's actors restart, and retry their chunks, without limit
        )
        results = iter(dataset.iter_rows())
        for row in results:
            collect(json.loads(row["result"]), jobs, report, events)
    finally:
        if results is not None:
            results.close()  # stops the pool's work on Ctrl-C or an error
        if started:
            ray.shutdown()
        remove_parts(to_do)
    return report


def connect(ray, address: str | None) -> bool:
    """Join `address`, or start a local instance; True if this call connected (and so must shut
    Ray down), False when the caller already had Ray running."""
    quiet_ray()
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(  # "local": a new instance, even where `ray start` left one running
                address="local",
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE,
                **quiet,
            )
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:
        where = "a local Ray instance" if address is None else f"Ray at {address}"
        raise SetupError(f"cannot start {where}: {one_line(exc)}") from exc
    return True


def quiet_ray() -> None:
    """Keep Ray's progress bars, logs and the workers' output off the console: stylekit's
    progress shows the batch, and what fails comes back as records or one error line (Ray Data
    still logs to its session folder)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.ERROR)
    messages_to_stderr()


def messages_to_stderr() -> None:
    """Send what Ray's driver prints for the cluster (e.g. "A worker died ...") to stderr:
    stdout carries the `--json` records, one JSON object a line. Ray has no option for this, so
    its printer (`ray._private.worker.print_to_stdstream`) is wrapped, once, if it is there."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "to_stderr", False):
        return

    def to_stderr(data, ignore_prefix: bool):
        return printer({**data, "is_err": True}, ignore_prefix)

    to_stderr.to_stderr = True
    worker.print_to_stdstream = to_stderr


def pool(ray, engine: Ray, chunks: int) -> tuple[int, float]:
    """(workers, GPUs per worker) for the cluster, at most one worker per chunk of jobs; a pool
    the cluster cannot hold is a UsageError rather than a batch that waits forever."""
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    gpus = engine.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus else 0.0
    workers = engine.workers
    if workers is None:
        workers = max(int(cluster_gpus // gpus), 1) if gpus else 1
    workers = min(workers, chunks)
    if workers * gpus > cluster_gpus:
        raise UsageError(
            f"{workers} workers with {gpus:g} GPU(s) each need {workers * gpus:g} GPUs; "
            f"the Ray cluster has {cluster_gpus:g} (lower --workers or --gpus-per-worker)"
        )
    if workers > cluster_cpus:
        raise UsageError(
            f"{workers} workers need a CPU each; the Ray cluster has {cluster_cpus:g} "
            "(lower --workers)"
        )
    return workers, gpus


def collect(result: dict, jobs: dict[str, Job], report: BatchReport, events: Events) -> None:
    """Report one chunk's outcome as the local loop would; a worker that could not start (its
    model failed to load) or a usage error stops the batch (exit 2)."""
    if "error" in result:
        raise (UsageError if result["usage"] else SetupError)(result["error"])
    for message in result["warnings"]:
        events.warning(message)
    for message in result["notices"]:
        events.notice(message)
    for fields in result["records"]:
        record = Record(**fields)
        job = jobs[record.output]
        if record.status == "done":
            report.add_done(job)
        else:
            report.add_failed(job, record.error or "failed")
        events.finished(record)


def remove_parts(jobs: list[Job]) -> None:
    """Remove the temp files a killed worker left beside these outputs (`.NAME.XXXXXXXX.part`),
    reading each output folder once."""
    names: dict[Path, set[str]] = {}
    for job in jobs:
        names.setdefault(job.output.parent, set()).add(job.output.name)
    for folder, wanted in names.items():
        try:
            with os.scandir(folder) as entries:
                stale = [
                    e.path for e in entries if (m := PART.fullmatch(e.name)) and m[1] in wanted
                ]
        except OSError:
            continue
        for path in stale:
            Path(path).unlink(missing_ok=True)


# --- the workers -----------------------------------------------------------------------------


def encode(job: Job, seed: int) -> list:
    """A job and its seed as JSON-able data (the rows Ray Data carries)."""
    source = None if job.input is None else str(job.input)
    return [source, str(job.output), job.rel.as_posix(), job.index, job.folder, seed]


def decode(data: list) -> tuple[Job, int]:
    """The (job, seed) that `encode` wrote."""
    source, output, rel, index, folder, seed = data
    path = None if source is None else Path(source)
    return Job(path, Path(output), PurePath(rel), index, folder), seed


class Collect(Events):
    """A worker's events: the records, warnings and notices of the chunk it is running."""

    def __init__(self):
        self.records: list[dict] = []
        self.warnings: list[str] = []
        self.notices: list[str] = []

    def finished(self, record: Record) -> None:
        self.records.append(asdict(record))

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def notice(self, message: str) -> None:
        self.notices.append(message)

    def take(self) -> dict:
        """What was collected since the last call, as JSON-able data."""
        taken = {"records": self.records, "warnings": self.warnings, "notices": self.notices}
        self.records, self.warnings, self.notices = [], [], []
        return taken


class Worker:
    """A Ray Data actor: builds the driver's batch once (model load included), then runs chunks."""

    def __init__(self, call: Call, cwd: str):
        self.events = Collect()
        self.error: dict | None = None
        captured: list[Batch] = []
        token = ENGINE.set(lambda batch: captured.append(batch) or BatchReport())
        try:
            os.chdir(cwd)
            call.task(*call.args, events=self.events, **call.kwargs)
            self.batch = captured[0]
            start_run(self.batch.prepare)
        except Exception as exc:  # reported with the first chunk: the driver stops the batch
            self.error = failure(exc)
        finally:
            ENGINE.reset(token)

    def __call__(self, rows):
        results = []
        for text in rows["jobs"]:
            results.append(json.dumps(self.run_chunk([decode(d) for d in json.loads(text)])))
        return {"result": np.array(results, dtype=object)}

    def run_chunk(self, items: list[tuple[Job, int]]) -> dict:
        """Run one chunk and return its records (or what stops the batch), JSON-able."""
        if self.error is not None:
            return self.error
        try:
            self.batch.run(items, BatchReport())
        except UsageError as exc:  # it would fail every job alike (runner.run_jobs)
            return failure(exc)
        return self.events.take()


def failure(exc: Exception) -> dict:
    """What a worker sends back when the batch cannot go on (exit 2): one line, and whether it
    was a usage error (bad options) or the run could not start (e.g. the model did not load)."""
    return {"error": one_line(exc), "usage": isinstance(exc, UsageError)}
