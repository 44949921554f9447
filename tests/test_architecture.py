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


MAX_MODULE_LINES = 700


def _module_name(path: Path) -> str:
    parts = ["crossinit_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports: at module level, inside functions and under
    TYPE_CHECKING alike, absolute or relative (`from crossinit_cli import x` counts as importing x)."""
    paths = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package() -> None:
    graph = _import_graph()
    assert "crossinit_cli.train" in graph["crossinit_cli.commands.learn"]  # the graph is read at all
    circles = _cycles(graph)
    described = [" <-> ".join(group) for group in circles]
    assert not circles, "import circles (counting imports inside functions): " + "; ".join(described)


def test_no_module_is_over_700_lines() -> None:
    over = [
        f"{path.relative_to(PACKAGE)} ({n} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not over, f"split along its ideas (at most {MAX_MODULE_LINES} lines a module): " + "; ".join(over)


MAX_COMMAND_LINES = 450


def test_no_command_module_is_over_450_lines() -> None:
    over = [
        f"commands/{path.name} ({n} lines)"
        for path in sorted((PACKAGE / "commands").glob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_COMMAND_LINES
    ]
    assert not over, f"a command module only presents (at most {MAX_COMMAND_LINES} lines): " + "; ".join(over)


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
