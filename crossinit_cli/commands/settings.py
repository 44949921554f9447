"""`config`: show and change the user's defaults, and say where the library and config live."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from crossinit_cli import config, ui


def show(home: Path, *, as_json: bool) -> int:
    current = config.load_config()
    paths = {"library": str(home), "config": str(config.config_path())}
    if as_json:
        ui.print_json({"paths": paths, "settings": asdict(current)})
        return 0
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in paths.items():
        table.add_row(f"{key} path", escape(value))
    for key, value in asdict(current).items():
        table.add_row(key, escape(str(value)))
    ui.out().print(table)
    return 0


def set_value(key: str, value: str) -> int:
    config.load_config()  # a broken config file is refused before anything is written
    value = config.normalized(key, value)
    path = config.update_config({key: value})
    ui.info(f"{key} = {escape(value)} (saved in {escape(str(path))})")
    return 0


def unset_value(key: str) -> int:
    config.validate_key(key)
    config.load_config()
    config.update_config({key: None})
    ui.info(f"{key} reset to {escape(str(getattr(config.Config(), key)))}")
    return 0
