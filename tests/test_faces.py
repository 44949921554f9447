"""Photos in: decoding any photo safely, finding the face, and cropping it FFHQ-style."""

from __future__ import annotations

import functools
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from crossinit_cli import faces
from crossinit_cli.errors import CrossinitError

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
HOPPER = DATA / "grace_hopper.jpg"


@functools.cache
def _judge():  # -> dlib.shape_predictor
    # The 68-point model, not the 5-point one the code aligns with: an independent and finer measure
    # (on the glasses of Grace Hopper the 5 points wobble by 2 degrees).
    return faces._dlib().shape_predictor(str(faces._model_path("shape_predictor_68_face_landmarks.dat")))


def _landmarks(image: Image.Image) -> dict[str, np.ndarray]:
    """Eye centres and nose tip of the largest face, found afresh in `image`."""
    pixels = np.asarray(image.convert("RGB"))
    found = faces._find_faces(pixels)
    assert found is not None, "no face in the crop"
    points = np.array([(p.x, p.y) for p in _judge()(pixels, found[0]).parts()], dtype=float)
    return {"left": points[36:42].mean(axis=0), "right": points[42:48].mean(axis=0), "nose": points[33]}


def _tilt_degrees(marks: dict[str, np.ndarray]) -> float:
    dx, dy = marks["right"] - marks["left"]
    return float(np.degrees(np.arctan2(dy, dx)))


def _mean_abs_diff(a: Image.Image, b: Image.Image, side: int = 32) -> float:
    """Mean absolute difference of two crops seen at side x side px: how differently they frame the face.

    Re-encoding a photo moves dlib's landmarks by a pixel or two, which at full size shifts fine texture
    and makes a pixel-exact comparison meaningless. Reference points at 32 px: the same photo re-saved
    as JPEG, about 15; the crop shifted by 5% of its width, 37; another person, 65.
    """
    small = [np.asarray(im.resize((side, side), Image.Resampling.BOX), dtype=float) for im in (a, b)]
    return float(np.abs(small[0] - small[1]).mean())


def _gradient(size: tuple[int, int] = (320, 240)) -> Image.Image:
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (size[1], 1))] * 3, axis=-1)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def crops() -> dict[str, faces.FaceCrop]:
    return {"astronaut": faces.align_face(ASTRONAUT), "hopper": faces.align_face(HOPPER)}


# --- aligned crops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_real_photo_gives_one_level_centred_ffhq_crop(crops, name):
    crop = crops[name]
    path = {"astronaut": ASTRONAUT, "hopper": HOPPER}[name]
    assert crop.image.size == (512, 512)
    assert crop.image.mode == "RGB"
    assert crop.faces_found == 1
    marks = _landmarks(crop.image)
    eye_distance = marks["right"][0] - marks["left"][0]
    # Eyes level: the whole point of aligning (the photos are tilted by 3.3 and 3.7 degrees).
    assert abs(_tilt_degrees(_landmarks(Image.open(path)))) > 2.5
    assert abs(_tilt_degrees(marks)) < 1.5
    # FFHQ framing: eyes a quarter of the width apart, centred, a little above the middle.
    assert 0.2 * 512 < eye_distance < 0.3 * 512
    assert abs((marks["left"][0] + marks["right"][0]) / 2 - 256) < 20
    assert 0.38 * 512 < (marks["left"][1] + marks["right"][1]) / 2 < 0.52 * 512
    assert 0.5 * 512 < marks["nose"][1] < 0.7 * 512


def test_box_is_the_face_in_the_source(crops):
    left, top, right, bottom = crops["hopper"].box
    # Grace Hopper's face is in the upper middle of the 512x600 portrait.
    assert 120 < left < right < 420 and 100 < top < bottom < 400
    assert 150 < right - left < 300


