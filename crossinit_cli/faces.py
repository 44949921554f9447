"""Photos in: read an ordinary photo safely and turn it into an aligned, square face crop.

This module owns everything between a file the user points at and the square RGB image the trainer
sees: which files count as photos, decoding them defensively (EXIF orientation, alpha, CMYK, 16-bit,
colour profiles, truncated or hostile files), finding the face with dlib's HOG detector, and cropping
it with FFHQ's framing (eyes level, whole head with some hair and the chin). The detector and landmark
weights ship inside the ``face-recognition-models`` package, so nothing is downloaded at run time.

No torch here: numpy, Pillow and (imported lazily) dlib only.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from crossinit_cli import untrusted
from crossinit_cli.errors import CrossinitError
from crossinit_cli.families import SizeCondition

SUPPORTED_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Suffixes picked up when a folder is given; files named one by one are tried whatever their suffix."""

MAX_PHOTO_BYTES = 512 * 1024 * 1024
"""The largest photo file read: 50 MP of 16-bit RGBA, uncompressed, is 400 MB."""

MAX_PIXELS = 50_000_000
"""Decompression-bomb guard: the largest image (width x height, from the file header) we agree to decode.

A 50 MP photo is bigger than any phone or DSLR photo a user would feed in (a 200 MP phone mode is
rejected), yet it bounds the decoded RGB buffer at 150 MB. A few hundred bytes of PNG can claim
100000 x 100000 pixels; the header is checked before a single pixel is decoded."""

MIN_SIDE = 64
"""Smaller than this on the short side there is no face worth learning from."""

DETECT_LONG_SIDE = 1024
"""The detector runs on a copy whose long side is at most this, for speed; crops use full resolution."""

WEAK_DETECTION = 0.3
"""A detection scoring under this fraction of the best one in the photo is taken for a false positive.

Measured on tests/data/astronaut.png saved as a JPEG (q 90-92, colour or grey, EXIF-rotated or not): beside
the real face (HOG score 1.5-1.7, 88 px) the detector finds a 105 px "face" on the suit scoring 0.01-0.09,
which "the largest face" would pick. Two real faces score alike and both stay."""

# dlib's 5-point model gives eye corners and the bottom of the nose, but FFHQ's framing is defined by
# the mouth. Measured with dlib's 68-point model on the test photos: the mouth centre lies 1.2-1.4x as
# far below the eyes as the bottom of the nose does.
_MOUTH_PER_NOSE = 1.3

_HEAVY_FORMATS_HINT = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_EXIF_ORIENTATION = 0x0112
# The crop is resampled at this multiple of the output size, then reduced with Lanczos: the rotation's
# bicubic interpolation then softens nothing the output can show.
_SUPERSAMPLE = 2
_MODELS_HINT = "pip install dlib-bin face-recognition-models, or use --no-align"


@dataclass(frozen=True)
class FaceCrop:
    """One aligned face: what the trainer sees, and where it came from."""

    source: Path
    image: Image.Image  # RGB, size x size
    box: tuple[int, int, int, int]  # face box in the (EXIF-transposed) source: left, top, right, bottom
    faces_found: int  # how many faces the detector saw in that photo (0 with align=False)
    photo_size: tuple[int, int] = (0, 0)  # the (EXIF-transposed) source's width and height
    region_side: float = 0.0  # the side, in source pixels, of the square the image was cut from
    aligned: bool = True  # an FFHQ face crop; False: the photo's centre square (`box`), --no-align
    points: np.ndarray | None = None  # eye on the image's left, eye on its right, nose tip [3, 2] (None: no-align)

    def size_condition(self, size: int) -> SizeCondition:
        """SDXL's `original_size` and `crops_coords_top_left` for this image trained at `size` px.

        An aligned face: the square it was cut from is the original, whole (crop 0, 0), as a face file of
        that size would be in diffusers' SDXL textual-inversion example: a face found 300 px wide in the
        photo says 300 x 300, so SDXL puts the blur of its upscaling on the size, not on the identity.
        --no-align: the photo is the original and the centre square its crop, at the crop's offset scaled to
        `size`, as diffusers' SDXL text-to-image example conditions a centre crop. A flipped image keeps
        the values (both examples flip after taking them)."""
        side = self.region_side or float(size)
        if self.aligned:
            return SizeCondition((round(side), round(side)))
        scale = size / side
        width, height = self.photo_size
        return SizeCondition((height, width), (round(self.box[1] * scale), round(self.box[0] * scale)))

    def at_size(self, size: int) -> FaceCrop:
        """The same crop at another size, cut again from the photo with the landmarks already found: the
        same pixels as `align_face(source, size)`, without running the detector again."""
        if self.image.size == (size, size):
            return self
        img = load_photo(self.source)
        if self.points is None:
            return _center_crop(self.source, img, size)
        eye_left, eye_right, nose = self.points
        crop, _ = _ffhq_crop(img, eye_left, eye_right, nose, size)
        return replace(self, image=crop)


