"""The Hugging Face libraries: their own output, and the Hub.

Output: diffusers and transformers print loading bars, advice and warnings on stderr; crossinit shows its
own progress and one-line errors instead. The Hub: a model in the local cache loads from its snapshot
folder with no network call at all; one that is not cached costs one quick request to the Hub first, so
that a machine without network gets one line at once instead of huggingface_hub's retries (five a file,
about 45 s for a CLIP model: "Retrying in 8s").

An engine-level module (engines must not import from `commands/`): `devices.py`, `sample.py`, `scoring.py`
and the commands all go through it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossinit_cli.errors import CrossinitError

HUB_TIMEOUT = 10.0
"""Seconds the one reachability request waits for the Hub before the load is given up."""


class HubUnreachable(CrossinitError):
    """A model that is not in the local cache, on a machine that cannot reach the Hub."""


def is_hub_id(model: str) -> bool:
    """`owner/name` that is not a local path (what `config.model_reference` keeps as written)."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).expanduser().exists()


# The Hub's own rule for a repository id (huggingface_hub.utils.validate_repo_id): each part letters, digits,
# '-', '_' and '.', not starting or ending with '-' or '.', no '--' or '..', at most 96 characters.
_HUB_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def valid_hub_id(model: str) -> bool:
    """Whether `owner/name` is spelled as the Hub allows (checked before huggingface_hub sees it: its own
    check is a traceback)."""
    parts = model.split("/")
    return (
        len(parts) == 2
        and len(model) <= 96
        and all(_HUB_PART.fullmatch(part) for part in parts)
        and "--" not in model
        and ".." not in model
    )


def check_hub_id(model: str) -> None:
    """A one-line refusal of an `owner/name` the Hub would reject (`--model "a/b c"`)."""
    if not valid_hub_id(model):
        raise CrossinitError(
            f"model {model!r} is not a valid Hugging Face hub id (owner/name: letters, digits, '-', '_' and '.'), "
            "nor an existing file or folder"
        )


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on: nothing may touch the network."""
    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in values)


def cached_folder(repo_id: str, marker: str) -> Path | None:
    """The snapshot folder of a hub model in the local cache, found by its top-level `marker` file
    (model_index.json, config.json); None when it is not there. Reads the cache's folders only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, marker)
    except ValueError:  # not a valid repo id: the loader says so in its own words
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_source(repo_id: str, marker: str, what: str = "model") -> str:
    """What to hand `from_pretrained` for a hub id.

    Cached: its snapshot folder, loaded as a local folder, so not one network call is made (passing the id
    with `local_files_only` still lets huggingface_hub fetch a registry of its own). Not cached, in offline
    mode: the id (the loader then says it is not cached). Otherwise the id, once one request has shown
    that the Hub answers; HubUnreachable in one line when it does not."""
    folder = cached_folder(repo_id, marker)
    if folder is not None:
        return str(folder)
    if not offline():
        require_hub(repo_id, what)
    return repo_id


def require_hub(repo_id: str, what: str = "model") -> None:
    """One request to the Hub, no retries; HubUnreachable in one line when it does not answer."""
    reason = _hub_unreachable(repo_id)
    if reason is not None:
        raise HubUnreachable(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached ({reason}); "
            f"download it once with `hf download {repo_id}` on a machine with network, or pass "
            f"{FLAGS.get(what, '--model')} with a local folder"
        )


FLAGS = {"model": "--model", "CLIP model": "--clip-model"}
"""The flag that names each kind of hub download, for the message that offers a local folder instead."""


def _hub_unreachable(repo_id: str) -> str | None:
    """None when the Hub answers (whatever it says about `repo_id`: the loader reports that), else why not.
    One request on huggingface_hub's own session (its proxies and certificates), no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{repo_id}", timeout=HUB_TIMEOUT)
    except _network_errors() as exc:
        text = str(exc).strip().splitlines()
        return text[0][:160] if text else type(exc).__name__
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed connection, whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]  # requests' errors are OSErrors
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


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
