"""Identities out to the files other Stable Diffusion tools read, and such files back in: the engine of
`export` and `import`.

`export(library, selection, ...)` is the whole export in one call; `commands/transfer.py` runs its steps
itself (`target`, `choose`, `plan`, `write`) only to print between them. Nothing here prints: each file
becomes an `ExportedFile` or an `ImportedFile`, and a skipped one says why in its record.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossinit_cli import families, formats, readers, tools
from crossinit_cli.atomic import remove_stale_temps, shared_mode, write_bytes_atomic
from crossinit_cli.catalog import Query
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Damaged, Identity, Library, validate_name

DEFAULT_FORMAT = "a1111"


def file_stem(path: Path) -> str:
    """A file's name without its export suffix (`alice.preview.png` -> `alice`): the word a tool prompts with."""
    name = path.name
    for suffix in formats.EXPORT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ---- export: which identities, where, in what format ---------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The identities an export names: some by name, `--all`, or `--tag` (exactly one of the three)."""

    names: list[str]
    every: bool = False
    tag: str | None = None


@dataclass(frozen=True)
class Target:
    """Where an export goes, checked before any identity is read: one file (`single`), a folder, or a tool."""

    selection: Selection
    fmt: str | None
    output: str | None
    tool: tools.Tool | None
    force: bool

    @property
    def single(self) -> bool:
        return self.tool is None and len(self.selection.names) == 1


@dataclass(frozen=True)
class Chosen:
    """The identities an export writes, and the damaged entries `--all`/`--tag` passed over."""

    identities: list[Identity]
    damaged: list[Damaged] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """A checked export: each identity's format and path (a tool's are decided per identity, in `write`)."""

    target: Target
    identities: list[Identity]
    fmt: str | None  # None: each in the format the tool reads for its family
    paths: dict[str, Path]


@dataclass(frozen=True)
class ExportedFile:
    """One identity's export: where it went and whether it was 'written', 'unchanged' or 'skipped' (`reason`)."""

    name: str
    format: str | None
    path: Path | None
    status: str
    identity: Identity
    reason: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)  # each encoder's rows by its export key
    usage: str = ""  # how to use the file (one file only)
    layer_hint: str | None = None  # the clip skip to set in the tool, if the identity has one
    clip_skip: int | None = None  # the identity's clip skip (None: unknown, imported from a pickle)


@dataclass(frozen=True)
class Exports:
    """What an export did: a record per identity (in order), the entries passed over, the tool written into."""

    files: list[ExportedFile]
    damaged: list[Damaged]
    tool: tools.Tool | None

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files if f.path is not None and f.status != "skipped"]

    @property
    def failed(self) -> int:
        return sum(f.status == "skipped" for f in self.files)


def target(
    selection: Selection, *, fmt: str | None = None, output: str | None = None, to: Path | None = None, force: bool
) -> Target:
    """The export's flags checked, and `to`'s tool found (a wrong folder is refused before anything is read)."""
    names, every, tag = selection.names, selection.every, selection.tag
    if sum((bool(names), every, tag is not None)) != 1:
        raise CrossinitError("name the identities to export, or pass --all or --tag TAG (one of the three)")
    if to is not None:
        if output is not None or fmt is not None:
            raise CrossinitError("--to picks the folder and the format each tool reads; drop -o/--format")
        return Target(selection, None, None, tools.detect(to), force)
    if fmt is not None and fmt not in formats.FORMATS:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(formats.FORMATS)}")
    if len(names) != 1 and output is not None and formats.names_a_file(output):
        raise CrossinitError(f"-o {output} names one file; several identities need a folder (-o FOLDER/)")
    return Target(selection, fmt, output, None, force)


def choose(library: Library, selection: Selection) -> Chosen:
    """The identities a selection names: each name (all must exist), or all of them, or those with its tag."""
    if selection.names:
        return Chosen([library.get(name) for name in dict.fromkeys(selection.names)])
    entries = library.list(Query(tag=selection.tag))
    damaged = [entry for entry in entries if isinstance(entry, Damaged)]
    chosen = [entry for entry in entries if isinstance(entry, Identity)]
    if not chosen:
        tag = selection.tag
        raise CrossinitError(f"no identities with tag {tag!r}" if tag is not None else "the library is empty")
    return Chosen(chosen, damaged)


