"""`crossinit generate --manifest` through the CLI on the tiny model: one load, per-line settings, streaming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from crossinit_cli import sample
from crossinit_cli.errors import CrossinitError
from crossinit_cli.generation import apply_template
from crossinit_cli.store import Identity, Library


@pytest.fixture()
def stocked(library: Library, tiny_model: Path) -> Library:
    for seed, name in enumerate(("alice", "bob")):
        vectors = (np.random.default_rng(seed).standard_normal((2, 32)) * 5).astype(np.float32)
        library.add(Identity(name=name, tokens=2, width=32, base_model=str(tiny_model)), vectors)
    return library


def _manifest(tmp_path: Path, *lines: Any) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_manifest_runs_each_line_with_its_settings_on_one_model_load(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path, loads: list
) -> None:
    elsewhere = tmp_path / "elsewhere"
    manifest = _manifest(
        tmp_path,
        {"prompt": "<alice> at the beach", "seed": 7},
        "# a comment, and a blank line next",
        "",
        {"prompt": "<bob> and <alice>", "seed": 3, "n": 2, "size": "48x32", "steps": 1, "guidance": 2.0},
        {"prompt": "a red cube", "seed": 5, "negative": "<bob>", "scheduler": "euler", "out": str(elsewhere)},
    )
    out = tmp_path / "out"
    result = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", out, "--steps", "2")
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1  # one model load for the whole manifest
    records = _records(result.stdout)  # JSON Lines: one object per image, nothing else
    assert [(r["line"], r["seed"], r["index"]) for r in records] == [(1, 7, 0), (4, 3, 0), (4, 4, 1), (5, 5, 0)]
    assert [r["steps"] for r in records] == [2, 1, 1, 2]  # a line's own steps, else the flag's
    assert [r["guidance"] for r in records] == [sample.DEFAULT_GUIDANCE, 2.0, 2.0, sample.DEFAULT_GUIDANCE]
    assert records[3]["scheduler"] == "euler" and records[3]["negative_prompt"] == "<bob>"
    assert records[1]["identities"] == ["bob", "alice"]
    for record in records:
        with Image.open(record["path"]) as image:
            expected = (48, 32) if record["line"] == 4 else (64, 64)
            assert image.size == expected
            assert json.loads(image.text["crossinit"])["seed"] == record["seed"]
    assert Path(records[0]["path"]).parent == out and Path(records[3]["path"]).parent == elsewhere
    assert "wrote 4 images from 3 line(s) with one model load" in result.stderr


def test_a_manifest_line_gives_the_same_image_as_generate(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, {"prompt": "<alice> smiling", "seed": 11, "n": 2, "steps": 2})
    one = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", tmp_path / "a")
    alone = cli(
        "generate", "<alice> smiling", "--seed", "11", "-n", "2", "--steps", "2", "--model", tiny_model,
        "--out", tmp_path / "b", "--json",
    )  # fmt: skip
    assert one.exit_code == 0 and alone.exit_code == 0, one.stderr + alone.stderr
    for a, b in zip(_records(one.stdout), json.loads(alone.stdout)):
        assert Path(a["path"]).name == Path(b["path"]).name
        # A manifest samples one image per call, generate -n 2 both in one batch: the same noise and
        # steps, so the same image up to the float rounding a batch may change (docs/generate.md,
        # Determinism; on an AVX2-only EPYC 2 of 12,288 values differ by one level).
        x = np.asarray(Image.open(a["path"])).astype(int)
        y = np.asarray(Image.open(b["path"])).astype(int)
        assert np.abs(x - y).max() <= 2 and (x != y).mean() < 0.01


BAD_LINES = [
    ("{not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"seed": 1}', "no 'prompt'"),
    ('{"prompt": "x", "steps": 0}', "'steps' must be a whole number from 1"),
    ('{"prompt": "x", "seeds": 3}', "unknown key(s) 'seeds'"),
    ('{"prompt": "x", "size": "100x7"}', "multiples of 8"),
    ('{"prompt": "x", "scheduler": "magic"}', "unknown scheduler 'magic'"),
    ('{"prompt": "<nobody> waves"}', "no identity named <nobody>"),
    ('{"prompt": "x", "guidance": "high"}', "'guidance' must be a number"),
]


def test_bad_lines_are_reported_by_number_and_skipped(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path, loads: list
) -> None:
    lines = [json.dumps({"prompt": "<alice>", "seed": 1, "steps": 1})] + [text for text, _ in BAD_LINES]
    manifest = _manifest(tmp_path, *lines)
    result = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", tmp_path / "out")
    assert result.exit_code == 4, result.stderr  # some lines failed: a status of its own (docs/exit-codes.md)
    assert [r["line"] for r in _records(result.stdout)] == [1]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    summary = f"warning: {len(BAD_LINES)} of {len(lines)} lines failed (exit status 4; see above for each)"
    assert warnings.pop() == summary
    assert len(warnings) == len(BAD_LINES)
    for number, (warning, (_, why)) in enumerate(zip(warnings, BAD_LINES), start=2):
        assert warning.startswith(f"warning: line {number}: ") and why in warning and warning.endswith("skipped")
    assert f"{len(BAD_LINES)} line(s) skipped" in result.stderr


def test_on_error_stop_ends_the_run_at_the_bad_line_before_the_model_loads(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path, loads: list
) -> None:
    manifest = _manifest(tmp_path, {"prompt": "<alice>", "seed": 1}, '{"prompt": "x", "n": -2}')
    out = tmp_path / "out"
    result = cli("generate", "--manifest", manifest, "--on-error", "stop", "--model", tiny_model, "--out", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == "error: line 2: 'n' must be a whole number from 1 to 10000, not -2"
    assert loads == [] and not out.exists()


def test_manifest_usage_errors(cli, stocked: Library, tiny_model: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {"prompt": "<alice>"})
    both = cli("generate", "<alice>", "--manifest", manifest, "--model", tiny_model)
    assert both.exit_code == 2 and "not both" in both.stderr  # a usage mistake
    empty = _manifest(tmp_path, "# nothing", "")
    assert "no lines in manifest" in cli("generate", "--manifest", empty, "--model", tiny_model).stderr
    missing = cli("generate", "--manifest", tmp_path / "nope.jsonl", "--model", tiny_model)
    assert missing.exit_code == 1 and "cannot read the manifest from" in missing.stderr
    only_bad = cli("generate", "--manifest", _manifest(tmp_path, "{"), "--model", tiny_model)
    assert only_bad.exit_code == 1 and "none of the 1 line(s)" in only_bad.stderr
    assert cli("generate", "--manifest", manifest, "--on-error", "ignore").exit_code == 2


def test_each_image_reaches_stdout_before_the_next_is_sampled(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pipe has seen at each sampling call: every image before it, already flushed."""
    seen: list[int] = []
    real = sample.sample

    def watching(*args: Any, **kwargs: Any) -> Any:
        sys.stdout.flush()
        seen.append(sys.stdout.buffer.getvalue().decode().count("\n"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample", watching)
    manifest = _manifest(tmp_path, {"prompt": "<alice>", "seed": 1, "n": 2}, {"prompt": "<bob>", "seed": 2})
    result = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", tmp_path / "o", "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert seen == [0, 1, 2]


def test_a_manifest_from_stdin_in_a_real_pipe(stocked: Library, tiny_model: Path, tmp_path: Path) -> None:
    lines = "\n".join(json.dumps({"prompt": p, "seed": 4, "steps": 1}) for p in ("<alice>", "<bob> in a hat"))
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", "generate", "--manifest", "-", "--model", str(tiny_model),
         "--out", str(tmp_path / "o")],
        input=lines, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = _records(done.stdout)
    assert [r["prompt"] for r in records] == ["<alice>", "<bob> in a hat"]
    assert all(Path(r["path"]).is_file() for r in records)
    assert "\x1b[" not in done.stderr  # no progress bar drawn into a pipe


def test_a_manifest_shows_one_overall_bar_on_a_terminal(stocked: Library, tiny_model: Path, tmp_path: Path) -> None:
    import os

    lines = "\n".join(json.dumps({"prompt": "<alice>", "seed": s, "steps": 1}) for s in range(3))
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", "generate", "--manifest", "-", "--model", str(tiny_model),
         "--out", str(tmp_path / "o")],
        input=lines, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "160"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(_records(done.stdout)) == 3  # stdout stays JSON Lines
    assert "images" in done.stderr and "3/3" in done.stderr


