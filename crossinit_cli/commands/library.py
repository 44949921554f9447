"""`list`, `show`, `edit` and `remove`: looking at and changing stored identities (no torch needed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from crossinit_cli import ui
from crossinit_cli.catalog import SORTS, Query, Row
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.store import Identity, Library

MAX_STRENGTH = 4.0


def identity_record(library: Library, ident: Identity, *, detail: bool = False) -> dict[str, Any]:
    """What `list --json` and `show --json` print for one identity."""
    if detail:  # metadata and vectors from one write, even while a --force replace runs
        ident, vectors = library.read(ident.name)
    record = ident.to_dict()
    if record.pop("clip_skip_unknown", None):
        record["clip_skip"] = None  # unknown: imported from a file that cannot record it
    record["token"] = ident.token
    # A stored name is already normalised: its key is its case-folded form (no validation per listed entry).
    record["path"] = str(library.entries / ident.name.casefold())
    if detail:
        import numpy as np

        record["crops"] = [str(p) for p in library.crops(ident.name)]
        record["vector_norms"] = [round(float(n), 4) for n in np.linalg.norm(vectors.learned, axis=1)]
        if vectors.init is not None:
            record["init_norms"] = [round(float(n), 4) for n in np.linalg.norm(vectors.init, axis=1)]
        if vectors.parts:  # SDXL: the norms above are clip_l's; every encoder's by its key
            record["encoder_norms"] = {
                key: [round(float(n), 4) for n in np.linalg.norm(learned, axis=1)]
                for key, (learned, _) in vectors.parts.items()
            }
    return record


def family_title(family: str) -> str:
    """How `list` and `show` name a model family ("SDXL"); "?" for an entry that does not say."""
    from crossinit_cli.families import FAMILIES

    return FAMILIES[family].title if family in FAMILIES else (family or "?")


COLUMNS = ("name", "family", "base model", "mode", "created", "tags", "notes")


def list_identities(library: Library, *, as_json: bool, query: Query | None = None) -> int:
    from crossinit_cli.families import FAMILIES

    query = query or Query()
    if query.family is not None and query.family.casefold() not in FAMILIES:
        raise CrossinitError(f"unknown family {query.family!r}; choose one of {', '.join(FAMILIES)}")
    if query.sort not in SORTS:
        raise CrossinitError(f"unknown sort {query.sort!r}; choose one of {', '.join(SORTS)}")
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
        ui.warn(f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}; `crossinit remove NAME` deletes one")
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
            rows.append(([entry.name, f"damaged: {_printable(entry.damaged or '')}"], "red"))
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


def _printable(text: str) -> str:
    """One line of text without control characters (a note could hold any)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else " " for c in text)


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
            f"(crossinit learn --resume {escape(run.name)}, or crossinit remove {escape(run.name)})"
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
    for key, value in record.items():
        if key == "snapshots":
            table.add_row(key, escape(_snapshot_summary(value, ident.active_step)))
        elif key == "clip_skip" and value is None:
            table.add_row(key, "unknown (imported from a file that cannot record it)")
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                table.add_row(f"{key}.{sub}", escape(_nested(subvalue)))
        elif isinstance(value, list):
            table.add_row(key, escape(", ".join(map(str, value))))
        else:
            table.add_row(key, escape(str(value)))
    ui.out().print(table)
    return 0


