"""The library's catalog: a SQLite index of every entry's metadata, so that `list` reads one file, not 10,000.

It is derived: the per-identity folders stay the truth. Each row keeps its entry's *stamp* (the modification
times of the folder and of its meta.toml, and meta.toml's size and inode). Before answering, `Library.list`
compares every stamp with the folders (two `stat`s an entry, no file read) and re-reads only the entries that
differ: a folder copied in or edited by hand, or a write killed between its folder and its catalog update.
A catalog that is missing, damaged or of another schema is rebuilt from the folders; one that cannot be
written (a read-only library) is replaced by one in memory. Writes update it inside the library lock, right
after the folder's commit. Dot-folders under `identities/` are not entries and are never indexed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOG = "catalog.sqlite"
SCHEMA = 5
"""Bumped when a row's record gains a field that older rows lack (4: clip_skip; 5: the vectors' stamp and
integrity check), so they are read again."""
BUSY_TIMEOUT_S = 30.0
SORTS = ("name", "created", "likeness")

_TABLES = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    stamp TEXT NOT NULL,
    name TEXT NOT NULL,
    damaged TEXT,
    family TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL DEFAULT '',
    likeness REAL,
    search TEXT NOT NULL DEFAULT '',
    record TEXT,
    summary TEXT,
    record_check INTEGER NOT NULL DEFAULT 0,
    summary_check INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tags (key TEXT NOT NULL, tag TEXT NOT NULL, folded TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tags_by_key ON tags (key);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags (folded);
"""
_EXPECTED = {
    "entries": [
        "key",
        "stamp",
        "name",
        "damaged",
        "family",
        "model",
        "created",
        "likeness",
        "search",
        "record",
        "summary",
        "record_check",
        "summary_check",
    ],
    "tags": ["key", "tag", "folded"],
}
_ORDER = {
    "name": "key",
    "created": "damaged IS NOT NULL, created DESC, key",
    "likeness": "likeness IS NULL, likeness DESC, key",
}


class Unavailable(Exception):
    """The catalog file cannot be opened or written (read-only library, a lock held too long ...)."""


class Corrupt(Exception):
    """A row holds what this code never writes (a record that is not a JSON object): the file is rebuilt."""


@dataclass
class Row:
    """One entry as indexed: its metadata (`record`, as `Identity.to_dict()` gives it) or why it is damaged."""

    key: str
    stamp: str
    name: str
    record: dict[str, Any] | None = None
    damaged: str | None = None
    text: str | None = None  # the record as the catalog holds it (JSON), parsed only when asked for
    cells: list[str] | None = None  # `summary()`'s columns, when the query asked for them instead

    def metadata(self) -> dict[str, Any] | None:
        if self.record is None and self.text is not None:
            self.record = json.loads(self.text)
        return self.record


@dataclass
class Query:
    """What `list` asks for. Text matches are case-insensitive; `model` and `search` match substrings."""

    tag: str | None = None
    family: str | None = None
    model: str | None = None
    search: str | None = None
    sort: str = "name"
    limit: int | None = None


