"""`crossinit eval`: the identity metric on real photos, and the command end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from crossinit_cli import devices, faces, likeness
from crossinit_cli import fidelity as prompt_fidelity
from crossinit_cli import scoring as engine
from crossinit_cli.errors import CrossinitError
from crossinit_cli.evalresult import Evaluation
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
FAST = ("--steps", "2", "-n", "1", "--quiet")


@pytest.fixture(scope="module")
def astronaut_crop() -> Image.Image:
    return faces.align_face(DATA / "astronaut.png").image


@pytest.fixture(scope="module")
def references(astronaut_crop: Image.Image) -> list[np.ndarray]:
    found = likeness.reference_descriptors([astronaut_crop])
    assert len(found) == 1
    return found


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every pipeline `eval` loads, in order (the real loader, counted)."""
    real = devices.load_pipeline
    models: list[str] = []

    def counting(model: str, **kwargs: Any) -> Any:
        models.append(model)
        return real(model, **kwargs)

    monkeypatch.setattr(devices, "load_pipeline", counting)
    return models


@pytest.fixture()
def no_clip(monkeypatch: pytest.MonkeyPatch) -> str:
    """A default CLIP model that is certainly not in this machine's hub cache (HF_HUB_OFFLINE is on)."""
    missing = "crossinit-tests/clip-that-is-not-cached"
    monkeypatch.setattr(prompt_fidelity, "DEFAULT_CLIP_MODEL", missing)
    return missing


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# two of the defaults\na photo of {}\n\nan oil painting of {}\n", encoding="utf-8")
    return path


# ---- the engine on real photos ------------------------------------------------------------------


def test_same_person_scores_clearly_higher_than_a_different_person(references: list[np.ndarray]) -> None:
    photo = faces.load_photo(DATA / "astronaut.png")
    mirrored = likeness.match_face(references, ImageOps.mirror(photo))
    rescaled = likeness.match_face(references, photo.resize((300, 300), Image.Resampling.LANCZOS))
    other = likeness.match_face(references, faces.load_photo(DATA / "grace_hopper.jpg"))
    assert mirrored is not None and rescaled is not None and other is not None
    for same in (mirrored, rescaled):
        assert same.cosine > other.cosine + 0.05
        assert same.distance < likeness.SAME_PERSON_DISTANCE < other.distance
        assert same.distance < other.distance - 0.25


def test_an_image_without_a_face_counts_as_no_face(references: list[np.ndarray]) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    assert likeness.match_face(references, noise) is None
    assert likeness.match_face(references, Image.new("RGB", (256, 256), "grey")) is None
    summary = likeness.identity_summary([None, likeness.FaceMatch(cosine=0.9, distance=0.3), None, None])
    assert summary["images"] == 4 and summary["faces"] == 1 and summary["face_rate"] == 0.25
    assert summary["cosine"] == 0.9 and summary["distance"] == 0.3 and summary["match_rate"] == 0.25
    nothing = likeness.identity_summary([None, None])
    assert nothing["face_rate"] == 0 and nothing["cosine"] is None and nothing["match_rate"] == 0


def test_prompt_templates_and_the_text_clip_scores() -> None:
    assert prompt_fidelity.clip_text("a photo of {} on the beach") == "a photo of on the beach"
    assert prompt_fidelity.clip_text("{}, oil painting") == "oil painting"
    assert prompt_fidelity.fill("a photo of {} smiling", "Alice") == "a photo of <Alice> smiling"
    assert prompt_fidelity.read_prompts("# c\n\n {} in the snow \nwearing a hat\n") == [
        "{} in the snow",
        "a photo of a {} person, wearing a hat",
    ]
    assert (
        all("{}" in t for t in prompt_fidelity.DEFAULT_PROMPTS)
        and prompt_fidelity.DEFAULT_PROMPTS[0] == "a photo of a {} person"
    )
    # The official inference prompt says "person" (as training's "face of {} person" does): every default does.
    assert all(" {} person" in t for t in prompt_fidelity.DEFAULT_PROMPTS)
    with pytest.raises(CrossinitError, match="no prompts"):
        prompt_fidelity.read_prompts("# only a comment\n")
    with pytest.raises(CrossinitError, match="<bob>"):
        prompt_fidelity.check_templates(["{} and <bob>"])


# ---- the command --------------------------------------------------------------------------------


