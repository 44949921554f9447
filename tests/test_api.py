"""crossinit_cli.api, the Python API: the CLI's results bit for bit, silent, typed, named after the CLI's flags."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import typer
from PIL import Image

from crossinit_cli import api
from crossinit_cli.errors import CrossinitError

GRACE = Path(__file__).parent / "data" / "grace_hopper.jpg"
ROOT = Path(__file__).resolve().parent.parent


def test_learn_gives_the_clis_vectors_tells_its_progress_and_prints_nothing(
    cli, home: Path, tmp_path: Path, tiny_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    flags = ["--fast", "--steps", "2", "--seed", "3", "--batch-size", "1"]
    result = cli("learn", GRACE, "--name", "alice", "--model", tiny_model, *flags)
    assert result.exit_code == 0, result.stderr
    capfd.readouterr()

    heard: list[api.Progress] = []
    mine = api.Library(tmp_path / "other")
    ident = mine.learn(
        [GRACE], name="alice", fast=True, steps=2, seed=3, batch_size=1, model=str(tiny_model), progress=heard.append
    )
    silent = mine.learn(GRACE, name="quiet", fast=True, steps=2, seed=3, batch_size=1, model=str(tiny_model))

    assert capfd.readouterr() == ("", "")
    assert [(p.step, p.total) for p in heard if p.phase == "training"] == [(1, 2), (2, 2)]
    assert all(isinstance(p.loss, float) for p in heard if p.phase == "training")
    theirs = api.Library(home).get("alice")
    assert (ident.name, ident.family, ident.model, ident.clip_skip) == ("alice", "sd2", str(tiny_model), 1)
    assert list(ident.vectors) == ["clip_h"]
    np.testing.assert_array_equal(ident.vectors["clip_h"], theirs.vectors["clip_h"])
    np.testing.assert_array_equal(silent.vectors["clip_h"], theirs.vectors["clip_h"])
    assert [i.name for i in mine.list()] == ["alice", "quiet"]


def test_generate_gives_the_clis_pngs_pixels_with_the_configured_model_and_its_metadata(
    cli, library, tiny_model: Path, tmp_path: Path, add_identity, capfd: pytest.CaptureFixture[str]
) -> None:
    add_identity("alice", seed=1, scale=5, base_model="tiny-elsewhere")
    assert cli("config", "set", "model", str(tiny_model)).exit_code == 0  # model=None must find it, as the CLI does
    prompt = "<alice> at the beach"
    result = cli("generate", prompt, "-n", "2", "--seed", "5", "--steps", "2", "--negative", "blurry",
                 "--out", tmp_path / "cli", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    written = json.loads(result.stdout)
    capfd.readouterr()

    images = api.Library().generate(prompt, n=2, seed=5, steps=2, negative="blurry")

    assert capfd.readouterr() == ("", "")
    assert len(images) == len(written) == 2
    for image, record in zip(images, written, strict=True):
        with Image.open(record["path"]) as png:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(png.convert("RGB")))
            assert image.info["parameters"] == png.text["parameters"]
            assert json.loads(image.info["crossinit"]) == json.loads(png.text["crossinit"])
    assert [i.info["seed"] for i in images] == [5, 6]


def test_generate_tells_the_sampling_steps_and_writes_pngs_only_when_asked(
    library, tiny_model: Path, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", base_model=str(tiny_model))
    heard: list[api.Progress] = []
    out = tmp_path / "pngs"
    images = api.Library().generate(
        prompts=["<alice>", "<alice> smiling"], seed=1, steps=2, out=out, progress=heard.append
    )
    assert len(images) == 2
    assert sorted(p.name for p in out.iterdir()) == ["alice-1-0.png", "alice-smiling-1-0.png"]  # the prompts' slugs
    with Image.open(out / "alice-1-0.png") as png:
        np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(png.convert("RGB")))
    sampled = [(p.step, p.total) for p in heard if p.phase == "sampling" and p.step]
    assert sampled[-1] == (2, 2)
    assert any(p.phase == "model load" for p in heard)


def test_export_writes_the_clis_bytes_and_import_reads_them_back(
    cli, home: Path, tmp_path: Path, add_identity, capfd: pytest.CaptureFixture[str]
) -> None:
    add_identity("alice", init=True)
    assert cli("export", "alice", "-o", tmp_path / "cli.safetensors").exit_code == 0
    capfd.readouterr()
    lib = api.Library()
    paths = lib.export("alice", output=tmp_path / "api.safetensors")
    assert paths == [tmp_path / "api.safetensors"]
    assert paths[0].read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    assert lib.export("alice", format="a1111-pt", output=f"{tmp_path}/out/") == [tmp_path / "out" / "alice.pt"]

    (back,) = lib.import_(paths[0], name="bob", model="owner/model")
    assert (back.name, back.model) == ("bob", "owner/model")
    (rows,) = back.vectors.values()
    np.testing.assert_array_equal(rows, *lib.get("alice").vectors.values())
    assert capfd.readouterr() == ("", "")


def test_an_sdxl_identity_comes_with_both_encoders_rows(tmp_path: Path, tiny_sdxl: Path) -> None:
    lib = api.Library(tmp_path / "lib")
    ident = lib.learn([GRACE], name="xl", fast=True, steps=2, batch_size=1, model=str(tiny_sdxl))
    assert ident.family == "sdxl" and ident.widths == (32, 64)
    assert {k: v.shape for k, v in ident.vectors.items()} == {
        "clip_l": (ident.tokens, 32),
        "clip_g": (ident.tokens, 64),
    }


def test_list_get_edit_remove(library, add_identity) -> None:
    add_identity("alice", init=True)
    add_identity("bob")
    lib = api.Library()
    assert [i.name for i in lib.list()] == ["alice", "bob"]
    edited = lib.edit("alice", tag="family", note="hi", strength=0.5)
    assert (edited.tags, edited.notes, edited.strength) == (("family",), "hi", 0.5)
    assert [i.name for i in lib.list(tag="family")] == ["alice"]
    assert lib.get("ALICE").token == "<alice>"
    lib.remove("alice", "bob")
    assert lib.list() == []


def test_mistakes_are_crossinit_errors_and_print_nothing(
    library, add_identity, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    add_identity("alice")
    lib = api.Library()
    mistakes = [
        lambda: lib.get("nobody"),
        lambda: lib.learn([GRACE], fast=True, full=True),
        lambda: lib.learn([GRACE], device="gpu"),
        lambda: lib.learn([GRACE], steps=0),
        lambda: lib.learn([GRACE], name="alice"),  # exists; no model load before saying so
        lambda: lib.learn([]),
        lambda: lib.generate("<nobody> on a beach"),
        lambda: lib.generate("<alice>", n=0),
        lambda: lib.generate(prompts=[]),
        lambda: lib.generate("<alice>", prompts=["<alice>"]),
        lambda: lib.export("alice", format="nope"),
        lambda: lib.import_(tmp_path / "missing.safetensors"),
        lambda: lib.remove("nobody"),
        lambda: lib.edit("alice", strength=9),
        lambda: lib.resume("alice"),
        lambda: lib.list(sort="size"),
    ]
    for mistake in mistakes:
        with pytest.raises(CrossinitError):
            mistake()
    assert capfd.readouterr() == ("", "")


# learn/generate/export flags with no keyword of the same name, and why.
NOT_KEYWORDS = {
    "learn": {"quiet": "presentation", "json": "presentation", "resume": "Library.resume", "batch": "CLI only"},
    "generate": {
        "quiet": "presentation",
        "json": "presentation",
        "grid": "a contact sheet file: CLI only",
        "manifest": "JSON Lines jobs: CLI only (prompts= gives several prompts one model load)",
        "on_error": "goes with --manifest",
    },
    "export": {"json": "presentation"},
}
GLOBAL = {"home": "api.Library(home)", "verbose": "presentation (phase times come to the progress callback)"}
for _skipped in NOT_KEYWORDS.values():
    _skipped.update(GLOBAL)
API_OF = {"learn": api.Library.learn, "generate": api.Library.generate, "export": api.Library.export}


def _flag_names(param: click.Parameter) -> set[str]:
    """A CLI parameter's names as Python keywords: its own and each long flag's (--batch-size: batch_size)."""
    longs = {o[2:].replace("-", "_") for o in getattr(param, "opts", []) if o.startswith("--")}
    return {param.name or "", *longs}


@pytest.mark.parametrize("command", sorted(API_OF))
def test_every_flag_of_the_command_has_its_keyword(command: str) -> None:
    from crossinit_cli.cli import app

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    keywords = set(inspect.signature(API_OF[command]).parameters) - {"self", "progress"}
    missing = []
    for param in params:
        names = _flag_names(param)
        if not names & keywords and not names & set(NOT_KEYWORDS[command]):
            missing.append(sorted(names))
    assert not missing, f"{command}: flags without a keyword: {missing}"
    flags = set().union(*(_flag_names(p) for p in params))
    assert keywords <= flags, f"{command}: keywords no flag has: {keywords - flags}"


def test_importing_the_api_loads_no_torch_and_the_package_says_it_is_typed() -> None:
    code = (
        "import sys, crossinit_cli\n"
        "from crossinit_cli import api, Library, CrossinitError\n"
        "assert Library is api.Library and issubclass(CrossinitError, Exception)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
    assert (ROOT / "crossinit_cli" / "py.typed").is_file()


def test_a_fresh_interpreter_learning_and_generating_prints_nothing(tmp_path: Path, tiny_model: Path) -> None:
    """Also the libraries' own first-load warnings and progress bars stay off (a fresh process sees them)."""
    code = (
        "from crossinit_cli import api\n"
        f"lib = api.Library({str(tmp_path / 'lib')!r})\n"
        f"lib.learn([{str(GRACE)!r}], name='alice', fast=True, steps=1, batch_size=1, model={str(tiny_model)!r})\n"
        "lib.generate('<alice>', seed=1, steps=1)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CROSSINIT_")}
    env.update(CROSSINIT_CONFIG=str(tmp_path / "config.toml"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout, done.stderr) == ("", "")


def test_a_mistake_is_found_before_torch_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from crossinit_cli import api\n"
        f"lib = api.Library({str(tmp_path / 'lib')!r})\n"
        "for call in (lambda: lib.learn([" + repr(str(GRACE)) + "], model='/nonexistent/sd21'),\n"
        "             lambda: lib.generate('a cat', model='./missing-model')):\n"
        "    try:\n        call()\n    except api.CrossinitError as exc:\n        print('error:', exc)\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CROSSINIT_")}
    env.update(CROSSINIT_CONFIG=str(tmp_path / "config.toml"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    lines = done.stdout.splitlines()
    assert [line.startswith("error: ") for line in lines[:2]] == [True, True], done.stdout + done.stderr
    assert lines[2:] == ["False False"] and done.stderr == ""
