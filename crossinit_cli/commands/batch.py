"""`learn --batch MANIFEST`: batches.learn_batch as a person sees it (docs/batch.md).

This module only presents: the plan line, one bar over the batch's identities (main process, terminal
only), a line per identity as each process finishes it, the table (or `--json`) and the exit status.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.table import Table

from crossinit_cli import batches, ui
from crossinit_cli.batches import BatchHooks, BatchRequest, BatchResult, Outcome, Plan
from crossinit_cli.commands.common import EXIT_PARTIAL, stderr_progress
from crossinit_cli.learning import LearnHooks
from crossinit_cli.store import Library


def learn_batch(library: Library, request: BatchRequest, *, quiet: bool = False, as_json: bool = False) -> int:
    """`learn --batch MANIFEST`: every identity of the manifest not yet stored, spread over the processes
    of `accelerate launch`, one model load per process."""
    shown = _Shown(quiet, as_json)
    hooks = BatchHooks(
        learning=shown.learning,
        on_begin=shown.begin,
        on_outcome=shown.outcome,
        on_results=shown.results,
        identity=LearnHooks(on_warning=ui.warn, on_phase=ui.timing),
    )
    result = batches.learn_batch(library, request, hooks)
    return _exit_code(result)


def _exit_code(result: BatchResult) -> int:
    """0, EXIT_PARTIAL when some identities failed, 1 when all did (as for one identity)."""
    failed = result.failed
    return 1 if failed and failed == len(result.results) else EXIT_PARTIAL if failed else 0


@dataclass
class _Shown:
    """What this process shows of its share, and the main process of the whole batch."""

    quiet: bool
    as_json: bool
    bar: Any = None  # the overall bar (rich Progress), on the main process's terminal
    task: Any = None
    process: int = 0

    @contextmanager
    def learning(self, plan: Plan) -> Iterator[None]:
        """The plan line, then one bar over the identities (with an ETA) for this process's share: with several
        processes its count includes what the others finished (batches._Overall), so the ETA is the batch's."""
        self.process = plan.process
        if plan.main and not self.quiet:
            ui.info(
                f"{plan.todo} identit{'y' if plan.todo == 1 else 'ies'} to learn over {plan.processes} "
                f"process{'es' if plan.processes != 1 else ''}; {plan.skipped} already present"
            )
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("identities"))
        columns += (TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        bar = stderr_progress(not plan.main or self.quiet or plan.todo == 0, *columns, transient=True)
        if bar is None:
            yield
            return
        with bar:
            self.bar, self.task = bar, bar.add_task("learning", total=plan.todo)
            try:
                yield
            finally:
                self.bar = None

    def begin(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"learning {escape(name)}")

    def outcome(self, outcome: Outcome, finished: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=finished)
        if not self.quiet:
            ui.info(f"[{self.process}] {escape(outcome.name)}: {outcome.status} {escape(outcome.detail)}".rstrip())

    def results(self, result: BatchResult) -> None:
        """The main process's table (or --json), and for failures the summary line."""
        _report(result.results, as_json=self.as_json)
        if result.failed:  # the summary line (and for all failed, exit 1 as for one identity)
            code = _exit_code(result)
            ui.warn(
                f"{result.failed} of {len(result.results)} identities failed (exit status {code}; see the table "
                "for each)"
            )


def _report(results: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        ui.print_json(results)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("name", "status", "seconds", "final loss", "process", "detail"):
        table.add_column(column, overflow="fold")
    for r in results:
        colour = {"learned": "green", "skipped": "dim", "failed": "red"}[r["status"]]
        table.add_row(
            escape(r["name"]),
            f"[{colour}]{r['status']}[/]",
            f"{r['seconds']:.1f}" if r["seconds"] else "",
            f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "",
            str(r["process"]),
            escape(r["detail"]),
        )
    ui.out().print(table)
