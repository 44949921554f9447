"""AUTOMATIC1111's PNG embeddings: crossinit's `a1111-png` export read back by a copy of A1111's own
decoding, by `crossinit import`, and A1111's pixel-coded variant read by crossinit.

The A1111 functions below are copied from stable-diffusion-webui's modules/textual_inversion/
image_embedding.py and textual_inversion.py (load_from_file's PNG branch, create_embedding_from_data), with
only `devices.device` dropped; they use torch and PIL as A1111 does, and none of crossinit's code.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from crossinit_cli import formats, pngembed
from crossinit_cli.store import Identity, Library

WIDTH = 32

# --- A1111, as its source has it -------------------------------------------------------------------


class EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


class EmbeddingDecoder(json.JSONDecoder):
    def __init__(self, *args, **kwargs):
        json.JSONDecoder.__init__(self, *args, object_hook=self.object_hook, **kwargs)

    def object_hook(self, d):
        if "TORCHTENSOR" in d:
            return torch.from_numpy(np.array(d["TORCHTENSOR"]))
        return d


def embedding_from_b64(data):
    d = base64.b64decode(data)
    return json.loads(d, cls=EmbeddingDecoder)


def lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def xor_block(block):
    g = lcg()
    randblock = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), randblock & 0x0F)


def style_block(block, sequence):
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 0
            if yi % 2 == 0:
                offset = 4
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def insert_image_data_embed(image, data):
    d = 3
    data_compressed = zlib.compress(json.dumps(data, cls=EmbeddingEncoder).encode(), level=9)
    data_np_ = np.frombuffer(data_compressed, np.uint8).copy()
    data_np_high = data_np_ >> 4
    data_np_low = data_np_ & 0x0F
    h = image.size[1]
    next_size = data_np_low.shape[0] + (h - (data_np_low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))
    data_np_low = np.resize(data_np_low, next_size)
    data_np_low = data_np_low.reshape((h, -1, d))
    data_np_high = np.resize(data_np_high, next_size)
    data_np_high = data_np_high.reshape((h, -1, d))
    edge_style = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge_style = (np.abs(edge_style) / np.max(np.abs(edge_style)) * 255).astype(np.uint8)
    data_np_low = style_block(data_np_low, sequence=edge_style)
    data_np_low = xor_block(data_np_low)
    data_np_high = style_block(data_np_high, sequence=edge_style[::-1])
    data_np_high = xor_block(data_np_high)
    im_low = Image.fromarray(data_np_low, mode="RGB")
    im_high = Image.fromarray(data_np_high, mode="RGB")
    background = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    background.paste(im_low, (0, 0))
    background.paste(image, (im_low.size[0] + 1, 0))
    background.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return background


def crop_black(img, tol=0):
    mask = (img > tol).all(2)
    mask0, mask1 = mask.any(0), mask.any(1)
    col_start, col_end = mask0.argmax(), mask.shape[1] - mask0[::-1].argmax()
    row_start, row_end = mask1.argmax(), mask.shape[0] - mask1[::-1].argmax()
    return img[row_start:row_end, col_start:col_end]


def extract_image_data_embed(image):
    d = 3
    outarr = (
        crop_black(np.array(image.convert("RGB").getdata()).reshape(image.size[1], image.size[0], d).astype(np.uint8))
        & 0x0F
    )
    black_cols = np.where(np.sum(outarr, axis=(0, 2)) == 0)
    if black_cols[0].shape[0] < 2:
        return None
    data_block_lower = outarr[:, : black_cols[0].min(), :].astype(np.uint8)
    data_block_upper = outarr[:, black_cols[0].max() + 1 :, :].astype(np.uint8)
    data_block_lower = xor_block(data_block_lower)
    data_block_upper = xor_block(data_block_upper)
    data_block = (data_block_upper << 4) | (data_block_lower)
    data_block = data_block.flatten().tobytes()
    data = zlib.decompress(data_block)
    return json.loads(data, cls=EmbeddingDecoder)


def a1111_load_png(path: Path):
    """EmbeddingDatabase.load_from_file's image branch, then create_embedding_from_data: (name, vec, step)."""
    import os

    name, ext = os.path.splitext(os.path.basename(path))
    embed_image = Image.open(path)
    if hasattr(embed_image, "text") and "sd-ti-embedding" in embed_image.text:
        data = embedding_from_b64(embed_image.text["sd-ti-embedding"])
        name = data.get("name", name)
    else:
        data = extract_image_data_embed(embed_image)
        if data:
            name = data.get("name", name)
        else:
            return None
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        param_dict = getattr(param_dict, "_parameters", param_dict)
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        emb = next(iter(param_dict.items()))[1]
        vec = emb.detach().to(dtype=torch.float32)
    elif type(data) == dict and "clip_g" in data and "clip_l" in data:  # noqa: E721 - A1111's own test
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}
    elif type(data) == dict and type(next(iter(data.values()))) == torch.Tensor:  # noqa: E721
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().to(dtype=torch.float32)
    else:
        raise Exception("Couldn't identify as neither textual inversion embedding nor diffuser concept.")
    return name, vec, data.get("step", None)


