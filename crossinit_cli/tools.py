"""The Stable Diffusion tools `export --to DIR` delivers into: how each one's install folder is recognised, and
which folder it really reads textual-inversion embeddings from, found the way the tool itself finds it (its
start-up arguments, its config files, its defaults) and reported with the setting it came from.

One entry per install layout in `LAYOUTS` (docs/formats.md cites each tool's code for its markers and paths):

- SD.Next: `webui.py`, `installer.py`, `modules/`; `embeddings_dir` in its `config.json`, else
  `<models dir>/embeddings` (`--models-dir`, `SD_MODELSDIR` or `models_dir` in `config.json`; under
  `--data-dir`) (`modules/ui_definitions.py`, `modules/paths.py`, `modules/cmd_args.py`);
- AUTOMATIC1111, Forge, Forge Classic/Neo: `webui.py`, `launch.py`, `modules/`; `--embeddings-dir` (or
  `--forge-ref-a1111-home`, `--data-dir`, ...) in `COMMANDLINE_ARGS` (`webui-user.sh`, `webui-user.bat`, the
  environment), else the default the install's own `modules/cmd_args.py` declares (`embeddings/`;
  `models/embeddings/` in Forge Classic/Neo);
- ComfyUI: a git clone (`main.py`, `folder_paths.py`, `comfy/`), the Windows portable root (`ComfyUI/`,
  `python_embeded/`), the Desktop / `--base-directory` layout (`models/`, `custom_nodes/`, `user/`, no
  `comfy/`); `models/embeddings/` unless `extra_model_paths.yaml` puts an `is_default` entry first;
- InvokeAI: `invokeai.yaml`; InvokeAI 4 and later read no folder by themselves (autoimport is gone), so files go
  to `crossinit-embeddings/` there and the user adds them once with the Model Manager's Scan Folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from crossinit_cli import untrusted
from crossinit_cli.errors import CrossinitError


@dataclass(frozen=True)
class Tool:
    key: str  # "a1111", "forge", "sdnext", "comfyui", "invokeai": formats.format_for_tool's first key
    label: str
    root: Path
    embeddings: Path  # where the files go (created if it does not exist yet)
    setting: str  # where that folder came from, in the tool's own terms
    hint: str  # how to use a delivered identity there; {stem} is its file's stem
    step: str = ""  # what the user does once so the tool picks the files up ("" when it reads them itself)
    reads: tuple[Path, ...] = field(default=())  # every embeddings folder the tool reads (`--to` may name one)


@dataclass(frozen=True)
class Layout:
    looked_for: str  # for the refusal of a folder that is no known install
    matches: Callable[[Path], bool]
    locate: Callable[[Path], Tool]


# ---- AUTOMATIC1111, Forge, Forge Classic / Neo ---------------------------------------------------------------

_ENV = "the COMMANDLINE_ARGS environment variable"
# The flags of modules/paths_internal.py and modules/cmd_args.py that move the embeddings folder.
_PATH_FLAGS = ("--embeddings-dir", "--data-dir", "--models-dir", "--model-ref", "--config", "--forge-ref-a1111-home")
_WEBUI_DEFAULT = "the default in its modules/cmd_args.py"


def _sh_assignments(text: str) -> list[str]:
    """The values `webui-user.sh` gives COMMANDLINE_ARGS, in order (comment lines are skipped)."""
    values = []
    for line in text.splitlines():
        found = re.match(r"\s*(?:export\s+)?COMMANDLINE_ARGS=(.*)$", line)
        if found:
            try:
                words = shlex.split(found.group(1), comments=True)
            except ValueError:
                continue
            values.append(" ".join(words))
    return values


def _bat_assignments(text: str) -> list[str]:
    """The values `webui-user.bat` gives COMMANDLINE_ARGS, `^` continuations joined, %VAR% of earlier `set`s
    expanded, `if not defined VAR set ...` skipped where VAR is set; `@REM`/`::` lines are comments."""
    text = re.sub(r"\^\r?\n", "", text)
    variables, values = {k.upper(): v for k, v in os.environ.items() if v}, []
    for line in text.splitlines():
        found = re.match(
            r'\s*(?:if\s+not\s+defined\s+(\w+)\s+)?set\s+"?([A-Za-z0-9_]+)=(.*?)"?\s*$', line, re.IGNORECASE
        )
        if not found or (found.group(1) and found.group(1).upper() in variables):
            continue
        name, value = found.group(2), found.group(3)
        value = re.sub(r"%([A-Za-z0-9_]+)%", lambda m, n=name: _bat_var(m.group(1), n, variables), value)
        if value:
            variables[name.upper()] = value
        else:  # `set X=` undefines X
            variables.pop(name.upper(), None)
        if name.upper() == "COMMANDLINE_ARGS":
            values.append(value)
    return values


def _bat_var(name: str, assigned: str, variables: dict[str, str]) -> str:
    """%NAME% as cmd.exe expands it; the variable being assigned stays for _script_args to splice in."""
    if name.upper() == assigned.upper() == "COMMANDLINE_ARGS":
        return "%COMMANDLINE_ARGS%"
    return variables.get(name.upper(), "")


def _script_args(script: Path, start: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """The arguments (each with where it came from) after `script` sets COMMANDLINE_ARGS starting from `start`,
    as the shell does: an assignment replaces the value, `$COMMANDLINE_ARGS` / `%COMMANDLINE_ARGS%` in it stands
    for the value before. None when the script does not set it."""
    try:
        text = untrusted.read_text(script, untrusted.SETTINGS_BYTES, errors="replace")
    except OSError:
        return None
    posix = script.suffix == ".sh"
    values = _sh_assignments(text) if posix else _bat_assignments(text)
    if not values:
        return None
    self_ref = r"\$\{?COMMANDLINE_ARGS\}?" if posix else r"%COMMANDLINE_ARGS%"
    args = start
    for value in values:
        pieces = re.split(self_ref, value)
        new: list[tuple[str, str]] = []
        for i, piece in enumerate(pieces):
            if i:
                new += args
            literal = os.path.expandvars(piece) if posix else piece
            try:
                new += [(token, f"{script.name} COMMANDLINE_ARGS") for token in shlex.split(literal)]
            except ValueError:
                continue
        args = new
    return args


def _flags(args: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The last value of each path flag (argparse keeps the last), with where it came from."""
    found: dict[str, tuple[str, str]] = {}
    for i, (token, where) in enumerate(args):
        flag, _, value = token.partition("=")
        if flag in _PATH_FLAGS:
            if value or "=" in token:
                found[flag] = (value, where)
            elif i + 1 < len(args):
                found[flag] = (args[i + 1][0], where)
    return found


