"""`export` and `import`: identities to and from the files other Stable Diffusion tools read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from crossinit_cli import families, formats, tools, ui
from crossinit_cli.atomic import remove_stale_temps, shared_mode, write_bytes_atomic
from crossinit_cli.catalog import Query
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Damaged, Identity, Library, validate_name


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in formats.EXPORT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def export_identity(
    library: Library, name: str, *, fmt: str | None, output: str | None, force: bool, as_json: bool
) -> int:
    """One identity to a file: `-o` a folder (or none) takes the default name of `fmt` (default a1111);
    `-o` a file name picks the format by its suffix, and a `--format` that writes another kind is refused."""
    if fmt is not None and fmt not in formats.FORMATS:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(formats.FORMATS)}")
    ident = library.get(name)
    if output is None or Path(output).is_dir() or output.endswith(("/", "\\")):
        fmt = fmt or "a1111"
        folder = Path.cwd() if output is None else Path(output).expanduser()
        path = folder / formats.default_filename(ident.name, fmt)
    else:
        path = Path(output).expanduser()
        fmt = formats.format_for_file(path, fmt)
    formats.check_format(fmt, ident.family)
    if path.exists() and not force:
        raise CrossinitError(f"{path} already exists; pass --force to overwrite it")
    export = _export_of(library, ident, fmt)
    parts = export.parts
    vectors = parts[0]
    formats.export_vectors(export, fmt, path)
    hint = formats.REGISTRY[fmt].usage(path, ident.name, _file_stem(path), len(parts))
    facts = formats.export_facts(fmt, ident.family, formats.identity_clip_skip(ident))
    fits = facts["fits"]
    layer_hint = formats.clip_skip_hint(ident.family, facts["clip_skip"], facts["read_by"])
    if as_json:
        ui.print_json(
            {
                "name": ident.name,
                "format": fmt,
                "path": str(path),
                "shape": list(vectors.shape),
                "shapes": {k: list(v.shape) for k, v in zip(_keys(ident.family, len(parts)), parts)},
                "family": ident.family,
                **facts,
                "strength": ident.strength,
                "usage": hint,
            }
        )
    else:
        ui.info(f"exported [bold]{escape(ident.name)}[/] ({fmt}) to {escape(str(path))}")
        if fits:
            ui.info(escape(f"fits {fits}"))
        ui.info(escape(hint))
        if layer_hint:
            ui.info(escape(layer_hint))
    return 0


@dataclass(frozen=True)
class Selection:
    """The identities an export names: some by name, `--all`, or `--tag` (exactly one of the three)."""

    names: list[str]
    every: bool = False
    tag: str | None = None


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
    """`export`: one identity as before, several (names, --all, --tag) into a folder, or --to a tool."""
    names, every, tag = selection.names, selection.every, selection.tag
    if sum((bool(names), every, tag is not None)) != 1:
        raise CrossinitError("name the identities to export, or pass --all or --tag TAG (one of the three)")
    if to is not None:
        if output is not None or fmt is not None:
            raise CrossinitError("--to picks the folder and the format each tool reads; drop -o/--format")
        tool = tools.detect(to)  # before anything is read: a wrong folder is refused at once
        return deliver(library, _chosen(library, names, every, tag), tool, force=force, as_json=as_json)
    if len(names) == 1:
        return export_identity(library, names[0], fmt=fmt, output=output, force=force, as_json=as_json)
    if output is not None and formats.names_a_file(output):
        raise CrossinitError(f"-o {output} names one file; several identities need a folder (-o FOLDER/)")
    fmt = fmt or "a1111"
    chosen = _chosen(library, names, every, tag)
    folder = Path.cwd() if output is None else Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CrossinitError(f"{folder} is a file; exporting several identities needs a folder")
    for ident in chosen:  # a format that cannot hold one of them is refused before anything is written
        formats.check_format(fmt, ident.family)
    paths = {ident.name: folder / formats.default_filename(ident.name, fmt) for ident in chosen}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not force:  # checked for all before any is written
        raise CrossinitError(f"{taken[0]} already exists ({len(taken)} in all); pass --force to overwrite")
    records = []
    for ident in chosen:
        formats.export_vectors(_export_of(library, ident, fmt), fmt, paths[ident.name])
        record = {"name": ident.name, "format": fmt, "path": str(paths[ident.name]), "status": "written"}
        records.append({**record, "clip_skip": formats.identity_clip_skip(ident)})
        if not as_json:
            ui.info(f"exported [bold]{escape(ident.name)}[/] ({fmt}) to {escape(str(paths[ident.name]))}")
    if as_json:
        ui.print_json(records)
    return 0


def _export_of(library: Library, ident: Identity, fmt: str) -> formats.Export:
    """What an export of `ident` in `fmt` holds: its effective vectors, and what its files record about it."""
    import numpy as np

    parts = [np.ascontiguousarray(p, dtype=np.float32) for p in library.effective_parts(ident.name)]
    steps = int(ident.training.get("steps", 0) or 0)
    picture = _picture(library, ident.name, fmt)
    clip_skip = formats.identity_clip_skip(ident)
    return formats.Export(parts, ident.name, ident.base_model, steps, ident.family, picture, clip_skip)


def _picture(library: Library, name: str, fmt: str) -> Path | None:
    """The face crop a picture format is drawn on: the identity's first (None: none, or not a picture format)."""
    crops = library.crops(name) if formats.REGISTRY[fmt].picture else []
    return crops[0] if crops else None


