"""One table of readers per format (readers.READERS) and one of clip-skip settings per tool
(readers.CLIP_SKIP_SETTINGS): checked here against each tool's own loader, transcribed from its code, and the
messages, `--help`, `export --json` and docs/formats.md that come from them."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crossinit_cli import formats, readers
from crossinit_cli.store import Identity, Library

DOCS = Path(__file__).parent.parent / "docs" / "formats.md"
SUFFIXES = {f.name: f.suffix for f in formats.REGISTRY.values()}


# --- each tool's own loader, transcribed from its code (SD 1.x/2.x and SDXL branches) -----------------------


def _tensor_hook(d: dict[str, Any]) -> Any:
    return torch.from_numpy(np.array(d["TORCHTENSOR"])) if "TORCHTENSOR" in d else d


def _webui(path: Path) -> list[torch.Tensor]:
    """AUTOMATIC1111 and Forge: textual_inversion.py load_from_file + create_embedding_from_data."""
    ext = path.suffix.upper()
    if ext == ".PNG":
        text = Image.open(path).text["sd-ti-embedding"]
        data = json.loads(base64.b64decode(text), object_hook=_tensor_hook)
    elif ext in (".BIN", ".PT"):
        data = torch.load(path, map_location="cpu")
    elif ext == ".SAFETENSORS":
        data = load_file(str(path))
    else:
        raise ValueError("not an embedding file")
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        return [next(iter(param_dict.values())).float()]
    if isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        return [data["clip_l"].float(), data["clip_g"].float()]
    if isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        return [emb.unsqueeze(0) if emb.dim() == 1 else emb]
    raise ValueError("Couldn't identify as neither textual inversion embedding nor diffuser concept")


def _comfyui(path: Path) -> list[torch.Tensor]:
    """ComfyUI comfy/sd1_clip.py load_embed (.safetensors, .pt, .bin), once per encoder key (sdxl_clip.py)."""
    if path.suffix.lower() == ".safetensors":
        embed = load_file(str(path))
    else:
        embed = torch.load(path, weights_only=True, map_location="cpu")  # a PNG raises here: not loaded
    out = []
    for key in ("clip_l", "clip_g") if "clip_g" in embed else ("clip_l",):
        if "string_to_param" in embed:
            value = next(iter(embed["string_to_param"].values()))
        elif key in embed:
            value = embed[key]
        else:
            value = next(iter(embed.values()))
        out.append(value.reshape(-1, value.shape[-1]))
    return out


def _invokeai(path: Path) -> list[torch.Tensor]:
    """InvokeAI: the Model Manager's probe (configs/textual_inversion.py), then TextualInversionModelRaw."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_token" in state:
        token_dim = list(state["string_to_param"].values())[0].shape[-1]
    elif "emb_params" in state:
        token_dim = state["emb_params"].shape[-1]
    elif "clip_g" in state:
        token_dim = state["clip_g"].shape[-1]
    else:
        token_dim = list(state.values())[0].shape[0]
    if token_dim not in (768, 1024, 1280):
        raise ValueError(f"NotAMatchError: unrecognized token dimension {token_dim}")
    if "string_to_param" in state:
        return [next(iter(state["string_to_param"].values()))]
    if "emb_params" in state:
        return [state["emb_params"]]
    if "clip_g" in state and "clip_l" in state:
        return [state["clip_l"], state["clip_g"]]
    emb = next(iter(state.values()))
    return [emb.unsqueeze(0) if emb.dim() == 1 else emb]


def _sdnext(path: Path) -> list[torch.Tensor]:
    """SD.Next modules/textual_inversion.py: list_embeddings (.safetensors, .pt) + open_embeddings."""
    if path.suffix.upper() not in (".SAFETENSORS", ".PT"):
        raise ValueError("not listed")
    if path.suffix.upper() == ".SAFETENSORS":
        return list(load_file(str(path)).values())  # matched to the encoders by width
    return [torch.load(path, map_location="cpu", weights_only=True)["string_to_param"]["*"]]


LOADERS = {"a1111": _webui, "forge": _webui, "comfyui": _comfyui, "invokeai": _invokeai, "sdnext": _sdnext}


