"""One library entry as it is stored: its metadata (`Identity`), its vectors (`Vectors`), and their files.

The records, the checks a vector or an edited field passes, the safetensors names of an entry's vectors
(per encoder, snapshots) and the race-free reads of an entry's files (by a handle on its folder). The
library (store.py) reads and writes whole entries with them. Nothing here imports torch.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
