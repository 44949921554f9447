"""One library entry as it is stored: its metadata (`Identity`), its vectors (`Vectors`), and their files.

The records, the checks a vector or an edited field passes, the safetensors names of an entry's vectors
(per encoder, snapshots) and the race-free reads of an entry's files (by a handle on its folder). The
library (store.py) reads and writes whole entries with them. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import numpy as np

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
    # True: base_model is only what an imported file claims; no model is loaded for it until the user names
    # one (--model, `edit --model`, `config set model`: config.identities_model). None: learned or named.
    base_model_claimed: bool | None = None
    schema: int = 1
    integrity: dict[str, Any] = field(default_factory=dict)  # {"size", "sha256"} of vectors.safetensors

    @property
    def token(self) -> str:
        """How prompts name this identity."""
        return f"<{self.name}>"

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy is most of the cost of `list --json` at 10,000 entries.
        return {name: plain_copy(getattr(self, name)) for name in self.__dataclass_fields__}

    def to_toml(self) -> bytes:
        """The metadata as `meta.toml` holds it (UTF-8 TOML; None values left out)."""
        import tomli_w

        return tomli_w.dumps(drop_none(self.to_dict())).encode("utf-8")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Identity:
        """The identity `raw` (meta.toml, a catalog row, an edit) describes, checked field by field against
        `FIELDS`: a ValueError naming the first field that is wrong (type, finite numbers, list shape, size)."""
        if not isinstance(raw, dict):
            raise ValueError("the metadata is not a table")
        for key in ("name", "tokens", "width"):
            if key not in raw:
                raise ValueError(f"field {key!r} is missing")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in known}
        for key, value in values.items():
            check_field(key, value)
        ident = cls(**values)
        if ident.schema > SCHEMA:
            raise ValueError(f"schema {ident.schema} is newer than this crossinit ({SCHEMA}); upgrade")
        ident.strength = float(ident.strength)
        ident.family = str(ident.family or LEGACY_FAMILIES.get(ident.width, ""))
        ident.widths = [int(w) for w in ident.widths] or [ident.width]
        return ident


MAX_TEXT = 100_000
"""The longest text a field may hold (notes); names, tags and the like are far shorter."""

MAX_ITEMS = 10_000
"""The most items a list or table of the metadata may hold (tags, snapshots, a training record's keys)."""

MAX_DEPTH = 6


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any, where: str, depth: int = 0) -> None:
    """A value of a free-form table (training, evaluation, a snapshot): text, true/false, finite numbers,
    and lists and tables of them, bounded in depth and size."""
    if depth > MAX_DEPTH:
        raise ValueError(f"field {where!r} is nested too deeply")
    if value is None or isinstance(value, bool):  # None: a catalog row's (JSON) form of a field TOML leaves out
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"field {where!r} must be a finite number, not {value}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"field {where!r} is a number out of range")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"field {where!r} is longer than {MAX_TEXT} characters")
    if isinstance(value, (list, tuple, dict)) and len(value) > MAX_ITEMS:
        raise ValueError(f"field {where!r} has more than {MAX_ITEMS} items")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"field {where!r} has a key that is not text")
            _plain(item, f"{where}.{key}", depth + 1)
    elif not isinstance(value, (str, int, float, datetime, date, time)):  # TOML's own kinds
        raise ValueError(f"field {where!r} holds a {type(value).__name__}, which the metadata never stores")


def _whole(low: int, high: int) -> Any:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"a whole number from {low} to {high}"
        return None

    return check


def _text(longest: int) -> Any:
    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and len(value) <= longest else f"text of at most {longest} characters"

    return check


def _finite(value: Any) -> str | None:
    return None if _number(value) and math.isfinite(value) else "a finite number"


def _texts(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) <= MAX_ITEMS
    ok = ok and all(isinstance(t, str) and len(t) <= 1000 for t in value)
    return None if ok else "a list of texts"


def _widths(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) <= 8 and all(_whole(1, 2**20)(w) is None for w in value)
    return None if ok else "a list of at most 8 whole numbers"