def _nested(value: Any) -> str:
    """A record's value on one line: nested tables (training.norms, training.size_conditioning) as compact JSON."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@dataclass(frozen=True)
class Edits:
    """What `edit` changes; all None/empty: open the metadata in $EDITOR."""

    rename: str | None = None
    note: str | None = None
    tags: list[str] | None = None
    untags: list[str] | None = None
    strength: float | None = None
    use_snapshot: str | None = None

    def none(self) -> bool:
        return (
            self.rename is None
            and self.note is None
            and not self.tags
            and not self.untags
            and self.strength is None
            and self.use_snapshot is None
        )


def edit_identity(library: Library, name: str, edits: Edits, *, as_json: bool = False) -> int:
    rename, note, tags, untags = edits.rename, edits.note, edits.tags, edits.untags
    strength, use_snapshot = edits.strength, edits.use_snapshot
    ident = library.get(name)
    step = None if use_snapshot is None else _snapshot_step(ident, use_snapshot)
    if strength is not None:
        if not 0.0 <= strength <= MAX_STRENGTH:
            raise CrossinitError(f"--strength must be between 0 and {MAX_STRENGTH:g}, not {strength:g}")
        if not ident.has_init:
            raise CrossinitError(
                f"identity {ident.name!r} has no cross-init start stored (it was imported), so its strength "
                "cannot be scaled"
            )

    def change(current: Identity) -> None:
        # Runs under the library lock on the latest metadata: tags from other processes are kept.
        if note is not None:
            current.notes = note
        current.tags = [t for t in current.tags if t not in (untags or [])]
        current.tags += [t for t in dict.fromkeys(tags or []) if t not in current.tags]
        if strength is not None:
            current.strength = strength
        if step is not None:
            current.active_step = step

    if edits.none():
        edited = _edit_in_editor(library, ident)
        if edited is None:  # saved as it was: "no changes" is all there is to say
            if as_json:
                ui.print_json(identity_record(library, ident))
            return 0
        ident = edited
    elif rename is not None:  # one atomic step, so a kill never leaves the note changed but not the name
        ident = library.rename(ident.name, rename, change)
    else:
        ident = library.modify(ident.name, change)
    if as_json:
        ui.print_json(identity_record(library, ident))
    else:
        ui.info(f"updated [bold]{escape(ident.name)}[/]")
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


def _snapshot_step(ident: Identity, wanted: str) -> int:
    """The step `--use-snapshot` names (0 for 'final'), if the identity kept a snapshot there."""
    if wanted.strip().lower() == "final":
        return 0
    steps = [int(s["step"]) for s in ident.snapshots]
    try:
        step = int(wanted)
    except ValueError:
        raise CrossinitError(f"--use-snapshot takes a step number or 'final', not {wanted!r}") from None
    if step not in steps:
        kept = ", ".join(map(str, steps)) if steps else "none (learn with --snapshot-every N to keep some)"
        raise CrossinitError(f"identity {ident.name!r} has no snapshot at step {step}; kept: {kept}")
    return step


def _edit_in_editor(library: Library, ident: Identity) -> Identity | None:
    """Open the metadata in $VISUAL/$EDITOR as TOML and store what comes back (None: nothing changed)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise CrossinitError("no edit flags given and $EDITOR is not set; see `crossinit edit --help`")
    text = ident.to_toml().decode("utf-8")
    with tempfile.TemporaryDirectory(prefix="crossinit-edit-") as tmp:
        path = Path(tmp) / f"{library.path_of(ident.name).name}.toml"
        path.write_text(text, encoding="utf-8")
        try:
            done = subprocess.run([*shlex.split(editor), str(path)], check=False)
        except OSError as exc:
            raise CrossinitError(f"cannot run editor {editor!r}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            raise CrossinitError(f"editor {editor!r} exited with status {done.returncode}; nothing changed")
        edited = path.read_text(encoding="utf-8")
    if edited == text:
        ui.info("no changes")
        return None
    try:
        raw = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:
        raise CrossinitError(f"edited metadata is not valid TOML ({library_text(exc)}); nothing changed") from None
    strength = raw.get("strength", ident.strength)
    if isinstance(strength, (int, float)) and not isinstance(strength, bool) and not 0 <= strength <= MAX_STRENGTH:
        raise CrossinitError(
            f"edited metadata is invalid: field 'strength' must be between 0 and {MAX_STRENGTH:g}, not {strength:g}; "
            "nothing changed"
        )
    return library.replace_meta(ident.name, raw)


def remove_identities(library: Library, names: list[str], *, yes: bool) -> int:
    """Delete entries and unfinished runs by name. Nothing but the name is needed: a damaged entry, a
    half-written one or an unreadable run goes the same way as a whole one (their crops are read where
    they can be, only to delete the latents cached from them: latents.forget)."""
    from crossinit_cli import checkpoint, latents

    runs = {name: checkpoint.leftover(library.home, name) for name in names}
    for name in names:
        if runs[name] is None and not library.has_folder(name):
            raise library.unknown(name)  # every name must exist before anything is removed
    if not yes:
        if not sys.stdin.isatty():
            raise CrossinitError("refusing to remove without confirmation; pass --yes")
        import typer

        if not typer.confirm(f"Remove {', '.join(names)}? This deletes the learned vectors and crops"):
            ui.info("nothing removed")
            return 1
    for name in names:
        if library.has_folder(name):
            library.remove(name)
            ui.info(f"removed [bold]{escape(name)}[/]")
        found = runs[name]
        if found is not None:
            path, run = found
            latents.forget(latents.folder(library.home), sorted((path / checkpoint.CROPS).glob("*.png")))
            checkpoint.discard_folder(path)
            where = f" (step {run.step} of {run.steps})" if run is not None else " (its settings were unreadable)"
            ui.info(f"removed the unfinished run of [bold]{escape(name)}[/]{where}")
    return 0
