"""Looking at and changing stored identities: the engine of `list`, `show`, `edit` and `remove` (no torch).

`identity_record` is what an identity looks like as data (`list --json`, `show --json`); `edit` applies an
`Edits` in one locked step, `edit_text` stores metadata changed by hand (the $EDITOR round trip
`edit_in_editor` runs), and `remove` deletes entries and unfinished runs (`Removal` checks every name
first, so a command can ask before anything goes). Nothing here prints.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossinit_cli import checkpoint
from crossinit_cli.catalog import SORTS, Query
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.store import Identity, Library

MAX_STRENGTH = 4.0


def identity_record(library: Library, ident: Identity, *, detail: bool = False) -> dict[str, Any]:
    """What `list --json` and `show --json` print for one identity (`detail`: with crops and vector norms)."""
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


def check_query(query: Query) -> Query:
    """A listing's filter with a known family and sort (a one-line refusal otherwise)."""
    from crossinit_cli.families import FAMILIES

    if query.family is not None and query.family.casefold() not in FAMILIES:
        raise CrossinitError(f"unknown family {query.family!r}; choose one of {', '.join(FAMILIES)}")
    if query.sort not in SORTS:
        raise CrossinitError(f"unknown sort {query.sort!r}; choose one of {', '.join(SORTS)}")
    return query


# ---- edit -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edits:
    """What `edit` changes; all None/empty: nothing (the command then opens the metadata in $EDITOR)."""

    rename: str | None = None
    note: str | None = None
    tags: list[str] | None = None
    untags: list[str] | None = None
    strength: float | None = None
    use_snapshot: str | None = None
    tag_order: list[tuple[str, str]] | None = None  # ("tag"|"untag", tag) as given on the command line
    model: str | None = None  # the base model it runs on (a path made absolute): trusted from now on

    def none(self) -> bool:
        return (
            self.model is None
            and self.rename is None
            and self.note is None
            and not self.tags
            and not self.untags
            and self.strength is None
            and self.use_snapshot is None
        )


def tag_order(args: list[str]) -> list[tuple[str, str]]:
    """The `--tag`/`--untag` values of a command line, in the order given (`--tag x`, `--tag=x`)."""
    order: list[tuple[str, str]] = []
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            break
        for op in ("tag", "untag"):
            if token == f"--{op}":
                value = next(tokens, None)
                if value is not None:
                    order.append((op, value))
            elif token.startswith(f"--{op}="):
                order.append((op, token.split("=", 1)[1]))
    return order


def edit(library: Library, name: str, edits: Edits) -> Identity:
    """Apply `edits` to an identity in one locked step (a rename too: a kill never leaves half of it done);
    the identity as stored afterwards."""
    ident = library.get(name)
    step = None if edits.use_snapshot is None else snapshot_step(ident, edits.use_snapshot)
    strength = edits.strength
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
        if edits.note is not None:
            current.notes = edits.note
        if edits.tag_order:  # in command-line order: `--tag x --untag x` ends without x, `--untag x --tag x` with
            for op, tag in edits.tag_order:
                if op == "untag":
                    current.tags = [t for t in current.tags if t != tag]
                elif tag not in current.tags:
                    current.tags.append(tag)
        else:
            current.tags = [t for t in current.tags if t not in (edits.untags or [])]
            current.tags += [t for t in dict.fromkeys(edits.tags or []) if t not in current.tags]
        if strength is not None:
            current.strength = strength
        if step is not None:
            current.active_step = step
        if edits.model is not None:  # named by the user: no longer only what an imported file claimed
            current.base_model, current.base_model_claimed = edits.model, None

    if edits.rename is not None:
        return library.rename(ident.name, edits.rename, change)
    return library.modify(ident.name, change)


def snapshot_step(ident: Identity, wanted: str) -> int:
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


def edit_in_editor(library: Library, name: str, editor: str | None = None) -> Identity | None:
    """Open an identity's metadata in `editor` (default $VISUAL, else $EDITOR) as TOML and store what comes
    back; None when it came back unchanged."""
    ident = library.get(name)
    editor = editor or os.environ.get("VISUAL") or os.environ.get("EDITOR")
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
        return None
    try:
        return edit_text(library, ident, edited)
    except CrossinitError as exc:  # the user's edits are not thrown away: kept where the error says
        kept = _keep_edit(ident.name, edited)
        raise CrossinitError(f"{exc}; your edit is kept in {kept}") from None