@dataclass(frozen=True)
class Gathered:
    """The photos a `learn` takes from what it was given, and the files it left out with why."""

    photos: list[Path]
    skipped: list[tuple[Path, str]]
    named: list[Path] = field(default_factory=list)  # photos given by name (not found in a folder): never skipped


def collect_photos(inputs: list[Path]) -> list[Path]:
    """The photos of `gather_photos` (folders expanded, duplicates dropped)."""
    return gather_photos(inputs).photos


def gather_photos(inputs: list[Path]) -> Gathered:
    """Expand folders (non-recursive, sorted, supported suffixes only) and keep files as given.

    Hidden files are skipped inside folders (macOS leaves ``._IMG_0001.jpg`` companions on shared
    drives), as are sub-folders and files of other kinds; a path given twice, directly or through its
    folder, is kept once. Each file left out is in `skipped` with the reason.
    """
    photos: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    named: list[Path] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise CrossinitError(f"{path}: no such file or folder")
        if path.is_dir():
            found = []
            for item in sorted(path.iterdir()):
                reason = _left_out(item)
                if reason is None:
                    found.append(item)
                elif not item.name.startswith("."):  # .DS_Store and friends are not worth a word
                    skipped.append((item, reason))
            if not found:
                kinds = ", ".join(sorted(SUPPORTED_SUFFIXES))
                raise CrossinitError(f"{path}: folder has no photos ({kinds})")
            photos.extend(found)
        else:
            photos.append(path)
            named.append(path)
    unique: dict[Path, Path] = {}
    for photo in photos:
        if photo.resolve() in unique:
            skipped.append((photo, f"the same file as {unique[photo.resolve()]}"))
        unique.setdefault(photo.resolve(), photo)
    if not unique:
        raise CrossinitError("no photos given")
    return Gathered(list(unique.values()), skipped, named)


def _left_out(item: Path) -> str | None:
    """Why a file in a given folder is not taken as a photo (None: it is)."""
    if item.name.startswith("."):
        return "hidden"
    if item.is_dir():
        return "a folder: folders inside are not searched"
    if item.suffix.lower() not in SUPPORTED_SUFFIXES:
        return f"not a photo: {item.suffix or 'no suffix'}"
    return None


