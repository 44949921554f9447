"""Export formats read back by their consumers' own logic, import of every layout, hostile files."""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from crossinit_cli import formats
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library
from tests import test_readers
from tests.conftest import OFFICIAL

WIDTH = 32


def _learned(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, WIDTH)).astype(np.float32) * 0.3


@pytest.fixture()
def alice(library: Library) -> np.ndarray:
    learned = _learned()
    library.add(Identity(name="alice", tokens=2, width=WIDTH, base_model="tiny"), learned)
    return learned


# --- what the consumers do, written from their sources, without crossinit's code -------------------


def a1111_read(path: Path) -> torch.Tensor:
    """stable-diffusion-webui modules/textual_inversion: load_from_file + create_embedding_from_data."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        emb = next(iter(param_dict.items()))[1]
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
    else:
        raise Exception("Couldn't identify as neither textual inversion embedding nor diffuser concept.")
    return emb.detach().to(torch.float32)


def comfyui_read(path: Path) -> torch.Tensor:
    """ComfyUI comfy/sd1_clip.py load_embed for a safetensors file."""
    embed = load_file(str(path))
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if "emb_params" in embed:
        return embed["emb_params"]
    return next(iter(embed.values()))


def invokeai_read(path: Path) -> torch.Tensor:
    """InvokeAI TextualInversionModelRaw.from_checkpoint (SD 1.x/2.x branch)."""
    state = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    if "string_to_param" in state:
        return list(state["string_to_param"].values())[0]
    if "emb_params" in state:
        return state["emb_params"]
    if len(state) > 1:
        raise ValueError("Unknown textual inversion format")
    return list(state.values())[0]


# --- export ----------------------------------------------------------------------------------------


def test_a1111_export_is_one_tensor_named_emb_params(cli, alice, tmp_path: Path) -> None:
    result = cli("export", "alice", "-o", f"{tmp_path}/")
    assert result.exit_code == 0, result.stderr
    path = tmp_path / "alice.safetensors"
    raw = load_file(str(path))
    assert list(raw) == ["emb_params"] and raw["emb_params"].dtype == torch.float32
    assert raw["emb_params"].shape == (2, WIDTH)
    np.testing.assert_array_equal(a1111_read(path).numpy(), alice)
    np.testing.assert_array_equal(comfyui_read(path).numpy(), alice)


def test_a1111_pt_export_has_a1111_keys(cli, alice, tmp_path: Path) -> None:
    assert cli("export", "alice", "-f", "a1111-pt", "-o", tmp_path / "a.pt").exit_code == 0
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == "alice" and data["sd_checkpoint"] is None
    assert data["sd_checkpoint_name"] == "tiny"
    np.testing.assert_array_equal(a1111_read(tmp_path / "a.pt").numpy(), alice)


def test_official_export_matches_official_layout(cli, alice, tmp_path: Path) -> None:
    assert cli("export", "alice", "-f", "official", "-o", tmp_path / "o.bin").exit_code == 0
    data = torch.load(tmp_path / "o.bin", weights_only=True)
    reference = torch.load(OFFICIAL[0], weights_only=True)
    assert sorted(data) == ["alice_v0", "alice_v1"]
    assert [v.shape for v in data.values()][0].__len__() == next(iter(reference.values())).dim() == 1
    np.testing.assert_array_equal(torch.stack([data["alice_v0"], data["alice_v1"]]).numpy(), alice)


def test_invokeai_export_loads_in_invokeai_logic(cli, alice, tmp_path: Path) -> None:
    result = cli("export", "alice", "-f", "invokeai", "-o", f"{tmp_path}/", "--json")
    record = json.loads(result.stdout)
    assert record["path"] == str(tmp_path / "alice.safetensors")
    np.testing.assert_array_equal(invokeai_read(Path(record["path"])).numpy(), alice)


@pytest.mark.parametrize("fmt", ["a1111", "a1111-pt", "diffusers"])
def test_diffusers_load_textual_inversion_reads_export(fmt: str, cli, alice, tiny_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    result = cli("export", "alice", "-f", fmt, "-o", f"{tmp_path}/", "--json")
    path = json.loads(result.stdout)["path"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.load_textual_inversion(path, token="<alice>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<alice>", "<alice>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().numpy()
    np.testing.assert_allclose(rows, alice, rtol=0, atol=0)
    expanded = pipe.maybe_convert_prompt("a photo of <alice>", pipe.tokenizer)
    assert expanded == "a photo of <alice> <alice>_1"


def test_export_uses_stored_strength(cli, library: Library, tmp_path: Path) -> None:
    learned, init = _learned(1), _learned(2)
    library.add(Identity(name="s", tokens=2, width=WIDTH), learned, init)
    assert cli("edit", "s", "--strength", "0.5").exit_code == 0
    cli("export", "s", "-o", tmp_path / "s.safetensors")
    np.testing.assert_allclose(
        load_file(str(tmp_path / "s.safetensors"))["emb_params"].numpy(), init + 0.5 * (learned - init), rtol=1e-6
    )


def test_export_refuses_to_overwrite_without_force(cli, alice, tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"keep me")
    result = cli("export", "alice", "-o", target)
    assert result.exit_code == 1 and "--force" in result.stderr and target.read_bytes() == b"keep me"
    assert cli("export", "alice", "-o", target, "--force").exit_code == 0
    assert list(load_file(str(target))) == ["emb_params"]


# --- round trips and official files ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_export_import_round_trip_is_identical(fmt: str, cli, alice, library: Library, tmp_path: Path) -> None:
    result = cli("export", "alice", "-f", fmt, "-o", f"{tmp_path}/", "--json")
    assert result.exit_code == 0, result.stderr
    path = json.loads(result.stdout)["path"]
    result = cli("import", path, "--name", "back", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["source"].startswith("import:")
    back = library.vectors("back").learned
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, alice)


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.name)
def test_official_bins_import_as_2x1024(path: Path, cli, library: Library) -> None:
    result = cli("import", path, "--model", "stabilityai/stable-diffusion-2-1-base")
    assert result.exit_code == 0, result.stderr
    ident = library.get(path.stem)
    assert (ident.tokens, ident.width, ident.base_model) == (2, 1024, "stabilityai/stable-diffusion-2-1-base")
    original = torch.load(path, weights_only=True)
    stored = library.vectors(path.stem).learned
    np.testing.assert_array_equal(
        stored, torch.stack([original[f"{path.stem}_v0"], original[f"{path.stem}_v1"]]).numpy()
    )
    assert stored.dtype == np.float32


def test_import_of_a_diffusers_folder(cli, library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "concept"
    folder.mkdir()
    save_file({"<cat-toy>": torch.ones(1, WIDTH)}, str(folder / "learned_embeds.safetensors"))
    assert cli("import", folder).exit_code == 0
    assert library.get("cat-toy").tokens == 1


# --- hostile files ---------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    files["code-pickle"] = tmp_path / "evil.pt"
    torch.save({"emb_params": evil}, files["code-pickle"])
    files["raw-pickle"] = tmp_path / "raw.bin"
    files["raw-pickle"].write_bytes(pickle.dumps(evil))

    good = tmp_path / "good.safetensors"
    save_file({"emb_params": torch.ones(2, WIDTH)}, str(good))
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) - 40])
    files["huge-header"] = tmp_path / "huge.safetensors"
    files["huge-header"].write_bytes(struct.pack("<Q", 2**40) + b'{"a":1}')
    header = json.dumps(
        {"emb_params": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4 * 10**10]}}
    ).encode()
    files["gigantic-declared"] = tmp_path / "gigantic.safetensors"
    files["gigantic-declared"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["noise"] = tmp_path / "noise.bin"
    files["noise"].write_bytes(os.urandom(512))
    for name, tensor in {
        "nan": torch.tensor([[float("nan")] * WIDTH] * 2),
        "inf": torch.full((2, WIDTH), float("inf")),
        "int": torch.ones(2, WIDTH, dtype=torch.int32),
        "3d": torch.ones(2, 2, WIDTH),
        "too-many": torch.ones(64, WIDTH),
    }.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"emb_params": tensor}, str(files[name]))
    for name, state in {  # SDXL files that must not load: k differs, widths wrong or swapped, NaN, a key short
        "sdxl-k": {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(3, 1280)},
        "sdxl-swapped": {"clip_l": torch.ones(2, 1280), "clip_g": torch.ones(2, 768)},
        "sdxl-width": {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1024)},
        "sdxl-nan": {"clip_l": torch.ones(2, 768), "clip_g": torch.full((2, 1280), float("nan"))},
        "sdxl-half": {"clip_l": torch.ones(2, 768)},
        "sdxl-extra": {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280), "emb_params": torch.ones(2, 768)},
    }.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(state, str(files[name]))
    files["multi"] = tmp_path / "multi.safetensors"
    save_file({"a": torch.ones(2, WIDTH), "b": torch.ones(2, WIDTH)}, str(files["multi"]))
    files["not-a-dict"] = tmp_path / "list.pt"
    torch.save([torch.ones(2, WIDTH)], files["not-a-dict"])
    files.update(_hostile_pngs(tmp_path))
    return files


def _png(path: Path, texts: dict[str, str], picture: Image.Image | None = None) -> Path:
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    (picture or Image.new("RGB", (64, 64), (90, 90, 90))).save(path, "PNG", pnginfo=info)
    return path


def _b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def _hostile_pngs(tmp_path: Path) -> dict[str, Path]:
    """PNG 'embeddings' that must not load: none in them, not base64/JSON, not tensors, wrong shapes."""
    tensor = {"TORCHTENSOR": [[0.5] * WIDTH] * 2}
    files = {
        "png-plain-picture": _png(tmp_path / "plain.png", {}),
        "png-text-not-json": _png(tmp_path / "notjson.png", {"sd-ti-embedding": base64.b64encode(b"{oops").decode()}),
        "png-text-a-list": _png(tmp_path / "list.png", {"sd-ti-embedding": _b64([1, 2])}),
        "png-ragged-tensor": _png(
            tmp_path / "ragged.png",
            {"sd-ti-embedding": _b64({"string_to_param": {"*": {"TORCHTENSOR": [[1.0], [1, 2]]}}})},
        ),
        "png-strings-tensor": _png(
            tmp_path / "strings.png", {"sd-ti-embedding": _b64({"string_to_param": {"*": {"TORCHTENSOR": [["a"]]}}})}
        ),
        "png-two-terms": _png(
            tmp_path / "two.png", {"sd-ti-embedding": _b64({"string_to_param": {"*": tensor, "+": tensor}})}
        ),
        "png-sdxl-with-name": _png(
            tmp_path / "xlname.png",
            {
                "sd-ti-embedding": _b64(
                    {"clip_l": {"TORCHTENSOR": [[0.1] * 768]}, "clip_g": {"TORCHTENSOR": [[0.1] * 1280]}, "name": "x"}
                )
            },
        ),
        "png-deep-json": _png(tmp_path / "deep.png", {"sd-ti-embedding": base64.b64encode(b"[" * 100000).decode()}),
    }
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(
        _png(tmp_path / "whole.png", {"sd-ti-embedding": _b64({"emb_params": tensor})}).read_bytes()[:-30]
    )
    files["png-truncated"] = truncated
    return files


def test_hostile_embedding_files_are_refused(cli, alice, library: Library, tmp_path: Path) -> None:
    before = sorted(p.relative_to(library.home) for p in library.home.rglob("*") if ".lock" not in p.name)
    for label, path in _hostile_files(tmp_path).items():
        result = cli("import", path, "--name", "intruder")
        assert result.exit_code == 1, f"{label}: {result.stderr}"
        assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, f"{label}: {result.stderr!r}"
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists(), "a pickle ran code"
    after = sorted(p.relative_to(library.home) for p in library.home.rglob("*") if ".lock" not in p.name)
    assert after == before
    assert [e.name for e in library.list()] == ["alice"]


def test_read_embedding_file_names_the_reason() -> None:
    with pytest.raises(CrossinitError, match="no such file"):
        formats.read_embedding_file(Path("/nonexistent/x.pt"))


def test_a_truncated_pickle_is_a_one_line_refusal(cli, library: Library, tmp_path: Path) -> None:
    """torch's weights-only unpickler raises IndexError on some garbage (found by importing a folder)."""
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x80garbage")
    result = cli("import", bad)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "not a readable torch file" in result.stderr and library.list() == []


