"""How the library scales, what durable writes cost, and what a generate manifest saves.

    python benchmarks/bench_library.py                       # list at 10 / 1,000 / 10,000, completion, durability
    python benchmarks/bench_library.py --sizes 10 1000       # fewer sizes
    python benchmarks/bench_library.py --manifest            # also: a 20-line manifest vs 20 `generate` calls

Everything is timed as a user runs it: a fresh `crossinit` process each time (median of --repeat runs), in one
run of this script so that the ratios compare like with like on a machine shared with other work. Libraries
are written straight to disk in the store's own layout (learning 10,000 identities would take hours), then a
first `crossinit list` builds the catalog from the folders: its time is the one-off rebuild cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CROSSINIT = [sys.executable, "-m", "crossinit_cli"]


def build_library(home: Path, count: int) -> None:
    """`count` identities of a `learn --batch` research set, in the store's layout (no catalog yet)."""
    import numpy as np
    from safetensors.numpy import save

    from crossinit_cli.entries import VECTORS
    from crossinit_cli.store import Identity, name_key

    rng = np.random.default_rng(0)
    entries = home / "identities"
    entries.mkdir(parents=True)
    for i in range(count):
        vectors = rng.standard_normal((2, 1024)).astype(np.float32)
        ident = Identity(
            name=f"subject-{i:05d}",
            tokens=2,
            width=1024,
            family="sd2",
            base_model="stabilityai/stable-diffusion-2-1-base",
            notes=f"research set, subject {i}",
            tags=["research", f"batch-{i % 20}"],
            training={"mode": "fast", "steps": 25, "lr": 0.005, "final_loss": 0.1, "device": "cuda"},
        )
        folder = entries / name_key(ident.name)
        folder.mkdir()
        (folder / VECTORS).write_bytes(save({"learned": vectors, "init": vectors}))
        (folder / "meta.toml").write_bytes(ident.to_toml())