# --- crossinit's export, read by A1111 and by crossinit ---------------------------------------------


def _face() -> Image.Image:
    """A stand-in aligned crop: a gradient, so that any pixel moved or lost shows."""
    ramp = np.linspace(0, 255, 128, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(128, 0), ramp[:, None].repeat(128, 1), np.full((128, 128), 90.0)], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.fixture()
def alice(library: Library) -> np.ndarray:
    learned = np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32) * 0.3
    ident = Identity(name="alice", tokens=2, width=WIDTH, base_model="tiny", training={"steps": 25})
    library.add(ident, learned, crops=[_face()])
    return learned


def test_a1111_reads_the_png_export_with_its_own_decoding(cli, alice, tmp_path: Path) -> None:
    result = cli("export", "alice", "--format", "a1111-png", "-o", f"{tmp_path}/", "--json")
    assert result.exit_code == 0, result.stderr
    path = Path(json.loads(result.stdout)["path"])
    assert path.name == "alice.png"
    name, vec, step = a1111_load_png(path)
    assert name == "alice" and step == 25
    np.testing.assert_array_equal(vec.numpy(), alice)  # float32 -> JSON -> float64 -> float32: exact


def test_the_png_export_is_the_face_crop_with_the_name_on_it(cli, alice, library: Library, tmp_path: Path) -> None:
    assert cli("export", "alice", "-o", tmp_path / "alice.png").exit_code == 0
    framed = np.asarray(Image.open(tmp_path / "alice.png").convert("RGB"))
    crop = np.asarray(Image.open(library.crops("alice")[0]).convert("RGB"))
    edge = (framed.shape[1] - crop.shape[1] - 2) // 2  # the coded blocks, one each side, then a black column
    assert edge >= 1 and framed.shape == (crop.shape[0], crop.shape[1] + 2 * edge + 2, 3)
    assert not framed[:, edge].any() and not framed[:, -edge - 1].any()
    picture = framed[:, edge + 1 : edge + 1 + crop.shape[1]]
    band = picture.shape[0] - max(12, picture.shape[0] // 12) * 2  # the name's band is at the bottom
    np.testing.assert_array_equal(picture[:band], crop[:band])  # the face, untouched above it
    assert (picture[band:] != crop[band:]).any()
    bottom = picture[-(picture.shape[0] // 10) :]
    assert (bottom.max(axis=-1) > 240).sum() > 20, "white letters of the name"


def test_an_identity_without_crops_gets_a_card_with_its_name(cli, library: Library, tmp_path: Path) -> None:
    library.add(Identity(name="imported", tokens=1, width=WIDTH), np.ones((1, WIDTH), np.float32))
    assert cli("export", "imported", "-o", tmp_path / "i.png").exit_code == 0
    name, vec, _ = a1111_load_png(tmp_path / "i.png")
    assert name == "imported" and vec.shape == (1, WIDTH)


def test_the_png_export_round_trips_through_import(cli, alice, library: Library, tmp_path: Path) -> None:
    assert cli("export", "alice", "-o", tmp_path / "alice.png").exit_code == 0
    result = cli("import", tmp_path / "alice.png", "--name", "back", "--json")
    assert result.exit_code == 0, result.stderr
    back = library.get("back")
    assert back.source.startswith("import:a1111-png:") and back.base_model == "tiny"
    np.testing.assert_array_equal(library.vectors("back").learned, alice)


def test_an_sdxl_png_holds_clip_l_and_clip_g_as_a1111_reads_them(cli, library: Library, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    parts = {"clip_l": rng.standard_normal((3, 768)), "clip_g": rng.standard_normal((3, 1280))}
    parts = {k: v.astype(np.float32) for k, v in parts.items()}
    library.add(Identity(name="xl", tokens=3, width=768, family="sdxl", base_model="sdxl"), parts, crops=[_face()])
    result = cli("export", "xl", "-o", tmp_path / "xl.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert "write `xl` in a prompt" in json.loads(result.stdout)["usage"]
    name, vec, _ = a1111_load_png(tmp_path / "xl.png")  # SDXL: the name is the file's
    assert name == "xl" and sorted(vec) == ["clip_g", "clip_l"]
    for key in parts:
        np.testing.assert_array_equal(vec[key].numpy(), parts[key])
    assert cli("import", tmp_path / "xl.png", "--name", "xl2").exit_code == 0
    assert library.get("xl2").family == "sdxl"
    for key, stored in zip(parts, library.effective_parts("xl2")):
        np.testing.assert_array_equal(stored, parts[key])


def _stripped(path: Path, out: Path) -> Path:
    """`path`'s pixels saved again without any text chunk, as an image host or an editor may hand it on."""
    with Image.open(path) as image:
        Image.fromarray(np.asarray(image.convert("RGB"))).save(out)
    assert not Image.open(out).text
    return out


def test_the_png_export_carries_the_embedding_in_its_edges_too(cli, alice, library: Library, tmp_path: Path) -> None:
    """A1111's own decoder reads the text chunk and the coded edges to the same vectors, also once the text
    chunks are gone; so does crossinit's import."""
    rng = np.random.default_rng(4)
    parts = {"clip_l": rng.standard_normal((3, 768)), "clip_g": rng.standard_normal((3, 1280))}
    parts = {k: v.astype(np.float32) for k, v in parts.items()}
    library.add(Identity(name="xl", tokens=3, width=768, family="sdxl", base_model="sdxl"), parts, crops=[_face()])
    for name, expected in (("alice", {"": alice}), ("xl", parts)):
        path = tmp_path / f"{name}.png"
        assert cli("export", name, "-o", path).exit_code == 0
        with Image.open(path) as image:
            from_text = embedding_from_b64(image.text["sd-ti-embedding"])
            from_edges = extract_image_data_embed(image)  # A1111's function, on the picture as exported
        assert json.dumps(from_text, cls=EmbeddingEncoder) == json.dumps(from_edges, cls=EmbeddingEncoder)
        bare = _stripped(path, tmp_path / f"{name}-bare.png")
        loaded_name, vec, _ = a1111_load_png(bare)  # no text chunk: A1111 falls back to the edges
        assert loaded_name == ("alice" if name == "alice" else "xl-bare")
        for key, rows in expected.items():
            np.testing.assert_array_equal((vec[key] if key else vec).numpy(), rows)
        assert cli("import", bare, "--name", f"{name}2").exit_code == 0
        for key, stored in zip(expected, library.effective_parts(f"{name}2")):
            np.testing.assert_array_equal(stored, expected[key])


MEASURE = """
import resource, sys, time
from pathlib import Path
from crossinit_cli import pngembed
from crossinit_cli.errors import CrossinitError
start = time.perf_counter()
try:
    pngembed.read(Path(sys.argv[1]))
    said = "read"
except CrossinitError as exc:
    said = str(exc)
seconds = time.perf_counter() - start
try:  # this process's own peak: ru_maxrss also counts the RSS of the (pytest) process it was forked from
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seconds, peak, said, sep="\\n")
"""


@pytest.mark.parametrize("columns", [1, 2])
def test_a_6300px_mostly_empty_png_is_decoded_in_bounded_memory_and_quickly(columns: int, tmp_path: Path) -> None:
    """issue 28: a 131 KB PNG, 6300 x 6300, white but for a dark column, no text chunk: the edges' decoding
    stays under 768 MiB (it took 1.7 GB) and refuses it in seconds."""
    import subprocess
    import sys

    pixels = np.full((6300, 6300, 3), 255, dtype=np.uint8)
    pixels[:, 3149 : 3149 + columns] = 0  # two dark columns: equal blocks either side, of 56 MiB each
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    del pixels
    assert path.stat().st_size < 200_000
    root = Path(__file__).parent.parent
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    seconds, peak_kib, said = done.stdout.strip().split("\n")
    assert int(peak_kib) < 768 * 1024, f"{int(peak_kib) >> 10} MiB"
    assert float(seconds) < 15
    if columns == 1:
        assert "a picture without an embedding" in said
    else:
        assert "the data blocks in its edges hold" in said and "not an embedding's" in said


def test_a1111s_pixel_coded_png_imports(cli, library: Library, tmp_path: Path) -> None:
    """A1111's training previews: no text chunk, the embedding coded in the picture's edges."""
    rows = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 48)).astype(np.float32))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "edgy", "step": 1200}
    picture = insert_image_data_embed(_face(), data)
    picture.save(tmp_path / "preview.png")  # no pnginfo: only the edges carry it
    assert "sd-ti-embedding" not in Image.open(tmp_path / "preview.png").text
    assert a1111_load_png(tmp_path / "preview.png")[0] == "edgy"  # A1111 itself reads it back
    result = cli("import", tmp_path / "preview.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "edgy"
    np.testing.assert_array_equal(library.vectors("edgy").learned, rows.numpy())
    assert library.get("edgy").training == {"steps": 1200}


def test_a1111s_text_chunk_from_its_own_encoder_imports(cli, library: Library, tmp_path: Path) -> None:
    """A PNG as A1111's training writes it: the .pt dict through its EmbeddingEncoder, float64 lists."""
    from PIL.PngImagePlugin import PngInfo

    rows = torch.from_numpy(np.random.default_rng(8).standard_normal((4, 768)))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "sd15", "step": 3000,
            "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned"}  # fmt: skip
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data, cls=EmbeddingEncoder).encode()).decode())
    insert_image_data_embed(_face(), data).save(tmp_path / "sd15-3000.png", "PNG", pnginfo=info)
    result = cli("import", tmp_path / "sd15-3000.png", "--json")
    assert result.exit_code == 0, result.stderr
    ident = library.get("sd15")
    assert (ident.family, ident.base_model, ident.width) == ("sd1", "v1-5-pruned", 768)
    np.testing.assert_array_equal(library.vectors("sd15").learned, rows.numpy().astype(np.float32))


