"""Photos from anywhere through a real `crossinit learn`: never a traceback; exit 1 with one line, or a
success; nothing written on failure.

Photos are checked before the model is loaded, so the hostile corpus runs against a model path that does
not exist: a photo that is refused fails with a message naming it, one that is accepted gets as far as the
model and fails there, with the model's message. The accepted formats are then learned from for real, all
in one `learn`. tests/test_faces.py checks the decoder's results in-process; this checks the process.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crossinit_cli import faces
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library
from tests.reliability.harness import DATA, assert_one_line_error, crossinit, tree, write_embedding

pytestmark = pytest.mark.reliability

NO_MODEL = "/nonexistent/crossinit-test-model"
FUZZ_SEEDS = range(8)


def _face(size: int | None = None) -> Image.Image:
    image = Image.open(DATA / "astronaut.png").convert("RGB")
    return image if size is None else image.resize((size, size), Image.Resampling.LANCZOS)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int, extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _hostile_photos(folder: Path) -> dict[str, Path]:
    """Files that must be refused, each with one line naming it."""
    face = _face()
    jpeg, png, webp = _encode(face, "JPEG", quality=90), _encode(face, "PNG"), _encode(face, "WEBP", quality=80)
    gif = _encode(face.quantize(64), "GIF")
    raw: dict[str, bytes] = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "truncated.png": png[: len(png) // 2],
        "truncated.webp": webp[: len(webp) // 2],
        "truncated.gif": gif[: len(gif) // 2],
        "header-only.jpg": jpeg[:200],
        "png-bad-crc.png": png[:40] + bytes([png[40] ^ 0xFF]) + png[41:],
        "text-named.jpg": b"this is not a photo\n" * 50,
        "html-named.png": b"<!doctype html><html><body>404 Not Found</body></html>",
        "random-bytes.webp": random.Random(0).randbytes(4096),
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="999999" height="999999"/>',
        "heic-named.heic": b"\0\0\0\x18ftypheic" + random.Random(1).randbytes(512),
        "tiny-1x1.png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "tiny-63x400.png": _encode(Image.new("RGB", (63, 400)), "PNG"),
        "bomb-100000x100000.png": _png_claiming(100_000, 100_000),
        "bomb-65535x65535.gif": b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;",
        "bomb-zTXt.png": _png_claiming(
            100, 100, _png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
        ),
        "jpeg-bomb-60000x60000.jpg": jpeg[:2]
        + b"\xff\xc0\x00\x11\x08"
        + struct.pack(">HH", 60000, 60000)
        + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        + jpeg[2:],
        "pdf-named.jpg": b"%PDF-1.4\n" + random.Random(2).randbytes(1024),
    }
    files = {}
    for name, data in raw.items():
        files[name] = folder / name
        files[name].write_bytes(data)
    files["a-folder.jpg"] = folder / "a-folder.jpg"
    files["a-folder.jpg"].mkdir()
    files["fifo.jpg"] = folder / "fifo.jpg"
    import os

    os.mkfifo(files["fifo.jpg"])
    files["dev-zero.png"] = folder / "dev-zero.png"
    files["dev-zero.png"].symlink_to("/dev/zero")
    files["dangling.png"] = folder / "dangling.png"
    files["dangling.png"].symlink_to(folder / "nothing-here.png")
    no_face = Image.new("RGB", (640, 480), (90, 140, 200))
    files["no-face.jpg"] = folder / "no-face.jpg"
    no_face.save(files["no-face.jpg"], quality=90)
    return files


def _accepted_photos(folder: Path) -> dict[str, Path]:
    """Real faces in every form a phone, a scanner or the web produces: each one must be learned from."""
    face = _face()
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, fmt: str | None = None, **options) -> None:
        files[name] = folder / name
        image.save(files[name], fmt, **options)

    save("face.webp", face, quality=90)
    save("face-cmyk.jpg", face.convert("CMYK"), "JPEG", quality=92)
    save("face-grey.jpg", face.convert("L"), "JPEG", quality=92)
    deep = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("face-16bit.png", Image.fromarray(deep))
    assert Image.open(files["face-16bit.png"]).mode == "I;16"
    rgba = face.convert("RGBA")
    rgba.putalpha(255)
    save("face-alpha.png", rgba)
    frames = [face.quantize(200), Image.new("RGB", face.size, (0, 0, 0)).quantize(2)]
    save("face-animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    # stored sideways with EXIF orientation 6 (rotate 90° clockwise to view), as a phone does
    exif = Image.Exif()
    exif[0x0112] = 6
    save("face-exif-rotated.jpg", face.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())
    save("png-named.jpg", face, "PNG")  # wrong extension: the content decides
    big = face.resize((6000, 6000), Image.Resampling.BICUBIC)  # 36 MP, under the 50 MP limit
    save("face-36mp.jpg", big, "JPEG", quality=80)
    save("face-200px.png", _face(200))  # about the smallest the detector finds this face in
    return files


def _mutations(seed: int) -> tuple[str, bytes]:
    """A seeded corruption of a small face photo: truncation, flipped bytes, a duplicated or lost span."""
    rng = random.Random(seed)
    fmt, suffix = rng.choice([("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif")])
    face = _face(256)
    data = bytearray(_encode(face.quantize(128) if fmt == "GIF" else face, fmt))
    kind = rng.choice(["truncate", "flip", "duplicate", "drop"])
    if kind == "truncate":
        data = data[: rng.randrange(1, len(data))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 24)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        start = rng.randrange(len(data))
        span = data[start : start + rng.randint(1, 512)]
        data = data[:start] + span + data[start:] if kind == "duplicate" else data[:start] + data[start + len(span) :]
    return f"fuzz-{seed:02d}-{kind}{suffix}", bytes(data)


@pytest.fixture()
def stocked(rhome: Path, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The library holds one identity, so that 'nothing written' is checked against something."""
    write_embedding(tmp_path / "alice.safetensors", 1)
    assert crossinit("import", tmp_path / "alice.safetensors", "--name", "alice", env=env).returncode == 0
    return tree(rhome)