def test_identity_flag_templates_plain_manifest_prompts(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, {"prompt": "smiling", "seed": 1}, {"prompt": "<bob> waves", "seed": 2})
    args = ["generate", "--manifest", manifest, "-i", "alice", "--model", tiny_model, "--steps", "1"]
    result = cli(*args, "--out", tmp_path / "o", "--json")  # --json changes nothing: JSON Lines either way
    assert result.exit_code == 0, result.stderr
    records = _records(result.stdout)
    templated = apply_template("smiling", stocked.get("alice"))  # as `generate -i alice smiling` writes it
    assert "<alice>" in templated and templated.endswith("smiling")
    assert [(r["prompt"], r["identities"]) for r in records] == [
        (templated, ["alice"]),
        ("<bob> waves", ["bob"]),
    ]


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_a_script_tells_a_partly_failed_manifest_by_its_exit_status(
    stocked: Library, tiny_model: Path, tmp_path: Path
) -> None:
    """A real process, as a shell script sees it: 0 all ran, 4 some lines failed, 1 none ran."""
    good = json.dumps({"prompt": "<alice>", "seed": 4, "steps": 1})
    bad = json.dumps({"prompt": "<nobody> waves"})

    def status(*lines: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "crossinit_cli", "generate", "--manifest", "-", "--model", str(tiny_model),
             "--out", str(tmp_path / "o")],
            input="\n".join(lines), capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    assert status(good).returncode == 0
    partly = status(good, bad, good, bad)
    assert partly.returncode == 4 and len(_records(partly.stdout)) == 2
    assert partly.stderr.splitlines()[-1] == "warning: 2 of 4 lines failed (exit status 4; see above for each)"
    assert status(bad).returncode == 1