def plan(target: Target, chosen: Chosen) -> Plan:
    """Each identity's format and path, every refusal (format, existing file) made before anything is written.

    One identity: `-o` a folder (or none) takes the default name of the format (default a1111); `-o` a file
    name picks the format by its suffix, and a `--format` that writes another kind is refused."""
    idents = chosen.identities
    if target.tool is not None:
        return Plan(target, idents, None, {})
    output = target.output
    if target.single:
        ident = idents[0]
        if output is None or Path(output).is_dir() or output.endswith(("/", "\\")):
            fmt = target.fmt or DEFAULT_FORMAT
            folder = Path.cwd() if output is None else Path(output).expanduser()
            path = folder / formats.default_filename(ident.name, fmt)
        else:
            named = Path(output).expanduser()
            fmt = formats.format_for_file(named, target.fmt)
            path = formats.export_path(named, fmt)
        formats.check_format(fmt, ident.family)
        if path.exists() and not target.force:
            raise CrossinitError(f"{path} already exists; pass --force to overwrite it")
        return Plan(target, idents, fmt, {ident.name: path})
    fmt = target.fmt or DEFAULT_FORMAT
    folder = Path.cwd() if output is None else Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CrossinitError(f"{folder} is a file; exporting several identities needs a folder")
    for ident in idents:  # a format that cannot hold one of them is refused before anything is written
        formats.check_format(fmt, ident.family)
    paths = {ident.name: folder / formats.default_filename(ident.name, fmt) for ident in idents}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not target.force:  # checked for all before any is written
        raise CrossinitError(f"{taken[0]} already exists ({len(taken)} in all); pass --force to overwrite")
    return Plan(target, idents, fmt, paths)


def refuse_inside_library(library: Library, path: Path) -> None:
    """An export never writes into the library itself (it would overwrite an entry's own files)."""
    home = Path(os.path.realpath(library.home))
    where = Path(os.path.realpath(path))
    if where == home or home in where.parents:
        raise CrossinitError(f"{path} is inside the library at {library.home}; export somewhere else")


def write(library: Library, plan: Plan, on_file: Callable[[ExportedFile], None] | None = None) -> list[ExportedFile]:
    """Write a checked plan's files, handing each record to `on_file` as soon as it is done."""
    tool, fmt = plan.target.tool, plan.fmt
    for path in [tool.embeddings] if tool is not None else plan.paths.values():
        refuse_inside_library(library, path)
    if tool is not None:
        if tool.embeddings.is_dir():
            remove_stale_temps(tool.embeddings)  # what an earlier export killed mid-write left behind
        each = _delivery(library, tool, force=plan.target.force)
    else:
        assert fmt is not None

        def each(ident: Identity) -> ExportedFile:
            return _to_file(library, ident, fmt, plan.paths[ident.name], usage=plan.target.single)

    done: list[ExportedFile] = []
    for ident in plan.identities:
        record = each(ident)
        done.append(record)
        if on_file is not None:
            on_file(record)
    return done


def export(
    library: Library,
    selection: Selection,
    *,
    fmt: str | None = None,
    output: str | Path | None = None,
    to: Path | None = None,
    force: bool = False,
) -> Exports:
    """`crossinit export`, whole: the chosen identities to one file, into a folder, or into a tool's folder."""
    where = target(selection, fmt=fmt, output=None if output is None else str(output), to=to, force=force)
    chosen = choose(library, selection)
    return Exports(write(library, plan(where, chosen)), chosen.damaged, where.tool)


def export_of(library: Library, ident: Identity, fmt: str) -> formats.Export:
    """What an export of `ident` in `fmt` holds: its effective vectors, and what its files record about it."""
    import numpy as np

    parts = [np.ascontiguousarray(p, dtype=np.float32) for p in library.effective_parts(ident.name)]
    steps = int(ident.training.get("steps", 0) or 0)
    crops = library.crops(ident.name) if formats.REGISTRY[fmt].picture else []
    picture = crops[0] if crops else None  # a picture format is drawn on the identity's first face crop
    clip_skip = readers.identity_clip_skip(ident)
    return formats.Export(parts, ident.name, ident.base_model, steps, ident.family, picture, clip_skip)


