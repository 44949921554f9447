"""Where things live (library home, config file) and the user's defaults in `config.toml`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crossinit_cli.errors import CrossinitError, library_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP_NAME = "crossinit"
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def library_home(override: Path | None = None) -> Path:
    """The library directory: --home, then CROSSINIT_HOME, then the platform's user data dir."""
    if override is not None:
        return _expanded(Path(override), "--home")
    env = os.environ.get("CROSSINIT_HOME")
    if env:
        return _expanded(Path(env), "CROSSINIT_HOME")
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def _expanded(path: Path, where: str) -> Path:
    """`path` with a leading ~ or ~user expanded, or one line saying it cannot be (no such user, no HOME)."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise CrossinitError(f"{where} {path}: cannot expand {path.parts[0]!r} (no such user or home folder)") from None


def config_path() -> Path:
    """The config file: CROSSINIT_CONFIG, then `config.toml` in the platform's user config dir."""
    env = os.environ.get("CROSSINIT_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml"


@dataclass
class Config:
    """User defaults; a command-line flag always wins over these."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    output_dir: str = "crossinit-out"

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def validate_key(key: str) -> str:
    if key not in Config.keys():
        raise CrossinitError(f"unknown config key {key!r}; known keys: {', '.join(Config.keys())}")
    return key


def validate(key: str, value: str) -> str:
    validate_key(key)
    if key == "device" and value not in DEVICES:
        raise CrossinitError(f"device must be one of {', '.join(DEVICES)}, not {value!r}")
    if key == "dtype" and value not in DTYPES:
        raise CrossinitError(f"dtype must be one of {', '.join(DTYPES)}, not {value!r}")
    if not value.strip():
        raise CrossinitError(f"{key} cannot be empty")
    return value


def model_reference(model: str) -> str:
    """A model as crossinit stores it: a local path made absolute (so `generate` and `doctor` find it from any
    folder), a hub id as written. A path is what exists on disk or starts with `.`, `/` or `~`; `owner/name`
    that is not on disk is a hub id."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return os.path.abspath(path)  # not resolve(): a symlink the user named stays the name recorded
    return model


def normalized(key: str, value: str) -> str:
    """A value as `config set` stores it: checked, and a model path made absolute."""
    value = validate(key, value)
    return model_reference(value) if key == "model" else value


def identities_model(chosen: str | None, identities: Iterable[Any]) -> str:
    """The base model a command that uses identities runs on; the one rule of generate, generate --manifest,
    eval (per identity) and everything else that loads a model for stored identities.

    1. `chosen`: `--model`, else the configured model (`config set model`), when there is one;
    2. else the base model the identities were learned on (`base_model`), when they agree; identities that
       record none (imported without --model) do not vote; several different ones are a one-line error
       naming each identity and its model;
    3. else the built-in default, DEFAULT_MODEL.
    """
    if chosen:
        return chosen
    learned: dict[str, list[str]] = {}
    for ident in identities:
        if ident.base_model:
            learned.setdefault(ident.base_model, []).append(ident.name)
    if len(learned) > 1:
        which = "; ".join(f"{', '.join(names)} on {model}" for model, names in learned.items())
        raise CrossinitError(f"these identities were learned on different base models ({which}); pass --model")
    return next(iter(learned), DEFAULT_MODEL)


def _read(path: Path) -> str | None:
    """The config file's text (None when there is none): a regular file of at most 1 MiB, read without
    waiting (CROSSINIT_CONFIG naming a FIFO or /dev/zero is refused in one line)."""
    from crossinit_cli import untrusted

    try:
        return untrusted.read_text(path, untrusted.CONFIG_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CrossinitError(f"cannot read config {path}: {library_text(exc)}; fix or delete it") from None
    except CrossinitError as exc:
        raise CrossinitError(f"cannot use config: {exc}; fix it or point CROSSINIT_CONFIG elsewhere") from None


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    text = _read(path)
    if text is None:
        return Config()
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise CrossinitError(f"cannot read config {path}: {library_text(exc)}; fix or delete it") from None
    config = Config()
    for key, value in raw.items():
        if key in Config.keys() and isinstance(value, str):
            setattr(config, key, validate(key, value))
    return config


CONFIG_LOCK_TIMEOUT_S = 30


def update_config(changes: dict[str, str | None], path: Path | None = None) -> Path:
    """Set each key of `changes` to its value (None, or the default value: remove the key) in the config file,
    keeping everything else in it as written: comments, keys crossinit does not know, tables, order.

    Safe against `config set` runs in parallel: under a lock beside the file (`config.toml.lock`), the file is
    read again, changed and replaced atomically, so no run's key is lost to another's stale copy."""
    import tomlkit
    from filelock import FileLock, Timeout

    from crossinit_cli.atomic import write_bytes_atomic

    path = path or config_path()
    defaults = Config()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(path.name + ".lock")), timeout=CONFIG_LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise CrossinitError(f"config {path} is being changed by another crossinit; try again") from None
    except OSError as exc:
        raise CrossinitError(f"cannot write config {path}: {library_text(exc)}") from None
    try:
        text = _read(path) or ""
        try:
            document = tomlkit.parse(text)
        except (tomlkit.exceptions.ParseError, RecursionError) as exc:
            raise CrossinitError(f"cannot read config {path}: {library_text(exc)}; fix or delete it") from None
        for key, value in changes.items():
            validate_key(key)
            if value is None or value == getattr(defaults, key):
                document.pop(key, None)
            else:
                document[key] = validate(key, value)
        write_bytes_atomic(path, tomlkit.dumps(document).encode("utf-8"))
    finally:
        lock.release()
    return path


def set_default(key: str, value: str) -> tuple[str, Path]:
    """`config set`: `value` checked (a model path made absolute) and saved, the rest of the file kept as
    written; the value stored and the file."""
    load_config()  # a broken config file is refused before anything is written
    value = normalized(key, value)
    return value, update_config({key: value})


def reset_default(key: str) -> str:
    """`config unset`: `key` back to crossinit's own default (removed from the file); that default."""
    validate_key(key)
    load_config()
    update_config({key: None})
    return str(getattr(Config(), key))


@dataclass(frozen=True)
class RunOptions:
    """What a command that runs a model takes from the flags every such command shares, merged once with the
    saved defaults (a flag wins): the CLI builds it, the command reads it."""

    model: str  # what `learn` and `doctor` use: --model, else the configured model, else DEFAULT_MODEL
    device: str
    dtype: str
    output_dir: str
    quiet: bool = False
    as_json: bool = False
    explicit_model: str | None = None  # --model (a path made absolute); None when not given
    configured_model: str | None = None  # `config set model` (None: not set, the built-in default applies)

    @property
    def chosen_model(self) -> str | None:
        """--model, else the configured model: what wins over the identities' own (`identities_model`)."""
        return self.explicit_model or self.configured_model

    def model_for(self, identities: Iterable[Any]) -> str:
        """The model to run `identities` on (`identities_model`: flag, config, theirs, the default)."""
        return identities_model(self.chosen_model, identities)

    @classmethod
    def merged(
        cls,
        saved: Config,
        *,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        output_dir: Path | None = None,
        quiet: bool = False,
        as_json: bool = False,
    ) -> RunOptions:
        explicit = model_reference(model) if model else None
        configured = saved.model if saved.model != DEFAULT_MODEL else None
        return cls(
            model=explicit or configured or DEFAULT_MODEL,
            device=device or saved.device,
            dtype=dtype or saved.dtype,
            output_dir=str(output_dir) if output_dir is not None else saved.output_dir,
            quiet=quiet,
            as_json=as_json,
            explicit_model=explicit,
            configured_model=configured,
        )

    def settings(self) -> dict[str, str]:
        """The merged defaults, as `config` shows them."""
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "output_dir": self.output_dir}