def test_tilted_face_comes_out_level(tmp_path):
    tilted = Image.open(HOPPER).rotate(15, resample=Image.Resampling.BICUBIC, fillcolor=(90, 120, 200))
    path = tmp_path / "tilted.png"
    tilted.save(path)
    assert abs(_tilt_degrees(_landmarks(faces.align_face(path).image))) < 1.5


def test_exif_rotated_photo_gives_the_upright_crop(tmp_path, crops):
    upright = Image.open(HOPPER)
    # Orientation 6: the camera stored the pixels turned a quarter left; viewers turn them right.
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    sideways.save(path, quality=95, exif=exif)
    assert faces.load_photo(path).size == upright.size
    crop = faces.align_face(path)
    assert crop.box == crops["hopper"].box  # in the upright photo's coordinates
    assert _mean_abs_diff(crop.image, crops["hopper"].image) < 20


def test_large_photo_maps_the_face_back_to_full_resolution(tmp_path, crops):
    # Detection runs on a copy at most 1024 px long; box and crop must come back in the photo's pixels.
    big = Image.open(HOPPER).resize((2048, 2400), Image.Resampling.BICUBIC)
    path = tmp_path / "big.png"
    big.save(path)
    crop = faces.align_face(path)
    box, small_box = np.array(crop.box, dtype=float), np.array(crops["hopper"].box, dtype=float) * 4
    centre, small_centre = (box[:2] + box[2:]) / 2, (small_box[:2] + small_box[2:]) / 2
    assert np.abs(centre - small_centre).max() < 0.05 * 2048
    assert 0.7 < (box[2] - box[0]) / (small_box[2] - small_box[0]) < 1.3  # HOG's pyramid steps are coarse
    assert _mean_abs_diff(crop.image, crops["hopper"].image) < 20


def test_face_near_the_edge_is_padded_not_black(tmp_path):
    path = tmp_path / "edge.png"
    Image.open(ASTRONAUT).crop((150, 40, 330, 260)).save(path)
    crop = faces.align_face(path)
    assert crop.image.size == (512, 512)
    corners = np.asarray(crop.image)[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min() > 40  # a mirrored, blurred background, not black bars
    assert abs(_tilt_degrees(_landmarks(crop.image))) < 1.5


def test_no_align_takes_the_centre_square():
    crop = faces.align_face(HOPPER, 256, align=False)
    assert crop.box == (0, 44, 512, 556)
    assert crop.faces_found == 0
    assert crop.image.size == (256, 256)
    expected = Image.open(HOPPER).crop(crop.box).resize((256, 256), Image.Resampling.LANCZOS)
    assert _mean_abs_diff(crop.image, expected, side=256) < 1


def test_no_align_accepts_a_photo_without_a_face(tmp_path):
    path = tmp_path / "wall.png"
    _gradient().save(path)
    crop = faces.align_face(path, 128, align=False)
    assert crop.image.size == (128, 128) and crop.box == (40, 0, 280, 240)


def test_no_face_names_the_file(tmp_path):
    path = tmp_path / "wall.png"
    _gradient().save(path)
    with pytest.raises(CrossinitError) as info:
        faces.align_face(path)
    message = str(info.value)
    assert str(path) in message and "no face" in message and "--no-align" in message


def test_two_faces_warns_once_and_takes_the_larger(tmp_path):
    face = Image.open(ASTRONAUT).convert("RGB").crop((140, 20, 310, 210))
    canvas = Image.new("RGB", (1000, 500), (200, 200, 200))
    canvas.paste(face, (40, 150))  # small, left
    canvas.paste(face.resize((340, 380)), (560, 60))  # twice as large, right
    path = tmp_path / "pair.png"
    canvas.save(path)
    warnings: list[str] = []
    [crop] = faces.align_faces([path], warn=warnings.append)
    assert crop.faces_found == 2
    assert len(warnings) == 1 and "2 faces" in warnings[0] and str(path) in warnings[0]
    assert crop.box[0] > 500  # the large face on the right


def test_at_size_cuts_the_same_crop_again_without_detecting_the_face_again(monkeypatch):
    crop = faces.align_face(ASTRONAUT, 512)
    real, detections = faces._find_faces, []
    monkeypatch.setattr(faces, "_find_faces", lambda pixels: (detections.append(1), real(pixels))[1])
    small = crop.at_size(64)
    assert detections == [] and crop.at_size(512) is crop
    assert small.image.size == (64, 64) and (small.source, small.box, small.faces_found) == (ASTRONAUT, crop.box, 1)
    fresh = faces.align_face(ASTRONAUT, 64)  # detects again: the reference
    assert detections == [1] and np.array_equal(np.asarray(small.image), np.asarray(fresh.image))
    centre = faces.align_face(ASTRONAUT, 512, align=False)
    again = faces.align_face(ASTRONAUT, 64, align=False).image
    assert np.array_equal(np.asarray(centre.at_size(64).image), np.asarray(again)) and detections == [1]


def test_align_faces_is_quiet_for_single_faces():
    warnings: list[str] = []
    result = faces.align_faces([HOPPER], 256, warn=warnings.append)
    assert warnings == [] and [c.image.size for c in result] == [(256, 256)]


# --- decoding any photo ----------------------------------------------------------------------------


def _rgba(path: Path) -> None:
    img = Image.new("RGBA", (100, 80), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 50, 80))  # left half fully transparent (black underneath)
    img.save(path)


