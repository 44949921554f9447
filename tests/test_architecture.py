"""The code stays easy to extend: short functions with few parameters, engines that never reach into commands."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossinit_cli"
MAX_LINES, MAX_PARAMS = 60, 8


def _functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((where, node))
    return found


def _params(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_outside_the_typer_declarations_is_long_or_takes_many_parameters() -> None:
    over = [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines, {_params(node)} parameters)"
        for where, node in _functions()
        if where != "cli.py" and (node.end_lineno - node.lineno + 1 > MAX_LINES or _params(node) > MAX_PARAMS)
    ]
    assert not over, "split into named phases or pass a record: " + "; ".join(over)


def test_engines_never_import_from_commands() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("crossinit_cli.commands"):
                offenders.append(f"{path.name}:{node.lineno} imports {module}")
    assert not offenders, "; ".join(offenders)
