"""`crossinit learn` end to end on the tiny model: photos in, a library entry out, and nothing on failure."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
GRACE = DATA / "grace_hopper.jpg"
OFFICIAL_BIN = DATA / "official" / "28017.bin"
CHEAP = ("--steps", "2", "--batch-size", "2")


@pytest.fixture(params=["sd2", "sd1"])
def tiny_model(request: pytest.FixtureRequest, tiny_model: Path, tiny_sd1: Path) -> Path:
    """Every test here runs on the tiny SD 2.x model and on the tiny SD 1.x one (SD 1.x is first-class)."""
    return tiny_model if request.param == "sd2" else tiny_sd1


def _files(home: Path) -> dict[str, bytes]:
    """Every file of the library's entries, by relative path (to prove nothing changed)."""
    root = home / "identities"
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_learn_finds_each_face_once_and_hashes_the_token_table_once(
    cli, library: Library, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model trains at 64 px: its crop is cut again from the landmarks found at 512 px, and the
    table's fingerprint (the identity's and the cross init cache's key) is computed once."""
    from crossinit_cli import crossinit, faces

    detections: list[int] = []
    prints: list[str] = []
    find, fingerprint = faces._find_faces, crossinit.encoder_fingerprint
    monkeypatch.setattr(faces, "_find_faces", lambda pixels: (detections.append(1), find(pixels))[1])

    def counted(encoder: object) -> str:
        prints.append(fingerprint(encoder))
        return prints[-1]

    monkeypatch.setattr(crossinit, "encoder_fingerprint", counted)
    result = cli("learn", ASTRONAUT, *CHEAP, "--model", tiny_model)
    assert result.exit_code == 0, result.stderr
    assert len(detections) == 1 and len(prints) == 1
    assert library.get("astronaut").encoder_fingerprint == prints[0]
    (crop,) = library.crops("astronaut")
    with Image.open(crop) as stored:
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(faces.align_face(ASTRONAUT, 64).image))