def webui_flags(root: Path) -> dict[str, tuple[str, str]]:
    """The path flags the webui at `root` starts with: COMMANDLINE_ARGS from the environment, then as the
    platform's own start script (`webui-user.sh`, or `.bat` on Windows) sets it; the other platform's script
    counts only where it moves a folder (an install shared between Windows and WSL)."""
    try:
        start = [(token, _ENV) for token in shlex.split(os.environ.get("COMMANDLINE_ARGS", ""))]
    except ValueError:
        start = []
    scripts = [root / "webui-user.sh", root / "webui-user.bat"]
    if os.name == "nt":
        scripts.reverse()
    native = _script_args(scripts[0], start)
    flags = _flags(start if native is None else native)
    if not flags:
        foreign = _script_args(scripts[1], start)
        flags = _flags(foreign or [])
    return flags


def _read_code(root: Path, name: str) -> str | None:
    """The text of the install's `modules/<name>`, None where it cannot be read."""
    try:
        return untrusted.read_text(root / "modules" / name, untrusted.SETTINGS_BYTES, errors="replace")
    except OSError:
        return None


def _default_under_models(root: Path) -> tuple[bool, str]:
    """Whether the install puts `--embeddings-dir` under the models folder by default (Forge Classic/Neo:
    `os.path.join(models_path, "embeddings")`) rather than the data folder (A1111, Forge), and what that was read
    from: its modules/cmd_args.py; without one, its modules/paths_internal.py (Classic/Neo's declares
    `--model-ref`, A1111's and Forge's `--models-dir` or none); without either, which of `models/embeddings/`
    and `embeddings/` exists. The second value names only what was read."""
    code = _read_code(root, "cmd_args.py")
    if code is not None:
        found = re.search(r"--embeddings-dir.*?default=os\.path\.join\((\w+)", code)
        return bool(found) and found.group(1) == "models_path", "the default in its modules/cmd_args.py"
    code = _read_code(root, "paths_internal.py")
    if code is not None and ("--model-ref" in code or "--models-dir" in code):
        classic = "--model-ref" in code
        where = "models/embeddings (Forge Classic/Neo: it declares --model-ref)" if classic else "embeddings"
        return classic, f"the layout's default {where} per its modules/paths_internal.py; it has no modules/cmd_args.py"
    classic = (root / "models" / "embeddings").is_dir() and not (root / "embeddings").is_dir()
    where = "models/embeddings/ is there, embeddings/ is not" if classic else "embeddings/"
    return classic, f"the layout's default ({where}); it has no modules/cmd_args.py or paths_internal.py to read"


