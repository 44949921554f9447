"""Atomic file writes: write a sibling temp file, flush it to disk, rename it over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from crossinit_cli.errors import CrossinitError

TEMP_PREFIX = ".crossinit-tmp-"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)` then rename the temp file onto `path`; readers see old or new, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CrossinitError(f"cannot write {path}: {exc.strerror or exc}") from None
    from safetensors import SafetensorError

    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # safetensors' writer reports a full disk as its own error
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CrossinitError(f"cannot write {path}: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
