"""`list`, `show`, `edit` and `remove`: looking at and changing stored identities (no torch needed)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.markup import escape
from rich.table import Table

from crossinit_cli import ui
from crossinit_cli.catalog import Query, Row
from crossinit_cli.editing import (
    Edits,
    Removed,
    ambiguity,
    check_query,
    edit,
    edit_in_editor,
    identity_record,
    removal,
)
from crossinit_cli.errors import CrossinitError, shown
from crossinit_cli.store import Library

__all__ = ["Edits", "edit_identity", "identity_record", "list_identities", "remove_identities", "show_identity"]


def family_title(family: str) -> str:
    """How `list` and `show` name a model family ("SDXL"); "?" for an entry that does not say."""
    from crossinit_cli.families import FAMILIES

    return FAMILIES[family].title if family in FAMILIES else (family or "?")


COLUMNS = ("name", "family", "base model", "mode", "created", "tags", "notes")


def list_identities(library: Library, *, as_json: bool, query: Query | None = None) -> int:
    query = check_query(query or Query())
    if as_json:
        _print_json_rows(library, library.rows(query))
        return 0
    entries = library.rows(query, table=True)
    if not entries:
        if query != Query():
            ui.info("No identities match.")
        elif not _show_unfinished(library):
            ui.info(f"No identities yet in {library.home}. Learn one: crossinit learn photo.jpg --fast")
        return 0
    _print_table(entries)
    if query == Query():
        _show_unfinished(library)
    damaged = sum(row.damaged is not None for row in entries)
    if damaged:
        ui.warn(
            f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}; `crossinit remove NAME --identity` deletes one"
        )
    return 0


def _print_json_rows(library: Library, rows: list[Row]) -> None:
    """`list --json`: each identity's record as `identity_record` makes it, spliced from the catalog's JSON
    text without parsing it (one JSON object a line: 10,000 entries in well under a second)."""
    folder = _json_text(str(library.entries) + os.sep)  # encoded once; most keys need no escaping
    lines = []
    for row in rows:
        path = f'"{folder}{_json_text(row.key)}"'
        if row.damaged is not None or row.text is None:
            name, reason = (_json_text(text) for text in (row.name, row.damaged or "unreadable"))
            lines.append(f'{{"name": "{name}", "damaged": true, "reason": "{reason}", "path": {path}}}')
        else:
            lines.append(f'{row.text[:-1]}, "token": "<{_json_text(row.name)}>", "path": {path}, "damaged": false}}')
    ui.print_json_lines(lines)


def _json_text(text: str) -> str:
    """`text` as the inside of a JSON string (what json.dumps gives, without the quotes)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _print_table(entries: list[Row]) -> None:
    """The listing as aligned columns, written directly: a rich Table takes seconds for 10,000 rows.

    On a terminal the widest columns are cut (with '…') to fit its width; piped, lines are whole."""
    from crossinit_cli.families import FAMILIES

    titles = {key: family.title for key, family in FAMILIES.items()}
    rows: list[tuple[list[str], str]] = [(list(COLUMNS), "bold")]
    for entry in entries:
        if entry.cells is None:
            rows.append(([entry.name, f"damaged: {shown(entry.damaged or '')}"], "red"))
        else:
            family, *rest = entry.cells
            rows.append(([entry.name, titles.get(family) or family_title(family), *rest], ""))
    whole = [cells for cells, _ in rows if len(cells) == len(COLUMNS)]
    widths = [max(len(cells[i]) for cells in whole) for i in range(len(COLUMNS))]
    widths[0] = max(len(cells[0]) for cells, _ in rows)
    console = ui.out()
    if console.is_terminal:
        widths = _fit(widths, console.width)
    for cells, style in rows:
        if len(cells) == 2 and style == "red":
            line = f"{_cut(cells[0], widths[0]).ljust(widths[0])}  {cells[1]}"
            if console.is_terminal:
                line = _cut(line, console.width)
        else:
            line = "  ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()
        if style:
            from rich.text import Text

            console.print(Text(line, style=style), soft_wrap=True, crop=False)
        else:
            console.file.write(line + "\n")
    console.file.flush()


def _fit(widths: list[int], total: int) -> list[int]:
    """Column widths that fit in `total` characters: the widest columns give way first, but never the name
    or the date (a cut name could not be typed back), and none below 8."""
    widths = list(widths)
    cuttable = [i for i in range(len(widths)) if COLUMNS[i] not in ("name", "created")]
    while sum(widths) + 2 * (len(widths) - 1) > total:
        widest = max(cuttable, key=lambda i: widths[i])
        if widths[widest] <= 8:
            break
        widths[widest] -= 1
    return widths


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _show_unfinished(library: Library) -> bool:
    """Runs that were interrupted, with how to continue or clear them (on stderr: not identities)."""
    from crossinit_cli import checkpoint

    runs = checkpoint.unfinished(library.home)
    for run in runs:
        ui.info(
            f"unfinished run: [bold]{escape(run.name)}[/] at step {run.step} of {run.steps} "
            f"(crossinit learn --resume {escape(run.name)}, or crossinit remove {escape(run.name)} --unfinished)"
        )
    return bool(runs)