def load_photo(path: Path) -> Image.Image:
    """Open any photo safely and return it as an 8-bit RGB image, upright.

    EXIF orientation is applied, alpha is composited on white, CMYK / palette / grey / 16-bit / float
    images are converted (through their ICC profile to sRGB when they carry one), and animated files
    give their first frame. Every failure is a one-line CrossinitError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise CrossinitError(f"{path}: no such file")
    if not path.is_file():
        raise CrossinitError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CrossinitError(f"{path}: file is empty (0 bytes)")
    try:
        # Checked again on the open handle (a FIFO or device swapped in since is refused, not waited on).
        with untrusted.open_regular(path, MAX_PHOTO_BYTES) as fh:
            return _decode(path, fh)
    except untrusted.TooLarge as e:
        raise CrossinitError(f"{path}: file is too large for a photo ({e.size >> 20} MiB)") from None
    except untrusted.NotRegular:
        raise CrossinitError(f"{path}: not a file") from None
    except OSError as e:
        # Only reading the file itself gets here: decoding errors are turned into messages in _decode.
        raise CrossinitError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from e


def align_face(path: Path, size: int = 512, *, align: bool = True) -> FaceCrop:
    """Load a photo and crop its largest face to a size x size RGB image with FFHQ's framing.

    The face is found with dlib's frontal (HOG) detector on a copy downscaled to at most
    DETECT_LONG_SIDE px, retried with one upsampling when nothing is found. Its 5 landmarks give the
    eye line (made level) and the face's scale; the crop is cut from the full-resolution photo, with
    FFHQ's reflect-and-blur fill where the frame runs past the photo's edge.

    With align=False the photo is only centre-cropped to a square and resized (no detector runs).
    """
    path = Path(path)
    img = load_photo(path)
    if not align:
        return _center_crop(path, img, size)

    small, scale = _downscaled(img, DETECT_LONG_SIDE)
    faces = _find_faces(np.asarray(small))
    if not faces:
        raise CrossinitError(f"no face found in {path}; use a clearer photo or --no-align")
    rect, shape, count = faces
    # Pixel centres, not corners, scale between the two resolutions.
    points = (np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64) + 0.5) / scale - 0.5
    box = (
        max(0, round(rect.left() / scale)),
        max(0, round(rect.top() / scale)),
        min(img.width, round((rect.right() + 1) / scale)),  # dlib's right/bottom are inclusive
        min(img.height, round((rect.bottom() + 1) / scale)),
    )
    # 5-point order: 0-1 corners of the eye on the image's right, 2-3 of the eye on its left, 4 nose.
    eye_right = points[0:2].mean(axis=0)
    eye_left = points[2:4].mean(axis=0)
    marks = np.stack([eye_left, eye_right, points[4]])
    crop, side = _ffhq_crop(img, eye_left, eye_right, points[4], size)
    return FaceCrop(
        source=path, image=crop, box=box, faces_found=count, photo_size=img.size, region_side=side, points=marks
    )


def align_faces(
    paths: list[Path],
    size: int = 512,
    *,
    align: bool = True,
    warn: Callable[[str], None] | None = None,
) -> list[FaceCrop]:
    """align_face for each photo, telling `warn` about photos with several faces."""
    crops = []
    for path in paths:
        crop = align_face(path, size, align=align)
        if crop.faces_found > 1 and warn is not None:
            warn(f"{path}: {crop.faces_found} faces found, using the largest")
        crops.append(crop)
    return crops


def align_gathered(
    gathered: Gathered,
    size: int = 512,
    *,
    align: bool = True,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[FaceCrop], Gathered]:
    """align_faces for gathered photos, where a photo found in a folder that is not usable (not an image,
    no face) is skipped, with why, as long as one usable photo remains; a photo given by name still fails
    loudly. The crops, and the photos as used (the unusable ones moved to `skipped`)."""
    named = {p.resolve() for p in gathered.named}
    crops: list[FaceCrop] = []
    unusable: list[tuple[Path, str]] = []
    first: CrossinitError | None = None
    for path in gathered.photos:
        try:
            (crop,) = align_faces([path], size, align=align, warn=warn)
        except CrossinitError as exc:
            if path.resolve() in named:
                raise
            first = first or exc
            unusable.append((path, _unusable_reason(path, exc)))
            continue
        crops.append(crop)
    if not crops:
        assert first is not None
        if len(unusable) == 1:
            raise first
        listed = "; ".join(f"{p.name}: {why}" for p, why in unusable[:5])
        raise CrossinitError(f"none of the {len(unusable)} photos is usable ({listed})")
    used = [crop.source for crop in crops]
    return crops, Gathered(used, [*gathered.skipped, *unusable], gathered.named)


PHOTOS_LISTED = 8
"""How many file names `listed` shows ("using N photos: ...") before "and N more"."""


def listed(verb: str, paths: Sequence[Path], reasons: Sequence[str] = ()) -> str:
    """`using 3 photos: a.jpg, b.jpg, c.jpg` (`skipped 1 file: notes.txt (not a photo: .txt)`), shortened to
    PHOTOS_LISTED names. Not escaped: the names are the user's files."""
    kind = "photo" if verb == "using" else "file"
    shown = [f"{p} ({why})" for p, why in zip(paths, reasons)] if reasons else [str(p) for p in paths]
    more = len(shown) - PHOTOS_LISTED
    listing = ", ".join(shown[:PHOTOS_LISTED]) + (f", and {more} more" if more > 0 else "")
    return f"{verb} {len(paths)} {kind}{'s' if len(paths) != 1 else ''}: {listing}"