# --- the same bytes every time -----------------------------------------------------------------------

_EXPORT_ALL = """
import hashlib, sys
from pathlib import Path
from crossinit_cli import formats
from crossinit_cli.store import Library
library = Library(Path(sys.argv[1]))
for name in ("alice", "xl"):
    ident = library.get(name)
    crops = library.crops(name)
    for fmt in formats.FORMATS:
        if formats.REGISTRY[fmt].single_encoder and ident.family == "sdxl":
            continue
        data = formats.encode(
            library.effective_parts(name), name, fmt, base_model=ident.base_model, steps=7, family=ident.family,
            picture=crops[0] if crops and formats.REGISTRY[fmt].picture else None,
        )
        print(name, fmt, hashlib.sha256(data).hexdigest())
"""


def _sdxl_identity(library: Library, name: str = "xl", crops: tuple = ()) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((2, 768)).astype(np.float32), rng.standard_normal((2, 1280)).astype(np.float32)]
    ident = Identity(name=name, tokens=2, width=768, family="sdxl", base_model="stabilityai/sdxl")
    library.add(ident, {"clip_l": parts[0], "clip_g": parts[1]}, crops=list(crops))
    return parts


def test_every_format_gives_the_same_bytes_in_every_process(cli, library: Library, tmp_path: Path) -> None:
    """safetensors' own header order follows a hash map seeded per process: two processes (and two hash
    seeds) must still write the same bytes, or the file's hash, which A1111 records, changes each time."""
    face = Image.new("RGB", (96, 96), (200, 150, 120))
    library.add(Identity(name="alice", tokens=2, width=WIDTH, base_model="tiny"), _learned(), crops=[face])
    _sdxl_identity(library)
    runs = []
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).parent.parent)}
        done = subprocess.run(
            [sys.executable, "-c", _EXPORT_ALL, str(library.home)], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        runs.append(done.stdout)
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0].splitlines()) == 2 * len(formats.FORMATS) - 2  # SDXL: all but the two pickles
    for fmt in formats.FORMATS:  # and through the command, twice, in this process
        first = cli("export", "alice", "-f", fmt, "-o", f"{tmp_path}/a/{fmt}/")
        again = cli("export", "alice", "-f", fmt, "-o", f"{tmp_path}/b/{fmt}/")
        assert first.exit_code == again.exit_code == 0, first.stderr + again.stderr
        name = formats.default_filename("alice", fmt)
        assert (tmp_path / "a" / fmt / name).read_bytes() == (tmp_path / "b" / fmt / name).read_bytes(), fmt


