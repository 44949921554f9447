"""Export formats read back by their consumers' own logic, import of every layout, hostile files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from crossinit_cli import formats
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library
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