def test_lines_that_fail_while_sampling_count_as_failed(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise CrossinitError("out of GPU memory at 512x512")

    monkeypatch.setattr(sample, "sample", out_of_memory)
    manifest = _manifest(tmp_path, {"prompt": "<alice>", "seed": 1}, {"prompt": "<bob>", "seed": 2})
    result = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", tmp_path / "o", "--steps", "1")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "error: all 2 line(s) of the manifest failed; nothing was written"


def test_a_manifest_prompt_naming_an_identity_without_brackets_gets_one_hint(
    cli, stocked: Library, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, {"prompt": "alice waves", "seed": 1}, {"prompt": "alice again", "seed": 2})
    result = cli("generate", "--manifest", manifest, "--model", tiny_model, "--out", tmp_path / "o", "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert [r["identities"] for r in _records(result.stdout)] == [[], []]  # stdout: JSON Lines only
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint:")]
    assert hints == ["hint: 'alice' in prompt \"alice waves\" is plain text; write <alice> to use the stored identity"]


def test_an_sdxl_identity_runs_from_a_manifest_as_from_a_prompt(cli, tiny_sdxl: Path, tmp_path: Path) -> None:
    photo = Path(__file__).parent / "data" / "astronaut.png"
    cheap = ("--steps", "2", "--batch-size", "1", "--quiet")
    learned = cli("learn", photo, "--name", "carol", "--model", tiny_sdxl, *cheap)
    assert learned.exit_code == 0, learned.stderr
    plain = cli("generate", "<carol> at sea", "--model", tiny_sdxl, "--seed", "4", "--steps", "2",
                "--out", tmp_path / "plain", "--json")  # fmt: skip
    manifest = _manifest(tmp_path, {"prompt": "<carol> at sea", "seed": 4, "steps": 2})
    lines = cli("generate", "--manifest", manifest, "--model", tiny_sdxl, "--out", tmp_path / "lines")
    assert plain.exit_code == 0 and lines.exit_code == 0, lines.stderr
    (record,) = _records(lines.stdout)
    with Image.open(json.loads(plain.stdout)[0]["path"]) as a, Image.open(record["path"]) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # one image: a batch of one either way
