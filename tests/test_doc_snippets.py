"""Every Python snippet in README.md and docs/ runs as printed, on the tiny models.

A doc's ```python blocks run in order, in one fresh interpreter, sharing one namespace (as a reader pasting
them into one session would). The interpreter sees the world the prose describes: the user's library in
the platform's data dir (an empty HOME of its own), the hub ids the docs name in the Hugging Face cache
(holding the tiny random models instead of the real weights, offline), and a photo `alice.jpg` in the
working directory. A doc whose snippets need an identity that its prose says exists says which with a
comment the reader does not see, `<!-- snippets need: alice -->` (learned from alice.jpg on SD 2.1-base)
or `<!-- snippets need: alice-sdxl-export -->` (learned on SDXL base and exported as alice.safetensors).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
NEEDS = re.compile(r"<!-- snippets need: ([\w, -]+) -->")
HUB_IDS = {
    "stabilityai/stable-diffusion-2-1-base": "tiny_model",
    "stabilityai/stable-diffusion-xl-base-1.0": "tiny_sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny_sd1",
}


def _docs() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if BLOCK.search(p.read_text(encoding="utf-8"))]


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_docs_have_python_snippets_to_run() -> None:
    assert len(_docs()) >= 3, [_ids(p) for p in _docs()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, str]:
    """HOME, the hub cache and the environment a snippet runs in (built once for all docs)."""
    root = tmp_path_factory.mktemp("snippet-world")
    cache = root / "hub"
    for repo_id, fixture in HUB_IDS.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(request.getfixturevalue(fixture), repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSINIT_", "XDG_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), CROSSINIT_CPU_BF16="0")
    return env


def _run(code: str, cwd: Path, env: dict[str, str], what: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _crossinit(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"crossinit {' '.join(args)}:\n{done.stderr[-3000:]}"


def _prepare(needs: list[str], cwd: Path, env: dict[str, str]) -> None:
    """What the doc's prose says exists before its first snippet."""
    cheap = ["--steps", "2", "--batch-size", "1", "--quiet"]
    for need in needs:
        if need == "alice":
            _crossinit(["learn", "alice.jpg", "--name", "alice", *cheap], cwd, env)
        elif need == "alice-sdxl-export":
            model = "stabilityai/stable-diffusion-xl-base-1.0"
            _crossinit(["learn", "alice.jpg", "--name", "alice", "--model", model, *cheap], cwd, env)
            _crossinit(["export", "alice", "-o", "alice.safetensors"], cwd, env)
        else:
            raise AssertionError(f"unknown snippet need {need!r}")


@pytest.mark.slow
@pytest.mark.parametrize("doc", _docs(), ids=_ids)
def test_every_python_snippet_of_the_doc_runs_as_printed(doc: Path, world: dict[str, str], tmp_path: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    home = tmp_path / "home"
    cwd = tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    shutil.copy(DATA / "grace_hopper.jpg", cwd / "alice.jpg")
    env = {**world, "HOME": str(home)}
    needs = [n.strip() for found in NEEDS.findall(text) for n in found.split(",") if n.strip()]
    _prepare(needs, cwd, env)
    blocks = BLOCK.findall(text)
    # One namespace for all blocks, each compiled under its own name so a failure points at the block.
    program = "ns = {'__name__': '__main__'}\n" + "".join(
        f"exec(compile({block!r}, {f'{_ids(doc)} snippet {i + 1}'!r}, 'exec'), ns)\n" for i, block in enumerate(blocks)
    )
    _run(program, cwd, env, _ids(doc))
