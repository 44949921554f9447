"""The identity library: one directory per identity, written atomically under a library-wide lock.

Layout under the library home:

    identities/<key>/meta.toml            metadata (schema, name, base model, training record, ...)
    identities/<key>/vectors.safetensors  "learned" float32[k, width], and "init" (the cross-init start);
                                          SDXL: "learned.clip_l", "init.clip_l", "learned.clip_g", "init.clip_g";
                                          snapshots of a run as "snapshot/<step>/<name>" (named tensors per
                                          step: "learned", or one per encoder, "clip_l" and "clip_g")
    identities/<key>/crops/000.png        the aligned face crops it was learned from
    .lock                                 held while anything is written
    .staging/                             entries being assembled (always under the lock)
    .trash/                               entries being replaced (restored if the write died)
    identities/.removed~<id>/             an entry being removed (deleted by the next write if this one died)
    identities/<key>/meta.toml.pending    a rename's new metadata, until the directory carries the new key

`<key>` is the name NFKC-normalised and case-folded, so names match case-insensitively. A new entry is
assembled in `.staging/` and renamed into place, so a reader (or a process killed at any moment) sees the
library before or after a write, never between: replacing an entry takes two renames (old one aside, new
one in), and a reader that finds anything in `.staging/` or `.trash/` waits for the lock, behind which the
write has finished or its dead writer's leftovers are recovered. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import atomic, names
from crossinit_cli.atomic import TEMP_PREFIX, write_bytes_atomic
from crossinit_cli.catalog import Catalog, Corrupt, Query, Row, Unavailable, scan, stamp_of
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.names import name_key, validate_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

SCHEMA = 2
"""The newest metadata this release reads. Single-encoder entries are still written as schema 1, so the
releases before SDXL keep reading them; an entry with vectors per encoder (SDXL) is schema 2, which
those releases report as newer instead of misreading its first encoder's vectors."""
META = "meta.toml"
PENDING = "meta.toml.pending"
VECTORS = "vectors.safetensors"
CROPS = "crops"
MAX_TOKENS = 16
LEGACY_FAMILIES = {768: "sd1", 1024: "sd2"}
"""The model family of an entry written before `family` was stored: single-encoder widths are unambiguous."""
LOCK_TIMEOUT_S = 60.0


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Identity:
    """Everything stored about one identity except its tensors and crops."""

    name: str
    tokens: int
    width: int
    family: str = ""  # "sd1", "sd2" or "sdxl"; entries written before it existed get it from their width
    widths: list[int] = field(default_factory=list)  # one per text encoder (SDXL: [768, 1280]); else [width]
    base_model: str = ""
    encoder_fingerprint: str = ""
    has_init: bool = False
    strength: float = 1.0
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = "learn"
    created: str = field(default_factory=now)
    modified: str = field(default_factory=now)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # [{"step": 40, "loss": ...}, ...]
    active_step: int = 0  # the snapshot prompts use; 0: the final vectors
    clip_skip: int = 1  # the text-encoder layer it was learned at (A1111's Clip skip); older entries: 1
    clip_skip_unknown: bool | None = None  # True: imported from a file that cannot record it (None: known)
    schema: int = 1

    @property
    def token(self) -> str:
        """How prompts name this identity."""
        return f"<{self.name}>"

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy is most of the cost of `list --json` at 10,000 entries.
        return {name: _plain_copy(getattr(self, name)) for name in self.__dataclass_fields__}

    def to_toml(self) -> bytes:
        """The metadata as `meta.toml` holds it (UTF-8 TOML; None values left out)."""
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict())).encode("utf-8")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Identity:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in known}
        ident = cls(**values)
        if not isinstance(ident.name, str) or not isinstance(ident.tokens, int) or not isinstance(ident.width, int):
            raise ValueError("name, tokens and width must be a string and two integers")
        if not 1 <= ident.tokens <= MAX_TOKENS or ident.width < 1:
            raise ValueError(f"tokens={ident.tokens} width={ident.width} out of range")
        if ident.schema > SCHEMA:
            raise ValueError(f"schema {ident.schema} is newer than this crossinit ({SCHEMA}); upgrade")
        ident.tags = [str(t) for t in ident.tags]
        ident.strength = float(ident.strength)
        ident.family = str(ident.family or LEGACY_FAMILIES.get(ident.width, ""))
        ident.widths = [int(w) for w in ident.widths] or [ident.width]
        if isinstance(ident.clip_skip, bool) or not isinstance(ident.clip_skip, int) or ident.clip_skip < 1:
            raise ValueError(f"clip_skip must be a whole number of at least 1, not {ident.clip_skip!r}")
        return ident