def _reads(tool: str, path: Path, parts: list[np.ndarray]) -> str:
    """ "full", "partial" or "no": what `tool`'s own loader makes of the exported file."""
    try:
        got = LOADERS[tool](path)
    except Exception:  # noqa: BLE001 - any failure is the tool not loading it
        return "no"
    rows = sorted(tuple(t.shape) for t in got)
    if rows == sorted(p.shape for p in parts):
        for got_part in got:
            match = [p for p in parts if p.shape == tuple(got_part.shape)]
            assert np.allclose(got_part.float().numpy(), match[0], atol=1e-6)
        return readers.FULL
    return readers.PARTIAL


def _identity(library: Library, family: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if family == "sdxl":
        parts = [rng.standard_normal((2, 768)).astype(np.float32), rng.standard_normal((2, 1280)).astype(np.float32)]
        library.add(
            Identity(name="alice", tokens=2, width=768, family="sdxl"), {"clip_l": parts[0], "clip_g": parts[1]}
        )
        return parts
    width = 768 if family == "sd1" else 1024
    parts = [rng.standard_normal((2, width)).astype(np.float32)]
    library.add(Identity(name="alice", tokens=2, width=width, family=family), parts[0])
    return parts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_readers_table_is_what_each_tools_own_loader_does(family: str, library: Library, tmp_path: Path) -> None:
    parts = _identity(library, family)
    for fmt in formats.FORMATS:
        if family == "sdxl" and formats.REGISTRY[fmt].single_encoder:
            continue
        path = tmp_path / f"alice{SUFFIXES[fmt]}"
        ident = library.get("alice")
        export = formats.Export(parts, "alice", "", 0, family, None, 1)
        formats.export_vectors(export, fmt, path)
        table = {r.tool: r.level for r in readers.readers(fmt, family)}
        for tool in LOADERS:
            assert _reads(tool, path, parts) == table.get(tool, "no"), (fmt, family, tool, ident.name)


def test_an_official_bin_and_a_png_name_only_the_tools_that_read_them(cli, library: Library, tmp_path: Path) -> None:
    _identity(library, "sd2")
    official = cli("export", "alice", "-o", tmp_path / "alice.bin")
    assert official.exit_code == 0, official.stderr
    fits = next(line for line in official.stderr.splitlines() if line.startswith("fits "))
    assert fits == (
        "fits SD 2.x checkpoints (SD 2.1 and its fine-tunes) in the official Cross Init code; partly in ComfyUI "
        "and InvokeAI (only its first vector, without a word)"
    )
    png = cli("export", "alice", "-o", tmp_path / "alice.png", "--json")
    record = json.loads(png.stdout)
    assert record["read_by"] == ["a1111", "forge"] and record["read_partly_by"] == []
    assert record["fits"].endswith("in A1111 and Forge (lllyasviel's, not Forge Neo)")
    as_json = json.loads(cli("export", "alice", "-o", tmp_path / "x.bin", "--json").stdout)
    assert as_json["read_by"] == ["official"]
    assert [p["tool"] for p in as_json["read_partly_by"]] == ["comfyui", "invokeai"]


def test_the_diffusers_format_says_invokeai_refuses_it_and_names_the_one_it_reads(
    cli, library: Library, tmp_path: Path
) -> None:
    _identity(library, "sd1")
    result = cli("export", "alice", "--format", "diffusers", "-o", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "not InvokeAI: its probe refuses a diffusers-layout file holding 2 or more tokens" in result.stderr
    assert "for InvokeAI use --format invokeai" in result.stderr
    help_text = " ".join(cli("export", "--help").stdout.replace("│", " ").split())  # rich's box, unwrapped
    assert "official (the official Cross Init code for SD 2.x only; ComfyUI and InvokeAI partly)" in help_text
    assert "a1111-png (A1111 and Forge (lllyasviel's, not Forge Neo))" in help_text
    assert "diffusers (A1111, Forge, ComfyUI, SD.Next and diffusers; InvokeAI for SDXL only)" in help_text


def test_docs_formats_md_holds_the_tables_the_code_has() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert readers.readers_table() in text
    assert readers.clip_skip_table() in text


# --- clip skip: every tool's setting, exports with and without --to, imports that cannot carry it ---------------


def test_export_to_a_tool_carries_clip_skip_and_that_tools_setting(
    cli, library: Library, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", width=1024, family="sd2", clip_skip=2)
    forge = tmp_path / "forge"
    for name in ("modules", "modules_forge"):
        (forge / name).mkdir(parents=True)
    (forge / "webui.py").touch()
    (forge / "launch.py").touch()
    result = cli("export", "alice", "--to", forge, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["clip_skip"] == 2
    human = cli("export", "alice", "--to", forge, "--force")
    assert "learned at clip skip 2: Forge: Clip skip slider 2" in human.stderr and "A1111" not in human.stderr
    invoke = tmp_path / "invoke"
    invoke.mkdir()
    (invoke / "invokeai.yaml").touch()
    first = cli("export", "alice", "--to", invoke)
    assert "InvokeAI: Generate > Advanced > CLIP Skip 1" in first.stderr and "Scan Folder" in first.stderr
    again = cli("export", "alice", "--to", invoke)  # nothing changed: the one step is still said
    assert "unchanged" in again.stderr and "next: in InvokeAI's Model Manager: Add Models > Scan Folder" in again.stderr


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_pickle_import_records_clip_skip_as_unknown_and_says_so(
    suffix: str, cli, library: Library, tmp_path: Path
) -> None:
    rows = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32))
    path = tmp_path / f"bob{suffix}"
    if suffix == ".pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "bob"}, path)
    else:
        torch.save({"bob_v0": rows[0].clone(), "bob_v1": rows[1].clone()}, path)
    result = cli("import", path)
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "clip skip" in line]
    assert len(notes) == 1 and "cannot record clip skip" in notes[0] and "recorded as unknown" in notes[0]
    shown = cli("show", "bob")
    assert "unknown (imported from a file that cannot record it)" in shown.stdout
    assert json.loads(cli("show", "bob", "--json").stdout)["clip_skip"] is None
    exported = cli("export", "bob", "-o", tmp_path / "bob.safetensors", "--json")
    assert json.loads(exported.stdout)["clip_skip"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bob.safetensors"), framework="numpy") as handle:
        assert handle.metadata()["clip_skip"] == "unknown"  # not a guess of 1 presented as fact
    human = cli("export", "bob", "-o", tmp_path / "bob2.safetensors")
    assert "clip skip unknown" in human.stderr
    again = cli("import", tmp_path / "bob.safetensors", "--name", "bob3")  # and the unknown round-trips
    assert again.exit_code == 0 and library.get("bob3").clip_skip_unknown is True


def test_the_forge_hint_no_longer_says_forge_ignores_sd2_clip_skip() -> None:
    hint = readers.clip_skip_hint("sd2", 2)
    assert hint is not None and "Forge: Clip skip slider 2" in hint and "A1111 applies no clip skip" in hint
    assert "SD.Next: Settings > Pipeline Modifiers > CLiP skip enabled, then Advanced > CLiP skip 2" in hint
    assert "InvokeAI: Generate > Advanced > CLIP Skip 1" in hint and "ComfyUI: CLIP Set Last Layer -3" in hint
    assert readers.clip_skip_hint("sd1", 1) is None


def test_generating_with_an_unknown_clip_skip_claims_no_layer_it_was_learned_at() -> None:
    from crossinit_cli.generation import choose_clip_skip

    unknown = Identity(name="bob", tokens=2, width=768, family="sd1", clip_skip_unknown=True)
    known = Identity(name="ann", tokens=2, width=768, family="sd1", clip_skip=2)
    said: list[str] = []
    assert choose_clip_skip(2, [unknown], warn=said.append) == 2
    assert choose_clip_skip(None, [unknown, known], warn=said.append) == 2  # the known one's, no word about bob
    assert not any("bob" in line or "learned at clip skip 1" in line for line in said), said
    assert choose_clip_skip(1, [known], warn=said.append) == 1 and "'ann' was learned at clip skip 2" in said[-1]


def test_several_identities_exported_with_json_carry_their_clip_skip(cli, add_identity, tmp_path: Path) -> None:
    add_identity("ann", width=768, family="sd1", clip_skip=2)
    add_identity("bob", width=768, family="sd1")
    result = cli("export", "--all", "-o", f"{tmp_path}/", "--json")
    assert result.exit_code == 0, result.stderr
    assert {r["name"]: r["clip_skip"] for r in json.loads(result.stdout)} == {"ann": 2, "bob": 1}
