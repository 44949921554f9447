"""What a user gets from `pip install .`, not what the source tree holds.

An editable install reads the checkout, so it hid a wheel without `crossinit_cli/commands/`. These tests
build the wheel and sdist from a copy of the checkout, compare their modules with the tree's, and run the
README's install command as written (on the tiny model in place of the real weights) into a fresh virtual
environment, then every command with that environment's `crossinit` from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.install]

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU build this machine holds on disk; an unpinned torch pulls GBs of CUDA
PHOTO = ROOT / "tests" / "data" / "grace_hopper.jpg"


def checkout_files() -> list[str]:
    """The files a fresh clone has: git's list where there is a repository, else the tree minus build output."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
    return [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if p.is_file() and not any(part in skip or part.startswith(".venv") for part in p.relative_to(ROOT).parts)
    ]


def package_files() -> set[str]:
    """What the wheel must hold: every module and data file under crossinit_cli/."""
    return {name for name in checkout_files() if name.startswith("crossinit_cli/")}


def copy_checkout(target: Path) -> Path:
    """A copy of the checkout, so building never writes build/ or *.egg-info into the real one."""
    for name in checkout_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return target


def run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 900):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def readme_first_commands() -> tuple[list[str], list[str]]:
    """The README's first two blocks, one command a line (a trailing `# comment` dropped): the install lines
    (NVIDIA GPU, then CPU or Mac) and the self-test, then learn from your photo."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    install = next(i for i, block in enumerate(blocks) if "pip install ." in block)

    def lines(block: str) -> list[str]:
        return [line.split("   # ")[0].strip() for line in block.strip().splitlines()]

    return lines(blocks[install]), lines(blocks[install + 1])


def test_the_readme_install_block_has_a_line_per_machine() -> None:
    """The first block splits at the top: the NVIDIA GPU line (PyPI's CUDA torch), then the CPU-or-Mac line
    (the CPU torch index first, so `pip install .` keeps that build), then the self-test."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (gpu, cpu, self_test), _ = readme_first_commands()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert gpu == venv + "pip install ."
    assert cpu == venv + "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install ."
    assert self_test == "crossinit doctor --self-test"
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "# NVIDIA GPU" in first_block.splitlines()[1] and "# CPU only, or a Mac" in first_block.splitlines()[2]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and sdist that `python -m build` makes of a copy of the checkout."""
    source = copy_checkout(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(source)], cwd=source)
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        shipped = {name for name in wheel.namelist() if name.startswith("crossinit_cli/")}
        entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "crossinit = crossinit_cli.cli:main" in wheel.read(entry_points).decode()
    missing = sorted(package_files() - shipped)
    assert not missing, f"the wheel leaves out: {', '.join(missing)}"
    assert "crossinit_cli/commands/learn.py" in shipped and "crossinit_cli/data/celeb_names.txt" in shipped
    assert "crossinit_cli/data/grace_hopper.jpg" in shipped  # the self-test's photo
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        assert wheel.read("crossinit_cli/data/grace_hopper.jpg") == PHOTO.read_bytes()


def test_the_sdist_holds_every_module_and_data_file_of_the_tree(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted((package_files() | {"pyproject.toml", "README.md"}) - shipped)
    assert not missing, f"the sdist leaves out: {', '.join(missing)}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """The README's first commands: the install line run as written in a copy of the checkout, the self-test
    line as written from a folder outside it, then the learn line on a photo, on the tiny model.

    The harness only does what the environment needs and the README cannot say: the CPU build of torch is
    put in the venv first, offline (the CPU line's `pip install torch` then finds it installed, and its
    `pip install .` keeps it), the other dependencies are held
    to the test pins (PIP_CONSTRAINT), the venv's bin is on PATH (what `. .venv/bin/activate` did), and
    learn's photo is a real one and its model the tiny one (`--model`) instead of a 5 GB download.
    """
    source = copy_checkout(tmp_path_factory.mktemp("user-checkout"))
    work = tmp_path_factory.mktemp("user")
    shutil.copy(PHOTO, work / "alice.jpg")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "CROSSINIT_", "PIP_CONSTRAINT"))
    }
    env.update(
        CROSSINIT_HOME=str(work / "library"),
        CROSSINIT_CONFIG=str(work / "config.toml"),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(work / "hf"),
        NO_COLOR="1",
        PIP_CONSTRAINT=str(ROOT / "requirements-test.txt"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    python = shutil.which("python3", path=env.get("PATH")) or sys.executable
    run([python, "-m", "venv", ".venv"], cwd=source, env=env)
    run([str(source / ".venv" / "bin" / "python"), "-m", "pip", "install", "-q", TORCH], cwd=source, env=env)
    (_, install, self_test), (download, learn) = readme_first_commands()  # the CPU line: this machine's
    assert install.endswith("pip install .") and self_test == "crossinit doctor --self-test", (install, self_test)
    assert download.startswith("hf download ") and learn == "crossinit learn path/to/your-photo.jpg --fast", learn
    run(["bash", "-c", install], cwd=source, env=env)
    bin_dir = source / ".venv" / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    checked = run(["bash", "-c", self_test], cwd=work, env=env)
    listed = run([str(bin_dir / "crossinit"), "list", "--json"], cwd=work, env=env).stdout
    learn_line = learn.replace("path/to/your-photo.jpg", "alice.jpg")
    done = run(["bash", "-c", f"{learn_line} --model {tiny_model} --seed 3"], cwd=work, env=env)
    return {
        "bin": bin_dir,
        "env": env,
        "work": work,
        "source": source,
        "learn": done,
        "self_test": checked,
        "listed_after_self_test": listed,
        "model": tiny_model,
    }


def crossinit(installed: dict, *args: object) -> subprocess.CompletedProcess:
    """The installed console script, from a folder outside the checkout, with no source tree on the path."""
    done = run([str(installed["bin"] / "crossinit"), *map(str, args)], cwd=installed["work"], env=installed["env"])
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_the_readme_self_test_passes_with_the_installed_crossinit(installed: dict) -> None:
    """`crossinit doctor --self-test` from outside the checkout: every step ran, on the photo in the wheel."""
    done = installed["self_test"]
    lines = done.stdout.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("the install works: 7 steps passed")
    steps = [line.split()[:2] for line in lines[1:-1]]
    assert steps == [["ok", s] for s in ("model", "detect", "learn", "generate", "export", "import", "remove")]
    assert json.loads(installed["listed_after_self_test"]) == []  # the user's library: nothing left in it


def test_the_readme_install_command_learns_an_identity(installed: dict) -> None:
    assert "Traceback" not in installed["learn"].stderr
    assert "learned alice" in installed["learn"].stderr
    site = installed["source"] / ".venv" / "lib"
    package = next(site.glob("python3*/site-packages/crossinit_cli"))
    assert not (installed["source"] / ".venv").is_symlink() and (package / "commands" / "learn.py").is_file()
    check = "import crossinit_cli, sys; print(crossinit_cli.__file__)"
    where = run([str(installed["bin"] / "python"), "-c", check], cwd=installed["work"], env=installed["env"])
    assert where.stdout.strip() == str(package / "__init__.py"), "crossinit is imported from the checkout"


def test_every_command_of_the_installed_crossinit_runs(installed: dict) -> None:
    model, work = installed["model"], installed["work"]
    metadata = "import importlib.metadata as m; print(m.version('crossinit'))"
    version = run([str(installed["bin"] / "python"), "-c", metadata], cwd=work, env=installed["env"])
    assert crossinit(installed, "--version").stdout.strip() == f"crossinit {version.stdout.strip()}"
    assert crossinit(installed, "config", "set", "model", model).returncode == 0
    assert [r["name"] for r in json.loads(crossinit(installed, "list", "--json").stdout)] == ["alice"]
    assert json.loads(crossinit(installed, "show", "alice", "--json").stdout)["training"]["mode"] == "fast"
    exported = json.loads(crossinit(installed, "export", "alice", "-o", f"{work}/out/", "--json").stdout)
    assert Path(exported["path"]).is_file()
    crossinit(installed, "import", exported["path"], "--name", "bob", "--model", model)
    images = json.loads(
        crossinit(installed, "generate", "<alice> and <bob>", "-n", "1", "--steps", "2", "--seed", "5",
                  "-o", work / "images", "--json").stdout
    )  # fmt: skip
    assert len(images) == 1 and Path(images[0]["path"]).is_file()
    assert json.loads(crossinit(installed, "edit", "alice", "--tag", "t", "--strength", "0.9", "--json").stdout)[
        "strength"
    ] == pytest.approx(0.9)
    (work / "prompts.txt").write_text("a photo of {}\n", encoding="utf-8")
    crossinit(installed, "eval", "alice", "-n", "1", "--steps", "2", "--prompts", work / "prompts.txt", "--json")
    assert json.loads(crossinit(installed, "doctor", "--json").stdout)["ok"] is True


def test_pipx_install_gives_a_working_crossinit(tmp_path: Path, tiny_model: Path) -> None:
    """`pipx install .`, the way many people install Python command-line tools, with torch held to the CPU build."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text((ROOT / "requirements-test.txt").read_text() + f"{TORCH}\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PIPX_HOME=str(tmp_path / "pipx"),
        PIPX_BIN_DIR=str(tmp_path / "bin"),
        PIP_CONSTRAINT=str(constraints),
        CROSSINIT_HOME=str(tmp_path / "library"),
        CROSSINIT_CONFIG=str(tmp_path / "config.toml"),
        HF_HUB_OFFLINE="1",
    )
    source = copy_checkout(tmp_path / "checkout")
    run([sys.executable, "-m", "pipx", "install", str(source)], cwd=tmp_path, env=env)
    script = str(tmp_path / "bin" / "crossinit")
    shutil.copy(PHOTO, tmp_path / "carol.jpg")
    learned = run(
        [script, "learn", "carol.jpg", "--fast", "--steps", "2", "--model", str(tiny_model)], cwd=tmp_path, env=env
    )
    assert "Traceback" not in learned.stderr and "learned carol" in learned.stderr
    assert [r["name"] for r in json.loads(run([script, "list", "--json"], cwd=tmp_path, env=env).stdout)] == ["carol"]