def test_a_folder_import_takes_png_embeddings_and_skips_previews(cli, alice, library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    assert cli("export", "alice", "-o", folder / "alice.png").exit_code == 0
    _face().save(folder / "alice.preview.png")  # A1111's preview of an embedding, skipped by its loader too
    result = cli("import", folder, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["name"] for r in report["imported"]] == ["alice"]
    assert [Path(s["file"]).name for s in report["skipped"]] == ["alice.preview.png"]


def test_the_lcg_is_a1111s() -> None:
    """A1111's own self-test of its lcg(): the first 100 values and the sum of the next 100,000."""
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215, 220, 194, 126,
                 28, 240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38, 128, 19, 53, 195, 124,
                 75, 205, 12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249, 97, 166, 12, 35, 0, 41, 221, 122, 215,
                 170, 31, 113, 186, 97, 119, 31, 23, 185, 66, 140, 30, 41, 37, 63, 137, 109, 216, 55, 159, 145, 82, 204,
                 86, 73, 222, 44, 198, 118, 240, 97]  # fmt: skip
    stream = pngembed.lcg_stream(100_100)
    assert stream[:100].tolist() == reference
    assert int(stream[100:].astype(np.int64).sum()) == 12731374
    g = lcg()
    np.testing.assert_array_equal(stream[:10_000], np.array([next(g) for _ in range(10_000)]).astype(np.uint8))


def test_the_png_format_is_one_record() -> None:
    record = formats.REGISTRY["a1111-png"]
    assert (record.suffix, record.picture, record.single_encoder, record.tools) == (".png", True, "", ())