def _unusable_reason(path: Path, exc: CrossinitError) -> str:
    """A photo's error as a short reason beside its name: without the path, and without the advice."""
    text = str(exc).replace(f"{path}: ", "").replace(f" in {path}", "").replace(str(path), path.name)
    return text.split("; ")[0]


SAME_PERSON_DISTANCE = 0.6
"""dlib's own decision threshold: two faces closer than this are the same person (99.38% on LFW)."""


@dataclass(frozen=True)
class OddFace:
    """A photo whose face does not look like the others' (`odd_faces`)."""

    photo: Path
    distance: float  # median dlib distance of its face to the other photos' faces


def odd_faces(crops: list[FaceCrop]) -> list[OddFace]:
    """The photos whose face looks like someone else's than the other photos' faces.

    Each aligned crop gets the dlib ResNet descriptor `eval` compares faces with (`face_descriptor`); a
    photo is odd when the median distance of its face to the others' is at least SAME_PERSON_DISTANCE.
    With two photos, both are odd when they are that far apart (which one is the stranger cannot be told);
    with photos of several people, every photo may be. One photo, or crops without a detectable face
    (`--no-align`), give nothing to compare: [] (and no descriptor is computed for a single photo)."""
    if len(crops) < 2:
        return []
    described = [(crop.source, face_descriptor(crop.image)) for crop in crops]
    return odd_ones_out([(path, found) for path, found in described if found is not None])


def odd_ones_out(described: list[tuple[Path, np.ndarray]]) -> list[OddFace]:
    """`odd_faces` on descriptors already computed: median distance to the others >= the threshold."""
    if len(described) < 2:
        return []
    vectors = np.stack([np.asarray(d, dtype=np.float64) for _, d in described])
    distances = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=-1)
    odd = []
    for i, (path, _) in enumerate(described):
        median = float(np.median(np.delete(distances[i], i)))
        if median >= SAME_PERSON_DISTANCE:
            odd.append(OddFace(path, median))
    return odd


MEASURABLE_CROP = 128
"""An aligned crop smaller than this (px) holds a face too small for the detector to find reliably (HOG's
faces of about 80 px, 40 px after its one upsampling; FFHQ's crop is about twice the face)."""


def no_face_reason(name: str, sizes: list[tuple[int, int]], aligned: bool | None) -> str:
    """Why no face was found in an identity's stored crops (`sizes`), as one phrase: crops too small for
    the detector, photos used as they are (`--no-align`: `aligned` False), or no face in them."""
    count = len(sizes)
    if aligned is not False and sizes and min(min(size) for size in sizes) < MEASURABLE_CROP:
        width, height = min(sizes)
        return (
            f"the face detector finds no face in the {count} stored crop(s) of {name!r}: at {width}x{height} px "
            f"the face is too small for it (crops of {MEASURABLE_CROP} px and up are measured reliably; learn at "
            "a larger --resolution)"
        )
    if aligned is False:
        return f"no face found in the {count} stored crop(s) of {name!r} (learned with --no-align: photos as they are)"
    return f"no face found in the {count} stored crop(s) of {name!r}"


