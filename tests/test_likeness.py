"""Calibrated likeness, multi-identity assignment and `eval --fail-below`, on real photos.

The tiny test model draws noise, so the scoring is exercised two ways: the functions on crops of the real
test photos (Eileen Collins, astronaut.png; Grace Hopper, grace_hopper.jpg) standing in for generated
images, and the whole `eval` command with the pipeline's sampler swapped for one returning such photos
(everything else, the library, dlib, the records and the exit codes, is the real code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from crossinit_cli import faces, fidelity, likeness, sample
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library

DATA = Path(__file__).parent / "data"
FAST = ("--steps", "1", "-n", "2", "--quiet")
KEYS = {"identity_similarity", "reference_similarity", "likeness", "same_person_rate", "face_rate", "prompt_fidelity"}


@pytest.fixture(scope="module")
def astro() -> Image.Image:
    return faces.align_face(DATA / "astronaut.png").image


@pytest.fixture(scope="module")
def grace() -> Image.Image:
    return faces.align_face(DATA / "grace_hopper.jpg").image


def _pair(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two faces side by side in one picture, as a prompt naming two identities should draw them."""
    both = Image.new("RGB", (1024, 512), "white")
    both.paste(left.resize((512, 512)), (0, 0))
    both.paste(right.resize((512, 512)), (512, 0))
    return both


