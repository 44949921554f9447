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

The library is built in layers, one room each: entries.py (an entry's records and files), librarylock.py
(the lock and crash recovery), libraryreads.py (reading entries and listing them through the catalog),
and here `Library`, the writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import atomic, names
from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.entries import (
    CROPS,
    META,
    PENDING,
    SNAPSHOT_PREFIX,
    VECTORS,
    Identity,
    check_field_types,
    check_vectors,
    fingerprint,
    now,
    read_own,
    vector_tensors,
)
from crossinit_cli.entries import Damaged as Damaged  # store.Damaged: what a listing hands out for a broken entry
from crossinit_cli.errors import CrossinitError
from crossinit_cli.libraryreads import CatalogReads
from crossinit_cli.names import name_key, validate_name

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


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

        identity.name = validate_name(identity.name)
        tensors, shapes = vector_tensors(identity.name, learned, init)
        for step, parts in (snapshots or {}).items():
            for part, rows in parts.items():
                tensors[f"{SNAPSHOT_PREFIX}{int(step)}/{part}"] = check_vectors(rows, f"snapshot at step {step}")
        identity.tokens, identity.width = shapes[0]
        identity.widths = [w for _, w in shapes]
        identity.has_init = init is not None
        identity.schema = 2 if isinstance(learned, dict) else 1
        identity.modified = now()
        try:  # the schema every reader checks: what would be read back as damaged is never written
            Identity.from_dict(identity.to_dict())
        except (TypeError, ValueError) as exc:
            raise CrossinitError(f"identity {identity.name!r} cannot be stored: {exc}") from None
        key = name_key(identity.name)
        with self.locked():
            target = self.entries / key
            if target.exists() and not force:
                raise CrossinitError(f"identity {identity.name!r} already exists; pass --force to replace it")
            self._refuse_lookalike(identity.name)
            stage = self._staging / f"{key}~{uuid.uuid4().hex}"
            try:
                _stage(stage, tensors, identity, crops)
                if target.exists():
                    self._forget_replaced(identity.name, crops)
                    self._trash.mkdir(exist_ok=True)
                    old = self._trash / f"{key}~{uuid.uuid4().hex}"
                    target.rename(old)
                    stage.rename(target)
                    atomic.fsync_dir(self.entries)  # and the rename itself, before we say it is done
                    _delete(old)
                else:
                    stage.rename(target)
                    atomic.fsync_dir(self.entries)
            except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
                shutil.rmtree(stage, ignore_errors=True)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise CrossinitError(f"cannot write identity {identity.name!r}: {reason}") from None
            self._index(key)
        return target

    def _forget_replaced(self, name: str, crops: Sequence[Image.Image]) -> None:
        """The latents of the face an entry being replaced was learned from go with it (learn --force with
        another photo, import --force over a learned identity); those of a crop the new entry keeps stay."""
        from crossinit_cli import latents

        latents.forget(latents.folder(self.home), self.crops(name), keep=crops)

    def _own_folder(self, name: str) -> Path:
        """The folder of entry `name`, refused when it is a symbolic link: nothing is written through one."""
        path = self.path_of(name)
        if path.is_symlink():
            raise CrossinitError(
                f"the folder of identity {name!r} ({path}) is a symbolic link; crossinit writes nothing through "
                "one: replace it with the folder itself"
            )
        return path

    def _checked(self, ident: Identity) -> Identity:
        """`ident` as it will be written, checked against the metadata's schema (entries.FIELDS), with its
        vectors' record adopted when it has none (an entry written before crossinit kept one)."""
        try:
            checked = Identity.from_dict(ident.to_dict())
        except (TypeError, ValueError) as exc:
            raise CrossinitError(f"the metadata would be invalid: {exc}; nothing changed") from None
        if not checked.integrity:
            with contextlib.suppress(OSError, CrossinitError):
                folder = self._own_folder(checked.name)
                data = read_own(folder, VECTORS)
                self._read_vectors(checked.name, folder, checked)  # vectors that read as vectors, only
                checked.integrity = fingerprint(data)
        return checked

    def _refuse_lookalike(self, name: str) -> None:
        """Refuse a new name that would look like a stored one on screen ('аlice' beside 'alice')."""
        keys = (p.name for p in self.entries.iterdir() if not p.name.startswith("."))
        names.refuse_lookalike(name, keys)

    def modify(self, name: str, change: Callable[[Identity], None]) -> Identity:
        """Apply `change` to the current metadata under the lock, so concurrent edits never lose one."""
        with self.locked():
            ident = self.get(name)
            fixed = (ident.name, ident.tokens, ident.width, ident.schema, ident.has_init)
            recorded = dict(ident.integrity)
            change(ident)
            if (ident.name, ident.tokens, ident.width, ident.schema, ident.has_init) != fixed:
                raise CrossinitError("name, tokens, width, schema and has_init cannot be changed this way")
            if ident.integrity != recorded:
                raise CrossinitError("the vectors' record (integrity) cannot be changed this way")
            ident.modified = now()
            ident = self._checked(ident)
            write_bytes_atomic(self._own_folder(ident.name) / META, ident.to_toml())
            self._index(name_key(ident.name))
            return ident

    def replace_meta(self, name: str, raw: dict[str, Any]) -> Identity:
        """Store edited metadata (from $EDITOR); name, tokens and width must stay as they are."""
        with self.locked():
            current = self.get(name)
            check_field_types(raw, current)
            try:
                ident = Identity.from_dict(raw)
            except (TypeError, ValueError) as exc:
                raise CrossinitError(f"edited metadata is invalid: {exc}; nothing changed") from None
            for fixed in ("tokens", "width", "widths", "family", "has_init", "clip_skip", "integrity"):
                if getattr(ident, fixed) != getattr(current, fixed) and (fixed != "integrity" or fixed in raw):
                    raise CrossinitError(f"{fixed!r} cannot be edited")
            ident.integrity = current.integrity
            if ident.name.casefold() != current.name.casefold():
                raise CrossinitError("use `crossinit edit NAME --rename NEW` to rename")
            ident.name = validate_name(ident.name)
            ident.modified = now()
            ident = self._checked(ident)
            write_bytes_atomic(self._own_folder(name) / META, ident.to_toml())
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
            ident = self._checked(ident)
            if source.is_symlink():
                self._own_folder(old)
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
            _delete(gone)
            self._index(path.name)


def _stage(stage: Path, tensors: dict[str, np.ndarray], identity: Identity, crops: Sequence[Image.Image]) -> None:
    """Assemble a new entry in `stage`: its vectors (their size and sha256 recorded in its metadata), its
    crops and its metadata, every byte flushed to disk before the rename that publishes it."""
    from safetensors.numpy import save_file

    (stage / CROPS).mkdir(parents=True)
    save_file(tensors, str(stage / VECTORS))
    identity.integrity = fingerprint((stage / VECTORS).read_bytes())
    for i, crop in enumerate(crops):
        crop.save(stage / CROPS / f"{i:03d}.png")
    (stage / META).write_bytes(identity.to_toml())
    atomic.fsync_tree(stage)


def _delete(path: Path) -> None:
    """Delete an entry moved aside; one that was a symbolic link loses the link only, never what it points to."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