def _learn(photo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return crossinit("learn", photo, "--name", "probe", "--fast", "--model", NO_MODEL, "--quiet", env=env, timeout=120)


def _run_all(photos: dict[str, Path], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(photos, pool.map(lambda p: _learn(p, env), photos.values())))


def test_hostile_photos_are_refused_with_one_line_naming_them(
    rhome: Path, env: dict[str, str], tmp_path: Path, stocked: dict[str, str]
) -> None:
    photos = _hostile_photos(tmp_path)
    for name, done in _run_all(photos, env).items():
        assert_one_line_error(done)
        assert photos[name].name in done.stderr, f"{name}: {done.stderr}"
    assert tree(rhome) == stocked
    print(f"{len(photos)} hostile photos refused")


@pytest.mark.slow
def test_fuzzed_photos_are_refused_or_accepted_never_a_crash(
    rhome: Path, env: dict[str, str], tmp_path: Path, stocked: dict[str, str]
) -> None:
    photos = {}
    for seed in FUZZ_SEEDS:
        name, data = _mutations(seed)
        photos[name] = tmp_path / name
        photos[name].write_bytes(data)
    outcomes = {"unreadable": 0, "no face": 0, "accepted": 0}
    for name, done in _run_all(photos, env).items():
        assert_one_line_error(done)
        if NO_MODEL in done.stderr:  # the photo passed; the (absent) model stopped it
            outcomes["accepted"] += 1
        else:
            assert name in done.stderr, f"{name}: {done.stderr}"
            outcomes["no face" if "no face" in done.stderr else "unreadable"] += 1
    assert tree(rhome) == stocked
    print(f"{len(photos)} fuzzed photos: {outcomes}")


def test_every_accepted_form_of_a_face_is_learned_from(
    rhome: Path, env: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    photos = _accepted_photos(tmp_path)
    args = ["learn", *photos.values(), "--name", "everyform", "--fast", "--steps", "1", "--model", tiny_model]
    done = crossinit(*args, "--quiet", env=env, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    library = Library(rhome)
    assert len(library.crops("everyform")) == len(photos)
    assert library.get("everyform").training["photos"] == [p.name for p in photos.values()]
    # the upright crop of the EXIF-rotated photo is the plain one's, within JPEG's loss
    crops = dict(zip(photos, library.crops("everyform")))
    upright = np.asarray(Image.open(crops["face-exif-rotated.jpg"]), dtype=float)
    plain = np.asarray(Image.open(crops["png-named.jpg"]), dtype=float)
    assert np.abs(upright - plain).mean() < 12


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0.0, 1.0), flips=st.integers(0, 40))
def test_the_decoder_raises_nothing_but_one_line_errors(seed: int, cut: float, flips: int) -> None:
    """Volume, in-process: hypothesis drives the same corruptions through faces.align_face."""
    import tempfile

    rng = random.Random(seed)
    fmt = rng.choice(["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
    face = _face(96)
    data = bytearray(_encode(face.quantize(64) if fmt == "GIF" else face, fmt))
    data = data[: max(1, int(len(data) * (0.5 + cut / 2)))]
    for _ in range(flips):
        data[rng.randrange(len(data))] = rng.randrange(256)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"photo.{fmt.lower()}"
        path.write_bytes(bytes(data))
        try:
            crop = faces.align_face(path, 64)
        except CrossinitError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            assert crop.image.size == (64, 64) and crop.image.mode == "RGB"