def _table(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a table"


def _snapshots(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        return "a list of tables with a step each"
    for item in value:
        if not isinstance(item, dict) or _whole(1, 2**62)(item.get("step")) is not None:
            return "a list of tables with a step each"
    return None


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _integrity(value: Any) -> str | None:
    if not isinstance(value, dict) or not value:
        return None if value == {} else "a table with the vectors' size and sha256"
    size, digest = value.get("size"), value.get("sha256")
    ok = set(value) == {"size", "sha256"} and _whole(0, 2**62)(size) is None and isinstance(digest, str)
    ok = ok and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return None if ok else "a table with the vectors' size and sha256"


FIELDS: dict[str, Any] = {
    "name": _text(200),
    "tokens": _whole(1, MAX_TOKENS),
    "width": _whole(1, 2**20),
    "family": _text(32),
    "widths": _widths,
    "base_model": _text(4096),
    "encoder_fingerprint": _text(4096),
    "has_init": _flag,
    "strength": _finite,
    "notes": _text(MAX_TEXT),
    "tags": _texts,
    "source": _text(4096),
    "created": _text(64),
    "modified": _text(64),
    "training": _table,
    "evaluation": _table,
    "snapshots": _snapshots,
    "active_step": _whole(0, 2**62),
    "clip_skip": _whole(1, 64),
    "clip_skip_unknown": lambda value: None if value is None or isinstance(value, bool) else "true or false",
    "schema": _whole(1, 2**31),
    "integrity": _integrity,
}
"""The metadata's one schema: what each field of meta.toml (and of a catalog row, and of an edit) must be."""


def check_field(key: str, value: Any) -> None:
    """`value` fits field `key` of the metadata, or a ValueError naming the field and what it must be."""
    import json

    wrong = FIELDS[key](value) if key in FIELDS else None
    if wrong is not None:
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"field {key!r} must be {wrong}, not {shown}")
    _plain(value, key)


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


FIELD_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    str: ((str,), "text in quotes"),
    list: ((list,), "a list [...]"),
    dict: ((dict,), "a table"),
}


def check_field_types(raw: dict[str, Any], current: Identity) -> None:
    """Each edited field of the kind its current value is, or a one-line error naming the field."""
    for key, value in raw.items():
        if key not in Identity.__dataclass_fields__:
            continue
        kind = type(getattr(current, key))
        allowed, shown = FIELD_KINDS.get(kind, ((kind,), kind.__name__))
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


def vector_tensors(
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


def snapshots_in(tensors: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
    """The snapshots stored beside an entry's vectors: "snapshot/<step>/<name>" -> {step: {name: rows}}."""
    import numpy as np

    found: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key.startswith(SNAPSHOT_PREFIX):
            step, part = key[len(SNAPSHOT_PREFIX) :].split("/", 1)
            found.setdefault(int(step), {})[part] = check_vectors(np.asarray(value), key)
    return dict(sorted(found.items()))


def encoder_keys(family: str, tensors: dict[str, Any]) -> list[str]:
    """The per-encoder keys of an entry's vectors, in its family's encoder order."""
    from crossinit_cli import families

    present = [k[len("learned.") :] for k in tensors if k.startswith("learned.")]
    order = [e.key for e in families.FAMILIES[family].encoders] if family in families.FAMILIES else []
    return [k for k in order if k in present] + sorted(k for k in present if k not in order)


def read_at(folder: Path | int, file: str) -> bytes:
    """The bytes of `file` in `folder`, a path or a handle on a directory."""
    if isinstance(folder, int):
        with open(os.open(file, os.O_RDONLY, dir_fd=folder), "rb") as handle:
            return handle.read()
    return (folder / file).read_bytes()


def fingerprint(data: bytes) -> dict[str, Any]:
    """What an entry records about its vectors file: its size and SHA-256."""
    import hashlib

    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def mismatch(recorded: dict[str, Any], data: bytes) -> str | None:
    """Why the vectors file's bytes `data` are not the ones the entry recorded (None: they are, or no record)."""
    if not recorded:
        return None
    if len(data) != recorded["size"]:
        return f"{VECTORS} is {len(data)} bytes, not the {recorded['size']} its entry recorded"
    if fingerprint(data)["sha256"] != recorded["sha256"]:
        return f"{VECTORS} is not the file its entry recorded (its sha256 differs)"
    return None


def read_own(folder: Path | int, file: str) -> bytes:
    """The bytes of one of an entry's own files, never through a symbolic link (O_NOFOLLOW)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(file, flags, dir_fd=folder) if isinstance(folder, int) else os.open(folder / file, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{file} is a symbolic link, which an entry never holds") from None
        raise
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{file} is not a regular file")
        return handle.read()


def is_file_at(folder: Path | int, file: str) -> bool:
    try:
        found = os.stat(file, dir_fd=folder) if isinstance(folder, int) else (folder / file).stat()
    except OSError:
        return False
    return stat.S_ISREG(found.st_mode)


def read_pending(path: Path, folder: int | None = None) -> Identity | None:
    """The pending metadata of a rename whose directory rename happened (its name's key is `path`'s)."""
    try:
        raw = read_at(path if folder is None else folder, PENDING).decode("utf-8")
        ident = Identity.from_dict(tomllib.loads(raw))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return None
    return ident if ident.name.casefold() == path.name else None


def plain_copy(value: Any) -> Any:
    """A copy of nested dicts and lists (the metadata's only containers)."""
    if isinstance(value, dict):
        return {k: plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_copy(v) for v in value]
    return value


def drop_none(value: Any) -> Any:
    """TOML has no null: drop None values (recursively)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value if v is not None]
    return value