def test_the_safetensors_header_is_sorted_and_aligned(alice, library: Library) -> None:
    data = formats.encode(alice, "alice", "a1111", base_model="tiny", family="sd1")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert size % 8 == 0 and list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    np.testing.assert_array_equal(load_file_bytes(data)["emb_params"], alice)


def load_file_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


# --- -o: the file's name says what it holds ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout"),
    [("a.pt", "a1111-pt"), ("a.bin", "official"), ("a.safetensors", "a1111"), ("a.png", "a1111-png"),
     ("a.diffusers.safetensors", "diffusers"), ("A.PT", "a1111-pt")],
)  # fmt: skip
def test_the_suffix_of_o_picks_the_format(name: str, layout: str, cli, alice, tmp_path: Path) -> None:
    result = cli("export", "alice", "-o", tmp_path / name, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == layout
    assert formats.read_embedding_file(tmp_path / name).layout == ("a1111" if layout == "invokeai" else layout)
    if name.lower().endswith(".pt"):  # torch itself loads it, as A1111 does
        np.testing.assert_array_equal(a1111_read(tmp_path / name).numpy(), alice)


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--format", "a1111", "-o", "x.pt"], ["x.pt is a .pt file", "--format a1111 writes .safetensors"]),
     (["--format", "official", "-o", "x.safetensors"], [".safetensors file", "a1111"]),
     (["--format", "a1111-png", "-o", "x.bin"], [".bin file"]),
     (["-o", "x.txt"], [".txt is not an export file suffix"])],
)  # fmt: skip
def test_a_file_name_that_misdescribes_its_format_is_refused(args: list, words: list, cli, alice, tmp_path) -> None:
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    result = cli("export", "alice", *args)
    assert result.exit_code == 1 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    for word in words:
        assert word in result.stderr, result.stderr
    assert not list(tmp_path.glob("x.*"))