def test_learn_fast_stores_a_complete_entry(cli, library: Library, tiny_model: Path, tiny_sd1: Path) -> None:
    # --fast's own batch of 8 is checked in test_train; batch 1 keeps this run short on a small CPU.
    result = cli("learn", ASTRONAUT, "--fast", "--batch-size", "1", "--model", tiny_model, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["name"] == "astronaut" and record["token"] == "<astronaut>"
    assert (record["tokens"], record["width"]) == (2, 32)
    assert record["family"] == ("sd1" if tiny_model == tiny_sd1 else "sd2") and record["widths"] == [32]
    training = record["training"]
    assert training["mode"] == "fast" and training["steps"] == 25 and training["batch_size"] == 1
    # --batch-size without --lr scales the rate as the official --scale_lr does: 0.000625 x 1.
    assert training["lr"] == 0.000625 and training["reg_weight"] == 1e-5 and training["seed"] == 0
    assert training["photos"] == ["astronaut.png"] and training["resolution"] == 64
    assert training["device"] == "cpu" and training["dtype"] == "fp32"
    assert training["per_step_s"] > 0 and training["total_s"] > 0 and np.isfinite(training["final_loss"])
    assert record["base_model"] == str(tiny_model) and len(record["encoder_fingerprint"]) == 16

    vectors = library.vectors("astronaut")
    assert vectors.learned.shape == vectors.init.shape == (2, 32)
    assert not np.allclose(vectors.learned, vectors.init)  # it trained
    (crop,) = library.crops("astronaut")
    with Image.open(crop) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert record["crops"] == [str(crop)]

    # Human output on stderr: plain progress lines (not a terminal), where it went, what to do next.
    assert "step 25/25" in result.stderr and "loss" in result.stderr
    assert str(library.path_of("astronaut")) in result.stderr
    assert 'next: crossinit generate "a photo of a <astronaut> person as an astronaut"' in result.stderr


def test_same_seed_same_identity(cli, library: Library, tiny_model: Path) -> None:
    for name, seed in (("one", "7"), ("two", "7"), ("three", "8")):
        result = cli("learn", ASTRONAUT, "--name", name, "--seed", seed, "--model", tiny_model, *CHEAP, "--quiet")
        assert result.exit_code == 0, result.stderr
        # --quiet: no progress and no hints, only the result: where the identity is stored.
        assert result.stderr.startswith(f"learned {name} in ") and result.stderr.count("\n") == 1
        assert result.stderr.rstrip().endswith(f"stored in {library.path_of(name)}")
    one, two, three = (library.vectors(n).learned for n in ("one", "two", "three"))
    assert np.array_equal(one, two)
    assert not np.allclose(one, three)
    assert library.get("two").training["seed"] == 7


def test_a_second_person_and_a_folder(cli, library: Library, tiny_model: Path, tmp_path: Path) -> None:
    assert cli("learn", ASTRONAUT, "--model", tiny_model, *CHEAP).exit_code == 0
    grace = cli("learn", GRACE, "--model", tiny_model, *CHEAP)
    assert grace.exit_code == 0, grace.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert [r["name"] for r in listed] == ["astronaut", "grace_hopper"]
    assert not np.allclose(library.vectors("astronaut").learned, library.vectors("grace_hopper").learned)

    folder = tmp_path / "both"
    folder.mkdir()
    for photo in (ASTRONAUT, GRACE):
        (folder / photo.name).write_bytes(photo.read_bytes())
    both = cli("learn", folder, "--model", tiny_model, *CHEAP)
    assert both.exit_code == 0, both.stderr
    assert library.get("both").training["photos"] == ["astronaut.png", "grace_hopper.jpg"]
    assert len(library.crops("both")) == 2


def test_existing_name_is_refused_before_the_model_loads(cli, library: Library, tiny_model: Path, home: Path) -> None:
    assert cli("learn", ASTRONAUT, "--model", tiny_model, *CHEAP).exit_code == 0
    before = _files(home)
    # A missing model would fail later with another message: the name is checked first.
    again = cli("learn", ASTRONAUT, "--model", home / "no-such-model")
    assert again.exit_code == 1 and again.stderr.count("\n") == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert _files(home) == before
    forced = cli("learn", ASTRONAUT, "--model", tiny_model, "--force", "--steps", "1", "--batch-size", "1")
    assert forced.exit_code == 0, forced.stderr
    assert library.get("astronaut").training["steps"] == 1


def test_no_align_takes_the_photo_as_it_is(cli, library: Library, tiny_model: Path, tmp_path: Path) -> None:
    plain = tmp_path / "wall.png"
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(plain)
    refused = cli("learn", plain, "--model", tiny_model, *CHEAP)
    assert refused.exit_code == 1 and "no face" in refused.stderr and "--no-align" in refused.stderr
    taken = cli("learn", plain, "--model", tiny_model, "--no-align", *CHEAP)
    assert taken.exit_code == 0, taken.stderr
    assert library.get("wall").training["aligned"] is False


def _bomb(path: Path) -> None:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP) with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


