"""How long `crossinit --help` and `crossinit list` (50 identities) take as whole processes: what a user waits for.

    python benchmarks/bench_startup.py              # 20 runs of each, after one warm-up run
    python benchmarks/bench_startup.py --runs 50
    python benchmarks/bench_startup.py --vs /tmp/old-checkout     # also another checkout, interleaved: before/after

Each run is a fresh `python -m crossinit_cli` process, timed from its start to its exit (interpreter start-up,
imports, the command itself); `python -c pass` is timed the same way as the floor. Runs alternate between the
commands so that a machine whose load drifts slows all of them alike. Quote the median; a wide min-max says the
machine was busy, and then the CPU seconds (user + system) are the steadier figure. The library is written
straight to disk in the store's layout (bench_library.build_library).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_library import ROOT, build_library  # noqa: E402

FLOOR = [sys.executable, "-c", "pass"]
COMMANDS = {
    "crossinit --help": [sys.executable, "-m", "crossinit_cli", "--help"],
    "crossinit list (50 identities)": [sys.executable, "-m", "crossinit_cli", "list"],
}


def cpu_model() -> str:
    """The `lscpu` model line, or the platform's processor name where there is no lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def time_once(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the operating system's count for the finished child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command (default 20)")
    parser.add_argument("--vs", type=Path, help="another checkout of crossinit to time the same way (before/after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        build_library(home, 50)
        env = {
            **os.environ,
            "CROSSINIT_HOME": str(home),
            "CROSSINIT_CONFIG": str(Path(tmp) / "config.toml"),
            "HF_HUB_OFFLINE": "1",
            "COLUMNS": "120",
        }
        roots = {"": ROOT, **({f"{args.vs.name}: ": args.vs} if args.vs else {})}
        runs = {"python -c pass (floor)": (FLOOR, env, ROOT)}
        for label, root in roots.items():  # run from the checkout: `python -m` puts the current folder first
            for name, command in COMMANDS.items():
                runs[label + name] = (command, {**env, "PYTHONPATH": str(root)}, root)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for run in runs.values():  # warm-up: the catalog is built, the .pyc files written
            time_once(*run)
        for _ in range(args.runs):
            for name, run in runs.items():
                times[name].append(time_once(*run))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cpu_model()}; {os.cpu_count()} CPUs; load average {load:.2f}; Python {platform.python_version()}")
    print(f"{'whole process, seconds':48} {'min':>7} {'median':>7} {'max':>7} {'cpu median':>11}   ({args.runs} runs)")
    for name, pairs in times.items():
        wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
        spread = f"{min(wall):7.3f} {statistics.median(wall):7.3f} {max(wall):7.3f}"
        print(f"{name:48} {spread} {statistics.median(cpu):11.3f}")


if __name__ == "__main__":
    main()
