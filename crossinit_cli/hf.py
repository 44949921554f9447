"""The Hugging Face libraries' own output: diffusers and transformers print loading bars, advice and
warnings on stderr; crossinit shows its own progress and one-line errors instead.

An engine-level module (engines must not import from `commands/`): `sample.py`, `scoring.py` and the
commands all quiet the libraries through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def silence_libraries() -> list[tuple[Any, int, bool]]:
    """Set diffusers' and transformers' loggers to errors only, without progress bars; returns what they
    were (for `restore_libraries`). A command that loads a model once and keeps it calls this alone."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    return saved


def restore_libraries(saved: list[tuple[Any, int, bool]]) -> None:
    """Put the loggers back as `silence_libraries` found them."""
    for lib, verbosity, bars in saved:
        lib.set_verbosity(verbosity)
        if bars:
            lib.enable_progress_bar()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers'/transformers' own progress bars and warnings for a block: our progress and errors
    are ours. Restores the loggers afterwards."""
    saved = silence_libraries()
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed `torch_dtype`; older releases we support know only that name.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        restore_libraries(saved)
