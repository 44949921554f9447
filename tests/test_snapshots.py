"""Snapshots: `learn --snapshot-every`, `show --json`, `edit --use-snapshot`, `eval --snapshots/--pick-best`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from crossinit_cli import faces, sample, snapshots
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
EVAL = ("--steps", "1", "-n", "1", "--quiet")


@pytest.fixture()
def snapped(cli, library: Library, tiny_model: Path) -> str:
    """`astro`, learned in full mode for 6 steps with a snapshot every 2."""
    result = cli("learn", ASTRONAUT, "--name", "astro", "--steps", "6", "--batch-size", "1", "--snapshot-every", "2",
                 "--model", tiny_model, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return "astro"


def test_learn_keeps_snapshots_and_show_lists_them(cli, library: Library, snapped: str) -> None:
    shown = json.loads(cli("show", snapped, "--json").stdout)
    assert [s["step"] for s in shown["snapshots"]] == [2, 4, 6]
    assert all(isinstance(s["loss"], float) for s in shown["snapshots"]) and shown["active_step"] == 0
    vectors = library.vectors(snapped)
    assert sorted(vectors.snapshots) == [2, 4, 6]
    assert np.array_equal(vectors.snapshots[6]["learned"], vectors.learned)  # the last step is the final vectors
    assert not np.array_equal(vectors.snapshots[2]["learned"], vectors.learned)
    # Inside the entry's one vectors file, as named tensors per step; exports read only "learned".
    stored = load_file(str(library.path_of(snapped) / "vectors.safetensors"))
    assert {"snapshot/2/learned", "snapshot/4/learned", "snapshot/6/learned", "learned", "init"} == set(stored)


def test_snapshot_defaults_are_40_in_full_mode_and_none_in_fast(cli, library: Library, tiny_model: Path) -> None:
    for name, mode, steps in (("full", "--full", "41"), ("fast", "--fast", "41"), ("short", "--full", "6")):
        result = cli("learn", ASTRONAUT, "--name", name, mode, "--steps", steps, "--batch-size", "1",
                     "--model", tiny_model, "--quiet")  # fmt: skip
        assert result.exit_code == 0, result.stderr
    assert [s["step"] for s in library.get("full").snapshots] == [40, 41]
    assert library.get("fast").snapshots == [] and library.get("short").snapshots == []


def test_use_snapshot_changes_what_prompts_use_and_is_reversible(
    cli, library: Library, snapped: str, tmp_path: Path
) -> None:
    final = library.effective_vectors(snapped).copy()
    assert cli("edit", snapped, "--use-snapshot", "2").exit_code == 0
    vectors = library.vectors(snapped)
    assert library.get(snapped).active_step == 2
    shown = " ".join(cli("show", snapped).stdout.split())
    assert "step 2 (loss" in shown and ") [active], step 4" in shown
    assert np.array_equal(library.effective_vectors(snapped), vectors.snapshots[2]["learned"])
    exported = tmp_path / "astro.safetensors"
    assert cli("export", snapped, "-o", exported).exit_code == 0
    assert np.array_equal(load_file(str(exported))["emb_params"], vectors.snapshots[2]["learned"])
    # The strength still scales the offset from the start, now of the snapshot's rows.
    assert cli("edit", snapped, "--strength", "0.5").exit_code == 0
    expected = vectors.init + 0.5 * (vectors.snapshots[2]["learned"] - vectors.init)
    np.testing.assert_allclose(library.effective_vectors(snapped), expected, rtol=0, atol=1e-6)
    assert cli("edit", snapped, "--strength", "1", "--use-snapshot", "final").exit_code == 0
    assert np.array_equal(library.effective_vectors(snapped), final) and library.get(snapped).active_step == 0

    missing = cli("edit", snapped, "--use-snapshot", "3")
    assert missing.exit_code == 1 and missing.stderr.strip() == (
        "error: identity 'astro' has no snapshot at step 3; kept: 2, 4, 6"
    )
    word = cli("edit", snapped, "--use-snapshot", "best")
    assert word.exit_code == 1 and "a step number or 'final'" in word.stderr


def test_pick_best_keeps_near_best_likeness_then_prefers_prompt_fidelity() -> None:
    records = [
        {"step": 40, "likeness": 0.5, "prompt_fidelity": 0.31},
        {"step": 80, "likeness": 0.95, "prompt_fidelity": 0.27},
        {"step": 120, "likeness": 1.0, "prompt_fidelity": 0.22},
    ]
    assert snapshots.pick_best(records) == 80  # 40 is too far from the best likeness; 80 follows prompts better
    no_clip = [{**r, "prompt_fidelity": None} for r in records]
    assert snapshots.pick_best(no_clip) == 80  # the earliest of the near-best: least drift from the start
    with pytest.raises(CrossinitError, match="no stored face crops"):
        snapshots.pick_best([{"step": 40, "likeness": None, "prompt_fidelity": 0.3}])


def test_eval_snapshots_scores_each_and_pick_best_makes_one_active(
    cli, library: Library, snapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real scoring: the sampler draws Grace Hopper for step 2's vectors and Eileen Collins (astro's own
    photo) for steps 4 and 6, so step 2 looks unlike astro and 4 is the earliest near-best snapshot."""
    eileen = faces.align_face(ASTRONAUT).image
    grace = faces.align_face(DATA / "grace_hopper.jpg").image
    loads: list[str] = []

    def draw(pipe: Any, prompt: str, seeds: list[int], settings: Any) -> list[Image.Image]:
        loads.append(prompt)
        picture = grace if "<crossinit:astro.s2:0>" in prompt else eileen
        return [picture.copy() for _ in seeds]

    monkeypatch.setattr(sample, "sample", draw)
    result = cli("eval", snapped, "--snapshots", *EVAL, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {r["step"]: r for r in report["snapshots"]}
    assert sorted(rows) == [2, 4, 6] and report["picked"] is None and report["active_step"] == 0
    assert rows[2]["likeness"] < 1.0 < rows[4]["likeness"] and rows[2]["same_person_rate"] == 0.0
    assert rows[6]["active"] is True and rows[4]["active"] is False
    stored = {s["step"]: s["evaluation"] for s in library.get(snapped).snapshots}
    assert stored[4]["likeness"] == rows[4]["likeness"] and stored[2]["settings"]["n"] == 1
    assert library.get(snapped).evaluation == {}  # the identity's own evaluation is untouched

    best = cli("eval", snapped, "--pick-best", *EVAL)
    assert best.exit_code == 0, best.stderr
    assert "picked, active" in best.stdout and "now uses the snapshot at step 4" in best.stderr
    assert library.get(snapped).active_step == 4
    assert np.array_equal(library.effective_vectors(snapped), library.vectors(snapped).snapshots[4]["learned"])
    assert cli("edit", snapped, "--use-snapshot", "final").exit_code == 0  # reversible


def test_snapshot_eval_mistakes_are_one_line(cli, library: Library, tiny_model: Path, snapped: str) -> None:
    assert cli("learn", ASTRONAUT, "--name", "plain", "--fast", "--steps", "2", "--batch-size", "1",
               "--model", tiny_model, "--quiet").exit_code == 0  # fmt: skip
    result = cli("eval", "plain", "--snapshots", *EVAL)  # the usage mistakes: tests/test_usage.py
    assert result.exit_code == 1 and "kept no snapshots" in result.stderr and result.stderr.count("\n") == 1


def test_sdxl_snapshots_and_resume_keep_each_encoders_rows(
    cli, library: Library, tiny_sdxl: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDXL's two encoders: a snapshot is one named tensor per encoder, --use-snapshot switches both, and a
    run stopped by Ctrl-C resumes to the uninterrupted run's rows for both encoders."""
    from crossinit_cli import checkpoint, objective

    args = ("--steps", "6", "--batch-size", "1", "--snapshot-every", "2", "--model", tiny_sdxl, "--quiet")
    assert cli("learn", ASTRONAUT, "--name", "xl", *args).exit_code == 0
    stored = load_file(str(library.path_of("xl") / "vectors.safetensors"))
    assert {"snapshot/2/clip_l", "snapshot/2/clip_g", "snapshot/6/clip_l", "snapshot/6/clip_g"} <= set(stored)
    assert stored["snapshot/2/clip_l"].shape == (2, 32) and stored["snapshot/2/clip_g"].shape[0] == 2
    assert cli("edit", "xl", "--use-snapshot", "2").exit_code == 0
    parts = library.effective_parts("xl")
    assert np.array_equal(parts[0], stored["snapshot/2/clip_l"]) and np.array_equal(
        parts[1], stored["snapshot/2/clip_g"]
    )

    # Ctrl-C after step 3 (in the loss of step 4), then --resume: the same rows as the run above.
    calls = {"n": 0}
    real = objective.regulariser_all

    def interrupted(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(objective, "regulariser_all", interrupted)
    stopped = cli("learn", ASTRONAUT, "--name", "again", *args)
    assert stopped.exit_code == 130 and checkpoint.find(home, "again").step == 3
    monkeypatch.setattr(objective, "regulariser_all", real)
    assert cli("learn", "--resume", "again", "--quiet").exit_code == 0
    again = load_file(str(library.path_of("again") / "vectors.safetensors"))
    assert set(again) == set(stored)
    for key in stored:
        assert np.array_equal(again[key], stored[key]), key


def test_pick_best_picks_nothing_when_nothing_was_measured() -> None:
    """All likeness 0 (no face in any generated image) and no CLIP: no evidence, so no pick."""
    blank = [{"step": s, "likeness": 0.0, "face_rate": 0.0, "prompt_fidelity": None} for s in (40, 80, 120)]
    assert snapshots.pick_best(blank) is None
    assert snapshots.nothing_measured(blank) == (
        "no face was found in the generated images and prompt fidelity was not measured (no CLIP score)"
    )
    assert snapshots.pick_best([{**r, "prompt_fidelity": 0.2 + r["step"] / 1000} for r in blank]) == 120
    assert snapshots.pick_best([{**r, "likeness": 0.4 if r["step"] == 80 else 0.0} for r in blank]) == 80


def test_eval_pick_best_changes_nothing_and_says_so_when_nothing_was_measured(
    cli, library: Library, snapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler draws a faceless grey image for every snapshot, and CLIP is not loaded (not in the offline cache)."""
    monkeypatch.setattr(
        sample, "sample", lambda pipe, prompt, seeds, settings: [Image.new("RGB", (64, 64), "grey") for _ in seeds]
    )
    assert cli("edit", snapped, "--use-snapshot", "6").exit_code == 0
    before = library.get(snapped).active_step
    result = cli("eval", snapped, "--pick-best", *EVAL, "--json")  # CLIP: not in the offline cache
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["picked"] is None and report["active_step"] == before == 6
    assert report["not_picked"].startswith("no face was found in the generated images")
    assert "warning: --pick-best changed nothing: no face was found" in result.stderr
    assert "astro still uses the snapshot at step 6" in result.stderr
    assert library.get(snapped).active_step == 6