BAD_PHOTOS = {
    "no_face.png": lambda p: Image.fromarray(
        np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[:, None, None], (1, 256, 3))
    ).save(p),
    "truncated.jpg": lambda p: p.write_bytes(GRACE.read_bytes()[: GRACE.stat().st_size // 3]),
    "empty.jpg": lambda p: p.write_bytes(b""),
    "notes.jpg": lambda p: p.write_text("this is a text file, not a photo\n"),
    "dot.png": lambda p: Image.new("RGB", (1, 1), "white").save(p),
    "bomb.png": _bomb,
}


@pytest.mark.parametrize("filename", sorted(BAD_PHOTOS))
def test_bad_photo_is_one_line_and_writes_nothing(
    cli, home: Path, tiny_model: Path, tmp_path: Path, filename: str
) -> None:
    photo = tmp_path / filename
    BAD_PHOTOS[filename](photo)
    result = cli("learn", photo, "--model", tiny_model, "--fast")
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert filename in result.stderr  # the message names the file
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _files(home) == {} and not (home / ".cache").exists()


def test_missing_model_is_one_line(cli, home: Path, tmp_path: Path) -> None:
    result = cli("learn", ASTRONAUT, "--model", tmp_path / "models" / "sd21")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no such file or folder" in result.stderr and _files(home) == {}


def test_ctrl_c_mid_training_leaves_the_library_as_it_was(cli, home: Path, tiny_model: Path) -> None:
    assert cli("learn", ASTRONAUT, "--name", "keep", "--model", tiny_model, *CHEAP).exit_code == 0
    before = _files(home)
    command = [
        sys.executable,
        "-m",
        "crossinit_cli",
        "learn",
        str(GRACE),
        "--name",
        "keep",
        "--force",
        "--model",
        str(tiny_model),
        "--steps",
        "5000",
        "--batch-size",
        "1",
    ]
    env = {**os.environ, "CROSSINIT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        seen = []
        while time.monotonic() < deadline:  # wait until training is under way
            line = process.stderr.readline()
            seen.append(line)
            if line.startswith("step 1/5000") or not line:
                break
        assert seen[-1].startswith("step 1/5000"), seen
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert _files(home) == before  # the old "keep" is intact; nothing new, nothing half-written
    assert not any((home / ".staging").glob("*"))


def test_an_empty_name_is_refused_never_replaced_by_the_file_stem(cli, library: Library, tmp_path: Path) -> None:
    """`--name ''` is a mistake (an unset shell variable), not a request for the default name."""
    learned = cli("learn", ASTRONAUT, "--name", "", *CHEAP)
    assert learned.exit_code == 1 and learned.stderr.strip() == "error: identity name is empty"
    imported = cli("import", OFFICIAL_BIN, "--name", "")
    assert imported.exit_code == 1 and imported.stderr.strip() == "error: identity name is empty"
    manifest = tmp_path / "people.csv"
    manifest.write_text(f"name,photos\n,{ASTRONAUT}\n", encoding="utf-8")
    batch = cli("learn", "--batch", manifest)
    assert batch.exit_code == 1 and batch.stderr.count("\n") == 1 and "identity name is empty" in batch.stderr
    assert library.list() == [] and not library.exists("astronaut") and not library.exists("28017")


def test_out_of_memory_advice_keeps_the_learning_rate_per_image(
    cli, library: Library, home: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU that runs out of memory, the advice offers a micro-batch first (the same result), then halves
    the batch, doubles the steps and says the rate follows (the official --scale_lr); nothing is stored and
    no unfinished run is left behind."""
    import torch

    from crossinit_cli import objective

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(objective, "regulariser", out_of_memory)
    result = cli("learn", ASTRONAUT, "--model", tiny_model, "--steps", "6", "--batch-size", "8", "--quiet")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert (
        "at batch size 8 and 64 px; try --micro-batch 4 (same result), --batch-size 4 --steps 12 (same rate per "
        "image)" in result.stderr
    )
    own = cli("learn", ASTRONAUT, "--model", tiny_model, "--steps", "6", "--batch-size", "8", "--lr", "0.002")
    assert "try --micro-batch 4 (same result), --batch-size 4 --steps 12 --lr 0.001 (same rate per" in own.stderr
    assert library.list() == [] and not any((home / ".unfinished").glob("*"))


def _mixed_folder(tmp_path: Path) -> Path:
    """Eileen Collins (the astronaut photo, and its mirror image), Grace Hopper, and a note."""
    from PIL import ImageOps

    folder = tmp_path / "mix"
    folder.mkdir()
    Image.open(ASTRONAUT).convert("RGB").save(folder / "eileen.png")
    ImageOps.mirror(Image.open(ASTRONAUT).convert("RGB")).save(folder / "eileen-flipped.png")
    Image.open(GRACE).convert("RGB").save(folder / "grace.jpg")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_learn_warns_about_a_photo_of_someone_else_and_says_what_it_used(
    cli, library: Library, tmp_path: Path, tiny_sd1: Path
) -> None:
    folder = _mixed_folder(tmp_path)
    result = cli("learn", folder, "--name", "mix", "--model", tiny_sd1, *CHEAP)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert f"using 3 photos: {folder / 'eileen-flipped.png'}, {folder / 'eileen.png'}, {folder / 'grace.jpg'}" in lines
    assert f"skipped 1 file: {folder / 'notes.txt'} (not a photo: .txt)" in lines
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert warning.startswith(f"warning: {folder / 'grace.jpg'} does not look like the other photos (median face ")
    assert "distance 0.6" in warning or "distance 0.7" in warning  # measured 0.69
    assert "under 0.6" in warning and "--strict refuses" in warning
    assert library.get("mix").training["photos"] == ["eileen-flipped.png", "eileen.png", "grace.jpg"]


def test_learn_strict_refuses_photos_of_different_people_and_stores_nothing(
    cli, library: Library, home: Path, tmp_path: Path, tiny_sd1: Path, loads: list
) -> None:
    folder = _mixed_folder(tmp_path)
    result = cli("learn", folder, "--name", "mix", "--model", tiny_sd1, *CHEAP, "--strict", "--quiet")
    assert result.exit_code == 1 and not loads  # refused before the model loads
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {folder / 'grace.jpg'} does not look")
    assert "nothing stored" in result.stderr
    assert _files(home) == {} and not (home / ".unfinished").exists()
    (folder / "grace.jpg").unlink()  # the same person only: --strict has nothing to refuse
    assert cli("learn", folder, "--name", "mix", "--model", tiny_sd1, *CHEAP, "--strict", "-q").exit_code == 0


def test_a_two_face_photo_keeps_its_warning_and_no_align_compares_nothing(
    cli, library: Library, tmp_path: Path, tiny_sd1: Path
) -> None:
    eileen = Image.open(ASTRONAUT).convert("RGB")
    canvas = Image.new("RGB", (1100, 600), (200, 200, 200))
    grace = Image.open(GRACE).convert("RGB")
    canvas.paste(grace.resize((150, 150 * grace.height // grace.width)), (20, 170))  # smaller: not the one taken
    canvas.paste(eileen, (560, 40))
    canvas.save(tmp_path / "together.png")
    result = cli("learn", tmp_path / "together.png", ASTRONAUT, "--name", "two", "--model", tiny_sd1, *CHEAP, "-q")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'together.png'}: 2 faces found, using the largest"]

    # Grace Hopper larger than Eileen Collins: the face taken is someone else's, and the comparison says so.
    canvas.paste(grace.resize((300, 300 * grace.height // grace.width)), (20, 0))
    canvas.save(tmp_path / "together.png")
    result = cli("learn", tmp_path / "together.png", ASTRONAUT, "--name", "two", "--force", "--model", tiny_sd1,
                 *CHEAP, "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[-1].startswith(f"warning: {tmp_path / 'together.png'} and {ASTRONAUT} do not look like the same")

    mixed = cli("learn", ASTRONAUT, GRACE, "--name", "asis", "--no-align", "--model", tiny_sd1, *CHEAP, "-q")
    assert mixed.exit_code == 0 and "warning" not in mixed.stderr  # --no-align: no faces, nothing to compare


def test_learn_a_folder_skips_what_is_not_usable_in_one_note(cli, library: Library, tmp_path: Path, tiny_sd1: Path):
    folder = tmp_path / "me"
    folder.mkdir()
    Image.open(ASTRONAUT).convert("RGB").save(folder / "eileen.png")
    Image.new("RGB", (200, 200), "grey").save(folder / "wall.png")
    (folder / "broken.jpg").write_bytes(b"not a picture at all")
    (folder / "notes.txt").write_text("not a photo")
    result = cli("learn", folder, "--name", "me", "--model", tiny_sd1, *CHEAP)
    assert result.exit_code == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert note.startswith(f"skipped 3 files: {folder / 'notes.txt'} (not a photo: .txt), {folder / 'broken.jpg'} (")
    assert note.endswith(f"{folder / 'wall.png'} (no face found)")
    assert library.get("me").training["photos"] == ["eileen.png"]
    named = cli("learn", folder / "eileen.png", folder / "wall.png", "--name", "two", "--model", tiny_sd1, *CHEAP)
    assert named.exit_code == 1 and f"no face found in {folder / 'wall.png'}" in named.stderr


def test_the_least_resolution_comes_from_the_model(
    cli, library: Library, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = cli("learn", ASTRONAUT, "--name", "small", "--model", tiny_model, "--resolution", "64", *CHEAP, "--quiet")
    assert small.exit_code == 0, small.stderr  # the tiny model is 64 px: 64 is its size, not below a fixed 256
    assert library.get("small").training["resolution"] == 64
    from crossinit_cli import train

    monkeypatch.setattr(train, "model_resolution", lambda unet, vae: 1024)  # a model of SDXL's size
    big = cli("learn", ASTRONAUT, "--name", "big", "--model", tiny_model, "--resolution", "256", *CHEAP)
    assert big.exit_code == 1 and big.stderr.strip().splitlines()[-1] == (
        "error: --resolution 256 is too small for this model: at least 512 (half its own 1024 px)"
    )
    assert not library.exists("big")