def _webui_folder(
    root: Path, flags: dict[str, tuple[str, str]], under_models: bool, default: str = ""
) -> tuple[Path, str]:
    """The embeddings folder as the webui resolves it, first match wins: `--embeddings-dir`; Forge's
    `--forge-ref-a1111-home X` (launch_utils.configure_forge_reference_checkout adds `--embeddings-dir
    X/embeddings`, Classic/Neo `X/models/embeddings`, where that folder exists); then the default of
    modules/cmd_args.py under the models folder (`--model-ref`/`--models-dir`) or the data folder (`--data-dir`)."""
    rest = ("models", "embeddings") if under_models else ("embeddings",)
    if "--embeddings-dir" in flags:
        value, where = flags["--embeddings-dir"]
        return root / value, f"--embeddings-dir in {where}"
    if "--forge-ref-a1111-home" in flags and (root / flags["--forge-ref-a1111-home"][0]).joinpath(*rest).is_dir():
        value, where = flags["--forge-ref-a1111-home"]
        return (root / value).joinpath(*rest), f"--forge-ref-a1111-home in {where} + {'/'.join(rest)}"
    for flag in ("--model-ref", "--models-dir") if under_models else ():
        if flag in flags:
            value, where = flags[flag]
            return root / value / "embeddings", f"{flag} in {where} + embeddings"
    if "--data-dir" in flags:
        value, where = flags["--data-dir"]
        return (root / value).joinpath(*rest), f"--data-dir in {where} + {'/'.join(rest)}"
    return root.joinpath(*rest), f"{default or _WEBUI_DEFAULT}; {_no_flags(root)}"


def _no_flags(root: Path) -> str:
    """That no folder was set where COMMANDLINE_ARGS was looked for, naming only the scripts that exist."""
    scripts = [name for name in ("webui-user.sh", "webui-user.bat") if (root / name).is_file()]
    return "no folder set in " + " or ".join(["COMMANDLINE_ARGS", *scripts])


def _webui(root: Path) -> Tool:
    under_models, default = _default_under_models(root)
    if (root / "modules_forge").is_dir():
        key, label = "forge", ("Forge Classic/Neo" if under_models else "Forge")
    else:
        key, label = "a1111", "AUTOMATIC1111"
    folder, setting = _webui_folder(root, webui_flags(root), under_models, default)
    return Tool(key, label, root, folder, setting, "write `{stem}` in a prompt", reads=(folder,))


# ---- SD.Next ----------------------------------------------------------------------------------------------------


def _sdnext_setting(flags: dict[str, tuple[str, str]], flag: str, env: str) -> tuple[str, str] | None:
    """A start-up path of SD.Next (modules/cmd_args.py): the flag, else its environment variable's default."""
    if flag in flags:
        return flags[flag][0], f"{flag} in {flags[flag][1]}"
    return (os.environ[env], f"the {env} environment variable") if os.environ.get(env) else None