def _to_file(library: Library, ident: Identity, fmt: str, path: Path, *, usage: bool) -> ExportedFile:
    export = export_of(library, ident, fmt)
    clip_skip = export.clip_skip
    formats.export_vectors(export, fmt, path)
    parts = export.parts
    hint = formats.REGISTRY[fmt].usage(path, ident.name, file_stem(path), len(parts)) if usage else ""
    return ExportedFile(
        ident.name,
        fmt,
        path,
        "written",
        ident,
        shapes={k: list(v.shape) for k, v in zip(_keys(ident.family, len(parts)), parts)},
        usage=hint,
        layer_hint=readers.clip_skip_hint(ident.family, clip_skip, readers.read_by(fmt, ident.family)),
        clip_skip=clip_skip,
    )


def _keys(family: str, count: int) -> list[str]:
    if family in families.FAMILIES and len(families.get(family).encoders) == count:
        return [e.key for e in families.get(family).encoders]
    return [str(i) for i in range(count)]


# ---- export --to: into a tool's embeddings folder, rewriting only what changed -------------------------------


def _delivery(library: Library, tool: tools.Tool, *, force: bool) -> Callable[[Identity], ExportedFile]:
    """One identity into `tool`'s embeddings folder in the format it reads, rewritten only if its bytes would
    change; a refusal is a 'skipped' record. Files go in whole (temp file, then rename): no half file is read."""

    def deliver(ident: Identity) -> ExportedFile:
        fmt: str | None = None
        path: Path | None = None
        clip_skip = readers.identity_clip_skip(ident)
        try:
            fmt = formats.format_for_tool(tool.key, ident.family)
            path = tool.embeddings / formats.default_filename(ident.name, fmt)
            data = formats.encode_export(export_of(library, ident, fmt), fmt)
            status = _put(path, data, ident.name, force=force)
        except CrossinitError as exc:
            return ExportedFile(ident.name, fmt, path, "skipped", ident, reason=str(exc), clip_skip=clip_skip)
        hint = readers.clip_skip_hint(ident.family, clip_skip, [tool.key])  # the one tool's setting
        return ExportedFile(ident.name, fmt, path, status, ident, layer_hint=hint, clip_skip=clip_skip)

    return deliver


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


# ---- import ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedFile:
    """One file of an import: the identity it became (`name`, stored in `target`), or why it was skipped."""

    file: Path
    name: str | None = None
    target: Path | None = None
    embedding: formats.Imported | None = None
    reason: str | None = None
    note: str | None = None  # what the file could not tell (readers.import_note), one line
    family_inferred: bool = False  # the family was told from the vectors' widths alone (no --model, no metadata)


@dataclass(frozen=True)
class Imports:
    """What an import did: a record per file (in order); `folder`: a folder of files, each named after itself."""

    files: list[ImportedFile]
    folder: bool

    @property
    def imported(self) -> list[ImportedFile]:
        return [f for f in self.files if f.name is not None]

    @property
    def skipped(self) -> list[ImportedFile]:
        return [f for f in self.files if f.name is None]


class NothingImported(CrossinitError):
    """A folder import stored nothing; `skipped` says why for each file."""

    def __init__(self, message: str, skipped: list[ImportedFile]) -> None:
        super().__init__(message)
        self.skipped = skipped


def import_(
    library: Library,
    path: Path,
    *,
    name: str | None = None,
    model: str | None = None,
    force: bool = False,
    on_file: Callable[[ImportedFile], None] | None = None,
) -> Imports:
    """`crossinit import`: one embedding file (or diffusers folder) as `name` (default: from the file), or
    every embedding file directly in a folder, each named after itself; a record per file, skipped ones too
    (a folder's, each handed to `on_file` as it is done). `model`: the base model to record."""
    path = Path(path)
    if path.is_dir() and not formats.is_embedding_folder(path):
        if name is not None:
            raise CrossinitError(
                f"{path} is a folder of embedding files: each is named after itself, so --name does not apply"
            )
        return Imports(_import_folder(library, path, model=model, force=force, on_file=on_file), folder=True)
    loaded = formats.read_embedding_file(path, model)
    # An empty --name is a mistake to report, not a request for the file's stem.
    chosen = name if name is not None else (loaded.suggested_name or file_stem(path))
    try:
        chosen = validate_name(chosen)
    except CrossinitError as exc:
        if name is not None:
            raise
        raise CrossinitError(f"{exc}; pass --name to choose a name") from None
    loaded, inferred = checked_family(loaded, path, model)
    stored = _store(library, loaded, chosen, path, model=model, force=force)
    return Imports(
        [ImportedFile(path, chosen, stored, loaded, note=readers.import_note(loaded, path), family_inferred=inferred)],
        folder=False,
    )