def test_a_format_of_the_same_kind_may_be_named(cli, alice, tmp_path: Path) -> None:
    """--format diffusers or invokeai into a .safetensors file: the kind matches, the layout is the format's."""
    assert cli("export", "alice", "--format", "diffusers", "-o", tmp_path / "d.safetensors").exit_code == 0
    assert list(load_file(str(tmp_path / "d.safetensors"))) == ["<alice>"]


def test_a_file_name_without_an_extension_gets_its_formats(cli, alice, tmp_path: Path) -> None:
    """`-o noext`: the default layout, in `noext.safetensors`, which A1111's own loader reads (it skips a
    file without an embedding extension); `-f a1111-pt -o noext` writes `noext.pt`. The message names it."""
    result = cli("export", "alice", "-o", tmp_path / "noext")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("noext*")) == ["noext.safetensors"]
    assert list(load_file(str(tmp_path / "noext.safetensors"))) == ["emb_params"]
    assert f"to {tmp_path / 'noext.safetensors'}" in result.stderr + result.stdout
    assert "write `noext` in a prompt" in result.stderr + result.stdout
    rows = test_readers.LOADERS["a1111"](tmp_path / "noext.safetensors")
    assert [tuple(r.shape) for r in rows] == [(2, WIDTH)]
    assert cli("export", "alice", "-f", "a1111-pt", "-o", tmp_path / "noext").exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("noext*")) == ["noext.pt", "noext.safetensors"]
    again = cli("export", "alice", "-o", tmp_path / "noext")  # the file it would write exists
    assert again.exit_code == 1 and "noext.safetensors already exists" in again.stderr