def _cmyk(path: Path) -> None:
    Image.new("RGB", (100, 80), (255, 0, 0)).convert("CMYK").save(path, quality=95)


def _sixteen_bit(path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (80, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # or the test would prove nothing (Pillow < 10.2 reads "I")


def _palette(path: Path) -> None:
    Image.new("RGB", (100, 80), (255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (100, 80), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _grey(path: Path) -> None:
    Image.new("L", (100, 80), 128).save(path)


@pytest.mark.parametrize(
    ("name", "write", "check"),
    [
        ("rgba.png", _rgba, lambda a: (a[40, 10] == 255).all() and tuple(a[40, 90]) == (255, 0, 0)),
        ("cmyk.jpg", _cmyk, lambda a: a[40, 50, 0] > 200 and a[40, 50, 1:].max() < 60),
        (
            "deep.png",
            _sixteen_bit,
            lambda a: a[40, 0, 0] < 5 and 110 < a[40, 50, 0] < 145 and a[40, 99, 0] > 250,
        ),
        ("palette.gif", _palette, lambda a: tuple(a[40, 50]) == (255, 0, 0)),
        ("animated.gif", _animated, lambda a: tuple(a[40, 50]) == (255, 0, 0)),
        ("grey.jpg", _grey, lambda a: abs(int(a[40, 50, 0]) - 128) < 3 and (a[..., 0] == a[..., 2]).all()),
    ],
)
def test_any_photo_loads_as_8bit_rgb(tmp_path, name, write, check):
    path = tmp_path / name
    write(path)
    img = faces.load_photo(path)
    assert img.mode == "RGB" and img.size == (100, 80)
    assert check(np.asarray(img))


@pytest.mark.parametrize("profile", ["srgb", "garbage"])
def test_colour_profile_keeps_colours_and_a_broken_one_is_ignored(tmp_path, profile):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() if profile == "srgb" else b"junk"
    path = tmp_path / "profiled.jpg"
    Image.new("RGB", (100, 80), (30, 160, 90)).save(path, quality=95, icc_profile=icc)
    img = faces.load_photo(path)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=int)[40, 50] - (30, 160, 90)).max() < 8


def _bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("this is not a photo\n" * 20)


def _truncated(path: Path) -> None:
    data = HOPPER.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tiny(path: Path) -> None:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)


@pytest.mark.parametrize(
    ("name", "write", "words"),
    [
        ("empty.jpg", _empty, "0 bytes"),
        ("notes.jpg", _text, "not an image"),
        ("half.jpg", _truncated, "truncated"),
        ("dot.png", _tiny, "too small"),
        ("bomb.png", _bomb_png, "too large"),
    ],
)
def test_bad_file_is_a_one_line_error_naming_it(tmp_path, name, write, words):
    path = tmp_path / name
    write(path)
    with pytest.raises(CrossinitError) as info:
        faces.load_photo(path)
    message = str(info.value)
    assert str(path) in message and words in message
    assert "\n" not in message
    # align_face reports the same error (it loads through load_photo).
    with pytest.raises(CrossinitError):
        faces.align_face(path)


def test_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "poster.png"
    Image.new("RGB", (1000, 800)).save(path)
    monkeypatch.setattr(faces, "MAX_PIXELS", 500_000)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(CrossinitError, match="too large"):
        faces.load_photo(path)
    assert decoded == []


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CrossinitError, match="no such file"):
        faces.load_photo(tmp_path / "nope.jpg")