def _chosen(library: Library, names: list[str], every: bool, tag: str | None) -> list[Identity]:
    """The identities an export names: each name (all must exist), or all of them, or those with `tag`."""
    if names:
        return [library.get(name) for name in dict.fromkeys(names)]
    entries = library.list(Query(tag=tag))
    for entry in entries:
        if isinstance(entry, Damaged):
            ui.warn(f"skipped {entry.name}: {entry.reason}")
    chosen = [entry for entry in entries if isinstance(entry, Identity)]
    if not chosen:
        raise CrossinitError(f"no identities with tag {tag!r}" if tag is not None else "the library is empty")
    return chosen


def deliver(library: Library, chosen: list[Identity], tool: tools.Tool, *, force: bool, as_json: bool) -> int:
    """Write each identity into `tool`'s embeddings folder in the format it reads, rewriting only files whose
    bytes would change. Files go in whole (temp file, then rename), so the tool never reads half of one."""
    if not as_json:
        where = f"{tool.label} at {tool.root}: embeddings go to {tool.embeddings} ({tool.setting})"
        ui.info(escape(where))
    if tool.embeddings.is_dir():
        remove_stale_temps(tool.embeddings)  # what an earlier export killed mid-write left behind
    records, failed = [], 0
    for ident in chosen:
        record: dict[str, Any] = {"name": ident.name, "tool": tool.key, "path": None, "setting": tool.setting}
        record["clip_skip"] = formats.identity_clip_skip(ident)
        try:
            fmt = formats.format_for_tool(tool.key, ident.family)
            path = tool.embeddings / formats.default_filename(ident.name, fmt)
            record.update(format=fmt, path=str(path))
            data = formats.encode_export(_export_of(library, ident, fmt), fmt)
            record["status"] = _put(path, data, ident.name, force=force)
        except CrossinitError as exc:
            failed += 1
            record.update(status="skipped", reason=str(exc))
            ui.warn(f"skipped {ident.name}: {exc}")
            records.append(record)
            continue
        records.append(record)
        if not as_json:
            stem = _file_stem(path)
            how = tool.hint.format(stem=stem)
            ui.info(f"{record['status']:>9} [bold]{escape(ident.name)}[/] -> {escape(path.name)} ({escape(how)})")
            layer_hint = formats.clip_skip_hint(ident.family, record["clip_skip"], [tool.key])
            if layer_hint:
                ui.info(escape(f"{' ' * 10}{layer_hint}"))
    counts = {s: sum(r["status"] == s for r in records) for s in ("written", "unchanged", "skipped")}
    if as_json:
        ui.print_json(records)
    else:
        ui.info(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do")
    if tool.step and (counts["written"] or counts["unchanged"]):  # it picks nothing up by itself: even with --json
        ui.info(escape(f"next: {tool.step}"))
    return 1 if failed else 0


def _put(path: Path, data: bytes, name: str, *, force: bool) -> str:
    """Write `data` to `path` unless it already holds exactly that: 'written' or 'unchanged'."""
    try:
        current = path.read_bytes() if path.is_file() else None
    except OSError as exc:
        raise CrossinitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if current is not None and _same_content(current, data):
        _share(path)  # a file an older crossinit left private (0600) becomes readable, without a rewrite
        return "unchanged"
    if current is not None and not force and _written_for(path) != name:
        raise CrossinitError(f"{path} exists and is not crossinit's export of {name!r}; pass --force to replace it")
    if path.exists() and not path.is_file():
        raise CrossinitError(f"{path} exists and is not a file")
    write_bytes_atomic(path, data, shared=True)
    return "written"


def _share(path: Path) -> None:
    """Give `path` the umask's mode if it has another (only its mode changes: same file, same bytes and mtime)."""
    mode = shared_mode()
    try:
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except OSError as exc:
        raise CrossinitError(f"cannot make {path} readable: {exc.strerror or exc}") from None


def _same_content(old: bytes, new: bytes) -> bool:
    """Equal files, or safetensors files equal but for the order of their header's keys (the writer's own
    map has no fixed order, so two exports of the same identity may differ byte for byte)."""
    if old == new:
        return True
    import json

    def split(blob: bytes) -> tuple[dict[str, Any], bytes] | None:
        size = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 + size:
            return None
        try:
            return json.loads(blob[8 : 8 + size]), blob[8 + size :]
        except ValueError:
            return None

    parts = split(old), split(new)
    return parts[0] is not None and parts[0] == parts[1]


def _written_for(path: Path) -> str | None:
    """The identity name crossinit recorded in a file it exported, if it is one."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            return (handle.metadata() or {}).get("crossinit_name")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return None


def _keys(family: str, count: int) -> list[str]:
    if family in families.FAMILIES and len(families.get(family).encoders) == count:
        return [e.key for e in families.get(family).encoders]
    return [str(i) for i in range(count)]


def import_identity(
    library: Library, path: Path, *, name: str | None, model: str | None, force: bool, as_json: bool
) -> int:
    if Path(path).is_dir() and not formats.is_embedding_folder(Path(path)):
        if name is not None:
            raise CrossinitError(
                f"{path} is a folder of embedding files: each is named after itself, so --name does not apply"
            )
        return import_folder(library, Path(path), model=model, force=force, as_json=as_json)
    loaded = formats.read_embedding_file(path, model)
    # An empty --name is a mistake to report, not a request for the file's stem.
    chosen = name if name is not None else (loaded.suggested_name or _file_stem(path))
    try:
        chosen = validate_name(chosen)
    except CrossinitError as exc:
        if name is not None:
            raise
        raise CrossinitError(f"{exc}; pass --name to choose a name") from None
    tokens, width = loaded.vectors.shape
    target = _store(library, loaded, chosen, Path(path), model=model, force=force)
    if as_json:
        from crossinit_cli.commands.library import identity_record

        ui.print_json(identity_record(library, library.get(chosen)))
    else:
        ui.info(
            f"imported [bold]{escape(chosen)}[/] ({tokens}x{'+'.join(map(str, loaded.widths))}, {loaded.layout} "
            f"layout{', ' + families.get(loaded.family).title if loaded.family else ''}) into {escape(str(target))}"
        )
    return 0


def import_folder(library: Library, folder: Path, *, model: str | None, force: bool, as_json: bool) -> int:
    """Import every embedding file directly in `folder`; one line per file skipped, and why."""
    imported, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        reason = None
        if path.is_dir():
            reason = "a folder (folders inside are not searched)"
        elif path.suffix.lower() not in formats.EMBEDDING_SUFFIXES:
            reason = f"not an embedding file ({', '.join(formats.EMBEDDING_SUFFIXES)})"
        elif path.name.lower().endswith(".preview.png"):
            reason = "a preview picture (A1111 shows it beside the embedding of that name)"
        else:
            try:
                name = _import_one(library, path, model=model, force=force)
                imported.append(name)
                if not as_json:
                    ui.info(f"imported [bold]{escape(name)}[/] from {escape(path.name)}")
                continue
            except CrossinitError as exc:
                reason = str(exc).replace(str(path), path.name)
        skipped.append({"file": str(path), "reason": reason})
        ui.warn(f"skipped {path.name}: {reason}")
    if not imported:
        raise CrossinitError(f"nothing imported from {folder} ({len(skipped)} file(s) skipped)")
    if as_json:
        from crossinit_cli.commands.library import identity_record

        records = [identity_record(library, library.get(name)) for name in imported]
        ui.print_json({"imported": records, "skipped": skipped})
    else:
        ui.info(f"imported {len(imported)}, skipped {len(skipped)} from {escape(str(folder))}")
    return 0


def _import_one(library: Library, path: Path, *, model: str | None, force: bool) -> str:
    loaded = formats.read_embedding_file(path, model)
    try:
        chosen = validate_name(loaded.suggested_name or _file_stem(path))
    except CrossinitError:
        chosen = validate_name(_file_stem(path))
    _store(library, loaded, chosen, path, model=model, force=force)
    return chosen


def _store(
    library: Library, loaded: formats.Imported, name: str, path: Path, *, model: str | None, force: bool
) -> Path:
    """Add an imported embedding to the library under `name`, recording where it came from."""
    tokens, width = loaded.vectors.shape
    ident = Identity(
        name=name,
        tokens=tokens,
        width=width,
        family=loaded.family,
        base_model=model or loaded.base_model or "",
        source=f"import:{loaded.layout}:{path.resolve()}",
        training={"steps": loaded.steps} if loaded.steps else {},
        clip_skip=loaded.clip_skip or 1,
        clip_skip_unknown=True if loaded.clip_skip is None else None,
    )
    target = library.add(ident, loaded.parts or loaded.vectors, force=force)
    note = formats.import_note(loaded, path)
    if note:
        ui.warn(note)
    return target