def face_descriptor(image: Image.Image) -> np.ndarray | None:
    """The 128-d dlib ResNet descriptor of the largest face in `image`, or None when there is no face.

    Two photos of the same person are usually closer than 0.6 (Euclidean), the threshold dlib's
    model was tuned for (99.38% on LFW).
    """
    small, _ = _downscaled(image.convert("RGB"), DETECT_LONG_SIDE)
    pixels = np.asarray(small)
    faces = _find_faces(pixels)
    if not faces:
        return None
    _, shape, _ = faces
    return np.array(_face_encoder().compute_face_descriptor(pixels, shape), dtype=np.float64)


def face_descriptors(image: Image.Image, limit: int = 8) -> list[np.ndarray]:
    """The descriptors of every face in `image` (the `limit` largest), left to right; [] when none.

    Used where several people share a picture (`eval` of a prompt naming two identities)."""
    small, _ = _downscaled(image.convert("RGB"), DETECT_LONG_SIDE)
    pixels = np.ascontiguousarray(np.asarray(small))
    detector = _detector()
    rects, scores, _ = detector.run(pixels, 0, 0.0)
    if len(rects) == 0:
        rects, scores, _ = detector.run(pixels, 1, 0.0)
    if len(rects) == 0:
        return []
    rects = [r for r, s in zip(rects, scores) if s >= WEAK_DETECTION * max(scores)]
    rects = sorted(rects, key=lambda r: r.width() * r.height(), reverse=True)[:limit]
    encoder, predictor = _face_encoder(), _shape_predictor()
    return [
        np.array(encoder.compute_face_descriptor(pixels, predictor(pixels, r)), dtype=np.float64)
        for r in sorted(rects, key=lambda r: r.left())
    ]


# --- decoding -------------------------------------------------------------------------------------


def _decode(path: Path, fh: io.BufferedReader) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; we want an error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CrossinitError(f"{path}: image is too large (more than {MAX_PIXELS:,} pixels)") from e
    except UnidentifiedImageError as e:
        hint = _HEAVY_FORMATS_HINT.get(path.suffix.lower())
        if hint:
            raise CrossinitError(f"{path}: {hint} is not supported here; convert it to JPEG or PNG") from e
        raise CrossinitError(f"{path}: not an image (or a format Pillow cannot read)") from e
    except _DECODE_ERRORS as e:
        raise CrossinitError(f"{path}: corrupt image ({_one_line(e)})") from e

    # The header alone gives the size: refuse before a single pixel is decoded.
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise CrossinitError(
            f"{path}: image is too large ({width}x{height}, more than {MAX_PIXELS:,} pixels); downscale it"
        )
    if min(width, height) < MIN_SIDE:
        raise CrossinitError(f"{path}: image is too small ({width}x{height}; need at least {MIN_SIDE} px)")

    try:
        img.seek(0)
        # load() forces a full decode while the file is open: a truncated file fails here rather than
        # as grey pixels later (Pillow's LOAD_TRUNCATED_IMAGES stays off).
        img.load()
        return _to_rgb(_upright(img))
    except Image.DecompressionBombError as e:
        raise CrossinitError(f"{path}: image is too large (more than {MAX_PIXELS:,} pixels)") from e
    except _DECODE_ERRORS as e:
        raise CrossinitError(f"{path}: corrupt or truncated image ({_one_line(e)})") from e


