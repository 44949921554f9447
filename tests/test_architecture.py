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


def _params(node: ast.FunctionDef, where: str = "") -> int:
    """Its parameters; in api.py only the positional ones (its keyword-only ones are the CLI's flags, by
    name: tests/test_api.py checks each is one)."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + ([] if where == "api.py" else args.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_outside_the_typer_declarations_is_long_or_takes_many_parameters() -> None:
    over = [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines, "
        f"{_params(node, where)} parameters)"
        for where, node in _functions()
        if where != "cli.py" and (node.end_lineno - node.lineno + 1 > MAX_LINES or _params(node, where) > MAX_PARAMS)
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


def test_no_command_module_imports_another_but_common() -> None:
    """Commands only present the engines: what two of them share lives in an engine or in commands/common.py."""
    offenders = []
    for path in sorted((PACKAGE / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                if node.module == "crossinit_cli.commands":
                    modules = [f"crossinit_cli.commands.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                if module.startswith("crossinit_cli.commands.") and module != "crossinit_cli.commands.common":
                    offenders.append(f"commands/{path.name}:{node.lineno} imports {module}")
    assert not offenders, "; ".join(offenders)
