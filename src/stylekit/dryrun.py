"""What `--dry-run` prints: the plan on stdout, one line (or `--json` record) per output.

    in/a.png -> stylized/a.png  seed 4  512x384
    in/b.png -> stylized/b.png  skipped (exists; --overwrite to redo it)

No progress bar and no "0 done" summary: stderr gets the run's notices and warnings (the seeds to
pin, sizes rounded), the reason of each input that would fail, and one closing line. The checks
behind the plan are the real run's (`runner.begin`): what it refuses, the dry run refuses too.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console
from rich.markup import escape

from stylekit.runner import Events, Record


class PlanEvents(Events):
    """Render a dry run's records as its plan (see the module docstring)."""

    def __init__(
        self, console: Console, *, as_json: bool = False, quiet: bool = False, debug: bool = False
    ):
        self.console, self.as_json, self.quiet, self.debug = console, as_json, quiet, debug
        self.counts = {"planned": 0, "skipped": 0, "failed": 0}
        self.notices: set[str] = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def finished(self, record: Record) -> None:
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        if self.as_json:
            print(json.dumps(asdict(record), default=str), flush=True)
        else:
            print(plan_line(record), flush=True)
        if record.status == "failed":
            self.console.print(
                f"[red]would fail[/red] {escape(record.error or '')}", soft_wrap=True
            )

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning[/yellow] {escape(message)}", soft_wrap=True)

    def notice(self, message: str) -> None:
        if message not in self.notices and not self.quiet:
            self.console.print(escape(message), soft_wrap=True)
        self.notices.add(message)

    def error(self, exc: BaseException) -> None:
        if self.debug:
            from stylekit.progress import print_traceback

            print_traceback(self.console, exc)

    def summary(self, report) -> None:
        """One closing line on stderr: what a run would do, and that nothing was written."""
        if self.quiet:
            return
        c = self.counts
        self.console.print(
            f"dry run: {c['planned']} to write, {c['skipped']} skipped, {c['failed']} would "
            "fail; nothing written"
        )


def plan_line(record: Record) -> str:
    """One output of the plan: `input -> output  seed N  WxH`, or why it is not made."""
    head = f"{record.input or '-'} -> {record.output}"
    if record.status == "skipped":
        return f"{head}  skipped (exists; --overwrite to redo it)"
    if record.status == "failed":
        return f"{head}  would fail: {record.error}"
    size = record.size or "size known once the model loads"
    return f"{head}  seed {record.seed}  {size}"