def _import_folder(
    library: Library,
    folder: Path,
    *,
    model: str | None,
    force: bool,
    on_file: Callable[[ImportedFile], None] | None,
) -> list[ImportedFile]:
    """Every embedding file directly in `folder`; a skipped one's record says why."""
    done: list[ImportedFile] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        record = _import_one(library, path, model=model, force=force)
        done.append(record)
        if on_file is not None:
            on_file(record)
    if not any(record.name for record in done):
        raise NothingImported(f"nothing imported from {folder} ({len(done)} file(s) skipped)", done)
    return done


def _import_one(library: Library, path: Path, *, model: str | None, force: bool) -> ImportedFile:
    if path.is_dir():
        return ImportedFile(path, reason="a folder (folders inside are not searched)")
    if path.suffix.lower() not in formats.EMBEDDING_SUFFIXES:
        return ImportedFile(path, reason=f"not an embedding file ({', '.join(formats.EMBEDDING_SUFFIXES)})")
    if path.name.lower().endswith(".preview.png"):
        return ImportedFile(path, reason="a preview picture (A1111 shows it beside the embedding of that name)")
    try:
        loaded = formats.read_embedding_file(path, model)
        loaded, inferred = checked_family(loaded, path, model)
        try:
            chosen = validate_name(loaded.suggested_name or file_stem(path))
        except CrossinitError:
            chosen = validate_name(file_stem(path))
        stored = _store(library, loaded, chosen, path, model=model, force=force)
    except CrossinitError as exc:
        return ImportedFile(path, reason=str(exc).replace(str(path), path.name))
    note = readers.import_note(loaded, path)
    return ImportedFile(path, chosen, stored, loaded, note=note, family_inferred=inferred)


def checked_family(loaded: formats.Imported, path: Path, model: str | None) -> tuple[formats.Imported, bool]:
    """The embedding with its family: `model`'s, once its text encoders' widths are checked against the
    vectors' (a mismatch is refused in one line); else what the file tells (its metadata, its layout, or,
    where unambiguous, its width: 768 SD 1.x, 1024 SD 2.x; True when only the width told). A model whose
    configs cannot be read without loading (a hub id not in the cache) is recorded as given, unchecked."""
    from dataclasses import replace

    widths = tuple(loaded.widths)
    if model:
        peeked = families.peek(model)
        if peeked is None:
            return loaded, False
        theirs = tuple(peeked.widths or ())
        if (theirs and theirs != widths) or (not theirs and len(widths) != len(peeked.family.encoders)):
            shown = "+".join(map(str, theirs)) if theirs else f"{len(peeked.family.encoders)} encoder(s)"
            own = f" ({families.get(loaded.family).title})" if loaded.family in families.FAMILIES else ""
            raise CrossinitError(
                f"{path} holds vectors of width {'+'.join(map(str, widths))}{own}, but --model {model} is "
                f"{peeked.family.title} (text width {shown}); give the model it was learned on, or leave out --model"
            )
        return replace(loaded, family=peeked.family.name, family_inferred=False), False
    return loaded, loaded.family_inferred


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
        base_model_claimed=True if not model and loaded.base_model else None,  # the file's word: not used as is
        source=f"import:{loaded.layout}:{path.resolve()}",
        training={"steps": loaded.steps} if loaded.steps else {},
        clip_skip=loaded.clip_skip or 1,
        clip_skip_unknown=True if loaded.clip_skip is None else None,
    )
    return library.add(ident, loaded.parts or loaded.vectors, force=force)
