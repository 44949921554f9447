"""What the reliability tests share: running the installed `crossinit` as a real process, fault injection,
and looking at a library from the outside (snapshots of what readers see, leftovers of writers)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossinit_cli.store import Damaged, Library

HOOKS = Path(__file__).parent / "hooks"
DATA = Path(__file__).parent.parent / "data"
REPO = Path(__file__).parent.parent.parent
_SCRIPT = Path(sys.executable).with_name("crossinit")
CROSSINIT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "crossinit_cli"]


def cli_env(home: Path, config: Path, **extra: str) -> dict[str, str]:
    """The environment of a `crossinit` process working on `home` only, offline, without colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSINIT_", "PYTEST_"))}
    env.update(
        CROSSINIT_HOME=str(home),
        CROSSINIT_CONFIG=str(config),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        NO_COLOR="1",
        COLUMNS="200",
    )
    env.pop("EDITOR", None)
    env.pop("VISUAL", None)
    env.update(extra)
    return env


def fault_env(env: dict[str, str], spec: str, root: Path, ops: str = "") -> dict[str, str]:
    """`env` plus the hooks/sitecustomize.py fault `spec` on calls under `root` (see that file)."""
    path = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH", "")) if p)
    return {
        **env,
        "PYTHONPATH": path,
        "CROSSINIT_FAULT": spec,
        "CROSSINIT_FAULT_ROOT": str(root),
        "CROSSINIT_FAULT_OPS": ops,
    }


def crossinit(*args: object, env: dict[str, str], timeout: float = 300, input: str | None = None):
    """Run `crossinit ARGS...` to the end; returns the CompletedProcess (text)."""
    return subprocess.run(
        [*CROSSINIT, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def start(*args: object, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*CROSSINIT, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def kill_after(proc: subprocess.Popen, delay: float) -> tuple[int, str]:
    """SIGKILL `proc` after `delay` s unless it ended first; returns (returncode, stderr)."""
    try:
        _, err = proc.communicate(timeout=delay)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return proc.returncode, err


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1, exactly one line on stderr starting with 'error:', no traceback, nothing on stdout."""
    where = f"rc={done.returncode} stderr={done.stderr[-1500:]!r}"
    assert done.returncode == 1, where
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, where
    # warnings may precede the error (several faces ...), never follow it
    assert lines[-1] == errors[0], where
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]!r}"
    assert done.stdout == "", done.stdout


def assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (0, 1), f"rc={done.returncode}: {done.stderr[-1500:]}"
    if done.returncode == 1:
        assert_one_line_error(done)


# ---- looking at a library ---------------------------------------------------------------------------


def _digest(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:16]


def _pixels(path: Path) -> str:
    """A crop's pixels (not its bytes: its sRGB ICC profile carries the time it was made)."""
    from PIL import Image

    with Image.open(path) as image:
        return hashlib.sha256(image.tobytes()).hexdigest()[:16] + f"-{image.size[0]}x{image.size[1]}"


def snapshot(home: Path, *, times: bool = False) -> dict[str, Any]:
    """What a reader sees: per entry key, its metadata, tensor digests and crop pixel digests.

    Timestamps and timings are left out unless `times`: two runs of the same command differ there only.
    A damaged entry shows as {"damaged": reason}."""
    library = Library(home)
    seen: dict[str, Any] = {}
    for entry in library.list():
        if isinstance(entry, Damaged):
            seen[entry.path.name] = {"damaged": entry.reason}
            continue
        record = entry.to_dict()
        if not times:
            record.pop("created")
            record.pop("modified")
            # the machine's, not the run's: the seconds, and the free memory the micro-batch and checkpointing
            # were chosen by
            for key in ("per_step_s", "total_s", "micro_batch_reason", "checkpointing_reason"):
                record["training"].pop(key, None)
        vectors = library.vectors(entry.name)
        record["learned"] = _digest(vectors.learned)
        record["init"] = _digest(vectors.init)
        record["crops"] = [_pixels(p) for p in library.crops(entry.name)]
        seen[library.path_of(entry.name).name] = record
    return seen


def assert_catalog_matches(home: Path, label: str = "") -> None:
    """`list` (answered by the catalog) says exactly what the folders hold, and leaves the catalog fresh."""

    def plain(entries: list) -> list:
        return [("damaged", e.name, e.reason) if isinstance(e, Damaged) else e.to_dict() for e in entries]

    library = Library(home)
    listed, truth = plain(library.list()), plain(library.scan())
    assert listed == truth, f"{label}: list != folders\nlist={listed}\nfolders={truth}"
    state = library.catalog_state()
    assert state["state"] == "fresh", f"{label}: catalog {state}"


def leftovers(home: Path) -> list[str]:
    """Anything a writer leaves only while it runs: temp files, staging and trash entries, pending metadata."""
    found = []
    for path in home.rglob("*"):
        rel = path.relative_to(home)
        temporary = path.name.startswith((".crossinit-tmp-", ".removed~")) or path.name.endswith(".pending")
        if temporary or (rel.parts[0] in (".staging", ".trash") and len(rel.parts) > 1):
            found.append(str(rel))
    return sorted(found)


def tree(home: Path) -> dict[str, str]:
    """Every file under `home` (but the lock files: the library's, and `.running/`'s one per name learned)
    and a digest of its bytes: 'byte-identical' means equal."""
    if not home.exists():
        return {}
    return {
        str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "dir"
        for p in sorted(home.rglob("*"))
        if p.name != ".lock" and p.relative_to(home).parts[0] != ".running"
    }


def copy_library(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def write_embedding(path: Path, seed: int, *, width: int = 32, tokens: int = 2) -> np.ndarray:
    """An A1111-layout safetensors file of seeded vectors; returns them."""
    from safetensors.numpy import save_file

    vectors = np.random.default_rng(seed).standard_normal((tokens, width)).astype(np.float32)
    save_file({"emb_params": vectors}, str(path))
    return vectors


@dataclass
class Timer:
    started: float = 0.0

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.started
