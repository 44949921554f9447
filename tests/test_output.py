"""Global output conventions: --verbose timings, --version, clean text when piped or with NO_COLOR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from crossinit_cli import __version__

PHOTO = Path(__file__).parent / "data" / "astronaut.png"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crossinit_cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_verbose_reports_each_phase_and_quiet_default_does_not(tiny_model: Path, home: Path) -> None:
    base = ["learn", str(PHOTO), "--steps", "1", "--batch-size", "1", "--model", str(tiny_model), "-q"]
    verbose = _run("--verbose", *base, "--name", "v1")
    assert verbose.returncode == 0, verbose.stderr
    phases = (
        "face detection and alignment",
        "imports",
        "model load",
        "cross initialization",
        "training",
        "VAE encode",
        "training steps (1)",
        "library write",
        "total",
        "fixed cost (all but the 1 training steps)",
        "fixed cost in CPU time",
    )
    times = {}
    for line in verbose.stderr.splitlines():
        if line.startswith("time ") and line.endswith(" s"):
            phase, _, seconds = line[len("time ") :].rpartition(": ")
            times[phase] = float(seconds[:-2])
    assert set(phases) <= set(times), verbose.stderr
    # The fixed cost is everything but the steps: the whole command's time less theirs.
    assert abs(times["total"] - times["training steps (1)"] - times["fixed cost (all but the 1 training steps)"]) < 0.02
    assert times["total"] >= times["model load"] + times["training"] + times["imports"]
    assert times["fixed cost in CPU time"] > 0
    plain = _run(*base, "--name", "v2")
    assert plain.returncode == 0 and "time " not in plain.stderr


def test_piped_output_has_no_escape_codes(tiny_model: Path, home: Path) -> None:
    learned = _run("-v", "learn", str(PHOTO), "--steps", "2", "--batch-size", "1", "--model", str(tiny_model))
    assert learned.returncode == 0, learned.stderr
    assert "\x1b[" not in learned.stderr + learned.stdout
    assert "learned astronaut" in learned.stderr and "next: crossinit generate" in learned.stderr
    listed = _run("list", env={"NO_COLOR": "1"})
    assert "astronaut" in listed.stdout and "\x1b[" not in listed.stdout
    # NO_COLOR on a forced terminal: styles like bold may stay, colours go (rich follows no-color.org).
    forced = _run("show", "nobody", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "error:" in forced.stderr and "\x1b[31" not in forced.stderr and "\x1b[1;31" not in forced.stderr


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"crossinit {__version__}"
