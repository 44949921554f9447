"""`doctor`: what crossinit would run with on this machine, and what to fix before it can (`health`'s checks)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from crossinit_cli import ui
from crossinit_cli.config import RunOptions
from crossinit_cli.health import run_checks


def doctor(home: Path, run: RunOptions) -> int:
    facts, checks = run_checks(home, run)
    healthy = all(c.ok for c in checks)
    if run.as_json:
        ui.print_json({**facts, "checks": [asdict(c) for c in checks], "ok": healthy})
        return 0 if healthy else 1
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("crossinit", f"{facts['crossinit']} (Python {facts['python']}, {facts['platform']})")
    for package, version in facts["packages"].items():  # type: ignore[union-attr]
        table.add_row(package, version or "[red]not installed[/]")
    table.add_row("config", escape(str(facts["config"])))
    for check in checks:
        mark = "[green]ok[/]" if check.ok else "[red]problem[/]"
        line = f"{mark} {escape(check.detail)}"
        if check.advice:
            line += f"\n   fix: {escape(check.advice)}"
        table.add_row(check.name, line)
    ui.out().print(table)
    if not healthy:
        ui.error(f"{sum(not c.ok for c in checks)} problem(s) found; see the fixes above")
    return 0 if healthy else 1
