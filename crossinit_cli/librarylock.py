"""What keeps the library whole: its write lock, the recovery of a killed writer's leftovers, and readers
settling against a write in progress (see store.py for the layout and the write protocol)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossinit_cli.atomic import TEMP_PREFIX
from crossinit_cli.entries import META, PENDING, read_pending
from crossinit_cli.errors import CrossinitError

LOCK_TIMEOUT_S = 60.0

MARKER = ".crossinit-library"
"""The file that marks a folder as a crossinit library: written when the library is created (or adopted,
for one made before it existed), checked before anything in the folder is written or deleted."""

LAYOUT = frozenset(
    {MARKER, "identities", ".staging", ".trash", ".lock", ".cache", ".unfinished", ".running", "catalog.sqlite"}
    | {f"catalog.sqlite{suffix}" for suffix in ("-journal", "-wal", "-shm")}
)
"""What a library's home holds: a folder holding nothing else is one (adopted), whatever its age."""

OWN = (".staging", ".trash", ".lock", "catalog.sqlite", ".cache", ".unfinished", ".running", "identities")
"""The library's own paths, none of which may be a symbolic link: a delete or write there must stay inside."""


def check_home(home: Path) -> None:
    """Refuse a home that is not a library: a non-empty folder without the marker and not of the library's
    layout (crossinit empties `.staging/` and `.trash/` of its library; never of a folder it did not make).
    Also refuses one whose own paths (`.trash`, `catalog.sqlite` ...) are symbolic links."""
    home = Path(home)
    try:
        found = set(os.listdir(home))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise CrossinitError(f"{home} is a file, not a crossinit library; pick a folder with --home") from None
    except OSError as exc:
        raise CrossinitError(f"cannot read the library at {home}: {exc.strerror or exc}") from None
    if MARKER not in found and not found <= LAYOUT:
        raise CrossinitError(
            f"{home} is not a crossinit library (no {MARKER}, and it holds other files); "
            "pick a new or empty folder with --home or CROSSINIT_HOME"
        )
    for name in OWN:
        if name in found and (home / name).is_symlink():
            raise CrossinitError(
                f"the library's {name} at {home / name} is a symbolic link; crossinit writes and deletes "
                "nothing through one: replace it with a real file or folder"
            )


class LibraryLock:
    """The library's part that keeps it whole: the library-wide write lock, the recovery of what a killed
    writer left behind it, and readers settling against it (waiting out a write in progress)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        check_home(self.home)
        self.entries = self.home / "identities"
        self._staging = self.home / ".staging"
        self._trash = self.home / ".trash"
        self._held = False  # this object holds the lock: reads inside a write must not wait for it

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the library-wide write lock (released by the OS if this process dies)."""
        from filelock import FileLock, Timeout

        try:
            check_home(self.home)  # again: what was checked at the start may have changed since
            self.entries.mkdir(parents=True, exist_ok=True)
            marker = self.home / MARKER
            if not os.path.lexists(marker):  # created, or adopted (a library made before the marker)
                marker.write_bytes(b"crossinit library\n")
            lock = FileLock(str(self.home / ".lock"), timeout=LOCK_TIMEOUT_S)
            lock.acquire()
            self._held = True
        except Timeout:
            raise CrossinitError(
                f"the library at {self.home} stayed locked by another crossinit process for "
                f"{LOCK_TIMEOUT_S:.0f} s; try again"
            ) from None
        except OSError as exc:
            raise CrossinitError(f"cannot write to the library at {self.home}: {exc.strerror or exc}") from None
        try:
            self._recover()
            yield
        finally:
            self._held = False
            lock.release()

    def _recover(self) -> None:
        """Finish or undo what a killed process left: staging dirs, trashed entries, temp files."""
        if _real_dir(self._staging):
            shutil.rmtree(self._staging, ignore_errors=True)
        if _real_dir(self._trash):
            for item in self._trash.iterdir():
                key = item.name.split("~")[0]
                target = self.entries / key
                if item.is_symlink():  # not ours: the link goes, never what it points to
                    item.unlink()
                elif not os.path.lexists(target) and (item / META).is_file():
                    item.rename(target)
                else:
                    shutil.rmtree(item, ignore_errors=True)
        for gone in self.entries.glob(".removed~*"):
            if gone.is_symlink():
                gone.unlink()
            else:
                shutil.rmtree(gone, ignore_errors=True)
        for folder in self.entries.iterdir():
            if folder.name.startswith(".") or not _real_dir(folder):
                continue  # an entry that is a link is read through, never written or cleaned through
            for tmp in folder.glob(f"{TEMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
        for pending in self.entries.glob(f"*/{PENDING}"):
            if not _real_dir(pending.parent):
                continue
            # Past a rename's commit point (its key is the directory's): finish it; else drop it.
            if read_pending(pending.parent) is not None:
                os.replace(pending, pending.parent / META)
            else:
                pending.unlink(missing_ok=True)

    def _in_flux(self) -> bool:
        """Something in .staging/ or .trash/: a write is in progress, or one was killed."""
        for folder in (self._staging, self._trash):
            with contextlib.suppress(OSError), os.scandir(folder) as items:
                if next(items, None) is not None:
                    return True
        return False

    def _settle(self, *, always: bool = False) -> None:
        """Wait for the write in progress (or recover a killed one's) before reading.

        Taking the lock is enough: behind it the writer has finished, or it died, the OS released its
        lock and `locked()` recovers what it left. A library we cannot lock (read-only) is read as it is.
        """
        if self._held or not self.entries.is_dir() or not (always or self._in_flux()):
            return
        with contextlib.suppress(CrossinitError), self.locked():
            pass

    def _read_settled(self, read: Callable[[], Any]) -> Any:
        """`read()`; if it fails, once more after any write in progress (a replace racing this read)."""
        try:
            return read()
        except CrossinitError:
            if self._held or not self.entries.is_dir():
                raise
        self._settle(always=True)
        return read()


def _real_dir(path: Path) -> bool:
    """A folder, and not a symbolic link to one (lstat: nothing is deleted through a link)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
