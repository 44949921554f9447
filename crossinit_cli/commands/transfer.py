"""`export` and `import`: identities to and from the files other Stable Diffusion tools read."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from crossinit_cli import families, formats, ui
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, validate_name

USAGE_HINTS = {
    "a1111": "A1111/Forge: put it in stable-diffusion-webui/embeddings/ and write `{stem}` in a prompt; "
    "ComfyUI: models/embeddings/, prompt `embedding:{stem}`",
    "a1111-pt": "A1111: put it in stable-diffusion-webui/embeddings/ and write `{stem}` in a prompt",
    "diffusers": 'pipe.load_textual_inversion("{path}", token="<{name}>"), then write <{name}> in a prompt',
    "official": "the official Cross Initialization code's test scripts load it as learned embeddings",
    "invokeai": "InvokeAI: put it in its models folder (or Model Manager > Add) and write <{stem}> in a prompt",
}


SDXL_DIFFUSERS_HINT = (
    'state = safetensors.torch.load_file("{path}"); '
    'pipe.load_textual_inversion(state["clip_l"], token="<{name}>", text_encoder=pipe.text_encoder, '
    "tokenizer=pipe.tokenizer); "
    'pipe.load_textual_inversion(state["clip_g"], token="<{name}>", text_encoder=pipe.text_encoder_2, '
    "tokenizer=pipe.tokenizer_2)"
)


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in (".diffusers.safetensors", ".safetensors", ".pt", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def export_identity(library: Library, name: str, *, fmt: str, output: str | None, force: bool, as_json: bool) -> int:
    if fmt not in formats.FORMATS:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(formats.FORMATS)}")
    ident = library.get(name)
    formats.check_format(fmt, ident.family)
    filename = formats.default_filename(ident.name, fmt)
    if output is None:
        path = Path.cwd() / filename
    elif Path(output).is_dir() or output.endswith(("/", "\\")):
        path = Path(output).expanduser() / filename
    else:
        path = Path(output).expanduser()
    if path.exists() and not force:
        raise CrossinitError(f"{path} already exists; pass --force to overwrite it")
    parts = library.effective_parts(ident.name)
    vectors = parts[0]
    formats.export_vectors(
        parts,
        ident.name,
        fmt,
        path,
        base_model=ident.base_model,
        steps=int(ident.training.get("steps", 0)),
        family=ident.family,
    )
    hint = USAGE_HINTS[fmt].format(stem=_file_stem(path), name=ident.name, path=path)
    if fmt == "diffusers" and len(parts) > 1:
        hint = SDXL_DIFFUSERS_HINT.format(name=ident.name, path=path)
    fits = families.get(ident.family).checkpoints if ident.family in families.FAMILIES else None
    if as_json:
        ui.print_json(
            {
                "name": ident.name,
                "format": fmt,
                "path": str(path),
                "shape": list(vectors.shape),
                "shapes": {k: list(v.shape) for k, v in zip(_keys(ident.family, len(parts)), parts)},
                "family": ident.family,
                "fits": fits,
                "strength": ident.strength,
                "usage": hint,
            }
        )
    else:
        ui.info(f"exported [bold]{escape(ident.name)}[/] ({fmt}) to {escape(str(path))}")
        if fits:
            ui.info(escape(f"fits {fits}"))
        ui.info(escape(hint))
    return 0


def _keys(family: str, count: int) -> list[str]:
    if family in families.FAMILIES and len(families.get(family).encoders) == count:
        return [e.key for e in families.get(family).encoders]
    return [str(i) for i in range(count)]


def import_identity(
    library: Library, path: Path, *, name: str | None, model: str | None, force: bool, as_json: bool
) -> int:
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
    ident = Identity(
        name=chosen,
        tokens=tokens,
        width=width,
        family=loaded.family,
        base_model=model or loaded.base_model or "",
        source=f"import:{loaded.layout}:{Path(path).resolve()}",
        training={"steps": loaded.steps} if loaded.steps else {},
    )
    target = library.add(ident, loaded.parts or loaded.vectors, force=force)
    if as_json:
        from crossinit_cli.commands.library import identity_record

        ui.print_json(identity_record(library, library.get(chosen)))
    else:
        ui.info(
            f"imported [bold]{escape(chosen)}[/] ({tokens}x{'+'.join(map(str, loaded.widths))}, {loaded.layout} "
            f"layout{', ' + families.get(loaded.family).title if loaded.family else ''}) into {escape(str(target))}"
        )
    return 0