@dataclass
class Damaged:
    """An entry that could not be read; `list` shows it instead of failing."""

    name: str
    path: Path
    reason: str


SNAPSHOT_PREFIX = "snapshot/"
SNAPSHOT_ROWS = "learned"
"""The name of a single-encoder model's rows inside a snapshot (a snapshot is a dict of named tensors)."""


@dataclass
class Vectors:
    """An identity's vectors: `learned`/`init` are its (first) text encoder's [k, width].

    A model with several text encoders (SDXL) has vectors per encoder: `parts` holds every encoder's
    (learned, init) by its key ("clip_l", "clip_g"), in the family's order; empty for one encoder.
    """

    learned: np.ndarray
    init: np.ndarray | None
    parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # step -> named tensors

    def at_strength(self, strength: float, step: int = 0) -> np.ndarray:
        """init + strength * (learned - init): 1.0 is as learned, 0.0 the cross-init start.

        `step` picks a snapshot's rows instead of the final ones (0: the final vectors)."""
        return _blend(self.at_step(step), self.init, strength)

    def per_encoder(self, strength: float = 1.0, step: int = 0) -> list[np.ndarray]:
        """Every text encoder's vectors at `strength`, in the family's order (one array for SD 1.x/2.x);
        `step` picks a snapshot's."""
        if not self.parts:
            return [self.at_strength(strength, step)]
        if not step:
            return [_blend(learned, init, strength) for learned, init in self.parts.values()]
        taken = self.snapshot(step)
        return [_blend(taken[key], init, strength) for key, (_, init) in self.parts.items()]

    def at_step(self, step: int) -> np.ndarray:
        """The (first encoder's) rows of the snapshot taken at `step` (0: the final vectors)."""
        if not step:
            return self.learned
        taken = self.snapshot(step)
        return taken[SNAPSHOT_ROWS] if SNAPSHOT_ROWS in taken else taken[next(iter(self.parts))]

    def snapshot(self, step: int) -> dict[str, np.ndarray]:
        if step not in self.snapshots:
            raise CrossinitError(f"no snapshot at step {step}; `crossinit show NAME` lists them")
        return self.snapshots[step]


def _blend(learned: np.ndarray, init: np.ndarray | None, strength: float) -> np.ndarray:
    if init is None or strength == 1.0:
        return learned.copy()
    return (init + strength * (learned - init)).astype("float32")


