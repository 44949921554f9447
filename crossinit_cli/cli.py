"""The command-line surface: Typer declarations only; each command's work lives in `commands/`.

Shared option groups are declared once: the global options (`commandline.command` adds --home and --verbose
to every command, so they work after the command name too), the run options (`ModelOpt`, `DeviceOpt`,
`DtypeOpt`, merged with the saved config by `run_options`), the sampling options of generate and eval. Usage
mistakes (a missing argument, options that exclude each other) are `UsageError`s raised here: exit status 2
with the usage line, as docs/exit-codes.md says. How a command is declared lives in `commandline.py`.
"""

from crossinit_cli import startup  # noqa: F401 - first: Ctrl-C during the imports below is one line

# isort: split
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from crossinit_cli import catalog, config, families, formats, readers, sample, ui
from crossinit_cli._version import __version__
from crossinit_cli.commandline import (
    VERBOSE_HELP,
    KeepsArgs,
    State,
    UsageError,
    command,
    complete_names,
    complete_tags,
    exclusive,
    handles_errors,
    open_library,
    record,
    refuse_with_resume,
    run_options,
    with_globals,
)

app = typer.Typer(
    name="crossinit",
    help="Learn a face as a Stable Diffusion identity with Cross Initialization, then generate, edit, "
    "evaluate and export it.\n\nExample: crossinit learn alice.jpg --fast && crossinit generate "
    "'<alice> as an astronaut'",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(
    help="Show or change defaults (model, device, dtype, output dir) and where things live.\n\n"
    "Example: crossinit config set model ./models/sd21-base",
    no_args_is_help=False,
    invoke_without_command=True,
)
app.add_typer(config_app, name="config")


NameArg = Annotated[str, typer.Argument(help="Identity name (case-insensitive).", autocompletion=complete_names)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crossinit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="CROSSINIT_HOME", help="Library location (default: your user data dir)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or hints (learn, generate, eval).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout (the commands that have --json).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    State.home, State.quiet, State.as_json = home, quiet, as_json
    ui.Verbosity.on = verbose


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
LearnQuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress bar or hints; the result is still printed (where the identity went; --batch: the table).",
    ),
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Hub id, diffusers folder or checkpoint.")]
IdentityModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Hub id, diffusers folder or checkpoint (default: the configured model, else the one the identities "
        "were learned on).",
    ),
]
ReplaceOpt = Annotated[bool, typer.Option("--force", help="Replace an identity of that name.")]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", min=1, help=f"Sampling steps (default {sample.DEFAULT_STEPS}).")
]
NumImagesOpt = Annotated[int, typer.Option("-n", "--num-images", min=1, help="Images per prompt.")]


# Choices come from the registries that define them, so a new format, device or precision touches one place.
Format = Enum("Format", {name: name for name in formats.FORMATS}, type=str)  # type: ignore[misc]
Device = Enum("Device", {name: name for name in config.DEVICES}, type=str)  # type: ignore[misc]
Dtype = Enum("Dtype", {name: name for name in config.DTYPES}, type=str)  # type: ignore[misc]


DeviceOpt = Annotated[Device | None, typer.Option("--device", help="Where to sample (default: auto).")]
DtypeOpt = Annotated[Dtype | None, typer.Option("--dtype", help="Compute precision (default: auto).")]


class OnError(str, Enum):
    skip = "skip"
    stop = "stop"


class Checkpointing(str, Enum):  # memory.CHECKPOINTING
    auto = "auto"
    on = "on"
    off = "off"


_FAMILY_NAMES = " or ".join(", ".join(families.FAMILIES).rsplit(", ", 1))
Sort = Enum("Sort", {name: name for name in catalog.SORTS}, type=str)  # type: ignore[misc]


@command(app, "list")
def list_cmd(
    tag: Annotated[
        str | None, typer.Option("--tag", help="Only identities with this tag.", autocompletion=complete_tags)
    ] = None,
    family: Annotated[str | None, typer.Option("--family", help=f"Only this model family: {_FAMILY_NAMES}.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Only identities whose base model contains this text.")
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="Only identities whose name or notes contain this.")
    ] = None,
    sort: Annotated[
        Sort, typer.Option("--sort", help="name (A-Z), created (newest first) or likeness (best first).")
    ] = Sort.name,  # type: ignore[attr-defined]
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Show at most N identities.")] = None,
    as_json: JsonOpt = False,
) -> int:
    """List stored identities (text matches ignore case).

    Example: crossinit list --tag family --sort created --limit 5    (scripts: crossinit list --json | jq -r '.[].name')
    """
    from crossinit_cli.catalog import Query
    from crossinit_cli.commands.library import list_identities

    query = Query(tag=tag, family=family, model=model, search=search, sort=sort.value, limit=limit)
    return list_identities(open_library(), as_json=as_json, query=query)