def _sdnext(root: Path) -> Tool:
    """SD.Next reads `opts.embeddings_dir` only (its --embeddings-dir flag just mirrors the option): the value in
    config.json, else `<models_dir>/embeddings` (modules/paths.py: `cli.models_dir or config.get('models_dir')
    or 'models'`); a relative path is relative to the data folder, by default the install (where webui.sh starts
    it). An old `embeddings/` there is not read. Start-up flags come from COMMANDLINE_ARGS, as launch.py adds it."""
    flags = webui_flags(root)
    data = _sdnext_setting(flags, "--data-dir", "SD_DATADIR")
    base = root / data[0] if data else root
    config_file = _sdnext_setting(flags, "--config", "SD_CONFIG")
    config_path = base / config_file[0] if config_file else base / "config.json"
    try:
        config = json.loads(untrusted.read_text(config_path, untrusted.SETTINGS_BYTES))
    except (OSError, ValueError, RecursionError):
        config = {}  # SD.Next starts with its defaults too when its config file is missing or unreadable
    config = config if isinstance(config, dict) else {}
    models = _sdnext_setting(flags, "--models-dir", "SD_MODELSDIR")
    if not models and isinstance(config.get("models_dir"), str) and config["models_dir"]:
        models = config["models_dir"], f"models_dir in {config_path.name}"
    if isinstance(config.get("embeddings_dir"), str) and config["embeddings_dir"]:
        folder, setting = base / config["embeddings_dir"], f"embeddings_dir in {config_path.name}"
    else:
        folder = base / (models[0] if models else "models") / "embeddings"
        setting = f"SD.Next's default under {models[1]}" if models else "SD.Next's default"
        setting += f"; no embeddings_dir in {config_path.name}"
    hint = "refresh its extra networks, then write `{stem}` in a prompt"
    return Tool("sdnext", "SD.Next", root, folder, setting, hint, reads=(folder,))


# ---- ComfyUI ----------------------------------------------------------------------------------------------------


def comfy_embedding_folders(base: Path, code: Path) -> list[tuple[Path, str]]:
    """ComfyUI's `get_folder_paths("embeddings")` for base directory `base` and the code folder `code` (where
    `extra_model_paths.yaml` is read), each with its setting: `models/embeddings` first, then each `embeddings`
    entry of the yaml appended, or put first where its section says `is_default` (utils/extra_config.py)."""
    folders = [(base / "models" / "embeddings", "ComfyUI's default models/embeddings")]
    yaml_path = code / "extra_model_paths.yaml"
    if not yaml_path.exists():  # a FIFO or a device there is refused by the read, in one line
        return folders
    import yaml

    try:
        config = yaml.safe_load(untrusted.read_text(yaml_path, untrusted.SETTINGS_BYTES)) or {}
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as exc:
        raise CrossinitError(f"cannot read {yaml_path}: {str(exc).splitlines()[0]}") from None
    for section, conf in config.items() if isinstance(config, dict) else ():
        if not isinstance(conf, dict) or not isinstance(conf.get("embeddings"), str):
            continue
        base_path = conf.get("base_path")
        if base_path is not None:
            base_path = os.path.expandvars(os.path.expanduser(str(base_path)))
            base_path = base_path if os.path.isabs(base_path) else os.path.abspath(yaml_path.parent / base_path)
        for entry in conf["embeddings"].split("\n"):
            if not entry:
                continue
            full = Path(base_path) / entry if base_path else Path(entry)
            full = full if full.is_absolute() else Path(os.path.abspath(yaml_path.parent / full))
            setting = f"`{section}: embeddings` in extra_model_paths.yaml"
            if conf.get("is_default"):
                folders.insert(0, (full, setting + " (is_default)"))
            else:
                folders.append((full, setting))
    return folders