def test_several_identities_and_one_file_name_are_refused(cli, alice, library: Library, tmp_path: Path) -> None:
    library.add(Identity(name="bob", tokens=2, width=WIDTH), _learned(5))
    for target in ("one.safetensors", "one.png"):
        result = cli("export", "alice", "bob", "-o", tmp_path / target)
        assert result.exit_code == 1 and "names one file; several identities need a folder" in result.stderr
        assert not (tmp_path / target).exists()
    assert cli("export", "alice", "bob", "-o", tmp_path / "out").exit_code == 0  # a new folder, no suffix
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alice.safetensors", "bob.safetensors"]
    (tmp_path / "odd.safetensors").mkdir()  # an existing folder keeps its meaning, whatever its name
    assert cli("export", "alice", "bob", "-o", tmp_path / "odd.safetensors").exit_code == 0
    assert cli("export", "alice", "-o", f"{tmp_path}/one/", "-f", "a1111-pt").exit_code == 0
    assert (tmp_path / "one" / "alice.pt").is_file()


# --- the tools' older files ----------------------------------------------------------------------------


def _parameter_dict_pt(path: Path, rows: torch.Tensor, *, old: bool = False, extra: dict | None = None) -> Path:
    """An original textual-inversion / older A1111 .pt: string_to_param a real torch.nn.ParameterDict.
    `old`: as torch 1.11 pickled it (no `_keys`, fewer hook dicts), which later torch cannot iterate."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(rows.clone())})
    if old:
        for attr in ("_keys", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_pre_hooks"):
            vars(params).pop(attr, None)
    state = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params, **(extra or {})}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("old", [False, True], ids=["torch-2", "torch-1.11-layout"])
def test_a_parameter_dict_pt_imports(old: bool, cli, library: Library, tmp_path: Path) -> None:
    rows = torch.from_numpy(_learned(7))
    extra = {"name": "tio", "step": 500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "v1-5"}
    path = _parameter_dict_pt(tmp_path / "classic.pt", rows, old=old, extra=extra)
    with pytest.raises(pickle.UnpicklingError):  # what refused it before: not a plain-tensor pickle
        torch.load(path, weights_only=True)
    result = cli("import", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "tio"
    np.testing.assert_array_equal(library.vectors("tio").learned, rows.numpy())
    assert library.get("tio").training == {"steps": 500}
    original = _parameter_dict_pt(tmp_path / "rinongal.pt", rows)  # the original code's two keys only
    assert cli("import", original, "--name", "orig").exit_code == 0
    np.testing.assert_array_equal(library.vectors("orig").learned, rows.numpy())


def test_the_allow_list_is_torchs_own_and_holds_only_parameter_dict(tmp_path: Path) -> None:
    """No hand-written unpickler: torch.load(weights_only=True) under safe_globals([ParameterDict]), and
    torch's global allow-list is left as it was."""
    calls = []
    real = torch.serialization.safe_globals

    class Spy(real):
        def __init__(self, allowed):
            calls.append(list(allowed))
            super().__init__(allowed)

    path = _parameter_dict_pt(tmp_path / "p.pt", torch.ones(1, WIDTH))
    try:
        torch.serialization.safe_globals = Spy
        formats.read_embedding_file(path)
    finally:
        torch.serialization.safe_globals = real
    assert calls == [[torch.nn.ParameterDict]]
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()  # only while reading


# --- errors quote libraries without their terminal codes ---------------------------------------------


