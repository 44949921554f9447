"""Sixteen `crossinit` processes at once on one library, mixing learn, generate, edit, import, export, list,
show and remove for a bounded time: afterwards every entry loads, every command that succeeded has its
effect, readers never saw a damaged or torn entry, and no temporary file is left.

Each worker owns its own names (so the end state of its entries follows from its own log) and shares two
entries with everyone: `shared` (everybody adds tags) and `contested` (replaced with --force by imports and
by a learn while others generate with it and show it)."""

from __future__ import annotations

import json
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from crossinit_cli.store import Damaged, Identity, Library
from tests.reliability.harness import DATA, assert_catalog_matches, crossinit, leftovers, write_embedding

pytestmark = pytest.mark.reliability

WORKERS = 16
DEADLINE_S = 45.0
"""No worker starts a command after this; the heavy ones started at the beginning finish after it."""


@dataclass
class Worker:
    index: int
    folder: Path
    env: dict[str, str]
    log: list[tuple[list[str], int, str, float]] = field(default_factory=list)
    own: dict[str, dict] = field(default_factory=dict)  # name -> {"seed": s, "notes": str}
    gone: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)
    exports: dict[Path, int] = field(default_factory=dict)  # file -> seed of the vectors it must hold
    shown: list[dict] = field(default_factory=list)  # `show contested --json` records
    listed: list[list] = field(default_factory=list)  # `list --json` documents
    generated: list[dict] = field(default_factory=list)

    def run(self, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
        started = time.perf_counter()
        done = crossinit(*args, env=self.env, timeout=timeout)
        self.log.append(([str(a) for a in args], done.returncode, done.stderr[-800:], time.perf_counter() - started))
        return done


def _vectors(seed: int) -> np.ndarray:
    """What write_embedding(path, seed) writes."""
    return np.random.default_rng(seed).standard_normal((2, 32)).astype(np.float32)


def _light_step(worker: Worker, rng: random.Random, step: int, files: Path) -> None:
    """One command chosen at random among those that make sense for this worker's state."""
    i = worker.index
    mine = sorted(worker.own)
    choices = ["import", "import", "tag", "contest", "list", "show"]
    if mine:
        choices += ["note", "export", "export", "rename", "remove"]
    op = rng.choice(choices)
    if op == "import":
        name, seed = f"w{i}-{step}", i * 1000 + step
        write_embedding(files / f"{seed}.safetensors", seed)
        if worker.run("import", files / f"{seed}.safetensors", "--name", name).returncode == 0:
            worker.own[name] = {"seed": seed, "notes": ""}
    elif op == "tag":
        if worker.run("edit", "shared", "--tag", f"t{i}-{step}").returncode == 0:
            worker.tags.add(f"t{i}-{step}")
    elif op == "contest":
        worker.run("import", files / f"contested-{i}.safetensors", "--name", "contested", "--force")
    elif op == "list":
        done = worker.run("list", "--json")
        if done.returncode == 0:
            worker.listed.append(json.loads(done.stdout))
    elif op == "show":
        done = worker.run("show", "contested", "--json")
        if done.returncode == 0:
            worker.shown.append(json.loads(done.stdout))
    elif op == "note":
        name = rng.choice(mine)
        if worker.run("edit", name, "--note", f"note {step}").returncode == 0:
            worker.own[name]["notes"] = f"note {step}"
    elif op == "export":
        name = rng.choice(mine)
        out = worker.folder / "exports"
        if worker.run("export", name, "-o", f"{out}/", "--force").returncode == 0:
            worker.exports[out / f"{name}.safetensors"] = worker.own[name]["seed"]
    elif op == "rename":
        name, new = rng.choice(mine), f"r{i}-{step}"
        if worker.run("edit", name, "--rename", new, "--note", f"renamed {step}").returncode == 0:
            worker.own[new] = {**worker.own.pop(name), "notes": f"renamed {step}"}
            worker.gone.add(name)
    elif op == "remove":
        name = rng.choice(mine)
        if worker.run("remove", name, "--yes").returncode == 0:
            worker.own.pop(name)
            worker.gone.add(name)


def _work(worker: Worker, started: float, files: Path, tiny_model: Path) -> Worker:
    i = worker.index
    # The heavy commands first, so that they run while the light ones hammer the library.
    if i == 0:
        worker.run(
            "learn", DATA / "astronaut.png", "--name", "learned0", "--fast", "--steps", "2",
            "--model", tiny_model, "--seed", "0", "--quiet",
        )  # fmt: skip
    elif i == 1:
        worker.run(
            "learn", DATA / "grace_hopper.jpg", "--name", "contested", "--force", "--fast", "--steps", "2",
            "--model", tiny_model, "--seed", "1", "--quiet",
        )  # fmt: skip
    elif i in (2, 3):
        done = worker.run(
            "generate", "a photo of <contested>, and <shared>", "--steps", "2", "--seed", str(i),
            "--model", tiny_model, "--out", worker.folder / "images", "--json", "--quiet",
        )  # fmt: skip
        if done.returncode == 0:
            worker.generated = json.loads(done.stdout)
    rng = random.Random(i)
    step = 0
    while time.monotonic() - started < DEADLINE_S:
        _light_step(worker, rng, step, files)
        step += 1
    return worker


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_sixteen_processes_on_one_library(tmp_path: Path, env: dict[str, str], rhome: Path, tiny_model: Path) -> None:
    library = Library(rhome)
    library.add(Identity(name="shared", tokens=2, width=32), _vectors(5), _vectors(7))
    library.add(Identity(name="contested", tokens=2, width=32), _vectors(99))
    files = tmp_path / "files"
    files.mkdir()
    for i in range(WORKERS):
        write_embedding(files / f"contested-{i}.safetensors", 10_000 + i)
    workers = [Worker(i, tmp_path / f"worker-{i}", env) for i in range(WORKERS)]
    for worker in workers:
        worker.folder.mkdir()

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        workers = list(pool.map(lambda w: _work(w, started, files, tiny_model), workers))
    elapsed = time.monotonic() - started

    # Every command succeeded: none of them may fail because of another.
    log = [entry for w in workers for entry in w.log]
    failures = [(args, code, err) for args, code, err, _ in log if code != 0]
    assert failures == [], failures[:5]

    # Every entry loads.
    entries = library.list()
    assert not [e for e in entries if isinstance(e, Damaged)]
    for entry in entries:
        assert np.isfinite(library.vectors(entry.name).learned).all()
    names = {e.name for e in entries}

    # Every effect is there.
    for worker in workers:
        for name, expect in worker.own.items():
            assert name in names, f"{name} lost"
            np.testing.assert_array_equal(library.vectors(name).learned, _vectors(expect["seed"]))
            assert library.get(name).notes == expect["notes"], name
        assert not (worker.gone & names), worker.gone & names
        for path, seed in worker.exports.items():
            np.testing.assert_array_equal(load_file(str(path))["emb_params"], _vectors(seed))
        for image in worker.generated:
            assert Path(image["path"]).is_file()
    assert set().union(*(w.tags for w in workers)) <= set(library.get("shared").tags)
    learned0 = library.get("learned0")
    assert learned0.training["steps"] == 2 and learned0.has_init and len(library.crops("learned0")) == 1

    # `contested` is exactly one of the writes that replaced it, its metadata and vectors from the same one.
    candidates = {f"import:a1111:{files / f'contested-{i}.safetensors'}": _vectors(10_000 + i) for i in range(WORKERS)}
    contested = library.get("contested")
    if contested.source == "learn":
        assert contested.has_init and len(library.crops("contested")) == 1
    else:
        np.testing.assert_array_equal(library.vectors("contested").learned, candidates[contested.source])

    # Readers never saw a damaged entry, nor the metadata of one write with the vectors of another.
    for document in (d for w in workers for d in w.listed):
        assert not [r for r in document if r["damaged"]]
    for record in (r for w in workers for r in w.shown):
        if record["source"] in candidates:
            norms = np.linalg.norm(candidates[record["source"]], axis=1)
            np.testing.assert_allclose(record["vector_norms"], np.round(norms, 4), atol=1e-4)
    assert leftovers(rhome) == []
    # The catalog, written by every one of those commands, says what the folders hold.
    assert_catalog_matches(rhome, "after the load test")

    counts: dict[str, int] = {}
    for args, *_ in log:
        counts[args[0]] = counts.get(args[0], 0) + 1
    print(f"{len(log)} commands by {WORKERS} processes in {elapsed:.0f} s: {counts}")


@pytest.mark.parametrize("cleanup", ["old files deleted", "old files still there"])
def test_a_replace_between_a_readers_two_reads_does_not_tear_it(
    cleanup: str, rhome: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load test once caught `show` printing one write's metadata with another's vectors. Here the
    replace lands deterministically between the reader's metadata read and its vectors read."""
    import shutil

    from crossinit_cli import store

    reader, writer = Library(rhome), Library(rhome)
    reader.add(Identity(name="x", tokens=2, width=32, source="first", strength=0.5), _vectors(1), _vectors(2))
    real_read_vectors = Library._read_vectors
    replaced = []

    def read_vectors_after_a_replace(self, name, folder, *rest):
        if not replaced:
            replaced.append(True)
            with monkeypatch.context() as patch:
                if cleanup == "old files still there":  # as if the writer were killed before its cleanup
                    patch.setattr(shutil, "rmtree", lambda *a, **k: None)
                writer.add(Identity(name="x", tokens=2, width=32, source="second"), _vectors(3), force=True)
        return real_read_vectors(self, name, folder, *rest)

    monkeypatch.setattr(store.Library, "_read_vectors", read_vectors_after_a_replace)
    ident, vectors = reader.read("x")
    # With its old files still there the reader finishes on the old entry; without, it reads again.
    assert ident.source == ("first" if cleanup == "old files still there" else "second")
    expected = {"first": (_vectors(1), 0.5), "second": (_vectors(3), 1.0)}[ident.source]
    np.testing.assert_array_equal(vectors.learned, expected[0])
    assert ident.strength == expected[1]