def _keep_edit(name: str, edited: str) -> Path:
    """A refused $EDITOR result, kept in a file of its own (fix it, then paste it back with `crossinit edit`)."""
    fd, kept = tempfile.mkstemp(prefix=f"crossinit-edit-{name}-", suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(edited)
    return Path(kept)


def edit_text(library: Library, ident: Identity, edited: str) -> Identity:
    """Store `ident`'s metadata as edited by hand (TOML text); refused whole, with nothing changed, if invalid."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

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


# ---- remove ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removed:
    """One thing removed under a name: its entry (`run` False), or its unfinished run (`run` True: at `step`
    of `steps`, both None when its settings were unreadable)."""

    name: str
    run: bool = False
    step: int | None = None
    steps: int | None = None


WHAT = ("identity", "run", "both")
"""What `remove` takes of a name: its stored identity, its unfinished run, or both."""


@dataclass(frozen=True)
class Removal:
    """Names checked for removal, and what of each goes (`what[name]`: "identity", "run" or "both"); nothing
    is deleted yet. `ambiguous` are the names that are both an identity and an unfinished run when neither
    --identity nor --unfinished said which: a command asks (or refuses) and sets each with `choose`."""

    names: list[str]
    runs: dict[str, tuple[Path, checkpoint.Run | None] | None]
    what: dict[str, str]
    ambiguous: list[str]

    def choose(self, name: str, what: str) -> None:
        """Take `what` of the ambiguous `name` ("identity", "run" or "both")."""
        if what not in WHAT:
            raise CrossinitError(f"remove takes the identity, the run or both of {name!r}, not {what!r}")
        self.what[name] = what
        self.ambiguous.remove(name)

    def planned(self) -> list[tuple[str, bool]]:
        """(name, run?) of every thing this removal deletes, in the order it deletes them."""
        things = []
        for name in self.names:
            if self.what[name] in ("identity", "both"):
                things.append((name, False))
            if self.what[name] in ("run", "both"):
                things.append((name, True))
        return things

    def run(self, library: Library) -> Iterator[Removed]:
        """Delete them, one name at a time (a record as each thing is gone). Nothing but the name is needed:
        a damaged entry, a half-written one or an unreadable run goes the same way as a whole one (their
        crops are read where they can be, only to delete the latents cached from them: latents.forget)."""
        from crossinit_cli import latents

        if self.ambiguous:
            raise CrossinitError(ambiguity(self.ambiguous[0]))
        for name, is_run in self.planned():
            if not is_run:
                if library.has_folder(name):
                    library.remove(name)
                    yield Removed(name)
                continue
            found = self.runs[name]
            if found is not None:
                path, run = found
                latents.forget(latents.folder(library.home), sorted((path / checkpoint.CROPS).glob("*.png")))
                checkpoint.discard_folder(path)
                yield Removed(name, True, *((run.step, run.steps) if run is not None else (None, None)))

    def left(self, library: Library, done: list[Removed]) -> list[tuple[str, bool]]:
        """What of this removal is still there after it stopped early (Ctrl-C): looked up again, so a thing
        whose deletion finished without being reported counts as removed."""
        reported = {(r.name, r.run) for r in done}
        return [
            (name, is_run)
            for name, is_run in self.planned()
            if (name, is_run) not in reported
            and (checkpoint.leftover(library.home, name) is not None if is_run else library.has_folder(name))
        ]


def ambiguity(name: str) -> str:
    """The one line for a name that is both an identity and an unfinished run, with the flags that choose."""
    return (
        f"{name!r} is both a stored identity and an unfinished run; say which to remove: "
        f"`crossinit remove {name} --unfinished` (the run only), `--identity` (the identity only), or both flags"
    )


def removal(library: Library, names: list[str], *, identity: bool = False, unfinished: bool = False) -> Removal:
    """Every name checked before anything is removed. `identity`/`unfinished` (--identity, --unfinished):
    only that of each name, which must exist; neither: whatever the name is (an identity, an unfinished run),
    a name that is both left `ambiguous` for the command to settle."""
    runs = {name: checkpoint.leftover(library.home, name) for name in names}
    what: dict[str, str] = {}
    ambiguous: list[str] = []
    for name in names:
        has_run, has_entry = runs[name] is not None, library.has_folder(name)
        if unfinished and not has_run and not (identity and has_entry):
            raise CrossinitError(f"no unfinished run of {name!r}; `crossinit list` shows unfinished runs")
        if identity and not has_entry and not (unfinished and has_run):
            raise library.unknown(name)
        if not has_run and not has_entry:
            raise library.unknown(name)
        if identity or unfinished:
            take_entry, take_run = identity and has_entry, unfinished and has_run
        elif has_run and has_entry:
            ambiguous.append(name)
            take_entry = take_run = True  # settled by `choose`
        else:
            take_entry, take_run = has_entry, has_run
        what[name] = "both" if take_entry and take_run else ("identity" if take_entry else "run")
    return Removal(list(names), runs, what, ambiguous)


def remove(
    library: Library,
    names: list[str],
    on_removed: Callable[[Removed], None] | None = None,
    *,
    identity: bool = False,
    unfinished: bool = False,
) -> list[Removed]:
    """`crossinit remove --yes`: delete the entries and unfinished runs of these names (all must exist; a name
    that is both needs `identity` and/or `unfinished` to say which)."""
    done = []
    for removed in removal(library, names, identity=identity, unfinished=unfinished).run(library):
        done.append(removed)
        if on_removed is not None:
            on_removed(removed)
    return done