def run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([*CROSSINIT, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"crossinit {' '.join(args)} failed: {done.stderr[-2000:]}")
    return elapsed


def complete(words: str, env: dict[str, str]) -> float:
    """One bash completion of the last word of `words`, as the shell asks for it."""
    code = "import sys; sys.argv[0] = 'crossinit'; from crossinit_cli.cli import main; main()"
    env = {
        **env,
        "_CROSSINIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if not done.stdout.strip():
        raise SystemExit(f"completion of {words!r} offered nothing: {done.stderr[-2000:]}")
    return elapsed


def bench_list(sizes: list[int], repeat: int, work: Path) -> None:
    """Every command at every size, the sizes taken in turn within each round, so that load from elsewhere
    on the machine falls on all sizes alike; medians of the rounds."""
    print(f"list (median of {repeat} rounds of fresh processes; the first list builds the catalog from the folders)")
    head = ("identities", "build catalog", "list", "list --json", "list --tag", "complete name", "complete tag")
    print("  ".join(f"{h:>13}" for h in head))
    envs, rebuild = {}, {}
    for size in sizes:
        home = work / f"lib-{size}"
        build_library(home, size)
        envs[size] = {**os.environ, "CROSSINIT_HOME": str(home), "NO_COLOR": "1"}
        rebuild[size] = run(["list", "--json"], envs[size])
    commands: dict[str, Callable[[dict[str, str]], float]] = {
        "list": lambda env: run(["list"], env),
        "list --json": lambda env: run(["list", "--json"], env),
        "list --tag": lambda env: run(["list", "--tag", "batch-3", "--json"], env),
        "complete name": lambda env: complete("crossinit show subject-0000", env),
        "complete tag": lambda env: complete("crossinit list --tag batch-1", env),
    }
    samples: dict[tuple[int, str], list[float]] = {(size, label): [] for size in sizes for label in commands}
    for _ in range(repeat):
        for size in sizes:
            for label, measure in commands.items():
                samples[size, label].append(measure(envs[size]))
    times = {key: statistics.median(values) for key, values in samples.items()}
    for size in sizes:
        cells = [f"{times[size, label]:>12.2f}s" for label in commands]
        print("  ".join([f"{size:>13}", f"{rebuild[size]:>12.2f}s", *cells]))
    first, last = sizes[0], sizes[-1]
    ratios = ", ".join(f"{label} x{times[last, label] / times[first, label]:.2f}" for label in commands)
    print(f"ratios {last} / {first}: {ratios}")


def bench_durability(samples: int, work: Path) -> None:
    """import (Library.add) and edit (Library.modify) with and without the folder/file fsyncs."""
    import numpy as np

    from crossinit_cli import atomic
    from crossinit_cli.store import Identity, Library

    library = Library(work / "durable")
    vectors = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    real = (atomic.fsync_file, atomic.fsync_dir)

    def timed(durable: bool, op: str, i: int) -> float:
        atomic.fsync_file, atomic.fsync_dir = real if durable else (lambda *a, **k: None, lambda *a, **k: None)
        started = time.perf_counter()
        if op == "import":
            library.add(Identity(name=f"d{i}", tokens=2, width=1024), vectors, force=True)
        else:
            library.modify("d0", lambda ident: setattr(ident, "notes", f"note {i}"))
        return time.perf_counter() - started

    library.add(Identity(name="d0", tokens=2, width=1024), vectors)
    print(f"durable writes on {work} (median of {samples}, in-process; ms)")
    for op in ("import", "edit"):
        with_sync, without = [], []
        for i in range(samples):  # alternate, so that other load on the machine hits both alike
            with_sync.append(timed(True, op, i))
            without.append(timed(False, op, i))
        a, b = statistics.median(with_sync) * 1e3, statistics.median(without) * 1e3
        print(f"  {op:<7} with fsyncs {a:7.1f}   without {b:7.1f}   cost {a - b:+6.1f} ms (x{a / b:.2f})")
    atomic.fsync_file, atomic.fsync_dir = real


def bench_manifest(work: Path, lines: int = 20, steps: int = 10) -> None:
    """Images per minute: one `generate --manifest` of `lines` lines against `lines` separate `generate` calls."""
    import json

    import numpy as np

    from crossinit_cli.store import Identity, Library
    from crossinit_cli.synthetic import build_tiny_sd

    model = build_tiny_sd(work / "tiny-sd")
    home = work / "lib-manifest"
    vectors = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    Library(home).add(Identity(name="alice", tokens=2, width=32, base_model=str(model)), vectors)
    env = {**os.environ, "CROSSINIT_HOME": str(home), "CROSSINIT_CONFIG": str(work / "config.toml"), "NO_COLOR": "1"}
    env["OMP_NUM_THREADS"] = "1"  # as the tests run: a tiny model gains nothing from threads on a shared machine
    jobs = [{"prompt": f"<alice> portrait number {i}", "seed": i, "steps": steps} for i in range(lines)]
    manifest = work / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    common = ["--model", str(model), "--device", "cpu", "-q"]
    one = run(["generate", "--manifest", str(manifest), "--out", str(work / "m"), *common], env)
    separate = 0.0
    for job in jobs:
        args = [job["prompt"], "--seed", str(job["seed"]), "--steps", str(steps), "--out", str(work / "s")]
        separate += run(["generate", *args, *common], env)
    print(f"generate on the tiny model, {lines} images of {steps} steps (CPU)")
    print(f"  one --manifest of {lines} lines: {one:6.1f} s  {lines / one * 60:7.1f} images/min")
    print(f"  {lines} separate generate calls: {separate:6.1f} s  {lines / separate * 60:7.1f} images/min")
    print(f"  manifest speed-up: x{separate / one:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=40, help="Writes timed each way for the fsync cost.")
    parser.add_argument("--dir", type=Path, default=None, help="Where to build the libraries (a real disk).")
    parser.add_argument("--manifest", action="store_true", help="Also time a 20-line generate manifest.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-library-", dir=args.dir) as tmp:
        work = Path(tmp)
        bench_list(args.sizes, args.repeat, work)
        bench_durability(args.samples, work)
        if args.manifest:
            bench_manifest(work)


if __name__ == "__main__":
    main()
