"""Atomic, durable file writes: write a sibling temp file, flush it to disk, rename it over the target, flush
the folder. A rename lives in the folder's own data: until the folder is flushed too, a power cut soon after
can lose the new file or bring back the old one although the command said it was done (SQLite and git flush
folders for the same reason)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from crossinit_cli.errors import CrossinitError

TEMP_PREFIX = ".crossinit-tmp-"
STALE_TEMP_S = 600.0
"""A temp file older than this is a killed writer's: a live write of an embedding or metadata takes milliseconds."""


def shared_mode() -> int:
    """The mode a plainly created file gets: 0o666 less the umask (0644 under umask 022). mkstemp's temp files
    are 0600 whatever the umask, which suits the library but not files other programs (a tool running as another
    user, in Docker, on a shared server) must read: exports, deliveries, generated images."""
    try:  # Linux reports the umask without changing it; os.umask must set one to read it (racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, write: Callable[[Path], None], *, shared: bool = False) -> None:
    """Call `write(temp_path)` then rename the temp file onto `path`; readers see old or new, never half.
    `shared`: the file gets the umask's mode (`shared_mode`) instead of the temp file's private 0600."""
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
        if shared:
            os.chmod(tmp, shared_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, SafetensorError) as exc:  # safetensors' writer reports a full disk as its own error
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CrossinitError(f"cannot write {path}: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temp files a killed crossinit left in `folder` (not its own live ones); returns how many."""
    import time

    removed = 0
    for tmp in Path(folder).glob(f"{TEMP_PREFIX}*"):
        try:
            if tmp.is_file() and time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to delete: the next run tries again
    return removed


def write_bytes_atomic(path: Path, data: bytes, *, shared: bool = False) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data), shared=shared)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    if os.name == "nt":  # a folder cannot be opened to flush it; NTFS journals its metadata itself
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, and `root` itself, children first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))
