"""Many identities from one manifest, spread over the processes of an `accelerate launch` run (`learn --batch`).

A manifest is a CSV file (one identity a row) or a folder of folders (one identity a subfolder, named
for it, holding its photos). accelerate's process state hands each process its share of the rows
(`split_between_processes`); each process loads the model once and learns its identities one at a
time, writing each into the shared library as it finishes (the library's lock makes that safe). The
processes may be on several machines (`--num_machines`, one library folder they all see; docs/batch.md).
Without `accelerate launch` there is one process, which learns them all.

CSV columns: `name` and `photos` (required; photos separated by `;`, each a file or a folder, relative
to the CSV's folder), and optionally `mode` (fast/full), `steps`, `lr`, `batch_size`, `reg_weight`,
`seed`, `align` (true/false), `clip_skip`, `micro_batch` overriding the command line's values for that row.

Silent, as learning.py: `learn_batch` tells a caller through `BatchHooks` and returns every outcome.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.config import DEFAULT_MODEL
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.learning import (
    ALIGN_SIZE,
    SILENT,
    SNAPSHOT_EVERY,
    LearnHooks,
    LearnJob,
    Settings,
    check_peeked_clip_skip,
    check_photos,
    check_training_values,
    load_trainer,
    train_and_store,
)
from crossinit_cli.store import Library, name_key, validate_name

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

COLUMNS = (
    "name",
    "photos",
    "mode",
    "steps",
    "lr",
    "batch_size",
    "reg_weight",
    "seed",
    "align",
    "clip_skip",
    "micro_batch",
)
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off", ""}
# How long a process that has finished its share waits for the others at the batch's end (where the
# summary is gathered). torch's default, 30 minutes, ended every process of a batch whose shares differ by
# more than that (one identity in full mode left on a slower machine): the finished ones crashed waiting.
WAIT_FOR_OTHERS = timedelta(days=7)


@dataclass(frozen=True)
class BatchEntry(Settings):
    """One identity to learn (a manifest's row), with its settings; as the defaults, the command line's."""

    name: str = "-"
    photos: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class BatchRequest:
    """What `learn --batch MANIFEST` asks for: the manifest, its rows' defaults (the command line's), and what
    holds for every row."""

    manifest: Path
    defaults: BatchEntry = BatchEntry()
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False  # learn (and replace) identities already in the library
    strict: bool = False  # an identity whose photos look like different people fails, instead of a warning


@dataclass
class Outcome:
    name: str
    status: str  # learned, skipped, failed
    detail: str = ""
    seconds: float = 0.0
    final_loss: float | None = None
    process: int = 0


@dataclass(frozen=True)
class Plan:
    """What this process is about to do, once every process agrees on the list."""

    todo: int  # identities to learn, over all processes
    skipped: int  # already in the library
    processes: int
    process: int  # this process's index
    main: bool  # the process that reports


@dataclass(frozen=True)
class BatchResult:
    """Every process's outcomes as dicts (Outcome's fields), skipped ones first, then in manifest order."""

    results: list[dict[str, Any]]
    main: bool

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.results)


@dataclass(frozen=True)
class BatchHooks:
    """What a caller hears of a batch; every hook optional."""

    learning: Callable[[Plan], AbstractContextManager[Any]] | None = None  # wraps this process's share
    on_begin: Callable[[str], None] | None = None  # this process starts learning an identity
    on_outcome: Callable[[Outcome, int], None] | None = None  # ... and is done: how, and how many the batch has done
    on_results: Callable[[BatchResult], None] | None = None  # the main process, before the processes part
    identity: LearnHooks = SILENT  # each identity's session (its warnings, its phases)


def read_manifest(path: Path, defaults: BatchEntry) -> list[BatchEntry]:
    """The jobs of a CSV manifest or a folder of folders; every row checked before anything runs."""
    path = Path(path)
    if path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise CrossinitError(f"{path} has no subfolders; a batch folder holds one folder of photos per identity")
        jobs = [_job(defaults, name=f.name, photos=[f]) for f in folders]
    elif path.is_file():
        jobs = _read_csv(path, defaults)
    else:
        raise CrossinitError(f"{path}: no such manifest file or folder")
    seen: dict[str, str] = {}
    for job in jobs:
        key = name_key(job.name)
        if key in seen:
            raise CrossinitError(f"{path}: identity {job.name!r} appears twice (also as {seen[key]!r})")
        seen[key] = job.name
    return jobs


def _read_csv(path: Path, defaults: BatchEntry) -> list[BatchEntry]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = set(reader.fieldnames or ()) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CrossinitError(f"cannot read manifest {path}: {library_text(exc)}") from None
    if not rows:
        raise CrossinitError(f"{path} has no rows; expected a header with name,photos and one row per identity")
    missing = {"name", "photos"} - fields
    unknown = fields - set(COLUMNS)
    if missing or unknown:
        raise CrossinitError(
            f"{path}: "
            + (f"missing column(s) {', '.join(sorted(missing))}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown column(s) {', '.join(sorted(unknown))}" if unknown else "")
            + f" (columns: {', '.join(COLUMNS)})"
        )
    jobs = []
    for number, row in enumerate(rows, start=2):
        where = f"{path}:{number}"
        try:
            if None in row:  # DictReader's key for the fields past the header's columns
                extra = len(row[None])  # type: ignore[index]
                raise ValueError(f"{extra} more field(s) than the header's {len(fields)} columns (a comma too many?)")
            photos = [path.parent / p.strip() for p in (row.get("photos") or "").split(";") if p.strip()]
            if not photos:
                raise ValueError("no photos")
            jobs.append(
                _job(
                    defaults,
                    name=(row.get("name") or "").strip(),
                    photos=photos,
                    mode=_text(row, "mode"),
                    steps=_number(row, "steps", int),
                    lr=_number(row, "lr", float),
                    batch_size=_number(row, "batch_size", int),
                    reg_weight=_number(row, "reg_weight", float),
                    seed=_number(row, "seed", int),
                    align=_flag(row, "align"),
                    clip_skip=_number(row, "clip_skip", int),
                    micro_batch=_number(row, "micro_batch", int),
                )
            )
        except (ValueError, CrossinitError) as exc:
            raise CrossinitError(f"{where}: {exc}") from None
    return jobs


def _text(row: dict[str, Any], key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def _number(row: dict[str, Any], key: str, kind: type) -> Any:
    value = _text(row, key)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, not {value!r}") from None


def _flag(row: dict[str, Any], key: str) -> bool | None:
    value = (row.get(key) or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return None if value == "" else False
    raise ValueError(f"{key} must be true or false, not {value!r}")


def _job(defaults: BatchEntry, **values: Any) -> BatchEntry:
    merged = {**asdict(defaults), **{k: v for k, v in values.items() if v is not None}}
    merged["name"] = validate_name(merged["name"])
    if merged["mode"] not in ("fast", "full"):
        raise CrossinitError(f"mode must be fast or full, not {merged['mode']!r}")
    if merged["clip_skip"] < 1:
        raise CrossinitError(f"clip_skip must be 1 (the last layer) or more, not {merged['clip_skip']}")
    if merged["micro_batch"] is not None and merged["micro_batch"] < 1:
        raise CrossinitError(f"micro_batch must be at least 1, not {merged['micro_batch']}")
    check_training_values(lr=merged["lr"], seed=merged["seed"])
    return BatchEntry(**merged)


def checked_manifest(manifest: Path, defaults: BatchEntry, model_id: str) -> list[BatchEntry]:
    """The manifest's jobs, each clip skip checked against the model's configs: SDXL with a clip skip is one
    line before any model load."""
    jobs = read_manifest(manifest, defaults)
    for clip_skip in sorted({job.clip_skip for job in jobs}):
        check_peeked_clip_skip(model_id, clip_skip)
    return jobs


def learn_batch(library: Library, request: BatchRequest, hooks: BatchHooks = BatchHooks()) -> BatchResult:
    """Every identity of the manifest not yet stored (all with `force`), spread over the processes of
    `accelerate launch`, one model load per process; a mistake in one identity is its outcome."""
    from crossinit_cli import devices

    jobs = checked_manifest(request.manifest, request.defaults, request.model)
    placement = devices.resolve(request.device, request.dtype, training=True)
    state = _process_state(cpu=placement.device == "cpu")
    todo, skipped = _to_learn(library, jobs, request.force)
    # Every process must agree on the list before any of them adds to the library.
    with _with_the_others(state):
        state.wait_for_everyone()
    plan = Plan(len(todo), len(skipped), state.num_processes, state.process_index, state.is_main_process)

    outcomes: list[Outcome] = []
    learner = _Learner(library, request, placement, hooks.identity)
    progress = _Overall(library, [name_key(j.name) for j in todo])
    share = hooks.learning(plan) if hooks.learning is not None else contextlib.nullcontext()
    with state.split_between_processes(todo) as mine, share:
        for job in mine:
            if hooks.on_begin is not None:
                hooks.on_begin(job.name)
            outcome = learner.learn(job)
            outcome.process = state.process_index
            outcomes.append(outcome)
            finished = progress.finished(failed=outcome.status == "failed")
            if hooks.on_outcome is not None:
                hooks.on_outcome(outcome, finished)

    with _with_the_others(state):
        result = BatchResult(_all_outcomes(state, jobs, skipped, outcomes), plan.main)
    if plan.main and hooks.on_results is not None:
        hooks.on_results(result)
    with _with_the_others(state):
        state.wait_for_everyone()
    return result


def _process_state(*, cpu: bool) -> Any:
    """accelerate's state of this process (its index, how many there are), in the process group that
    `accelerate launch` set up, if any: one machine's processes or several machines'."""
    from accelerate import PartialState

    # accelerate forms a CPU process group (gloo) only when told the processes run on the CPU. The
    # timeout is every collective's, the last one included: the wait of a process that finished early.
    state = PartialState(cpu=cpu, timeout=WAIT_FOR_OTHERS)
    if state.num_processes == 1 and _launched_for_several():
        raise CrossinitError(
            "accelerate launch --cpu started this process alone, in no process group with the others it was "
            "launched with (that takes mpirun), so each would learn the whole batch; launch with --multi_gpu "
            "instead (on a machine without GPUs its processes run on the CPU), or run crossinit without it"
        )
    if state.num_processes > 1:
        atexit.unregister(_leave_the_group)  # once, however many batches this process runs
        atexit.register(_leave_the_group)
    if state.num_processes > 1 and state.device.type == "cuda":
        import torch

        torch.cuda.set_device(state.device)  # one GPU per process, as accelerate assigned them
    return state


def _leave_the_group() -> None:
    """Destroy the process group before the process exits (registered at exit, so that a script may run
    several batches in one process): left to the interpreter's teardown, gloo's threads could still be
    running when their objects went, and the process ended on SIGABRT ("terminate called without an active
    exception") instead of with its exit status."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _launched_for_several() -> bool:
    """Whether `accelerate launch --cpu` meant this process as one of several: for more than one process or
    machine it sets the main process's address (MASTER_ADDR), but without mpirun no group forms (a launch
    through torchrun, --multi_gpu, sets WORLD_SIZE)."""
    env = os.environ
    return env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


@contextmanager
def _with_the_others(state: Any) -> Iterator[None]:
    """A step all the batch's processes take together. One of them gone (killed, its machine down) or
    hung past WAIT_FOR_OTHERS is a one-line error here, not torch's traceback."""
    try:
        yield
    except RuntimeError as exc:  # what gloo and NCCL raise (torch.distributed.DistError among them)
        if state.num_processes == 1:
            raise
        # gloo starts its messages with its source file ("[.../pair.cc:553] Connection closed by peer ...").
        said = re.sub(r"^\[[^\]]*\]\s*", "", library_text(exc, 400)).split(". ")[0]
        raise CrossinitError(
            f"another process of this batch stopped or stopped answering ({said}); every identity finished "
            "is in the library: run the same command again on every machine to learn the rest"
        ) from None


def _to_learn(library: Library, jobs: list[BatchEntry], force: bool) -> tuple[list[BatchEntry], list[Outcome]]:
    """The jobs to learn, and the outcomes of those skipped because their identity is already there."""
    skipped = [
        Outcome(j.name, "skipped", "already in the library") for j in jobs if not force and library.exists(j.name)
    ]
    todo = [j for j in jobs if force or not library.exists(j.name)]
    return todo, skipped


def _all_outcomes(
    state: Any, jobs: list[BatchEntry], skipped: list[Outcome], outcomes: list[Outcome]
) -> list[dict[str, Any]]:
    """Every process's outcomes (gathered when there are several), skipped ones first, then in manifest order."""
    from accelerate.utils import gather_object

    everything = (
        gather_object([asdict(o) for o in outcomes]) if state.num_processes > 1 else [asdict(o) for o in outcomes]
    )
    return [asdict(o) for o in skipped] + sorted(everything, key=lambda o: [j.name for j in jobs].index(o["name"]))


class _Learner:
    """Learns one job after another in this process, loading the model at the first one that needs it."""

    def __init__(self, library: Library, request: BatchRequest, placement: Any, hooks: LearnHooks) -> None:
        self.library, self.model, self.placement, self.force = library, request.model, placement, request.force
        self.strict = request.strict
        self.hooks = hooks
        self.trainer: Any = None

    def learn(self, job: BatchEntry) -> Outcome:
        """Learn and store `job`'s identity; a mistake in it is its outcome, not the batch's end."""
        from crossinit_cli import faces

        hooks = self.hooks
        started = time.perf_counter()
        try:
            train_config = job.train_config()
            gathered = faces.gather_photos(job.photos)  # a folder's unusable files are skipped, as in `learn`
            crops, gathered = faces.align_gathered(gathered, ALIGN_SIZE, align=job.align, warn=hooks.warn)
            paths = gathered.photos
            if gathered.skipped:
                hooks.warn(f"{job.name}: {faces.listed('skipped', *zip(*gathered.skipped))}")
            odd_faces = check_photos(crops, align=job.align, strict=self.strict, hooks=hooks)
            if odd_faces:
                hooks.warn(odd_faces)
            if self.trainer is None:
                self.trainer = load_trainer(self.library, self.model, self.placement, hooks=hooks)
            entry = LearnJob(job.name, paths, crops, train_config, job.mode, job.align, self.force)
            entry = replace(entry, snapshot_every=SNAPSHOT_EVERY[job.mode], micro_batch=job.micro_batch)
            entry = replace(entry, checkpointing=job.checkpointing)
            result = train_and_store(self.library, self.trainer, entry, hooks).result
            return Outcome(job.name, "learned", "", time.perf_counter() - started, result.final_loss)
        except CrossinitError as exc:
            return Outcome(job.name, "failed", str(exc), time.perf_counter() - started)


class _Overall:
    """How many of the batch's identities are finished, by every process: those learned are in the library
    with a folder written since the batch began (each process adds its own as it finishes them), plus the
    ones this process saw fail. Read by the main process after each of its own identities."""

    def __init__(self, library: Library, keys: list[str]) -> None:
        self.entries, self.keys = library.entries, keys
        self.since = time.time_ns() - 1_000_000_000  # file times can lag the clock by a tick
        self.failed = 0

    def finished(self, *, failed: bool) -> int:
        self.failed += failed
        learned = 0
        for key in self.keys:
            with suppress(OSError):  # not there (yet): not learned
                learned += os.stat(self.entries / key).st_mtime_ns >= self.since
        return min(learned + self.failed, len(self.keys))
