"""crossinit: Cross Initialization face identities for Stable Diffusion, as a library and a CLI.

From Python: `from crossinit_cli import api` (docs/python-api.md); `api`, `Library` and `CrossinitError`
are also here, loaded on first use so that importing the package stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossinit_cli._version import __version__

__all__ = ["CrossinitError", "Library", "__version__", "api"]

if TYPE_CHECKING:
    from crossinit_cli import api
    from crossinit_cli.api import Library
    from crossinit_cli.errors import CrossinitError


def __getattr__(name: str) -> Any:
    if name == "api":
        import importlib

        return importlib.import_module("crossinit_cli.api")
    if name == "Library":
        from crossinit_cli.api import Library

        return Library
    if name == "CrossinitError":
        from crossinit_cli.errors import CrossinitError

        return CrossinitError
    raise AttributeError(f"module 'crossinit_cli' has no attribute {name!r}")
