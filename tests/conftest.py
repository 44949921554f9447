"""Shared fixtures: a tiny random SD pipeline built once per session, and an isolated library/config."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.factories import random_vectors

DATA = Path(__file__).parent / "data"
OFFICIAL = sorted((DATA / "official").glob("*.bin"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's ops are too small to gain from threads, and tests run many processes at once on a
# 2-core machine: one thread each avoids oversubscription (measured 2-10x faster under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `--dtype auto` computes in bf16 on a CPU with native bf16 (devices.cpu_bf16): the suite's expectations are
# fp32's wherever it runs; tests/test_precision.py covers both sides of the rule explicitly.
os.environ["CROSSINIT_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x/2.x-shaped pipeline on disk (text width 32, 64 px images, epsilon)."""
    from crossinit_cli.synthetic import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny pipeline with a v-prediction scheduler."""
    from crossinit_cli.synthetic import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x-shaped pipeline (quick_gelu text encoder, pad = EOS, epsilon, width 32)."""
    from crossinit_cli.synthetic import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL-shaped pipeline (encoders 32 and 64 wide, the second projected; 64 px images)."""
    from crossinit_cli.synthetic import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A tiny random CLIP (model, tokenizer, image processor) saved as a folder `--clip-model` can load."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture()
def network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """No network: every name lookup fails and every socket connection is refused at once; each attempt is
    recorded here (a lookup and the connection it would lead to are never both made)."""
    import socket

    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused (the tests' `network` fixture)")

    def no_name(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append((host, port))
        raise socket.gaierror(-3, "Temporary failure in name resolution (the tests' `network` fixture)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(self, address))
    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    return attempts


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty library and config of this test's own (also for subprocesses, through the env)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CROSSINIT_HOME", str(home))
    monkeypatch.setenv("CROSSINIT_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    return home


@pytest.fixture()
def library(home: Path):
    from crossinit_cli.store import Library

    return Library(home)


@pytest.fixture()
def add_identity(library) -> Callable[..., Any]:
    """Store an identity straight into this test's library, as if `learn --fast` had made it.

    add_identity("alice") draws its vectors from a seed taken from the name; `seed`, `width` and `scale`
    choose them, `init` is the cross-init start (an array, True for random rows, None for none, as an
    imported identity has), and any other keyword is an `Identity` field (base_model, training, ...).
    """
    from crossinit_cli.store import Identity

    def add(
        name: str,
        *,
        seed: int | None = None,
        width: int = 32,
        scale: float = 1.0,
        init: Any = None,
        crops: Any = (),
        force: bool = False,
        **fields: Any,
    ) -> Identity:
        seed = zlib.crc32(name.encode()) if seed is None else seed
        learned = random_vectors(seed, width=width, scale=scale)
        if init is True:
            init = random_vectors(seed + 100, width=width, scale=scale)
        fields = {"base_model": "tiny", "training": {"mode": "fast", "steps": 25}, **fields}
        library.add(Identity(name=name, tokens=2, width=width, **fields), learned, init, crops=crops, force=force)
        return library.get(name)

    return add


@pytest.fixture()
def cli(home: Path):
    """Run the CLI in-process: cli("list", "--json") -> click Result (stdout and stderr separate)."""
    from crossinit_cli.cli import app

    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return run


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every pipeline `generate` loads, in order (the real loader, counted)."""
    from crossinit_cli import devices

    real = devices.load_pipeline
    pipes: list[Any] = []

    def counting(model: str, **kwargs: Any) -> Any:
        pipes.append(real(model, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(devices, "load_pipeline", counting)
    return pipes


@pytest.fixture()
def umask() -> Callable[[int], None]:
    """umask(0o027) runs the rest of the test under that umask; the old one comes back after the test."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)