def check_vectors(array: np.ndarray, what: str) -> np.ndarray:
    """A [k, width] finite float32 array, or a CrossinitError naming what is wrong."""
    import numpy as np

    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not 1 <= array.shape[0] <= MAX_TOKENS or array.shape[1] < 1:
        raise CrossinitError(
            f"{what}: expected vectors of shape [k, width] with k <= {MAX_TOKENS}, got {list(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise CrossinitError(f"{what}: expected floating-point vectors, got {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise CrossinitError(f"{what}: vectors contain NaN or infinite values")
    return array


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
            if _read_pending(pending.parent) is not None:
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
                ident = self._read_meta(path)
                return ident, self._read_vectors(name, path, ident.family)
            try:
                folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                raise self.unknown(name) from None
            except OSError as exc:
                raise CrossinitError(f"cannot read identity {name!r}: {exc.strerror or exc}") from None
            try:
                ident = self._read_meta(path, folder)
                return ident, self._read_vectors(name, folder, ident.family)
            finally:
                os.close(folder)

        return self._read_settled(read_once)

    def vectors(self, name: str) -> Vectors:
        return self.read(name)[1]

    def effective_vectors(self, name: str) -> np.ndarray:
        """The vectors prompts use: the learned ones (or the active snapshot's) at the identity's strength."""
        ident, vectors = self.read(name)
        return vectors.at_strength(ident.strength, ident.active_step)

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

    def _read_meta(self, path: Path, folder: int | None = None) -> Identity:
        """The metadata of the entry at `path` (read through `folder`, a handle on it, when given)."""
        where = path if folder is None else folder
        try:
            raw = tomllib.loads(_read_at(where, META).decode("utf-8"))
            ident = Identity.from_dict(raw)
        except FileNotFoundError:
            raise CrossinitError(f"entry {path.name!r} is damaged: {META} is missing") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
            raise CrossinitError(f"entry {path.name!r} is damaged: {library_text(exc)}") from None
        if not _is_file_at(where, VECTORS):
            raise CrossinitError(f"entry {path.name!r} is damaged: {VECTORS} is missing")
        # The directory is the source of truth for the key. A rename that got past its commit point
        # (the directory rename) but not further left its new metadata beside the old one.
        if ident.name.casefold() != path.name:
            ident = _read_pending(path, folder) or ident
            ident.name = ident.name if ident.name.casefold() == path.name else path.name
        return ident

    def _read_vectors(self, name: str, folder: Path | int, family: str = "") -> Vectors:
        import numpy as np
        from safetensors import SafetensorError
        from safetensors.numpy import load

        def checked(tensors: dict[str, Any], key: str, what: str) -> np.ndarray | None:
            value = tensors.get(key)
            return None if value is None else check_vectors(np.asarray(value), what)

        try:
            tensors = load(_read_at(folder, VECTORS))
            snapshots = _snapshots_in(tensors)
            if "learned" in tensors:  # one text encoder: the layout of every release so far
                learned = check_vectors(np.asarray(tensors["learned"]), f"identity {name!r}")
                init = checked(tensors, "init", f"identity {name!r} init")
                return Vectors(learned, init, snapshots=snapshots)
            parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
            for key in _encoder_keys(family, tensors):
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
        record = row.metadata()
        if record is None:
            return Damaged(row.name, self.entries / row.key, row.damaged or "unreadable")
        return Identity.from_dict(record)

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


class Library(CatalogReads):
    """The identity library at `home`. Usable from Python: `Library(home).list()`.

    Built in parts a reader can take one at a time: `LibraryLock` (the lock and crash recovery),
    `EntryReads` (one entry from its folder), `CatalogReads` (listing through the catalog), and here the
    writes (add, modify, replace_meta, rename, remove), each under the lock and atomic."""

    def add(
        self,
        identity: Identity,
        learned: np.ndarray | dict[str, np.ndarray],
        init: np.ndarray | dict[str, np.ndarray] | None = None,
        crops: Sequence[Image.Image] = (),
        *,
        force: bool = False,
        snapshots: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> Path:
        """Store a new identity (replace an existing one only with `force`); returns its directory.

        `learned` (and `init`) are one [k, width] array, or for a model with several text encoders (SDXL)
        a dict of them by encoder key ("clip_l", "clip_g"), all with the same k. `snapshots` are the rows
        at some steps of its run ({step: {"learned" or encoder key: [k, width]}}), kept beside them.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        identity.name = validate_name(identity.name)
        tensors, shapes = _vector_tensors(identity.name, learned, init)
        for step, parts in (snapshots or {}).items():
            for part, rows in parts.items():
                tensors[f"{SNAPSHOT_PREFIX}{int(step)}/{part}"] = check_vectors(rows, f"snapshot at step {step}")
        identity.tokens, identity.width = shapes[0]
        identity.widths = [w for _, w in shapes]
        identity.has_init = init is not None
        identity.schema = 2 if isinstance(learned, dict) else 1
        identity.modified = now()
        key = name_key(identity.name)
        with self.locked():
            target = self.entries / key
            if target.exists() and not force:
                raise CrossinitError(f"identity {identity.name!r} already exists; pass --force to replace it")
            self._refuse_lookalike(identity.name)
            stage = self._staging / f"{key}~{uuid.uuid4().hex}"
            try:
                (stage / CROPS).mkdir(parents=True)
                save_file(tensors, str(stage / VECTORS))
                for i, crop in enumerate(crops):
                    crop.save(stage / CROPS / f"{i:03d}.png")
                (stage / META).write_bytes(identity.to_toml())
                atomic.fsync_tree(stage)  # every byte on disk before the rename publishes the entry
                if target.exists():
                    self._trash.mkdir(exist_ok=True)
                    old = self._trash / f"{key}~{uuid.uuid4().hex}"
                    target.rename(old)
                    stage.rename(target)
                    atomic.fsync_dir(self.entries)  # and the rename itself, before we say it is done
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    stage.rename(target)
                    atomic.fsync_dir(self.entries)
            except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
                shutil.rmtree(stage, ignore_errors=True)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise CrossinitError(f"cannot write identity {identity.name!r}: {reason}") from None
            self._index(key)
        return target

    def _refuse_lookalike(self, name: str) -> None:
        """Refuse a new name that would look like a stored one on screen ('аlice' beside 'alice')."""
        keys = (p.name for p in self.entries.iterdir() if not p.name.startswith("."))
        names.refuse_lookalike(name, keys)

    def modify(self, name: str, change: Callable[[Identity], None]) -> Identity:
        """Apply `change` to the current metadata under the lock, so concurrent edits never lose one."""
        with self.locked():
            ident = self.get(name)
            fixed = (ident.name, ident.tokens, ident.width, ident.schema, ident.has_init)
            change(ident)
            if (ident.name, ident.tokens, ident.width, ident.schema, ident.has_init) != fixed:
                raise CrossinitError("name, tokens, width, schema and has_init cannot be changed this way")
            ident.modified = now()
            write_bytes_atomic(self.path_of(ident.name) / META, ident.to_toml())
            self._index(name_key(ident.name))
            return ident

    def replace_meta(self, name: str, raw: dict[str, Any]) -> Identity:
        """Store edited metadata (from $EDITOR); name, tokens and width must stay as they are."""
        with self.locked():
            current = self.get(name)
            _check_field_types(raw, current)
            try:
                ident = Identity.from_dict(raw)
            except (TypeError, ValueError) as exc:
                raise CrossinitError(f"edited metadata is invalid: {exc}; nothing changed") from None
            for fixed in ("tokens", "width", "widths", "family", "has_init", "clip_skip"):
                if getattr(ident, fixed) != getattr(current, fixed):
                    raise CrossinitError(f"{fixed!r} cannot be edited")
            if ident.name.casefold() != current.name.casefold():
                raise CrossinitError("use `crossinit edit NAME --rename NEW` to rename")
            ident.name = validate_name(ident.name)
            ident.modified = now()
            write_bytes_atomic(self.path_of(name) / META, ident.to_toml())
            self._index(name_key(name))
            return ident

    def rename(self, old: str, new: str, change: Callable[[Identity], None] | None = None) -> Identity:
        """Rename an identity, applying `change` to its metadata in the same step (edit --note --rename).

        The directory rename is the commit point. The new metadata is written first, beside the old one
        (meta.toml.pending); readers use it only once the directory carries the new key, and the next
        write keeps or drops it accordingly: killed at any moment, the library is before or after.
        """
        new = validate_name(new)
        with self.locked():
            ident = self.get(old)
            source, target = self.path_of(old), self.path_of(new)
            if target.exists() and target != source:
                raise CrossinitError(f"identity {new!r} already exists")
            if target != source:
                self._refuse_lookalike(new)
            fixed = (ident.tokens, ident.width, ident.schema, ident.has_init)
            if change is not None:
                change(ident)
            if (ident.tokens, ident.width, ident.schema, ident.has_init) != fixed:
                raise CrossinitError("tokens, width, schema and has_init cannot be changed this way")
            ident.name = new
            ident.modified = now()
            if target == source:  # a change of case only: one atomic write
                write_bytes_atomic(target / META, ident.to_toml())
                self._index(target.name)
                return ident
            write_bytes_atomic(source / PENDING, ident.to_toml())
            try:
                source.rename(target)
                atomic.fsync_dir(self.entries)  # else a power cut could bring the old name back
            except OSError as exc:
                if not source.is_dir():  # renamed, but the flush failed: the disk itself is failing
                    reason = exc.strerror or exc
                    raise CrossinitError(f"renamed {old!r} but could not flush it to disk: {reason}") from None
                (source / PENDING).unlink(missing_ok=True)
                raise CrossinitError(f"cannot rename identity {old!r}: {exc.strerror or exc}") from None
            with contextlib.suppress(OSError):  # else the next write promotes it; readers use it already
                os.replace(target / PENDING, target / META)
                atomic.fsync_dir(target)
            self._index(source.name, target.name)
            return ident

    def remove(self, name: str) -> None:
        """Delete an entry by its folder alone: a damaged or half-written one goes the same way (nothing is read
        but its crops, where they can be, to delete the latents cached from them)."""
        with self.locked():
            path = self.path_of(name)
            if not path.is_dir():
                raise self.unknown(name)
            from crossinit_cli import latents

            latents.forget(latents.folder(self.home), self.crops(name))  # the face's latents go with it
            # Moved aside within its own folder, which needs no new directory: removing is how a user
            # makes room on a full disk. Dot names are not entries; `_recover` deletes what is left.
            gone = self.entries / f".removed~{uuid.uuid4().hex}"
            try:
                path.rename(gone)
                atomic.fsync_dir(self.entries)
            except OSError as exc:
                if path.is_dir():
                    raise CrossinitError(f"cannot remove identity {name!r}: {exc.strerror or exc}") from None
            shutil.rmtree(gone, ignore_errors=True)
            self._index(path.name)


_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    str: ((str,), "text in quotes"),
    list: ((list,), "a list [...]"),
    dict: ((dict,), "a table"),
}


def _check_field_types(raw: dict[str, Any], current: Identity) -> None:
    """Each edited field of the kind its current value is, or a one-line error naming the field."""
    for key, value in raw.items():
        if key not in Identity.__dataclass_fields__:
            continue
        kind = type(getattr(current, key))
        allowed, shown = _KINDS.get(kind, ((kind,), kind.__name__))
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool)
        if not wrong and key in ("tags", "widths"):
            wrong = not all(isinstance(item, str if key == "tags" else int) for item in value)
            shown = "a list of texts" if key == "tags" else "a list of whole numbers"
        if wrong:
            import json

            raise CrossinitError(
                f"edited metadata is invalid: field {key!r} must be {shown}, not {json.dumps(value, default=str)}; "
                "nothing changed"
            )


def _vector_tensors(
    name: str, learned: np.ndarray | dict[str, np.ndarray], init: np.ndarray | dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """The safetensors dict an entry stores, and each encoder's [k, width], checked."""
    if not isinstance(learned, dict):
        pairs = {"": (learned, init)}
    else:
        if init is not None and (not isinstance(init, dict) or set(init) != set(learned)):
            raise CrossinitError(f"identity {name!r}: init must have the same encoders as learned")
        pairs = {key: (value, None if init is None else init[key]) for key, value in learned.items()}
    if not pairs:
        raise CrossinitError(f"identity {name!r}: no vectors")
    tensors: dict[str, np.ndarray] = {}
    shapes: list[tuple[int, int]] = []
    for key, (rows, start) in pairs.items():
        suffix = f".{key}" if key else ""
        what = f"identity {name!r}" + (f" ({key})" if key else "")
        rows = check_vectors(rows, what)
        tensors["learned" + suffix] = rows
        if start is not None:
            start = check_vectors(start, f"{what} init")
            if start.shape != rows.shape:
                raise CrossinitError(f"init shape {list(start.shape)} differs from learned {list(rows.shape)}")
            tensors["init" + suffix] = start
        shapes.append((int(rows.shape[0]), int(rows.shape[1])))
    if len({k for k, _ in shapes}) != 1:
        raise CrossinitError(f"identity {name!r}: every text encoder needs the same number of vectors, got {shapes}")
    return tensors, shapes


def _snapshots_in(tensors: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
    """The snapshots stored beside an entry's vectors: "snapshot/<step>/<name>" -> {step: {name: rows}}."""
    import numpy as np

    found: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key.startswith(SNAPSHOT_PREFIX):
            step, part = key[len(SNAPSHOT_PREFIX) :].split("/", 1)
            found.setdefault(int(step), {})[part] = check_vectors(np.asarray(value), key)
    return dict(sorted(found.items()))


def _encoder_keys(family: str, tensors: dict[str, Any]) -> list[str]:
    """The per-encoder keys of an entry's vectors, in its family's encoder order."""
    from crossinit_cli import families

    present = [k[len("learned.") :] for k in tensors if k.startswith("learned.")]
    order = [e.key for e in families.FAMILIES[family].encoders] if family in families.FAMILIES else []
    return [k for k in order if k in present] + sorted(k for k in present if k not in order)


def _read_at(folder: Path | int, file: str) -> bytes:
    """The bytes of `file` in `folder`, a path or a handle on a directory."""
    if isinstance(folder, int):
        with open(os.open(file, os.O_RDONLY, dir_fd=folder), "rb") as handle:
            return handle.read()
    return (folder / file).read_bytes()


def _is_file_at(folder: Path | int, file: str) -> bool:
    try:
        found = os.stat(file, dir_fd=folder) if isinstance(folder, int) else (folder / file).stat()
    except OSError:
        return False
    return stat.S_ISREG(found.st_mode)


def _read_pending(path: Path, folder: int | None = None) -> Identity | None:
    """The pending metadata of a rename whose directory rename happened (its name's key is `path`'s)."""
    try:
        raw = _read_at(path if folder is None else folder, PENDING).decode("utf-8")
        ident = Identity.from_dict(tomllib.loads(raw))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return None
    return ident if ident.name.casefold() == path.name else None


def _plain_copy(value: Any) -> Any:
    """A copy of nested dicts and lists (the metadata's only containers)."""
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    return value


def _drop_none(value: Any) -> Any:
    """TOML has no null: drop None values (recursively)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value
