"""The one place crossinit works around its command-line library, typer; `cli.py` calls `install()` once.

typer 0.2x (the releases that vendor click as `typer._click`) does two things crossinit undoes here:

1. Every option value goes through a pydantic `TypeAdapter`, so the first command of a process pays for
   importing pydantic and building an adapter per option (0.05-0.08 s on a 2-core AMD EPYC, a third of
   `crossinit list`) before it does anything. The values crossinit declares (str, int, float, Path, Enum and
   lists of them) are converted here as typer would convert them; a value this cannot convert exactly (a typo,
   a number out of range) goes on to typer's own conversion, so error messages stay typer's, word for word.
2. Its rich help gives every option a type column, flags too (`--verbose -v <bool>`), which made a newcomer
   type `crossinit --verbose true list`; a flag gets no type column here, as in click's plain help.
3. Its help formatter (`typer.rich_utils`) imports rich's Markdown renderer (markdown-it) and its traceback
   renderer (pygments) at the top, 0.03-0.04 s of every `--help`, though crossinit's help is rich markup, never
   Markdown, and pretty tracebacks are off (`pretty_exceptions_enable=False`). Before a help page, the module is
   imported with those two stood in for by empty names, which are then taken away again: a later
   `import rich.markdown` anywhere gets the real one. (An app with `rich_markup_mode="markdown"` must not do this.)

Older typers (click-based, without pydantic) need neither, and `install()` leaves them alone. `UsageError` is
the usage-error class of whichever click typer runs on: raised in a command, it exits 2 with the usage line.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

try:  # typer >= 0.2x: its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - typer on the click package
    from click.exceptions import UsageError

__all__ = ["UsageError", "install"]

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_UNSURE = object()  # _convert's answer when typer's own conversion should decide (and say what is wrong)


def _in_range(number: float, info: Any) -> bool:
    return (info.min is None or number >= info.min) and (info.max is None or number <= info.max)


def _plain_path(info: Any) -> bool:
    """No path checks asked for (exists, readable ...): typer would only make a Path of the text."""
    checks = (info.exists, info.writable, info.resolve_path, info.allow_dash, info.path_type is not None)
    return not any(checks) and info.file_okay and info.dir_okay and info.readable


def _convert(annotation: Any, info: Any, value: Any) -> Any:
    """`value` as typer gives it to the command, or _UNSURE."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if isinstance(value, annotation):
            return value
        if isinstance(value, str) and info.case_sensitive:
            return next((member for member in annotation if member.value == value), _UNSURE)
        return _UNSURE
    if annotation is str:
        return value if isinstance(value, str) else _UNSURE
    if annotation is Path:
        if isinstance(value, Path):
            return value
        return Path(value) if isinstance(value, str) and _plain_path(info) else _UNSURE
    if annotation in (int, float) and not info.clamp:
        number: Any = _UNSURE
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = annotation(value) if annotation is float or isinstance(value, int) else _UNSURE
        elif isinstance(value, str) and (_INT if annotation is int else _FLOAT).fullmatch(value):
            number = annotation(value)
        return number if number is not _UNSURE and _in_range(number, info) else _UNSURE
    return _UNSURE


def _import_help_formatter() -> None:
    """Import typer.rich_utils without rich.markdown and rich.traceback (point 3 of the module docstring)."""
    if "typer.rich_utils" in sys.modules:
        return
    stand_ins = {}
    for module, name in (("rich.markdown", "Markdown"), ("rich.traceback", "Traceback")):
        if module not in sys.modules:
            stand_ins[module] = types.ModuleType(module)
            setattr(stand_ins[module], name, type(name, (), {}))
    sys.modules.update(stand_ins)
    try:
        import typer.rich_utils  # noqa: F401
    finally:
        for module, stand_in in stand_ins.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]


def install() -> None:
    """Patch typer's parameters as the module docstring says; nothing on a typer that does not need it."""
    try:
        from typer import core
        from typer._coercion import RuntimeParam, build_runtime_param
    except ImportError:  # pragma: no cover - click-based typer
        return
    if not hasattr(core, "_TyperParameter") or getattr(core, "_crossinit_fixed", False):
        return

    @dataclass(frozen=True)
    class QuickParam(RuntimeParam):  # type: ignore[misc]
        descriptor: Any = None

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            many = getattr(self.annotation, "__origin__", None) is list
            if many == isinstance(value, (list, tuple)):
                inner = self.annotation.__args__[0] if many else self.annotation
                done = [_convert(inner, self.parameter_info, v) for v in (value if many else [value])]
                if _UNSURE not in done:
                    return done if many else done[0]
            return build_runtime_param(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    typer_runtime_param = core._TyperParameter.get_runtime_param

    def get_runtime_param(self: Any) -> Any:
        desc = self.type_descriptor
        if self._runtime_param is None and desc.file_annotation is None and desc.parameter_info.parser is None:
            info, annotation = desc.parameter_info, desc.annotation
            self._runtime_param = QuickParam(parameter_info=info, annotation=annotation, descriptor=desc)
        return typer_runtime_param(self)

    typer_display_type = core.TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else typer_display_type(self, ctx)

    def light_help(typer_format_help: Any) -> Any:
        def format_help(self: Any, ctx: Any, formatter: Any) -> None:
            if getattr(self, "rich_markup_mode", None) == "rich":
                _import_help_formatter()
            return typer_format_help(self, ctx, formatter)

        return format_help

    for cls in (core.TyperCommand, core.TyperGroup):
        cls.format_help = light_help(cls.format_help)
    core._TyperParameter.get_runtime_param = get_runtime_param
    core.TyperOption.display_type_rich = display_type_rich
    core._crossinit_fixed = True
