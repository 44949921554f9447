"""`export` and `import`: the engine's records (`crossinit_cli.exporting`) as lines on stderr, or --json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from crossinit_cli import exporting as engine
from crossinit_cli import families, readers, tools, ui
from crossinit_cli.editing import identity_record
from crossinit_cli.errors import shown
from crossinit_cli.exporting import Selection
from crossinit_cli.store import Library

__all__ = ["Selection", "export_identities", "import_identity"]


def export_identities(
    library: Library,
    selection: Selection,
    *,
    fmt: str | None,
    output: str | None,
    to: Path | None,
    force: bool,
    as_json: bool,
) -> int:
    """`export`: one identity to a file, several (names, --all, --tag) into a folder, or --to a tool."""
    target = engine.target(selection, fmt=fmt, output=output, to=to, force=force)
    chosen = engine.choose(library, selection)
    for entry in chosen.damaged:
        ui.warn(f"skipped {entry.name}: {entry.reason}")
    plan = engine.plan(target, chosen)
    if target.tool is not None:
        return _deliver(library, plan, target.tool, as_json=as_json)
    if target.single:
        (exported,) = engine.write(library, plan)
        _report_one(exported, as_json=as_json)
        return 0

    def written(exported: engine.ExportedFile) -> None:
        if not as_json:
            ui.info(f"exported [bold]{escape(exported.name)}[/] ({exported.format}) to {escape(str(exported.path))}")

    files = engine.write(library, plan, written)
    if as_json:
        records = [{"name": f.name, "format": f.format, "path": str(f.path), "status": f.status} for f in files]
        ui.print_json([{**r, "clip_skip": f.clip_skip} for r, f in zip(records, files)])
    return 0


def _report_one(exported: engine.ExportedFile, *, as_json: bool) -> None:
    """One identity's file: where it went, what it fits and how a tool uses it."""
    ident = exported.identity
    facts = readers.export_facts(exported.format or "", ident.family, exported.clip_skip)
    fits = facts["fits"]
    if as_json:
        ui.print_json(
            {
                "name": ident.name,
                "format": exported.format,
                "path": str(exported.path),
                "shape": next(iter(exported.shapes.values())),
                "shapes": exported.shapes,
                "family": ident.family,
                **facts,
                "strength": ident.strength,
                "usage": exported.usage,
            }
        )
        return
    ui.info(f"exported [bold]{escape(ident.name)}[/] ({exported.format}) to {escape(str(exported.path))}")
    if fits:
        ui.info(escape(f"fits {fits}"))
    ui.info(escape(exported.usage))
    if exported.layer_hint:
        ui.info(escape(exported.layer_hint))


def _deliver(library: Library, plan: engine.Plan, tool: tools.Tool, *, as_json: bool) -> int:
    """`export --to`: a line per identity (written, unchanged or skipped), the counts, and the tool's next step."""
    if not as_json:
        ui.info(escape(f"{tool.label} at {tool.root}: embeddings go to {tool.embeddings} ({tool.setting})"))

    def delivered(exported: engine.ExportedFile) -> None:
        if exported.status == "skipped":
            ui.warn(f"skipped {exported.name}: {exported.reason}")
        elif not as_json:
            assert exported.path is not None
            how = tool.hint.format(stem=engine.file_stem(exported.path))
            what = f"[bold]{escape(exported.name)}[/] -> {escape(exported.path.name)}"
            ui.info(f"{exported.status:>9} {what} ({escape(how)})")
            if exported.layer_hint:
                ui.info(escape(f"{' ' * 10}{exported.layer_hint}"))

    files = engine.write(library, plan, delivered)
    counts = {s: sum(f.status == s for f in files) for s in ("written", "unchanged", "skipped")}
    if as_json:
        ui.print_json([_delivery_record(f, tool) for f in files])
    else:
        ui.info(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do")
    if tool.step and (counts["written"] or counts["unchanged"]):  # it picks nothing up by itself: even with --json
        ui.info(escape(f"next: {tool.step}"))
    return 1 if counts["skipped"] else 0


def _delivery_record(exported: engine.ExportedFile, tool: tools.Tool) -> dict[str, Any]:
    """`export --to --json`'s record of one identity (a format and path once they were decided)."""
    path = None if exported.path is None else str(exported.path)
    record: dict[str, Any] = {"name": exported.name, "tool": tool.key, "path": path, "setting": tool.setting}
    record["clip_skip"] = exported.clip_skip
    if exported.format is not None:
        record["format"] = exported.format
    record["status"] = exported.status
    if exported.reason is not None:
        record["reason"] = exported.reason
    return record


def import_identity(
    library: Library, path: Path, *, name: str | None, model: str | None, force: bool, as_json: bool
) -> int:
    """`import`: one file (a line, or its identity's record) or a folder (a line per file, skipped ones warned)."""

    def each(file: engine.ImportedFile) -> None:
        if file.name is None:
            ui.warn(f"skipped {file.file.name}: {file.reason}")
            return
        if file.note:
            ui.warn(file.note)
        elif not as_json:
            ui.info(f"imported [bold]{escape(file.name)}[/] from {escape(shown(file.file.name))}")
            _report_claim(library, file.name)

    done = engine.import_(library, path, name=name, model=model, force=force, on_file=each)
    if not done.folder:
        _report_file(library, done.imported[0], as_json=as_json)
    elif as_json:
        records = [identity_record(library, library.get(f.name)) for f in done.imported if f.name is not None]
        skipped = [{"file": str(f.file), "reason": f.reason} for f in done.skipped]
        ui.print_json({"imported": records, "skipped": skipped})
    else:
        ui.info(f"imported {len(done.imported)}, skipped {len(done.skipped)} from {escape(str(path))}")
    return 0


def _report_file(library: Library, file: engine.ImportedFile, *, as_json: bool) -> None:
    assert file.name is not None and file.embedding is not None
    if file.note:
        ui.warn(file.note)
    if as_json:
        ui.print_json(identity_record(library, library.get(file.name)))
        return
    loaded = file.embedding
    tokens = loaded.vectors.shape[0]
    family = f", {families.get(loaded.family).title}" if loaded.family else ""
    family += " (from the vector widths)" if family and file.family_inferred else ""
    ui.info(
        f"imported [bold]{escape(file.name)}[/] ({tokens}x{'+'.join(map(str, loaded.widths))}, {loaded.layout} "
        f"layout{family}) into {escape(str(file.target))}"
    )
    _report_claim(library, file.name)


def _report_claim(library: Library, name: str) -> None:
    """The base model an imported file names, which nothing uses until the user names it (docs/library.md)."""
    import shlex

    ident = library.get(name)
    if ident.base_model_claimed and ident.base_model:
        model = shown(ident.base_model)
        ui.info(
            escape(
                f"{ident.name}: its file names base model '{model}', which is not downloaded or used until you "
                f"name it: crossinit edit {shlex.quote(ident.name)} --model {shlex.quote(model)} (or generate and eval "
                "with --model)"
            )
        )
