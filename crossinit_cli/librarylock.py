"""What keeps the library whole: its write lock, the recovery of a killed writer's leftovers, and readers
settling against a write in progress (see store.py for the layout and the write protocol)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossinit_cli.atomic import TEMP_PREFIX
from crossinit_cli.entries import META, PENDING, read_pending
from crossinit_cli.errors import CrossinitError

LOCK_TIMEOUT_S = 60.0


class LibraryLock:
    """The library's part that keeps it whole: the library-wide write lock, the recovery of what a killed
    writer left behind it, and readers settling against it (waiting out a write in progress)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.entries = self.home / "identities"
        self._staging = self.home / ".staging"
        self._trash = self.home / ".trash"
        self._held = False  # this object holds the lock: reads inside a write must not wait for it

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the library-wide write lock (released by the OS if this process dies)."""
        from filelock import FileLock, Timeout

        try:
            self.entries.mkdir(parents=True, exist_ok=True)
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
        if self._staging.is_dir():
            shutil.rmtree(self._staging, ignore_errors=True)
        if self._trash.is_dir():
            for item in self._trash.iterdir():
                key = item.name.split("~")[0]
                target = self.entries / key
                if not target.exists() and (item / META).is_file():
                    item.rename(target)
                else:
                    shutil.rmtree(item, ignore_errors=True)
        for gone in self.entries.glob(".removed~*"):
            shutil.rmtree(gone, ignore_errors=True)
        for tmp in self.entries.glob(f"*/{TEMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
        for pending in self.entries.glob(f"*/{PENDING}"):
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