# --- collecting photos -----------------------------------------------------------------------------


def test_collect_photos_expands_a_folder_sorted_and_keeps_files(tmp_path):
    folder = tmp_path / "me"
    folder.mkdir()
    for name in ["b.jpg", "a.PNG", "c.webp", "notes.txt", ".hidden.jpg"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "d.jpg").write_bytes(b"x")
    extra = tmp_path / "scan.heic"
    extra.write_bytes(b"x")
    found = faces.collect_photos([folder, extra, folder / "b.jpg"])
    assert [p.name for p in found] == ["a.PNG", "b.jpg", "c.webp", "scan.heic"]


def test_collect_photos_refuses_an_empty_folder_and_a_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos")
    with pytest.raises(CrossinitError, match="no photos"):
        faces.collect_photos([tmp_path / "empty"])
    with pytest.raises(CrossinitError, match="no such file"):
        faces.collect_photos([tmp_path / "missing.jpg"])
    with pytest.raises(CrossinitError):
        faces.collect_photos([])


# --- identity descriptor ---------------------------------------------------------------------------


def test_face_descriptor_tells_people_apart():
    astronaut = faces.load_photo(ASTRONAUT)
    same = faces.face_descriptor(astronaut)
    mirrored = faces.face_descriptor(ImageOps.mirror(astronaut))
    other = faces.face_descriptor(faces.load_photo(HOPPER))
    assert same is not None and mirrored is not None and other is not None
    assert same.shape == (128,)
    assert np.linalg.norm(same - mirrored) < 0.6
    assert np.linalg.norm(same - other) > 0.6
    assert faces.face_descriptor(_gradient()) is None