def _one_line(error: object) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A malformed EXIF block (common in edited photos) is not a reason to
    reject pixels that decoded fine: the photo is then taken as stored."""
    try:
        # Only when there is something to do: exif_transpose copies even an upright 24 MP photo.
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha over white, through the ICC profile when there is one."""
    icc = img.info.get("icc_profile")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        img = flat
    if icc:
        return _icc_to_srgb(img if img.mode in ("RGB", "CMYK", "L") else img.convert("RGB"), icc)
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> 8-bit, scaled rather than clipped.

    Pillow's own convert() clips at 255, so a 16-bit PNG comes out almost white.
    """
    values = np.asarray(img)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
    elif img.mode.startswith("I;16") or values.max(initial=0) > 255:
        # 16-bit data ("I" is how older Pillow and TIFF deliver it); 65535 -> 255.
        top = 65535.0
    else:
        top = 255.0
    scaled = np.nan_to_num(values.astype(np.float64) * (255.0 / top), nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


@functools.cache
def _srgb_profile():  # -> ImageCms.ImageCmsProfile
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _icc_to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """Colour-manage into sRGB (phones save Display P3, print files CMYK with a profile).

    A profile that is broken or does not match the pixels is not the user's problem: fall back to
    Pillow's plain conversion.
    """
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littlecms
        return img.convert("RGB")
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(img, source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img.convert("RGB")


# --- detection ------------------------------------------------------------------------------------


@functools.cache
def _dlib():  # -> the dlib module
    try:
        import dlib
    except ImportError as e:
        raise CrossinitError(f"face alignment needs dlib: {_MODELS_HINT}") from e
    return dlib


def _model_path(name: str) -> Path:
    # face_recognition_models' __init__ imports pkg_resources, gone from new setuptools: find the
    # package's folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise CrossinitError(f"face alignment needs the face-recognition-models package: {_MODELS_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models" / name
        if candidate.is_file():
            return candidate
    raise CrossinitError(f"face-recognition-models is missing {name}; reinstall it ({_MODELS_HINT})")


@functools.cache
def _detector():  # -> dlib.fhog_object_detector
    return _dlib().get_frontal_face_detector()


@functools.cache
def _shape_predictor():  # -> dlib.shape_predictor
    return _dlib().shape_predictor(str(_model_path("shape_predictor_5_face_landmarks.dat")))


@functools.cache
def _face_encoder():  # -> dlib.face_recognition_model_v1
    return _dlib().face_recognition_model_v1(str(_model_path("dlib_face_recognition_resnet_model_v1.dat")))


def _downscaled(img: Image.Image, long_side: int) -> tuple[Image.Image, float]:
    """A copy whose long side is at most `long_side`, and the scale factor applied (<= 1)."""
    factor = -(-max(img.size) // long_side)  # ceil
    if factor <= 1:
        return img, 1.0
    # Box-averaging by a whole factor is the cheapest good downscale (40 ms for 24 MP), and exact to
    # map back: output pixel i covers input pixels [i * factor, (i + 1) * factor).
    return img.reduce(factor), 1.0 / factor


def _find_faces(pixels: np.ndarray):  # -> (dlib.rectangle, dlib.full_object_detection, count) | None
    """Largest face in an RGB uint8 array: its box, its 5 landmarks, and how many faces were seen.

    HOG finds faces of about 80 px and up; when nothing is found, one 2x upsampling catches smaller ones.
    """
    detector = _detector()
    pixels = np.ascontiguousarray(pixels)
    rects, scores, _ = detector.run(pixels, 0, 0.0)
    if len(rects) == 0:
        rects, scores, _ = detector.run(pixels, 1, 0.0)
    if len(rects) == 0:
        return None
    rects = [r for r, s in zip(rects, scores) if s >= WEAK_DETECTION * max(scores)]
    rect = max(rects, key=lambda r: r.width() * r.height())
    return rect, _shape_predictor()(pixels, rect), len(rects)


# --- cropping -------------------------------------------------------------------------------------


def _center_crop(path: Path, img: Image.Image, size: int) -> FaceCrop:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    box = (left, top, left + side, top + side)
    crop = img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return FaceCrop(path, crop, box, 0, photo_size=img.size, region_side=float(side), aligned=False)


def _ffhq_crop(
    img: Image.Image, eye_left: np.ndarray, eye_right: np.ndarray, nose: np.ndarray, size: int
) -> tuple[Image.Image, float]:
    """FFHQ's alignment (Karras et al., ffhq-dataset's recreate_aligned_images), from 5 points: the crop,
    and the side of the square it was cut from, in the photo's pixels.

    FFHQ takes the oriented square centred a tenth of the way from the eyes to the mouth, of side
    4 x max(eye distance, 0.9 x eye-to-mouth distance). Our mouth is estimated from the nose, and the
    square's rotation follows the eye line alone, so the eyes come out level. Where the square runs
    past the photo, FFHQ's fill is used: mirror the photo, blur it and fade it to the median colour.
    """
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (nose - eye_avg) * _MOUTH_PER_NOSE
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    x = eye_to_eye / max(np.hypot(*eye_to_eye), 1e-6) * half
    y = np.array([-x[1], x[0]])  # x turned 90 degrees towards the chin (image y points down)
    centre = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])
    side = 2 * half

    # Work on the square's bounding box only, shrunk to _SUPERSAMPLE x the output so that a 24 MP
    # photo costs about what a small one does.
    border = max(int(round(side * 0.1)), 3)
    lo = np.floor(quad.min(axis=0)).astype(int) - border
    hi = np.ceil(quad.max(axis=0)).astype(int) + border
    inside = (max(lo[0], 0), max(lo[1], 0), min(hi[0], img.width), min(hi[1], img.height))
    scale = min(1.0, _SUPERSAMPLE * size / side)
    width, height = inside[2] - inside[0], inside[3] - inside[1]
    if scale < 1.0:
        shrunk = (max(1, round(width * scale)), max(1, round(height * scale)))
        region = img.resize(shrunk, Image.Resampling.LANCZOS, box=inside, reducing_gap=3.0)
    else:
        region = img.crop(inside)
    # The exact per-axis factors after rounding the shrunk size, so the corners land where they should.
    factor = np.array([region.width / width, region.height / height])
    pads = (
        round((inside[0] - lo[0]) * factor[0]),
        round((inside[1] - lo[1]) * factor[1]),
        round((hi[0] - inside[2]) * factor[0]),
        round((hi[1] - inside[3]) * factor[1]),
    )
    if any(pads):
        region = _reflect_pad(region, pads, blur=side * scale * 0.02)
    corners = (quad - np.array(inside[:2])) * factor + np.array(pads[:2])
    work = int(min(_SUPERSAMPLE * size, max(size, round(side * scale))))
    out = region.transform((work, work), Image.Transform.QUAD, tuple(corners.flatten()), Image.Resampling.BICUBIC)
    if work != size:
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return out, float(side)


def _reflect_pad(region: Image.Image, pads: tuple[int, int, int, int], blur: float) -> Image.Image:
    """FFHQ's padding: mirror the photo outwards, blur the mirrored part and fade it to the median colour,
    so that the trainer sees a soft background rather than black bars."""
    left, top, right, bottom = pads
    padded = Image.fromarray(np.pad(np.asarray(region), ((top, bottom), (left, right), (0, 0)), mode="reflect"))
    w, h = padded.size
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    # 1 at the outer edge, 0 at the photo's edge, negative inside it (FFHQ lets the blur reach a third of
    # a pad width into the photo, no further).
    mask = np.full((h, w), -1.0, dtype=np.float32)
    if left:
        mask = np.maximum(mask, 1.0 - xs / left)
    if right:
        mask = np.maximum(mask, 1.0 - (w - 1 - xs) / right)
    if top:
        mask = np.maximum(mask, 1.0 - ys / top)
    if bottom:
        mask = np.maximum(mask, 1.0 - (h - 1 - ys) / bottom)

    def as_l(values: np.ndarray) -> Image.Image:
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), mode="L")

    # A blur this wide loses nothing when done at a quarter of the resolution, and is 16x cheaper there.
    quarter = padded.reduce(4) if min(w, h) >= 64 else padded
    radius = float(max(blur * quarter.width / w, 0.5))
    blurred = quarter.filter(ImageFilter.GaussianBlur(radius)).resize(padded.size, Image.Resampling.BILINEAR)
    padded = Image.composite(blurred, padded, as_l(mask * 3.0 + 1.0))
    median = np.median(np.asarray(padded)[::4, ::4].reshape(-1, 3), axis=0)  # a subsample is as good
    flat = Image.new("RGB", padded.size, tuple(int(round(v)) for v in median))
    return Image.composite(flat, padded, as_l(mask))