def _add(library: Library, name: str, model: Path, crops: list[Image.Image], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    learned = rng.standard_normal((2, 32)).astype(np.float32)
    library.add(Identity(name=name, tokens=2, width=32, base_model=str(model)), learned, learned * 0.9, crops=crops)


# ---- the numbers on real photos -----------------------------------------------------------------


def test_similarity_reads_dlibs_threshold_as_one_half() -> None:
    assert likeness.similarity(0.0) == 1.0 and likeness.similarity(likeness.SAME_PERSON_DISTANCE) == 0.5
    assert likeness.similarity(2.0) == 0.0 and likeness.THRESHOLD_SIMILARITY == 0.5


def test_the_ceiling_comes_from_pairs_of_photos_or_from_the_threshold(astro: Image.Image) -> None:
    one = likeness.reference_of(likeness.reference_descriptors([astro]))
    assert one.from_threshold and (one.similarity, one.photos, one.pairs) == (0.5, 1, 0)
    assert one.record()["kind"] == "threshold"
    # Three pictures of one face: three pairs, all far closer than the threshold.
    small = astro.resize((200, 200), Image.Resampling.LANCZOS)
    three = likeness.reference_of(likeness.reference_descriptors([astro, ImageOps.mirror(astro), small]))
    assert (three.photos, three.pairs) == (3, 3) and not three.from_threshold
    assert 0.75 < three.similarity <= 1.0


def test_likeness_of_the_same_face_beats_a_stranger_against_the_same_ceiling(
    astro: Image.Image, grace: Image.Image
) -> None:
    refs = likeness.reference_descriptors([astro, ImageOps.mirror(astro)])
    ceiling = likeness.reference_of(refs)
    same = [likeness.match_face(refs, astro.resize((300, 300))), likeness.match_face(refs, ImageOps.mirror(astro))]
    stranger = [likeness.match_face(refs, grace)]
    mine, theirs = likeness.likeness_of(same, ceiling), likeness.likeness_of(stranger, ceiling)
    assert mine["likeness"] > 0.85 and theirs["likeness"] < 0.6  # Grace Hopper is not Eileen Collins
    assert mine["same_person_rate"] == 1.0 and theirs["same_person_rate"] == 0.0
    assert mine["likeness"] == pytest.approx(mine["identity_similarity"] / mine["reference_similarity"], abs=1e-3)
    # No face at all: likeness 0, similarity unknown, face rate 0.
    blank = likeness.likeness_of([None, None], ceiling)
    assert blank == {
        "identity_similarity": None,
        "reference_similarity": round(ceiling.similarity, 4),
        "likeness": 0.0,
        "same_person_rate": None,
        "face_rate": 0.0,
    }
    # Half the images without a face: the face rate says so, the likeness is over the faces found.
    half = likeness.likeness_of([same[0], None], ceiling)
    assert half["face_rate"] == 0.5 and half["likeness"] == likeness.likeness_of([same[0]], ceiling)["likeness"]


def test_faces_of_a_two_person_image_go_to_the_right_identities(astro: Image.Image, grace: Image.Image) -> None:
    refs = [likeness.reference_descriptors([astro]), likeness.reference_descriptors([grace])]
    found = faces.face_descriptors(_pair(grace, astro))  # Grace on the left this time
    assert len(found) == 2
    to_astro, to_grace = likeness.assign_faces(found, refs)
    assert to_astro is not None and to_grace is not None
    assert to_astro.same_person and to_grace.same_person and not (to_astro.crossover or to_grace.crossover)
    # Two Eileens in a picture meant to show Eileen and Grace: one face must go to Grace, and it is a crossover.
    twins = likeness.assign_faces(faces.face_descriptors(_pair(astro, ImageOps.mirror(astro))), refs)
    assert twins[0] is not None and not twins[0].crossover and twins[0].same_person
    assert twins[1] is not None and twins[1].crossover and not twins[1].same_person
    # One face for two identities: the identity it resembles gets it, the other none.
    alone = likeness.assign_faces(faces.face_descriptors(grace), refs)
    assert alone[0] is None and alone[1] is not None and alone[1].same_person
    assert likeness.assign_faces([], refs) == [None, None]


def test_templates_name_one_identity_with_braces_or_several_by_name() -> None:
    assert fidelity.check_templates(["<a> and <b> at a cafe"]) == ["<a> and <b> at a cafe"]
    assert fidelity.group_names("<a> and <B> at a cafe") == ["a", "B"] and fidelity.group_names("a photo of {}") == []
    assert fidelity.clip_text("a photo of <a> and <b> at a cafe") == "a photo of and at a cafe"
    with pytest.raises(CrossinitError, match="beside"):
        fidelity.check_templates(["{} and <bob>"])
    with pytest.raises(CrossinitError, match="for <bob> alone write"):
        fidelity.check_templates(["a photo of <bob>"])


# ---- the command --------------------------------------------------------------------------------


@pytest.fixture()
def drawn(monkeypatch: pytest.MonkeyPatch, astro: Image.Image, grace: Image.Image) -> list[str]:
    """`eval`'s sampler returns real photos: Eileen for prompts naming astro, Grace for grace, both for
    a prompt naming both (each image a fresh copy), nothing but noise otherwise. Returns the prompts."""
    prompts: list[str] = []

    def draw(pipe: Any, prompt: str, seeds: list[int], settings: Any) -> list[Image.Image]:
        prompts.append(prompt)
        astro_tokens, grace_tokens = "<crossinit:astro:0>" in prompt, "<crossinit:grace:0>" in prompt
        if astro_tokens and grace_tokens:
            picture = _pair(astro, grace)
        elif astro_tokens:
            picture = astro
        elif grace_tokens:
            picture = grace
        else:
            picture = Image.new("RGB", (64, 64), "grey")
        return [picture.copy() for _ in seeds]

    monkeypatch.setattr(sample, "sample", draw)
    return prompts


def test_eval_json_has_the_calibrated_keys_and_the_table_says_it_in_words(
    cli, library: Library, tiny_model: Path, astro: Image.Image, tmp_path: Path, drawn: list[str]
) -> None:
    _add(library, "astro", tiny_model, [astro])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {} person\nan oil painting of a {} person\n", encoding="utf-8")
    result = cli("eval", "astro", "--prompts", prompts, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert set(record) >= KEYS
    assert record["likeness"] > 1.0  # its own photo, against dlib's threshold (one photo: no pair to measure)
    assert record["reference_similarity"] == 0.5 and record["identity"]["reference"]["kind"] == "threshold"
    assert record["same_person_rate"] == 1.0 and record["face_rate"] == 1.0 and record["prompt_fidelity"] is None
    assert record["crossover"] is None  # no prompt named two identities
    stored = library.get("astro").evaluation
    assert stored["likeness"] == record["likeness"]  # top level of the stored record: `list --sort likeness`
    assert "prompt_fidelity" not in stored  # null is not stored (TOML has none)

    table = cli("eval", "astro", "--prompts", prompts, *FAST)
    assert table.exit_code == 0, table.stderr
    words = " ".join(table.stdout.split())
    assert "looks like astro in 4 of 4 images" in words and "dlib's same-person threshold" in words
    assert "only one photo" in words


def test_eval_of_noise_says_no_face_and_likeness_zero(
    cli, library: Library, tiny_model: Path, astro: Image.Image, grace: Image.Image, drawn: list[str]
) -> None:
    _add(library, "plain", tiny_model, [astro, grace])  # two photos: a ceiling from their one pair
    result = cli("eval", "plain", *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["likeness"] == 0.0 and record["face_rate"] == 0.0 and record["identity_similarity"] is None
    assert record["identity"]["reference"] == {
        "similarity": record["reference_similarity"],
        "photos": 2,
        "pairs": 1,
        "kind": "photo pairs",
    }
    words = " ".join(cli("eval", "plain", *FAST).stdout.split())
    assert "no face found in any of the 18 images" in words and "likeness 0" in words


def test_a_prompt_naming_two_identities_assigns_faces_and_counts_crossovers(
    cli, library: Library, tiny_model: Path, astro: Image.Image, grace: Image.Image, tmp_path: Path, drawn: list[str]
) -> None:
    _add(library, "astro", tiny_model, [astro], seed=1)
    _add(library, "grace", tiny_model, [grace], seed=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {} person\n<astro> and <grace> having coffee\n", encoding="utf-8")
    result = cli("eval", "astro", "grace", "--prompts", prompts, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    # The two-identity prompt is drawn once for both (2 seeds), the {} prompt once per identity.
    assert len(drawn) == 3
    records = {r["name"]: r for r in json.loads(result.stdout)}
    for name in ("astro", "grace"):
        record = records[name]
        together = record["prompts"][1]
        assert together["prompt"] == "<astro> and <grace> having coffee"
        assert together["identities"] == ["astro", "grace"] and together["crossover"] == 0
        assert together["faces"] == 2 and together["same_person"] == 2
        assert record["crossover"] == 0 and record["same_person_rate"] == 1.0
        assert library.get(name).evaluation["likeness"] == record["likeness"]


def test_crossover_counts_a_face_that_belongs_to_the_other_identity(
    cli,
    library: Library,
    tiny_model: Path,
    astro: Image.Image,
    grace: Image.Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model draws Eileen twice where the prompt asks for Eileen and Grace.
    twins = _pair(astro, ImageOps.mirror(astro))
    monkeypatch.setattr(sample, "sample", lambda pipe, prompt, seeds, settings: [twins.copy() for _ in seeds])
    _add(library, "astro", tiny_model, [astro], seed=1)
    _add(library, "grace", tiny_model, [grace], seed=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("<astro> and <grace> having coffee\n", encoding="utf-8")
    result = cli("eval", "astro", "grace", "--prompts", prompts, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["astro"]["crossover"] == 0 and records["astro"]["same_person_rate"] == 1.0
    assert records["grace"]["crossover"] == 2 and records["grace"]["same_person_rate"] == 0.0
    assert records["grace"]["likeness"] < records["astro"]["likeness"]
    words = " ".join(cli("eval", "astro", "grace", "--prompts", prompts, *FAST).stdout.split())
    assert "2 face(s) in pictures with other identities look more like one of them than like grace" in words


def test_a_two_identity_prompt_must_name_only_identities_being_evaluated(
    cli, library: Library, tiny_model: Path, astro: Image.Image, tmp_path: Path
) -> None:
    _add(library, "astro", tiny_model, [astro])
    prompts = tmp_path / "p.txt"
    prompts.write_text("<astro> and <carol> at the beach\n", encoding="utf-8")
    result = cli("eval", "astro", "--prompts", prompts, *FAST)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "<carol>" in result.stderr


def test_fail_below_exits_3_naming_the_identity(
    cli, library: Library, tiny_model: Path, astro: Image.Image, drawn: list[str]
) -> None:
    _add(library, "astro", tiny_model, [astro])
    _add(library, "plain", tiny_model, [astro], seed=3)  # its prompts draw noise: likeness 0
    passed = cli("eval", "astro", *FAST, "--fail-below", "0.9")
    assert passed.exit_code == 0, passed.stderr
    failed = cli("eval", "astro", "plain", *FAST, "--fail-below", "0.9", "--json")
    assert failed.exit_code == 3
    assert {r["name"] for r in json.loads(failed.stdout)} == {"astro", "plain"}  # the report is still printed
    assert failed.stderr.strip().splitlines()[-1] == "error: likeness of <plain> is 0.00, below --fail-below 0.9"
    assert library.get("plain").evaluation["likeness"] == 0.0  # and still stored
    # Unmeasurable (no crops) cannot pass a gate; a negative threshold is a usage mistake.
    library.add(Identity(name="bare", tokens=2, width=32, base_model=str(tiny_model)), np.ones((2, 32), np.float32))
    bare = cli("eval", "bare", *FAST, "--fail-below", "0.1")
    assert bare.exit_code == 3 and "could not be measured" in bare.stderr
    negative = cli("eval", "astro", *FAST, "--fail-below", "-1")
    assert negative.exit_code == 1 and "--fail-below must be" in negative.stderr


def test_compare_shows_a_two_identity_prompt_only_for_those_it_names(
    cli, library: Library, tiny_model: Path, astro: Image.Image, grace: Image.Image, tmp_path: Path, drawn: list[str]
) -> None:
    _add(library, "astro", tiny_model, [astro], seed=1)
    _add(library, "grace", tiny_model, [grace], seed=2)
    _add(library, "third", tiny_model, [grace], seed=3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {} person\n<astro> and <grace> having coffee\n", encoding="utf-8")
    result = cli("eval", "astro", "grace", "third", "--compare", "--prompts", prompts, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "coffee" in result.stdout and "—" in result.stdout  # third's cell of the two-identity prompt
    records = {r["name"]: r for r in json.loads(cli("eval", "astro", "grace", "third", "--prompts", prompts, *FAST,
                                                    "--json").stdout)}  # fmt: skip
    assert [len(records[n]["prompts"]) for n in ("astro", "grace", "third")] == [2, 2, 1]
