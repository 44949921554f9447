"""Reading the library: one entry by name (`EntryReads`), and listings through the catalog (`CatalogReads`).

Every read settles first against a write in progress (librarylock.py), so a reader sees the library
before or after a write, never between; the catalog (catalog.py) is an index that is refreshed from the
entries whenever it disagrees with them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import names
from crossinit_cli.catalog import Catalog, Corrupt, Query, Row, Unavailable, scan, stamp_of
from crossinit_cli.entries import (
    CROPS,
    META,
    VECTORS,
    Damaged,
    Identity,
    Vectors,
    check_vectors,
    encoder_keys,
    is_file_at,
    mismatch,
    read_at,
    read_own,
    read_pending,
    snapshots_in,
)
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.librarylock import LibraryLock
from crossinit_cli.names import name_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import numpy as np


class EntryReads(LibraryLock):
    """Reading one entry from its own folder: its metadata, its vectors (both from the same write), its crops."""

    def path_of(self, name: str) -> Path:
        key = name_key(name)
        self._settle()
        return self.entries / key

    def exists(self, name: str) -> bool:
        return (self.path_of(name) / META).is_file()

    def has_folder(self, name: str) -> bool:
        """An entry's folder is there, whole or damaged (all `remove` needs to know: it reads nothing else)."""
        return self.path_of(name).is_dir()

    def keys(self) -> list[str]:
        """The keys of the stored entries (their folder names), from one directory listing."""
        with contextlib.suppress(OSError), os.scandir(self.entries) as found:  # no stat per entry
            return sorted(e.name for e in found if not e.name.startswith(".") and e.is_dir())
        return []

    def unknown(self, name: str, where: str = "") -> CrossinitError:
        """The one-line error for a name with no entry, suggesting the closest stored names."""
        shown = f"<{name}>" if where else repr(name)
        hint = names.did_you_mean(name, self.keys())
        if hint:
            return CrossinitError(f"no identity named {shown}{where}; {hint} (`crossinit list` shows them all)")
        return CrossinitError(f"no identity named {shown}{where}; see `crossinit list`")

    def get(self, name: str) -> Identity:
        def read() -> Identity:
            path = self.path_of(name)
            if not path.is_dir():
                raise self.unknown(name)
            return self._read_meta(path)

        return self._read_settled(read)

    def read(self, name: str) -> tuple[Identity, Vectors]:
        """An identity's metadata and vectors, both from the same write.

        Both files are read through one handle on the entry's folder: a replace running meanwhile can
        move that folder aside but not swap it under the handle. If the replace deletes the old files
        first, the read is repeated behind the lock."""

        def read_once() -> tuple[Identity, Vectors]:
            path = self.path_of(name)
            if os.open not in os.supports_dir_fd:  # no directory handles (Windows): read by path
                ident = self._read_meta(path, verify=False)
                return ident, self._read_vectors(name, path, ident)
            try:
                folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                raise self.unknown(name) from None
            except OSError as exc:
                raise CrossinitError(f"cannot read identity {name!r}: {exc.strerror or exc}") from None
            try:
                ident = self._read_meta(path, folder, verify=False)
                return ident, self._read_vectors(name, folder, ident)
            finally:
                os.close(folder)

        return self._read_settled(read_once)

    def vectors(self, name: str) -> Vectors:
        return self.read(name)[1]

    def effective_vectors(self, name: str) -> np.ndarray | list[np.ndarray]:
        """The vectors prompts use: the learned ones (or the active snapshot's) at the identity's strength.

        One text encoder (SD 1.x/2.x): its [k, width] array. Several (SDXL): one array per encoder in the
        family's order (clip_l's, then clip_g's), as `effective_parts` gives them; never the first alone."""
        ident, vectors = self.read(name)
        parts = vectors.per_encoder(ident.strength, ident.active_step)
        return parts[0] if len(parts) == 1 else parts

    def effective_parts(self, name: str) -> list[np.ndarray]:
        """The vectors prompts use, one array per text encoder of the identity's family (SDXL: two)."""
        ident, vectors = self.read(name)
        return vectors.per_encoder(ident.strength, ident.active_step)

    def crops(self, name: str) -> list[Path]:
        folder = self.path_of(name) / CROPS
        return sorted(folder.glob("*.png")) if folder.is_dir() else []

    def scan(self) -> list[Identity | Damaged]:
        """Every entry read from its own folder, without the catalog: the truth the catalog is checked against."""
        if not self.entries.is_dir():
            return []
        self._settle()
        found: list[Identity | Damaged] = []
        for path in sorted(self.entries.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(self._read_meta(path))
            except CrossinitError as exc:
                found.append(Damaged(path.name, path, str(exc)))
        return found

    def _read_meta(self, path: Path, folder: int | None = None, *, verify: bool = True) -> Identity:
        """The metadata of the entry at `path` (read through `folder`, a handle on it, when given); with
        `verify`, its vectors file is checked against the size and sha256 the entry recorded."""
        where = path if folder is None else folder
        try:
            raw = tomllib.loads(read_at(where, META).decode("utf-8"))
            ident = Identity.from_dict(raw)
        except FileNotFoundError:
            raise CrossinitError(f"entry {path.name!r} is damaged: {META} is missing") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
            raise CrossinitError(f"entry {path.name!r} is damaged: {library_text(exc)}") from None
        if not is_file_at(where, VECTORS):
            raise CrossinitError(f"entry {path.name!r} is damaged: {VECTORS} is missing")
        if verify and ident.integrity:
            try:
                wrong = mismatch(ident.integrity, read_own(where, VECTORS))
            except OSError as exc:
                wrong = f"cannot read {VECTORS} ({library_text(exc)})"
            if wrong:
                raise CrossinitError(f"entry {path.name!r} is damaged: {wrong}")
        # The directory is the source of truth for the key. A rename that got past its commit point
        # (the directory rename) but not further left its new metadata beside the old one.
        if ident.name.casefold() != path.name:
            ident = read_pending(path, folder) or ident
            ident.name = ident.name if ident.name.casefold() == path.name else path.name
        return ident

    def _read_vectors(self, name: str, folder: Path | int, ident: Identity) -> Vectors:
        """The vectors of the entry `ident`, read once: checked against its record, then parsed."""
        import numpy as np
        from safetensors import SafetensorError
        from safetensors.numpy import load

        def checked(tensors: dict[str, Any], key: str, what: str) -> np.ndarray | None:
            value = tensors.get(key)
            return None if value is None else check_vectors(np.asarray(value), what)

        family = ident.family
        try:
            data = read_own(folder, VECTORS)
        except OSError as exc:
            raise CrossinitError(f"identity {name!r} is damaged: cannot read {VECTORS} ({library_text(exc)})") from None
        wrong = mismatch(ident.integrity, data)
        if wrong:
            raise CrossinitError(f"entry {ident.name!r} is damaged: {wrong}")
        try:
            tensors = load(data)
            snapshots = snapshots_in(tensors)
            if "learned" in tensors:  # one text encoder: the layout of every release so far
                learned = check_vectors(np.asarray(tensors["learned"]), f"identity {name!r}")
                init = checked(tensors, "init", f"identity {name!r} init")
                return Vectors(learned, init, snapshots=snapshots)
            parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
            for key in encoder_keys(family, tensors):
                learned = check_vectors(np.asarray(tensors[f"learned.{key}"]), f"identity {name!r} ({key})")
                parts[key] = (learned, checked(tensors, f"init.{key}", f"identity {name!r} init ({key})"))
            if not parts:
                raise KeyError("learned")
        except (OSError, KeyError, SafetensorError, ValueError) as exc:
            raise CrossinitError(f"identity {name!r} is damaged: cannot read {VECTORS} ({library_text(exc)})") from None
        first_learned, first_init = next(iter(parts.values()))
        return Vectors(first_learned, first_init, parts, snapshots)


class CatalogReads(EntryReads):
    """Answering `list` and completion from the catalog, kept in step with the folders by their stamps."""

    def list(self, query: Query | None = None) -> list[Identity | Damaged]:
        """Every entry (or those `query` selects), sorted by name; unreadable ones as `Damaged`.

        Answered by the catalog once its stamps have been checked against the folders (see catalog.py)."""
        return [self._from_row(row) for row in self.rows(query)]

    def rows(self, query: Query | None = None, *, table: bool = False) -> list[Row]:
        """`list`'s entries as the catalog holds them: metadata as JSON text (parsed on demand), or with
        `table` the columns `crossinit list` shows (catalog.summary)."""
        if not self.entries.is_dir():
            return []
        self._settle()
        query = query or Query()
        disk = scan(self.entries)
        for _attempt in range(2):
            try:
                with Catalog(self.home).connect() as db:
                    self._refresh(db, disk)
                    return Catalog.query(db, query, table=table)
            except Corrupt:
                Catalog(self.home).discard()  # and rebuilt from the folders on the second attempt
            except Unavailable:
                break  # cannot be written (read-only library ...): answer from a catalog in memory
        with Catalog(None).connect() as db:
            self._refresh(db, disk)
            return Catalog.query(db, query, table=table)

    def tags(self, prefix: str = "") -> list[str]:
        """Tags in use that start with `prefix`, from the catalog as it is (for shell completion: no check)."""
        if not Catalog(self.home).exists():
            self.list()
        try:
            with Catalog(self.home).connect() as db:
                return Catalog.tags(db, prefix)
        except (Unavailable, Corrupt):
            return []

    def catalog_state(self) -> dict[str, Any]:
        """What `doctor` reports about the catalog: fresh, stale, missing or damaged (and nothing changed)."""
        import sqlite3

        catalog = Catalog(self.home)
        disk = scan(self.entries)
        state: dict[str, Any] = {"path": str(catalog.path), "entries": len(disk)}
        if not catalog.exists():
            return {**state, "state": "missing", "detail": "the next `crossinit list` builds it"}
        try:
            db = sqlite3.connect(f"{Path(catalog.path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                known = Catalog.stamps(db) if check == "ok" else {}
            finally:
                db.close()
        except sqlite3.Error as exc:
            check = str(exc)
        if check != "ok":
            return {**state, "state": "damaged", "detail": f"{check}; the next `crossinit list` rebuilds it"}
        differ = sum(known.get(key) != stamp for key, stamp in disk.items()) + len(set(known) - set(disk))
        if differ:
            return {**state, "state": "stale", "stale": differ, "detail": "the next `crossinit list` updates them"}
        return {**state, "state": "fresh", "detail": "matches the folders"}

    def _refresh(self, db: Any, disk: dict[str, str]) -> None:
        """Re-read the entries whose stamps differ from the catalog's; drop the rows of entries gone."""
        known = Catalog.stamps(db)
        stale = [key for key, stamp in disk.items() if known.get(key) != stamp]
        rows = [row for row in map(self._row, stale) if row is not None]
        Catalog.update(db, rows, [key for key in known if key not in disk] + sorted(set(stale) - {r.key for r in rows}))

    def _row(self, key: str) -> Row | None:
        """The catalog row of the entry `key` as its folder holds it now (None: it is gone)."""
        path = self.entries / key
        stamp = stamp_of(path)  # before the read: a change during the read leaves the row stale, not wrong
        if stamp is None:
            return None
        try:
            ident = self._read_meta(path)
        except CrossinitError as exc:
            if not path.is_dir():  # removed or renamed while we read it
                return None
            return Row(key, stamp, key, damaged=str(exc))
        return Row(key, stamp, ident.name, ident.to_dict())

    def _from_row(self, row: Row) -> Identity | Damaged:
        try:
            record = row.metadata()
            if record is None:
                return Damaged(row.name, self.entries / row.key, row.damaged or "unreadable")
            return Identity.from_dict(record)
        except (TypeError, ValueError) as exc:  # a row its checksum let through, yet not metadata: say so
            return Damaged(row.name, self.entries / row.key, f"its catalog row is invalid ({library_text(exc)})")

    def _index(self, *keys: str) -> None:
        """Bring the catalog rows of `keys` up to date with their folders, inside the write's lock.

        A catalog that cannot be written is left as it is: the next `list` finds those rows stale by their stamps."""
        try:
            with Catalog(self.home).connect() as db:
                rows = [row for row in map(self._row, keys) if row is not None]
                Catalog.update(db, rows, [key for key in keys if key not in {r.key for r in rows}])
        except Unavailable:
            pass
        except Corrupt:
            Catalog(self.home).discard()  # rebuilt from the folders by the next list
