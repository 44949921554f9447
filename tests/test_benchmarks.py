"""What the benchmarks claim, checked on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_crossinit_step_is_the_example_loop_step_less_its_vae_encode(tiny_model: Path) -> None:
    """count_flops.py: the loop encodes its image through the VAE every step; crossinit encodes the crop and
    its mirror image once a run and otherwise does the same arithmetic (text encoder, UNet, backward)."""
    command = [sys.executable, "benchmarks/count_flops.py", "--model", str(tiny_model), "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    ours, loop = figures["crossinit"], figures["loop"]
    assert ours["step_gflop"] > 0 and ours["encode_gflop"] > 0
    assert loop["step_gflop"] - ours["step_gflop"] == pytest.approx(ours["encode_gflop"] / 2, rel=1e-6)
