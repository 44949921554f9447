"""How long `crossinit --help` and `crossinit list` (50 identities) take as whole processes: what a user waits for.

    python benchmarks/bench_startup.py              # 20 runs of each, after one warm-up run
    python benchmarks/bench_startup.py --runs 50
    python benchmarks/bench_startup.py --root /tmp/old-checkout   # another checkout of crossinit, for a before/after

Each run is a fresh `python -m crossinit_cli` process, timed from its start to its exit (interpreter start-up,
imports, the command itself); `python -c pass` is timed the same way as the floor. Runs alternate between the
commands so that a machine whose load drifts slows all of them alike. Quote the median; a wide min-max says the
machine was busy. The library is written straight to disk in the store's layout (bench_library.build_library).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_library import ROOT, build_library  # noqa: E402

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
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


def time_once(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command (default 20)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to time (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        build_library(home, 50)
        env = {
            **os.environ,
            "CROSSINIT_HOME": str(home),
            "CROSSINIT_CONFIG": str(Path(tmp) / "config.toml"),
            "PYTHONPATH": str(args.root),
            "HF_HUB_OFFLINE": "1",
            "COLUMNS": "120",
        }
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for command in COMMANDS.values():  # warm-up: the catalog is built, the .pyc files written
            time_once(command, env)
        for _ in range(args.runs):
            for name, command in COMMANDS.items():
                times[name].append(time_once(command, env))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cpu_model()}; {os.cpu_count()} CPUs; load average {load:.2f}; Python {platform.python_version()}")
    print(f"{'whole process, seconds':34} {'min':>7} {'median':>7} {'max':>7}   ({args.runs} runs each)")
    for name, values in times.items():
        print(f"{name:34} {min(values):7.3f} {statistics.median(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