@command(app)
def show(name: NameArg, as_json: JsonOpt = False) -> int:
    """Show everything stored about one identity, including its training record.

    Example: crossinit show alice
    """
    from crossinit_cli.commands.library import show_identity

    return show_identity(open_library(), name, as_json=as_json)


@command(app, cls=KeepsArgs)
def edit(
    ctx: typer.Context,
    name: NameArg,
    rename: Annotated[str | None, typer.Option("--rename", help="New name.")] = None,
    note: Annotated[str | None, typer.Option("--note", help="Replace the notes ('' clears them).")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Add a tag (repeatable; with --untag, in command-line order).")
    ] = None,
    untag: Annotated[list[str] | None, typer.Option("--untag", help="Remove a tag (repeatable).")] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            "--strength",
            help="Scale the learned vectors' offset from their cross-init start: 1.0 = as learned, lower = "
            "more editable, higher = more faithful. Reversible.",
        ),
    ] = None,
    use_snapshot: Annotated[
        str | None,
        typer.Option(
            "--use-snapshot",
            help="Make the vectors of the snapshot at STEP the ones prompts use ('final': the last ones). Reversible.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Record the base model it runs on (hub id, diffusers folder or checkpoint): an imported identity's "
            "own claim is not used until named here or with --model.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> int:
    """Change a stored identity in place; with no flags, open its metadata in $EDITOR.

    Example: crossinit edit alice --tag family --strength 0.8
    """
    from crossinit_cli.commands.library import Edits, edit_identity
    from crossinit_cli.editing import tag_order

    if model is not None:
        from crossinit_cli.devices import check_model_reference

        model = config.model_reference(model)
        check_model_reference(model)
    order = tag_order(ctx.meta.get("args", [])) or None
    edits = record(Edits, locals(), tags=tag, untags=untag, tag_order=order)
    return edit_identity(open_library(), name, edits, as_json=as_json)


@command(app)
def remove(
    names: Annotated[list[str], typer.Argument(help="Identity names.", autocompletion=complete_names)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    identity: Annotated[
        bool, typer.Option("--identity", help="Remove only the stored identity of each name (not an unfinished run).")
    ] = False,
    unfinished: Annotated[
        bool,
        typer.Option(
            "--unfinished", help="Remove only the unfinished run of each name (`list` shows them), not the identity."
        ),
    ] = False,
) -> int:
    """Delete identities (or unfinished runs) from the library.

    A name that is both a stored identity and an unfinished run is asked about on a terminal; elsewhere
    --identity, --unfinished (or both) must say which. Example: crossinit remove alice --yes
    """
    from crossinit_cli.commands.library import remove_identities

    return remove_identities(open_library(), names, yes=yes, identity=identity, unfinished=unfinished)


@command(app)
def export(
    names: Annotated[
        list[str] | None, typer.Argument(help="Identity names (or --all, --tag).", autocompletion=complete_names)
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every identity in the library.")] = False,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Every identity with this tag.", autocompletion=complete_tags)
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", "-f", help=readers.format_help()),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="File to write, its suffix picking the format (.safetensors, .pt, .bin, .png; a name without one "
            "gets the format's), or folder (existing or ending in /) (default: ./<name>.<ext>); a folder for several.",
        ),
    ] = None,
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help="Install folder of AUTOMATIC1111, Forge, ComfyUI, InvokeAI or SD.Next (or its embeddings folder): "
            "each identity goes where that tool reads embeddings (found from its own settings), in the format it "
            "reads; run again, only what changed is rewritten.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Export identities for AUTOMATIC1111, ComfyUI, Forge, InvokeAI, SD.Next, diffusers or the official code.

    Example: crossinit export --all --to ~/ComfyUI    (one file: crossinit export alice -o alice.safetensors)
    """
    if sum((bool(names), every, tag is not None)) != 1:
        raise UsageError("name identities to export, or pass --all or --tag TAG (one of the three)")
    if to is not None and (output is not None or fmt is not None):
        raise UsageError("--to picks the folder and the format each tool reads; drop -o/--format")
    from crossinit_cli.commands.transfer import Selection, export_identities

    selection = Selection(names or [], every=every, tag=tag)
    return export_identities(
        open_library(), selection, fmt=fmt and fmt.value, output=output, to=to, force=force, as_json=as_json
    )


@command(app, "import")
def import_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="Embedding file (.safetensors, .pt, .bin, A1111 .png), diffusers folder, or a folder of files."
        ),
    ],
    name: Annotated[str | None, typer.Option("--name", help="Name to store it under (default: from the file).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Base model it was learned on, to record.")] = None,
    force: ReplaceOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Import an embedding file (any export format, or the official code's .bin), or every file of a folder.

    Example: crossinit import 28017.bin --name celeb28017 --model stabilityai/stable-diffusion-2-1-base
    """
    from crossinit_cli.commands.transfer import import_identity

    model = config.model_reference(model) if model else None
    if model is not None:
        from crossinit_cli import hf

        if hf.is_hub_id(model):
            hf.check_hub_id(model)  # "a/b c": one line (a path is recorded as given, even one not there yet)
    return import_identity(open_library(), path, name=name, model=model, force=force, as_json=as_json)


@command(app)
def learn(
    ctx: typer.Context,
    photos: Annotated[list[Path] | None, typer.Argument(help="Photos (JPEG/PNG/WebP) or folders of them.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Identity name (default: first photo's stem).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="The paper's fast mode (few dozen steps).")] = False,
    full: Annotated[bool, typer.Option("--full", help="The paper's full mode: 320 steps, batch 8 (default).")] = False,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Override the number of steps.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Override the learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Override the batch size.")] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            "--micro-batch",
            min=1,
            help="Images through the model at once; the batch's gradients add up to the same step in less memory "
            "(default: as many as fit in the free memory). Also with --resume.",
        ),
    ] = None,
    checkpointing: Annotated[
        Checkpointing,
        typer.Option(
            "--checkpointing",
            help="Recompute the model's forward pass in the backward to hold less memory (same result, slower "
            "step): auto turns it on only where one image would not fit in the free memory without it.",
        ),
    ] = Checkpointing.auto,
    reg_weight: Annotated[
        float | None, typer.Option("--reg-weight", help="Override λ of the regulariser (1e-5).")
    ] = None,
    model: ModelOpt = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            help="Training image size in px (default: the model's own, 1024 for SDXL); smaller is faster, less "
            "alike. A multiple of 64, at least half the model's own size (256 for SD 1.x and 2.x-base).",
        ),
    ] = None,
    device: Annotated[Device | None, typer.Option("--device", help="Where to train (default: auto).")] = None,
    dtype: DtypeOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same result.")] = 0,
    force: ReplaceOpt = False,
    no_align: Annotated[
        bool,
        typer.Option("--no-align", help="Use photos as they are (no face alignment, no comparison of the faces)."),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Refuse (exit 1, nothing stored) when a photo's face does not look like the others' (dlib face "
            "distance 0.6 or more), instead of warning.",
        ),
    ] = False,
    clip_skip: Annotated[
        int,
        typer.Option(
            "--clip-skip",
            min=1,
            help="Learn at the text encoder's layer -N through its final layer norm, as A1111's Clip skip N "
            "(1: the last layer; 2: what many SD 1.x fine-tunes are used with). SD 1.x and 2.x only.",
        ),
    ] = 1,
    quiet: LearnQuietOpt = False,
    snapshot_every: Annotated[
        int | None,
        typer.Option(
            "--snapshot-every",
            min=0,
            help="Keep the vectors every N steps with the identity (default: 40 in full mode, none in fast; 0: none).",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue NAME's interrupted run from its checkpoint with its own settings (`list` shows unfinished "
            "runs); only --steps (a new total, at least the steps done), --micro-batch, --quiet and --json go with it.",
            autocompletion=complete_names,
        ),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help="Learn many identities: a CSV (name,photos,...) or a folder of folders. Spreads them over the "
            "processes of `accelerate launch`; skips identities already present unless --force. Exit status 4 "
            "when some identities failed, 1 when all did.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> int:
    """Learn an identity from photos of one person's face.

    Example: crossinit learn alice.jpg --fast    (many: accelerate launch -m crossinit_cli learn --batch people.csv)
    """
    exclusive(fast=fast, full=full)
    given, mode = locals(), "fast" if fast else "full"
    if resume is not None:
        if photos or name or batch:
            raise UsageError("--resume reuses the run's photos, name and settings; give only the name")
        refuse_with_resume(ctx)
        from crossinit_cli.commands.learn import resume_identity

        configured = run_options({}).configured_model  # the next: hint names --model only if this would win
        return resume_identity(
            open_library(),
            resume,
            quiet=quiet,
            as_json=as_json,
            configured_model=configured,
            micro_batch=micro_batch,
            steps=steps,
        )
    settings = {  # learning.Settings' fields: the same for one identity and a batch's defaults
        "mode": mode,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "reg_weight": reg_weight,
        "seed": seed,
        "align": not no_align,
        "clip_skip": clip_skip,
        "micro_batch": micro_batch,
        "checkpointing": checkpointing.value,
    }
    if batch is not None and (photos or name):
        raise UsageError("--batch takes its photos and names from the manifest; drop the photos and --name")
    if batch is None and not photos:
        raise UsageError("give one or more photos (or a folder), or --batch MANIFEST")
    run = run_options(given)
    where = {"model": run.model, "device": run.device, "dtype": run.dtype, "force": force, "strict": strict}
    if batch is not None:
        from crossinit_cli.batches import BatchEntry, BatchRequest
        from crossinit_cli.commands.batch import learn_batch

        request = BatchRequest(batch, BatchEntry(**settings), **where)
        return learn_batch(open_library(), request, quiet=run.quiet, as_json=run.as_json)
    from crossinit_cli.commands.learn import learn
    from crossinit_cli.learning import LearnRequest

    request = LearnRequest(name=name, resolution=resolution, snapshot_every=snapshot_every, **where, **settings)
    return learn(
        open_library(), photos, request, quiet=run.quiet, as_json=run.as_json, configured_model=run.configured_model
    )


@command(app)
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompt; name identities as <alice>.")] = None,
    identity: Annotated[
        str | None,
        typer.Option("--identity", "-i", help="Identity for a plain prompt ('a photo of a <name> person, PROMPT')."),
    ] = None,
    n: NumImagesOpt = 1,
    seed: Annotated[int | None, typer.Option("--seed", help="First seed (image i uses seed + i).")] = None,
    steps: StepsOpt = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Classifier-free guidance (default 7.5).")
    ] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt.")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WxH, multiples of 8 (default: model's size).")] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help=", ".join(
                f"{name} (default)" if name == sample.DEFAULT_SCHEDULER else name for name in sample.SCHEDULERS
            )
            + ".",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: config output_dir).")] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="File of prompts, one a line; '-' for stdin.")
    ] = None,
    model: IdentityModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write a contact sheet of each prompt's images.")] = False,
    clip_skip: Annotated[
        int | None,
        typer.Option(
            "--clip-skip",
            min=1,
            help="Read the text encoder's layer -N, as A1111's Clip skip N (default: the identities' own, "
            "else 1). SD 1.x and 2.x only.",
        ),
    ] = None,
    manifest: Annotated[
        str | None,
        typer.Option(
            "--manifest",
            help="JSON Lines file ('-' for stdin): one object a line with 'prompt' and any of seed, n, size, "
            "steps, guidance, negative, scheduler, out, clip_skip (the flags give the rest). One model load; one "
            "JSON line per image on stdout as soon as it is written.",
        ),
    ] = None,
    on_error: Annotated[
        OnError,
        typer.Option(
            "--on-error",
            help="With --manifest: skip a bad line (reported; exit status 4 at the end if any failed) "
            "or stop (exit 1).",
        ),
    ] = OnError.skip,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Generate images with stored identities.

    Example: crossinit generate "<alice> as an astronaut, oil painting" -n 4 --seed 7
    (scripts: crossinit generate --manifest jobs.jsonl | jq -r .path)
    """
    text = " ".join(prompt).strip() if prompt else ""
    if manifest is not None and (text or prompts is not None):
        raise UsageError("give prompts in the manifest, or as arguments/--prompts, not both")
    if manifest is not None and grid:
        raise UsageError("--grid is not available with --manifest")
    if text and prompts is not None:
        raise UsageError("give either a prompt or --prompts, not both")
    if manifest is None and not text and prompts is None and identity is None:
        raise UsageError("no prompt given; pass a prompt, --prompts FILE (or - for stdin), or --identity NAME")
    from crossinit_cli.commands.generate import SamplingFlags

    flags = record(SamplingFlags, locals())
    run = run_options(locals(), output_dir=out)
    if manifest is not None:
        from crossinit_cli.commands.manifest import generate_manifest

        return generate_manifest(open_library(), manifest, defaults=flags, run=run, on_error=on_error.value)
    from crossinit_cli.commands.generate import generate_images

    text = " ".join(prompt) if prompt else None
    return generate_images(open_library(), text, prompts=prompts, flags=flags, run=run, grid=grid)


@command(app, "eval")
def eval_cmd(
    names: Annotated[list[str], typer.Argument(help="Identity name(s).", autocompletion=complete_names)],
    compare: Annotated[
        bool, typer.Option("--compare", help="Show several identities side by side (same prompts, same seeds).")
    ] = False,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="File of prompt templates, one a line, {} where the identity goes; '-' for stdin "
            "(default: the built-in set of docs/eval.md).",
        ),
    ] = None,
    n: NumImagesOpt = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, help="First seed (image i uses seed + i).")] = 0,
    steps: StepsOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Base model (default: the configured one, else the one each identity was learned on)."
        ),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    clip_model: Annotated[
        str | None,
        typer.Option("--clip-model", help="CLIP for prompt fidelity: hub id or folder (openai/clip-vit-base-patch32)."),
    ] = None,
    snapshots: Annotated[
        bool, typer.Option("--snapshots", help="Score every snapshot of the identity's run, in one table.")
    ] = False,
    pick_best: Annotated[
        bool,
        typer.Option(
            "--pick-best",
            help="Score the snapshots and make the best likeness/prompt-fidelity trade-off active (docs/eval.md).",
        ),
    ] = False,
    fail_below: Annotated[
        float | None,
        typer.Option(
            "--fail-below",
            help="Exit with status 3 when any identity's likeness is below this (1.0 = the person's own ceiling).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Score identities on the paper's two axes: identity similarity and prompt fidelity (CLIP).

    Results are stored with each identity (see `show`), with a contact sheet.
    Example: crossinit eval alice fast-alice --compare -n 8
    """
    from crossinit_cli.commands.evaluate import EvalOptions, evaluate_command
    from crossinit_cli.generation import model_origin

    if compare and len(names) < 2:
        raise UsageError("--compare needs at least two identities, e.g. crossinit eval alice bob --compare")
    if (snapshots or pick_best) and (len(names) != 1 or compare):
        raise UsageError("--snapshots and --pick-best score the snapshots of one identity; name one")
    if (snapshots or pick_best) and fail_below is not None:
        raise UsageError("--fail-below gates identities, not snapshots; run it without --snapshots/--pick-best")
    run = run_options(locals())
    where = {"model": run.chosen_model, "device": run.device, "dtype": run.dtype}
    origin = model_origin(run) if run.chosen_model else ""
    options = record(EvalOptions, locals(), **where, model_origin=origin, snapshots=snapshots or pick_best)
    return evaluate_command(open_library(), names, options)


