"""Unfinished `learn` runs: what an interrupted run leaves so that `learn --resume NAME` can continue it.

Layout, under the library home but outside `identities/` (so a run is never taken for an entry):

    .unfinished/<key>/run.json     the settings (name, model, mode, steps, lr, seed, ...) and the last step saved
    .unfinished/<key>/crops/*.png  the aligned crops the run trains on (lossless: the same pixels on resume)
    .unfinished/<key>/state.pt     the run's state (runstate.capture_run): rows, AdamW, every RNG, step, losses
    .running/<key>.lock            held while a process trains the run (`running`): one learner per name

Each file is written atomically (temp file, fsync, rename); state.pt is written before run.json names its
step, so a kill at any moment leaves a state that matches or is newer than what `list` shows. The folder
is removed once the identity is stored. `run.json` is read without torch, for `list`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.store import name_key, now

if TYPE_CHECKING:
    from PIL import Image

FOLDER = ".unfinished"
RUNNING = ".running"
RUN = "run.json"
STATE = "state.pt"
CROPS = "crops"


@dataclass
class Run:
    """One unfinished run: its folder and its settings."""

    path: Path
    settings: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.settings["name"])

    @property
    def step(self) -> int:
        return int(self.settings.get("step", 0))

    @property
    def steps(self) -> int:
        return int(self.settings["train"]["steps"])

    def set_steps(self, steps: int) -> None:
        """A new total of steps (`learn --resume --steps`), kept in run.json so a later resume goes on to it."""
        self.settings["train"]["steps"] = int(steps)
        _write_json(self.path / RUN, self.settings)

    def save(self, state: dict[str, Any]) -> None:
        """Keep the run's state (train.SaveState); then record its step in run.json."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.path / STATE, buffer.getvalue())
        self.settings["step"] = int(state["step"])
        self.settings["saved"] = now()
        _write_json(self.path / RUN, self.settings)

    def load_state(self) -> dict[str, Any] | None:
        """The saved state (None when the run was stopped before its first checkpoint)."""
        import torch

        path = self.path / STATE
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the same user-facing problem
            raise CrossinitError(
                f"the checkpoint of {self.name!r} is damaged ({type(exc).__name__}); "
                f"`crossinit remove {self.name} --unfinished` clears it"
            ) from None

    def crops(self) -> list[Image.Image]:
        from PIL import Image

        images = []
        for path in sorted((self.path / CROPS).glob("*.png")):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        if not images:
            raise CrossinitError(
                f"the checkpoint of {self.name!r} has no crops; `crossinit remove {self.name} --unfinished`"
            )
        return images

    def discard(self) -> None:
        discard_folder(self.path)


def root(home: Path) -> Path:
    return Path(home) / FOLDER


@contextlib.contextmanager
def running(home: Path, name: str) -> Iterator[None]:
    """Hold `name`'s run lock while this process trains it (a new run or a resume). A second `learn` of
    the same name in the same library is refused at once, instead of starting over the first one's
    checkpoint under it. The OS releases the lock if the process dies; the small lock file stays."""
    from filelock import FileLock, Timeout

    from crossinit_cli.librarylock import check_home

    check_home(home)  # again, as the library's own lock does: `.running` is one of its own paths, never a link
    folder = Path(home) / RUNNING
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{name_key(name)}.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        raise CrossinitError(
            f"another crossinit process is learning {name!r} in this library right now; "
            "wait for it to finish, or pick another --name"
        ) from None
    except OSError as exc:
        raise CrossinitError(f"cannot write to the library at {home}: {library_text(exc)}") from None
    try:
        yield
    finally:
        lock.release()


def start(home: Path, settings: dict[str, Any], crops: list[Image.Image]) -> Run:
    """Begin keeping a run: its crops and settings (the state follows at the first checkpoint)."""
    path = root(home) / name_key(settings["name"])
    if path.is_symlink():  # not a run crossinit made: the link goes, never what it points to
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    run = Run(path, {**settings, "step": 0, "started": now()})
    try:
        for i, crop in enumerate(crops):
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG")
            write_bytes_atomic(path / CROPS / f"{i:03d}.png", buffer.getvalue())
        _write_json(path / RUN, run.settings)
    except BaseException:  # a full disk (or Ctrl-C) here: no half-made run is left for `list` to show
        run.discard()
        raise
    return run


MAX_RUN_BYTES = 1 << 20
"""The largest run.json read: crossinit writes a few hundred bytes."""


def check_settings(settings: Any) -> dict[str, Any]:
    """A run's settings (run.json) checked against what `learn` writes, or a ValueError naming the field:
    a table with the name as text, `train` a table whose `steps` is a whole number, `step` a whole number,
    and every number finite (the metadata's rules, entries.check_field)."""
    from crossinit_cli.entries import check_field

    if not isinstance(settings, dict):
        raise ValueError("run.json is not a table")
    for key in ("name", "train"):
        if key not in settings:
            raise ValueError(f"field {key!r} is missing")
    check_field("name", settings["name"])
    train = settings["train"]
    if not isinstance(train, dict):
        raise ValueError("field 'train' must be a table")
    for key, value in {**settings, "train": train}.items():
        check_field(f"run.{key}" if key != "name" else key, value)
    steps, step = train.get("steps"), settings.get("step", 0)
    for key, value in (("train.steps", steps), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise ValueError(f"field {key!r} must be a whole number, not {json.dumps(value, default=str)[:60]}")
    return settings


def _read_settings(path: Path) -> dict[str, Any]:
    """run.json of the run at `path`, parsed and checked (OSError, ValueError as json does)."""
    with open(path / RUN, "rb") as handle:
        data = handle.read(MAX_RUN_BYTES + 1)
    if len(data) > MAX_RUN_BYTES:
        raise ValueError(f"{RUN} is larger than {MAX_RUN_BYTES} bytes")
    return check_settings(json.loads(data.decode("utf-8")))


def find(home: Path, name: str) -> Run | None:
    """The unfinished run of `name`, or None."""
    path = root(home) / name_key(name)
    try:
        settings = _read_settings(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CrossinitError(
            f"the unfinished run of {name!r} is damaged ({library_text(exc)}); `crossinit remove {name} --unfinished`"
        ) from None
    return Run(path, settings)


def leftover(home: Path, name: str) -> tuple[Path, Run | None] | None:
    """The folder of `name`'s unfinished run, readable or not, and the run when its settings can be read.

    What `remove` deletes: a run killed while it started, or whose run.json is damaged, has no settings to
    read, and goes all the same."""
    path = root(home) / name_key(name)
    if not path.is_dir():
        return None
    try:
        run = find(home, name)
        if run is not None:
            _ = run.name, run.step, run.steps  # settings a message can show
        return path, run
    except (CrossinitError, KeyError, TypeError, ValueError):
        return path, None


def discard_folder(path: Path) -> None:
    """Delete an unfinished run's folder (and the folder of runs with its last run); a link, the link only."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def unfinished(home: Path) -> list[Run]:
    """Every unfinished run, by name (unreadable ones are skipped: `remove` clears them by name)."""
    runs = []
    folder = root(home)
    if not folder.is_dir():
        return []
    for path in sorted(folder.iterdir()):
        try:
            runs.append(Run(path, _read_settings(path)))
        except (OSError, ValueError):
            continue
    return runs


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))