def stamp_of(folder: Path | str, dir_fd: int | None = None) -> str | None:
    """What changes whenever the entry at `folder` does (None: not a folder). Three stats (the folder,
    meta.toml, the vectors), no read: a vectors file changed in place makes its row stale, so it is verified again."""
    try:
        here = os.stat(folder, dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISDIR(here.st_mode):
        return None
    try:
        meta = os.stat(os.path.join(folder, "meta.toml"), dir_fd=dir_fd)
    except OSError:
        return f"{here.st_mtime_ns}:-"
    try:
        vectors = os.stat(os.path.join(folder, "vectors.safetensors"), dir_fd=dir_fd)
        held = f"{vectors.st_mtime_ns}:{vectors.st_size}:{vectors.st_ino}"
    except OSError:
        held = "-"
    return f"{here.st_mtime_ns}:{meta.st_mtime_ns}:{meta.st_size}:{meta.st_ino}:{held}"


def scan(entries: Path) -> dict[str, str]:
    """key -> stamp of every entry folder under `entries` (dot-folders and plain files are not entries)."""
    try:
        names = os.listdir(entries)
    except OSError:
        return {}
    fd = os.open(entries, os.O_RDONLY) if os.stat in os.supports_dir_fd else None
    try:
        found = {}
        for name in names:
            if not name.startswith("."):
                stamp = stamp_of(name if fd is not None else os.path.join(entries, name), fd)
                if stamp is not None:
                    found[name] = stamp
        return found
    finally:
        if fd is not None:
            os.close(fd)


class Catalog:
    """The catalog file of the library at `home` (or, with `home=None`, a throwaway one in memory)."""

    def __init__(self, home: Path | None) -> None:
        self.path = None if home is None else Path(home) / CATALOG

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """An open catalog with the current schema; a damaged or outdated file is rebuilt empty first."""
        try:
            db = self._open()
        except sqlite3.OperationalError as exc:  # cannot open or write it, locked too long: not damaged
            raise Unavailable(str(exc)) from None
        except sqlite3.DatabaseError as exc:  # not a database, malformed: derived data, so start again
            if self.path is None:
                raise Unavailable(str(exc)) from None
            self.discard()
            try:
                db = self._open()
            except sqlite3.Error as again:
                raise Unavailable(str(again)) from None
        try:
            yield db
        except sqlite3.OperationalError as exc:  # locked too long, read-only, disk full ...
            raise Unavailable(str(exc)) from None
        except sqlite3.DatabaseError as exc:  # a damaged page found while reading: rebuild it
            raise Corrupt(str(exc)) from None
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        where = ":memory:" if self.path is None else str(self.path)
        if self.path is not None:  # never through a link: its tables would be another database's, dropped here
            for suffix in ("", "-journal", "-wal", "-shm"):
                if os.path.islink(f"{self.path}{suffix}"):
                    raise sqlite3.OperationalError(f"{self.path.name}{suffix} is a symbolic link")
        db = sqlite3.connect(where, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous = NORMAL")
            if not _has_schema(db):
                db.execute("BEGIN IMMEDIATE")
                if not _has_schema(db):  # again under the write lock: another process may have just made it
                    db.execute("DROP TABLE IF EXISTS entries")
                    db.execute("DROP TABLE IF EXISTS tags")
                    for statement in _TABLES.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA}")
                db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def discard(self) -> None:
        """Delete the catalog file (it is rebuilt from the folders by the next `list`)."""
        if self.path is None:
            return
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")  # a link's own name only, never what it points to

    def exists(self) -> bool:
        return self.path is None or self.path.is_file()

    # ---- reading and writing -------------------------------------------------------------------

    @staticmethod
    def stamps(db: sqlite3.Connection) -> dict[str, str]:
        return dict(db.execute("SELECT key, stamp FROM entries"))

    @staticmethod
    def update(db: sqlite3.Connection, rows: Iterable[Row], gone: Iterable[str] = ()) -> None:
        """Put `rows` in and take the `gone` keys out, in one transaction."""
        rows, gone = list(rows), list(gone)
        if not rows and not gone:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            keys = [(key,) for key in gone] + [(row.key,) for row in rows]
            db.executemany("DELETE FROM entries WHERE key = ?", keys)
            db.executemany("DELETE FROM tags WHERE key = ?", keys)
            db.executemany(
                "INSERT INTO entries "
                "(key, stamp, name, damaged, family, model, created, likeness, search, record, summary, "
                "record_check, summary_check) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_checked(columns) for columns in map(_columns, rows)],
            )
            db.executemany(
                "INSERT INTO tags (key, tag, folded) VALUES (?, ?, ?)",
                [(row.key, tag, tag.casefold()) for row in rows if row.record for tag in row.record.get("tags", [])],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def query(db: sqlite3.Connection, query: Query, *, table: bool = False) -> list[Row]:
        """The rows `query` selects, in its order: with their records, or (`table`) their summary columns."""
        where, params = [], []
        if query.tag is not None:
            where.append("key IN (SELECT key FROM tags WHERE folded = ?)")
            params.append(query.tag.casefold())
        if query.family is not None:
            where.append("family = ?")
            params.append(query.family.casefold())
        if query.model is not None:
            where.append("instr(model, ?) > 0")
            params.append(query.model.casefold())
        if query.search is not None:
            where.append("instr(search, ?) > 0")  # a damaged entry's search text is its key
            params.append(query.search.casefold())
        held = "summary" if table else "record"
        sql = f"SELECT key, stamp, name, damaged, {held}, {held}_check FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {_ORDER[query.sort]}"
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        rows = []
        for key, stamp, name, damaged, value, check in db.execute(sql, params):
            if check != checksum((key, stamp, name, damaged, value)) or (damaged is None and value is None):
                raise Corrupt(f"the catalog's row for {key!r} is not one this crossinit wrote")
            if table:
                cells = None if damaged is not None else value.split("\t")
                if cells is not None and len(cells) != 6:
                    raise Corrupt(f"the catalog's row for {key!r} is not one this crossinit wrote")
                rows.append(Row(key, stamp, name, damaged=damaged, cells=cells))
            else:
                rows.append(Row(key, stamp, name, damaged=damaged, text=value))
        return rows

    @staticmethod
    def tags(db: sqlite3.Connection, prefix: str = "") -> list[str]:
        """Every tag in use that starts with `prefix` (case-insensitively), each once."""
        found = db.execute(
            "SELECT MIN(tag) FROM tags WHERE substr(folded, 1, ?) = ? GROUP BY folded ORDER BY folded",
            (len(prefix.casefold()), prefix.casefold()),
        )
        return [tag for (tag,) in found]


def _has_schema(db: sqlite3.Connection) -> bool:
    """The tables this crossinit writes, column for column (another version's, or none, are rebuilt)."""
    if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
        return False
    columns = {table: [c[1] for c in db.execute(f"PRAGMA table_info({table})")] for table in ("entries", "tags")}
    return columns == _EXPECTED


def checksum(columns: Iterable[Any]) -> int:
    """A row's columns hashed (CRC-32): a row this crossinit wrote matches it; one edited by hand, or by
    another program, does not, and the catalog is rebuilt from the folders instead of trusting it. Two are
    kept, over what each kind of listing reads: the record (JSON) and the summary (the table's columns)."""
    text = "\x1f".join("\x00" if value is None else str(value) for value in columns)
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def _checked(columns: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row's columns and its two checksums (see `checksum`)."""
    head = columns[:4]  # key, stamp, name, damaged
    return (*columns, checksum((*head, columns[9])), checksum((*head, columns[10])))


def _columns(row: Row) -> tuple[Any, ...]:
    record = row.record or {}
    likeness = (record.get("evaluation") or {}).get("likeness")
    if not isinstance(likeness, (int, float)) or isinstance(likeness, bool) or not math.isfinite(likeness):
        likeness = None
    else:
        likeness = float(likeness)  # as SQLite's REAL column gives it back, for the row's checksum
    return (
        row.key,
        row.stamp,
        row.name,
        row.damaged,
        str(record.get("family", "")).casefold(),
        str(record.get("base_model", "")).casefold(),
        str(record.get("created", "")),
        likeness,
        f"{row.name}\n{record.get('notes', '')}".casefold(),
        None if row.record is None else json.dumps(row.record, ensure_ascii=False, default=str, allow_nan=False),
        None if row.record is None else "\t".join(summary(row.record)),
    )


def summary(record: dict[str, Any]) -> list[str]:
    """The columns `list` shows after the name: family, base model, mode (steps), created day, tags, first note.

    Kept in the catalog as one tab-separated text, so that the listing parses no JSON."""
    training = record.get("training") or {}
    steps = training.get("steps")
    mode = str(training.get("mode") or str(record.get("source", "")).split(":")[0])
    notes = str(record.get("notes", ""))
    cells = [
        str(record.get("family", "")),
        str(record.get("base_model", "")),
        f"{mode} ({steps} steps)" if steps else mode,
        str(record.get("created", ""))[:10],
        ", ".join(map(str, record.get("tags", []))),
        notes.splitlines()[0] if notes else "",
    ]
    # Control characters as their escapes (errors.shown's rule; this module imports nothing of crossinit's).
    return ["".join(c if c.isprintable() else repr(c)[1:-1] for c in cell) for cell in cells]