def test_imports_stay_light():
    # No torch ever, dlib only once a face is looked for, and face_recognition_models never imported
    # (its __init__ needs pkg_resources, which new setuptools no longer ships).
    code = (
        "import sys, pathlib, crossinit_cli.faces as f\n"
        "assert 'torch' not in sys.modules and 'dlib' not in sys.modules\n"
        f"f.align_face(pathlib.Path({str(HOPPER)!r}))\n"
        "assert 'torch' not in sys.modules and 'face_recognition_models' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_gather_photos_says_what_it_left_out_and_why(tmp_path):
    folder = tmp_path / "me"
    folder.mkdir()
    for name in ["b.jpg", "a.PNG", "notes.txt", ".DS_Store", "._b.jpg"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    gathered = faces.gather_photos([folder, folder / "b.jpg"])
    assert [p.name for p in gathered.photos] == ["a.PNG", "b.jpg"]
    assert [(p.name, why) for p, why in gathered.skipped] == [
        ("notes.txt", "not a photo: .txt"),
        ("sub", "a folder: folders inside are not searched"),
        ("b.jpg", f"the same file as {folder / 'b.jpg'}"),
    ]  # hidden files (.DS_Store, macOS's ._ companions) are left out without a word


def _photos(tmp_path: Path, **sources: Path | Image.Image) -> list[Path]:
    paths = []
    for name, source in sources.items():
        path = tmp_path / f"{name}.png"
        (Image.open(source).convert("RGB") if isinstance(source, Path) else source).save(path)
        paths.append(path)
    return paths


def test_odd_faces_finds_the_photo_of_someone_else(tmp_path):
    """Eileen Collins twice (the photo and its mirror image) and Grace Hopper once."""
    mirrored = ImageOps.mirror(Image.open(ASTRONAUT).convert("RGB"))
    paths = _photos(tmp_path, eileen=ASTRONAUT, eileen_flipped=mirrored, grace=HOPPER)
    crops = faces.align_faces(paths)
    [odd] = faces.odd_faces(crops)
    assert odd.photo == paths[2] and 0.6 <= odd.distance < 0.8  # measured 0.69
    assert faces.odd_faces(crops[:2]) == []  # the same person: nothing odd

    pair = faces.odd_faces([crops[0], crops[2]])  # two people, two photos: which is the stranger is unknown
    assert [o.photo for o in pair] == [paths[0], paths[2]] and pair[0].distance == pair[1].distance


def test_odd_faces_costs_nothing_for_one_photo_and_skips_crops_without_a_face(monkeypatch):
    calls: list[int] = []
    real = faces.face_descriptor
    monkeypatch.setattr(faces, "face_descriptor", lambda image: calls.append(1) or real(image))
    [crop] = faces.align_faces([ASTRONAUT])
    assert faces.odd_faces([crop]) == [] and calls == []
    blank = faces.FaceCrop(HOPPER, _gradient().resize((512, 512)), (0, 0, 1, 1), 0)
    assert faces.odd_faces([crop, blank]) == [] and len(calls) == 2  # one face: nothing to compare it with


def test_a_folder_skips_unusable_photos_with_why_but_a_named_photo_fails(tmp_path: Path) -> None:
    folder = tmp_path / "me"
    folder.mkdir()
    Image.open(ASTRONAUT).convert("RGB").save(folder / "eileen.png")
    Image.new("RGB", (200, 200), "grey").save(folder / "wall.png")
    (folder / "broken.jpg").write_bytes(b"not a picture at all")
    crops, used = faces.align_gathered(faces.gather_photos([folder]), 64)
    assert [c.source.name for c in crops] == ["eileen.png"] and used.photos == [folder / "eileen.png"]
    assert [p.name for p, _ in used.skipped] == ["broken.jpg", "wall.png"]
    assert dict((p.name, why) for p, why in used.skipped)["wall.png"] == "no face found"
    assert str(folder) not in " ".join(why for _, why in used.skipped)  # short reasons, beside the names

    with pytest.raises(CrossinitError, match="no face found in .*wall.png"):  # named: loud
        faces.align_gathered(faces.gather_photos([folder, folder / "wall.png"]), 64)
    (folder / "eileen.png").unlink()
    with pytest.raises(CrossinitError, match=r"none of the 2 photos is usable \(broken.jpg: .*; wall.png: no face"):
        faces.align_gathered(faces.gather_photos([folder]), 64)


def test_listed_names_the_first_files_with_why_and_counts_the_rest() -> None:
    photos = [Path(f"p{i}.jpg") for i in range(10)]
    assert faces.listed("using", photos[:1]) == "using 1 photo: p0.jpg"
    text = faces.listed("using", photos)
    assert text.startswith("using 10 photos: p0.jpg, p1.jpg") and text.endswith("p7.jpg, and 2 more")
    skipped = faces.listed("skipped", [Path("notes.txt"), Path("wall.png")], ["not a photo: .txt", "no face found"])
    assert skipped == "skipped 2 files: notes.txt (not a photo: .txt), wall.png (no face found)"