def test_eval_stores_metrics_and_reports_identity_alone_without_clip(
    cli, library: Library, tiny_model: Path, no_clip: str, loads: list[str]
) -> None:
    learned = cli("learn", DATA / "astronaut.png", "--name", "Astro", "--fast", "--steps", "2", "--model", tiny_model)
    assert learned.exit_code == 0, learned.stderr
    loads.clear()
    result = cli("eval", "astro", *FAST, "--seed", "5", "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)  # stdout is exactly one JSON document
    notice = result.stderr.strip().splitlines()
    assert len(notice) == 1 and no_clip in notice[0] and "identity similarity is reported alone" in notice[0]
    assert loads == [str(tiny_model)]

    assert record["name"] == "Astro"
    ident, fidelity = record["identity"], record["fidelity"]
    assert ident["available"] is True and ident["metric"] == likeness.FACE_METRIC
    assert ident["reference_crops"] == 1 and ident["images"] == len(prompt_fidelity.DEFAULT_PROMPTS)
    assert 0 <= ident["face_rate"] <= 1 and ident["faces"] <= ident["images"]
    assert fidelity == {"available": False, "model": no_clip, "reason": fidelity["reason"]}
    assert [p["prompt"] for p in record["prompts"]] == list(prompt_fidelity.DEFAULT_PROMPTS)
    assert record["prompts"][7]["clip_text"] == "a photo of a person on the beach"
    settings = record["settings"]
    assert settings["prompts"] == list(prompt_fidelity.DEFAULT_PROMPTS)
    assert (settings["n"], settings["seed"], settings["steps"]) == (1, 5, 2)
    assert settings["model"] == str(tiny_model) and settings["clip_model"] == no_clip and record["date"]

    # Stored with the identity, shown by `show` and `list --json`.
    stored = library.get("astro").evaluation
    assert stored["settings"]["seed"] == 5 and stored["identity"]["images"] == ident["images"]
    assert stored["contact_sheet"] == "eval/contact-sheet.png"
    shown = json.loads(cli("show", "astro", "--json").stdout)
    assert shown["evaluation"]["identity"]["face_rate"] == ident["face_rate"]
    listed = json.loads(cli("list", "--json").stdout)
    assert listed[0]["evaluation"]["settings"]["n"] == 1

    sheet = Path(record["contact_sheet"])
    assert sheet == library.path_of("astro") / "eval" / "contact-sheet.png"
    with Image.open(sheet) as image:
        # One column (n = 1, one crop), a row for the crops and one per prompt, each under a label band.
        assert image.width == 64 and image.height == (len(prompt_fidelity.DEFAULT_PROMPTS) + 1) * (64 + 12)
    assert not [p for p in sheet.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_compare_with_a_local_clip_gives_finite_fidelity_for_both(
    cli,
    library: Library,
    tiny_model: Path,
    tiny_clip: Path,
    astronaut_crop: Image.Image,
    prompts_file: Path,
    loads: list[str],
    add_identity,
) -> None:
    add_identity("fast", seed=1, scale=5, init=True, crops=[astronaut_crop], base_model=str(tiny_model))
    crops = [astronaut_crop, ImageOps.mirror(astronaut_crop)]
    add_identity("full", seed=2, scale=5, init=True, crops=crops, base_model=str(tiny_model))
    args = ("eval", "fast", "full", "--compare", "--prompts", prompts_file, "--clip-model", tiny_clip, *FAST)
    result = cli(*args, "-n", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == ["fast", "full"]
    assert loads == [str(tiny_model)]  # one pipeline for both identities and every prompt
    for record in records:
        score = record["fidelity"]["clip_score"]
        assert record["fidelity"]["available"] is True and record["fidelity"]["model"] == str(tiny_clip)
        assert isinstance(score, float) and math.isfinite(score) and -1.0 <= score <= 1.0
        assert [p["prompt"] for p in record["prompts"]] == ["a photo of {}", "an oil painting of {}"]
        assert all(p["images"] == 2 and -1.0 <= p["clip_score"] <= 1.0 for p in record["prompts"])
        assert record["identity"]["images"] == 4
        assert library.get(record["name"]).evaluation["fidelity"]["clip_score"] == score
    assert records[1]["identity"]["reference_crops"] == 2


def test_identity_without_crops_is_reported_without_identity_metric(
    cli, library: Library, tiny_model: Path, tiny_clip: Path, prompts_file: Path, add_identity
) -> None:
    add_identity("imported", seed=0, scale=5, base_model=str(tiny_model))
    result = cli("eval", "imported", "--prompts", prompts_file, "--clip-model", tiny_clip, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "has no stored face crops" in result.stderr
    assert "<imported>" in result.stdout and "oil painting" in result.stdout and "all" in result.stdout
    stored = library.get("imported").evaluation
    assert stored["identity"]["available"] is False and "no stored face crops" in stored["identity"]["reason"]
    assert -1.0 <= stored["fidelity"]["clip_score"] <= 1.0
    assert (library.path_of("imported") / "eval" / "contact-sheet.png").is_file()


def test_identities_of_different_base_models_load_one_pipeline_each(
    cli,
    library: Library,
    tiny_model: Path,
    tmp_path: Path,
    prompts_file: Path,
    tiny_clip: Path,
    loads: list[str],
    add_identity,
) -> None:
    other = tmp_path / "same-weights-other-name"
    other.symlink_to(tiny_model, target_is_directory=True)
    add_identity("a", seed=1, scale=5, base_model=str(tiny_model))
    add_identity("b", seed=2, scale=5, base_model=str(other))
    add_identity("c", seed=3, scale=5, base_model=str(tiny_model))
    result = cli("eval", "a", "b", "c", "--compare", "--prompts", prompts_file, "--clip-model", tiny_clip, *FAST)
    assert result.exit_code == 0, result.stderr
    assert sorted(loads) == sorted([str(tiny_model), str(other)])
    assert [library.get(n).evaluation["settings"]["model"] for n in "abc"] == [
        str(tiny_model),
        str(other),
        str(tiny_model),
    ]
    # The side-by-side table: one column per identity, the summary rows and one row per prompt.
    for text in ("<a>", "<b>", "<c>", "cosine", "fidelity", "oil painting"):
        assert text in result.stdout
    assert "contact sheet of b" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "nobody"), "no identity named 'nobody'"),
        (("eval", "alice", "alice", "--compare"), "named twice"),
        (("eval", "alice", "--prompts", "/no/such/prompts.txt"), "cannot read prompts"),
    ],
)
def test_mistakes_are_one_line_and_exit_1_before_any_model_loads(
    cli, library: Library, tiny_model: Path, loads: list[str], args: tuple[str, ...], message: str, add_identity
) -> None:
    add_identity("alice", seed=0, scale=5, base_model=str(tiny_model))
    result = cli(*args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and loads == []
    assert library.get("alice").evaluation == {}


def test_a_prompt_naming_another_identity_is_refused(
    cli, library: Library, tiny_model: Path, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", seed=0, scale=5, base_model=str(tiny_model))
    bad = tmp_path / "bad.txt"
    bad.write_text("{} and <bob> at the beach\n", encoding="utf-8")
    result = cli("eval", "alice", "--prompts", bad)
    assert result.exit_code == 1 and "<bob>" in result.stderr


def test_an_evaluation_is_not_stored_on_an_identity_relearned_meanwhile(
    library: Library, tiny_model: Path, add_identity
) -> None:
    add_identity("alice", seed=0, scale=5, base_model=str(tiny_model))
    stale = Evaluation(name="alice", settings={}, crops=[], prompts=[], identity_created="2000-01-01T00:00:00")
    with pytest.raises(CrossinitError, match="replaced while it was being evaluated"):
        engine.save(library, stale)
    assert library.get("alice").evaluation == {}
    assert not (library.path_of("alice") / "eval").exists()


def test_a_model_of_another_family_is_refused_naming_where_it_came_from(
    cli, library: Library, tiny_model: Path, tiny_sdxl: Path, prompts_file: Path, no_clip: str
) -> None:
    from crossinit_cli.store import Identity

    rng = np.random.default_rng(0)
    parts = {"clip_l": rng.standard_normal((2, 32)), "clip_g": rng.standard_normal((2, 64))}
    library.add(Identity(name="xl", tokens=2, width=32, family="sdxl", base_model=str(tiny_sdxl)), parts)
    assert cli("config", "set", "model", tiny_model).exit_code == 0
    configured = cli("eval", "xl", "--prompts", prompts_file, *FAST)
    assert configured.exit_code == 1 and len(configured.stderr.strip().splitlines()) == 1, configured.stderr
    assert "the model comes from your config (`crossinit config set model ...`" in configured.stderr
    assert "pass --model to override" in configured.stderr
    flag = cli("eval", "xl", "--model", tiny_model, "--prompts", prompts_file, *FAST)
    assert flag.exit_code == 1 and "the model comes from --model" in flag.stderr


def test_crops_too_small_to_measure_say_so_and_exit_1_and_pick_best_checks_before_generating(
    cli, library: Library, tiny_model: Path, astronaut_crop: Image.Image, prompts_file: Path, no_clip: str, loads
) -> None:
    tiny = astronaut_crop.resize((24, 24))  # an aligned face, far too small for the detector
    assert not engine.reference_descriptors([tiny])
    training = {"mode": "full", "steps": 4, "aligned": True}
    from crossinit_cli.store import Identity

    rows = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    library.add(Identity(name="small", tokens=2, width=32, base_model=str(tiny_model), training=training), rows,
                crops=[tiny])  # fmt: skip
    result = cli("eval", "small", "--prompts", prompts_file, *FAST, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)[0]["name"] == "small"  # the report is still printed
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: nothing could be measured: the face detector finds no face in the 1 stored crop")
    assert "24x24 px the face is too small" in last and "--no-align" not in result.stderr

    loads.clear()
    library.modify("small", lambda ident: setattr(ident, "snapshots", [{"step": 2, "loss": 0.1}]))
    best = cli("eval", "small", "--pick-best", "--prompts", prompts_file, *FAST)
    assert best.exit_code == 1 and len(best.stderr.strip().splitlines()) == 1, best.stderr
    assert "too small" in best.stderr and "--pick-best has nothing to pick on" in best.stderr
    assert loads == []  # refused before any model was loaded or any image generated