def test_a_refused_pickle_is_reported_without_escape_codes(tmp_path: Path) -> None:
    """torch's refusal of a global it does not allow carries ANSI bold codes even under NO_COLOR."""
    import argparse

    path = tmp_path / "namespace.pt"
    torch.save({"emb_params": argparse.Namespace(a=1)}, path)
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        assert "\x1b[" in str(exc).splitlines()[0]  # what would reach the terminal unfiltered
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    env["CROSSINIT_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", "import", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "\x1b" not in done.stderr and "GLOBAL argparse.Namespace" in done.stderr, done.stderr


def test_library_text_keeps_one_clean_line() -> None:
    from crossinit_cli.errors import library_text

    said = "\x1b[1mWeights only\x1b[0m load \x1b]8;;http://x\x07failed\x1b]8;;\x07.\r\x07\n\nsecond line"
    assert library_text(RuntimeError(said)) == "Weights only load failed."
    assert library_text(RuntimeError("a\nthe GLOBAL x line\tok\x9b2J"), prefer="GLOBAL") == "the GLOBAL x line\tok"
    assert library_text(RuntimeError("")) == "RuntimeError"
    assert len(library_text("x" * 500, 40)) == 40


# --- SDXL in plain diffusers: pool at the end token ------------------------------------------------


@torch.no_grad()
def test_the_sdxl_note_for_diffusers_users_moves_the_pooled_output_to_the_end_token(
    library: Library, tiny_sdxl: Path, tmp_path: Path
) -> None:
    """SDXL base's text_encoder_2 config says eos_token_id 2; transformers' CLIPTextTransformer then pools at
    the highest token id, which after load_textual_inversion is <alice>. The docs' one line fixes it; setting
    only `config.eos_token_id` does not (CLIPTextTransformer copies it at construction)."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    model = shutil.copytree(tiny_sdxl, tmp_path / "xl")
    config_path = model / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "eos_token_id": 2}))  # as SDXL base's config ships
    rng = np.random.default_rng(9)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    state = {"clip_l": rng.standard_normal((2, widths[0])), "clip_g": rng.standard_normal((2, widths[1]))}
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}
    pipe.load_textual_inversion(
        state["clip_l"], token="<alice>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="<alice>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt = "a photo of <alice>"
    ids = pipe.tokenizer_2(pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2), padding="max_length",
                           max_length=pipe.tokenizer_2.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
    at = {i: pipe.text_encoder_2.text_projection(out.last_hidden_state[0, i]) for i in (eos, int(ids[0].argmax()))}
    assert int(ids[0].argmax()) != eos

    def pooled() -> torch.Tensor:
        return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[2][0]

    torch.testing.assert_close(pooled(), at[int(ids[0].argmax())])  # without the line: pooled at <alice>
    pipe.text_encoder_2.config.eos_token_id = pipe.tokenizer_2.eos_token_id
    torch.testing.assert_close(pooled(), at[int(ids[0].argmax())])  # the config alone changes nothing
    pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id  # the docs' line
    torch.testing.assert_close(pooled(), at[eos])
    docs = (Path(__file__).parent.parent / "docs" / "formats.md").read_text()
    assert "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id" in docs
    assert "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id" in formats.REGISTRY[
        "diffusers"
    ].usage(Path("x"), "alice", "x", 2)


def test_import_checks_the_vectors_against_model_and_infers_the_family_from_widths(
    cli, library: Library, tiny_sdxl: Path, tmp_path: Path
) -> None:
    official = OFFICIAL[0]  # one SD 2.x encoder, 1024 wide
    wrong = cli("import", official, "--name", "o3", "--model", tiny_sdxl)
    assert wrong.exit_code == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "width 1024" in wrong.stderr and "is SDXL" in wrong.stderr and "--model" in wrong.stderr
    assert not library.exists("o3")

    sd1 = tmp_path / "ada.safetensors"
    save_file({"emb_params": torch.ones(2, 768)}, str(sd1))
    sdxl = tmp_path / "bea.safetensors"
    save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, str(sdxl))
    odd = tmp_path / "cat.safetensors"
    save_file({"emb_params": torch.ones(2, 640)}, str(odd))
    for path, family, title in ((sd1, "sd1", "SD 1.x"), (sdxl, "sdxl", "SDXL")):
        result = cli("import", path)
        assert result.exit_code == 0, result.stderr
        assert library.get(path.stem).family == family
        if family == "sd1":  # told from the widths alone, and said so
            assert f"{title} (from the vector widths)" in result.stderr
    assert cli("import", odd).exit_code == 0 and library.get("cat").family == ""  # 640: nothing to tell