@command(app)
def doctor(
    self_test: Annotated[
        bool,
        typer.Option(
            "--self-test",
            help="Check the install end to end: detect, learn, generate, export, import and remove on a tiny "
            "random model and a photo shipped with crossinit, in a throw-away library (no weights, no network; "
            "your library and config are not touched). Exits 1 naming the step that failed.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> int:
    """Check this machine: versions, the device and precision crossinit would use and why, the library, the model cache.

    Exits 1 with advice when something needs fixing. Example: crossinit doctor --self-test
    """
    if self_test:
        from crossinit_cli.commands.selftest import self_test as run_self_test

        return run_self_test(run_options(locals()))
    from crossinit_cli.commands.doctor import doctor as run_doctor

    return run_doctor(config.library_home(State.home), run_options(locals()))


def config_show(ctx: typer.Context, as_json: JsonOpt = False) -> int:
    """Show the settings and the paths of the library and the config file."""
    if ctx.invoked_subcommand is not None:
        return 0
    from crossinit_cli.commands.settings import show

    return show(config.library_home(State.home), as_json=as_json)


config_app.callback()(with_globals(handles_errors(config_show)))


@command(config_app, "set")
def config_set(
    key: Annotated[str, typer.Argument(help="model, device, dtype or output_dir.")],
    value: Annotated[str, typer.Argument(help="New value.")],
) -> int:
    """Set a default. Example: crossinit config set device cpu"""
    from crossinit_cli.commands.settings import set_value

    return set_value(key, value)


@command(config_app, "unset")
def config_unset(key: Annotated[str, typer.Argument(help="model, device, dtype or output_dir.")]) -> int:
    """Reset a default. Example: crossinit config unset device"""
    from crossinit_cli.commands.settings import unset_value

    return unset_value(key)


def main() -> None:
    app()
