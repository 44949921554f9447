"""How `cli.py` declares a command, written once: the global options every command takes after its name as
well as before it, usage mistakes as usage errors (exit 2), user mistakes as one line and exit 1, and a
command's record built from its parameters. The typer work-around itself lives in `typerfix.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from crossinit_cli import config, startup, typerfix, ui
from crossinit_cli.errors import CrossinitError
from crossinit_cli.typerfix import UsageError

typerfix.install()  # typer's pydantic coercion and `<bool>` help: the one documented work-around

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


class State:
    """The global options given before the command name; `command()` adds those given after it."""

    home: Path | None = None
    quiet: bool = False
    as_json: bool = False


def open_library() -> Any:
    from crossinit_cli.store import Library

    return Library(config.library_home(State.home))


def run_options(given: dict[str, Any], **flags: Any) -> config.RunOptions:
    """The run options (--model, --device, --dtype; --quiet, --json) among a declaration's parameters `given`,
    merged once with the saved config (a flag wins)."""
    flags = {"model": given.get("model"), "quiet": given.get("quiet", False), **flags}
    device, dtype = given.get("device"), given.get("dtype")
    return config.RunOptions.merged(
        config.load_config(),
        device=device and device.value,
        dtype=dtype and dtype.value,
        as_json=given.get("as_json", False),
        **flags,
    )


def record(cls: type[R], given: dict[str, Any], **more: Any) -> R:
    """A command's record (LearnRequest, EvalOptions ...) from the declaration's parameters of the same names
    (`given`: its locals()), with `more` for the fields whose flag says it another way."""
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in given.items() if k in names}, **more})


def exclusive(**given: Any) -> None:
    """Usage error unless at most one of these options (flag name -> value, `_` for `-`) was given."""
    named = [f"--{flag.replace('_', '-')}" for flag, value in given.items() if value not in (None, False, [], ())]
    if len(named) > 1:
        raise UsageError(f"{' and '.join(named)} cannot be used together")


def handles_errors(func: F) -> F:
    """User mistakes -> one line on stderr and exit 1; Ctrl-C -> exit 130; no traceback either way."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            startup.give_back()  # Ctrl-C is KeyboardInterrupt again, handled here
            code = func(*args, **kwargs)
        except CrossinitError as exc:
            ui.error(str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            # A command that keeps finished work (generate) says so in the interrupt it re-raises.
            ui.error(str(exc) or "interrupted; nothing was written")
            raise typer.Exit(130) from None
        if code:
            raise typer.Exit(code)

    return wrapper  # type: ignore[return-value]


GLOBAL = "Global options (also before the command name)"
HOME_HELP = "Library location (default: $CROSSINIT_HOME, else your user data dir)."
VERBOSE_HELP = "Report how long each phase (model load, training ...) took."
HomeOpt = Annotated[Path | None, typer.Option("--home", help=HOME_HELP, rich_help_panel=GLOBAL)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP, rich_help_panel=GLOBAL)]


def with_globals(func: F) -> F:
    """`func` with the global options added to its parameters (llm's option decorators, for typer): given after
    the command name they mean what they mean before it; --quiet/--json before it reach a command that has them."""
    signature = inspect.signature(func, eval_str=True)
    own = signature.parameters

    @functools.wraps(func)
    def wrapper(*args: Any, home: Path | None = None, verbose: bool = False, **kwargs: Any) -> Any:
        State.home = home if home is not None else State.home
        ui.Verbosity.on = ui.Verbosity.on or verbose
        for flag, key in (("--quiet", "quiet"), ("--json", "as_json")):
            if getattr(State, key) and key not in own:
                raise UsageError(f"{flag} (given before the command name) is not an option of this command")
            if getattr(State, key):
                kwargs[key] = True
        return func(*args, **kwargs)

    added = [
        inspect.Parameter("home", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=HomeOpt),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
    ]
    wrapper.__signature__ = signature.replace(parameters=[*own.values(), *added])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def command(group: typer.Typer, name: str | None = None, **settings: Any) -> Callable[[F], F]:
    """Declare a command of `group`: its errors handled (`handles_errors`), the global options added;
    `settings` go to typer's `command` (`cls=` for a command class of its own)."""

    def register(func: F) -> F:
        group.command(name, **settings)(with_globals(handles_errors(func)))
        return func

    return register


# ---- what several declarations share: completion, a parser that keeps its arguments, --resume's rule ----


def complete_names(incomplete: str) -> list[str]:
    """Shell completion of identity names, from the library's directory names (no metadata read)."""
    try:
        keys = sorted(p.name for p in open_library().entries.iterdir() if p.name.startswith(incomplete.casefold()))
    except (OSError, CrossinitError):  # no library there, or a folder that is not one
        return []
    # Names match case-insensitively; keep what was typed so the shell accepts the candidates.
    return [incomplete + key[len(incomplete) :] for key in keys]


def complete_tags(incomplete: str) -> list[str]:
    """Shell completion of tags in use, from the library's catalog (one query, no folder read)."""
    try:
        tags = open_library().tags(incomplete)
    except (OSError, CrossinitError):
        return []
    return [incomplete + tag[len(incomplete) :] for tag in tags]  # as typed, or the shell drops them


class KeepsArgs(typer.core.TyperCommand):
    """A command that keeps its raw arguments (ctx.meta["args"]), for options whose order matters."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        ctx.meta["args"] = list(args)
        return super().parse_args(ctx, args)


RESUME_TAKES = {"resume", "steps", "micro_batch", "quiet", "as_json", "photos", "name", "batch", "home", "verbose"}


def refuse_with_resume(ctx: typer.Context) -> None:
    """`learn --resume` keeps the run's own settings: any other training option given with it is refused."""
    for param in ctx.command.params:
        if param.name in RESUME_TAKES or param.param_type_name != "option":
            continue
        source = ctx.get_parameter_source(param.name)  # type: ignore[arg-type]
        if source is not None and source.name != "DEFAULT":
            raise UsageError(
                f"{max(param.opts, key=len)} cannot change a resumed run (it keeps its own settings); only --steps, "
                "--micro-batch, --quiet and --json go with --resume"
            )