def show_identity(library: Library, name: str, *, as_json: bool) -> int:
    ident = library.get(name)
    record = identity_record(library, ident, detail=True)
    if as_json:
        ui.print_json(record)
        return 0
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    record["family"] = family_title(ident.family)
    claimed = record.pop("base_model_claimed", None)
    # Every value as text with its control characters escaped: an imported file wrote some of them.
    for key, value in record.items():
        if key == "snapshots":
            table.add_row(key, escape(shown(_snapshot_summary(value, ident.active_step))))
        elif key == "clip_skip" and value is None:
            table.add_row(key, "unknown (imported from a file that cannot record it)")
        elif key == "base_model" and claimed and value:
            table.add_row(key, escape(f"{shown(value)} (named by the imported file; not used until you name a model)"))
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                table.add_row(f"{shown(key)}.{shown(str(sub))}", escape(shown(_nested(subvalue))))
        elif isinstance(value, list):
            table.add_row(key, escape(shown(", ".join(map(str, value)))))
        else:
            table.add_row(shown(key), escape(shown(str(value))))
    ui.out().print(table)
    return 0


def _nested(value: Any) -> str:
    """A record's value on one line: nested tables (training.norms, training.size_conditioning) as compact JSON."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def edit_identity(library: Library, name: str, edits: Edits, *, as_json: bool = False) -> int:
    """`edit`: the flags applied, or with none the metadata edited in $EDITOR; the identity as stored after."""
    if edits.none():
        ident = library.get(name)
        edited = edit_in_editor(library, ident.name)
        if edited is None:  # saved as it was: "no changes" is all there is to say
            ui.info("no changes")
            if as_json:
                ui.print_json(identity_record(library, ident))
            return 0
    else:
        edited = edit(library, name, edits)
    if as_json:
        ui.print_json(identity_record(library, edited))
    else:
        ui.info(f"updated [bold]{escape(edited.name)}[/]")
    return 0


def _snapshot_summary(snapshots: list[dict[str, Any]], active: int) -> str:
    """`step 40 (loss 0.1234, likeness 0.91), ...`, the active one marked."""
    if not snapshots:
        return "none"
    last = max(int(s["step"]) for s in snapshots)
    parts = []
    for snap in snapshots:
        step = int(snap["step"])
        numbers = [f"loss {snap['loss']:.4f}"] if "loss" in snap else []
        likeness = snap.get("evaluation", {}).get("likeness")
        if likeness is not None:
            numbers.append(f"likeness {likeness:.2f}")
        mark = " [active]" if step == (active or last) else ""
        parts.append(f"step {step} ({', '.join(numbers)}){mark}")
    return ", ".join(parts)


def remove_identities(
    library: Library, names: list[str], *, yes: bool, identity: bool = False, unfinished: bool = False
) -> int:
    """`remove`: every name checked, a name that is both an identity and an unfinished run settled (asked on a
    terminal, else refused naming the flags), then (unless --yes) one question, then a line per thing removed.
    Interrupted, it says exactly what went and what stayed."""
    checked = removal(library, names, identity=identity, unfinished=unfinished)  # all exist before anything goes
    asking = not yes and sys.stdin.isatty()
    for name in list(checked.ambiguous):
        if not asking:
            raise CrossinitError(ambiguity(name))
        checked.choose(name, _which(name, checked))
    if not yes:
        if not sys.stdin.isatty():
            raise CrossinitError("refusing to remove without confirmation; pass --yes")
        import typer

        if not typer.confirm(f"Remove {_things(checked.planned())}? This deletes the learned vectors and crops"):
            ui.info("nothing removed")
            return 1
    done: list[Removed] = []
    try:
        for removed in checked.run(library):
            done.append(removed)
            if not removed.run:
                ui.info(f"removed [bold]{escape(removed.name)}[/]")
                continue
            where = f" (step {removed.step} of {removed.steps})" if removed.step is not None else ""
            where = where or " (its settings were unreadable)"
            ui.info(f"removed the unfinished run of [bold]{escape(removed.name)}[/]{where}")
    except KeyboardInterrupt:
        left = checked.left(library, done)
        gone = [thing for thing in checked.planned() if thing not in left]
        raise KeyboardInterrupt(
            f"interrupted: removed {_things(gone) or 'nothing'}; kept {_things(left) or 'nothing'}"
        ) from None
    return 0


def _which(name: str, checked: Any) -> str:
    """Ask which of `name`'s identity and unfinished run to remove (a terminal only): identity, run or both."""
    import typer

    found = checked.runs[name]
    run = found[1] if found is not None else None
    at = f" at step {run.step} of {run.steps}" if run is not None else ""
    question = f"{name} is both a stored identity and an unfinished run{at}. Remove which (identity, run, both)?"
    while True:
        answer = str(typer.prompt(question)).strip().lower()
        chosen = next((what for what in ("identity", "run", "both") if what.startswith(answer)), None)
        if answer and chosen is not None:
            return chosen
        ui.info("answer identity, run or both")


def _things(things: list[tuple[str, bool]]) -> str:
    """`alice, the unfinished run of bob` (names as typed; control characters shown escaped)."""
    return ", ".join(f"the unfinished run of {shown(name)}" if run else shown(name) for name, run in things)