def _comfy(root: Path, base: Path, code: Path, label: str) -> Tool:
    folders = comfy_embedding_folders(base, code)
    folder, setting = folders[0]
    reads = tuple(path for path, _ in folders)
    if len(reads) > 1:  # the others are read too; the first is the one ComfyUI treats as the default
        setting += f"; it also reads {', '.join(map(str, reads[1:]))}"
    return Tool("comfyui", label, root, folder, setting, "write `embedding:{stem}` in a prompt", reads=reads)


def _is_comfy_clone(folder: Path) -> bool:
    return (folder / "comfy").is_dir() and (folder / "folder_paths.py").is_file() and (folder / "main.py").is_file()


def _is_comfy_base_directory(folder: Path) -> bool:
    return (
        all((folder / name).is_dir() for name in ("models", "custom_nodes", "user")) and not (folder / "comfy").exists()
    )


# ---- InvokeAI ---------------------------------------------------------------------------------------------------

INVOKEAI_FOLDER = "crossinit-embeddings"


def _invokeai(root: Path) -> Tool:
    folder = root / INVOKEAI_FOLDER
    step = f"in InvokeAI's Model Manager: Add Models > Scan Folder, paste {folder}, then Install All"
    setting = "crossinit's own folder: InvokeAI 4+ reads none by itself, its autoimport folder is gone"
    return Tool("invokeai", "InvokeAI", root, folder, setting, "write <{stem}> in a prompt", step=step, reads=(folder,))


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "webui.py + installer.py + modules/ (SD.Next)",
        lambda r: (r / "webui.py").is_file() and (r / "installer.py").is_file() and (r / "modules").is_dir(),
        _sdnext,
    ),
    Layout(
        "webui.py + launch.py + modules/ (AUTOMATIC1111, Forge, Forge Classic/Neo)",
        lambda r: (r / "webui.py").is_file() and (r / "launch.py").is_file() and (r / "modules").is_dir(),
        _webui,
    ),
    Layout(
        "main.py + folder_paths.py + comfy/ (ComfyUI)",
        _is_comfy_clone,
        lambda r: _comfy(r, r, r, "ComfyUI"),
    ),
    Layout(
        "ComfyUI/ + python_embeded/ (ComfyUI Windows portable)",
        lambda r: _is_comfy_clone(r / "ComfyUI") and (r / "python_embeded").is_dir(),
        lambda r: _comfy(r, r / "ComfyUI", r / "ComfyUI", "ComfyUI (Windows portable)"),
    ),
    Layout(
        "models/ + custom_nodes/ + user/ (ComfyUI Desktop, --base-directory)",
        _is_comfy_base_directory,
        lambda r: _comfy(r, r, r, "ComfyUI (base directory)"),
    ),
    Layout("invokeai.yaml (InvokeAI)", lambda r: (r / "invokeai.yaml").is_file(), _invokeai),
)
LOOKED_FOR = "; ".join(layout.looked_for for layout in LAYOUTS)


def _install_at(folder: Path) -> Tool | None:
    for layout in LAYOUTS:
        if layout.matches(folder):
            return layout.locate(folder)
    return None


def _same(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def detect(folder: Path) -> Tool:
    """The tool installed at `folder` (or whose embeddings folder `folder` is), or a one-line CrossinitError
    listing what was looked for."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CrossinitError(f"{root} is not a folder")
    tool = _install_at(root)
    if tool is not None:
        return tool
    for parent in list(root.absolute().parents)[:2]:  # embeddings/ or models/embeddings/ inside an install
        tool = _install_at(parent)
        if tool is None:
            continue
        if any(_same(root, read) for read in tool.reads):
            return replace(tool, embeddings=root, setting=f"named by --to; {tool.label} reads it")
        raise CrossinitError(
            f"{tool.label} at {tool.root} reads embeddings from {tool.embeddings} ({tool.setting}), not {root}; "
            f"pass --to {tool.root}"
        )
    raise CrossinitError(f"{root} is not an install folder crossinit knows; looked for {LOOKED_FOR}")
