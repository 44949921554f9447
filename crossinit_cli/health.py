"""What `doctor` checks: the versions installed, the device and precision crossinit would use and why,
the library, its catalog, the model and the face models. `run_checks` returns facts and `Check`s; the
command prints them. Nothing here prints."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crossinit_cli import config
from crossinit_cli._version import __version__
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError, library_text

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "dlib-bin", "face-recognition-models")


@dataclass
class Check:
    """One thing `doctor` looked at: fine or not, what it found, and how to fix it."""

    name: str
    ok: bool
    detail: str
    advice: str = ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _writable(folder: Path) -> tuple[bool, str]:
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".crossinit-doctor-"):
            pass
    except OSError as exc:
        return False, exc.strerror or str(exc)
    return True, "writable"


def _is_path(model: str) -> bool:
    """A model written as a path (what `config.model_reference` stores absolute), not a hub id."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") != 1


def _model_available(model: str) -> tuple[bool, str]:
    path = Path(model).expanduser()
    if path.is_file():
        return True, f"single-file checkpoint {path}"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return True, f"diffusers folder {path}"
        return False, f"{path} has no model_index.json"
    if _is_path(model):
        return False, "no such file or folder"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on it
        return False, "huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(model, "model_index.json")
    except ValueError as exc:  # not a valid repo id
        return False, library_text(exc)
    if isinstance(cached, str):
        return True, f"in the local Hugging Face cache ({Path(cached).parent})"
    return False, "not in the local Hugging Face cache"


def _catalog_check(home: Path, facts: dict[str, object]) -> list[Check]:
    """The catalog's state (stale, missing or damaged, it mends itself on the next `list`: only reported),
    and the entries whose files no longer match their metadata or their vectors' record (damaged)."""
    from crossinit_cli.store import Damaged, Library

    try:
        library = Library(home)
    except CrossinitError as exc:  # not a library, or its own paths are links: nothing else is read
        return [Check("catalog", False, str(exc), "pass --home or set CROSSINIT_HOME to a crossinit library")]
    state = library.catalog_state()
    facts["catalog"] = state
    counts = f"{state['entries']} entr{'y' if state['entries'] == 1 else 'ies'}"
    if state["state"] == "stale":
        counts += f", {state['stale']} out of date"
    checks = [Check("catalog", True, f"{state['state']} ({counts}): {state['detail']}")]
    try:
        damaged = [entry for entry in library.list() if isinstance(entry, Damaged)]
    except CrossinitError as exc:
        return [*checks, Check("entries", False, str(exc))]
    facts["damaged"] = [{"name": entry.name, "reason": entry.reason} for entry in damaged]
    if damaged:
        first = damaged[0]
        detail = f"{len(damaged)} damaged: {first.name} ({first.reason})" + (" ..." if len(damaged) > 1 else "")
        checks.append(Check("entries", False, detail, f"crossinit remove {first.name} (or restore its files)"))
    else:
        checks.append(Check("entries", True, f"{state['entries']} whole (vectors match their records)"))
    return checks


def _device_check(run: RunOptions, facts: dict[str, object]) -> Check:
    """The device and precision crossinit would use for training, and why (with free GPU memory on CUDA)."""
    from crossinit_cli import devices

    try:
        placement = devices.resolve(run.device, run.dtype, training=True)
        detail = f"{placement.device} ({placement.dtype}): {placement.reason}"
        detail += f"; {placement.dtype} because {placement.dtype_reason}"
        sampling = devices.resolve(run.device, run.dtype)
        if sampling.dtype != placement.dtype:  # MPS: training and sampling differ
            detail += f"; generate in {sampling.dtype} ({sampling.dtype_reason})"
        if placement.device == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            detail += f"; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
            facts["gpu_free_gib"] = round(free / 2**30, 2)
        facts["device"] = placement.device
        facts["dtype"] = placement.dtype
        facts["dtype_reason"] = placement.dtype_reason
        return Check("device", True, detail)
    except CrossinitError as exc:
        return Check("device", False, str(exc), "crossinit config set device auto")


def _model_check(model: str) -> Check:
    ok, detail = _model_available(model)
    if ok:
        advice = ""
    elif _is_path(model):
        advice = "crossinit config set model /path/to/a/diffusers-folder-or-checkpoint (or pass --model)"
    else:
        advice = f"hf download {model}, or crossinit config set model /path/to/model"
    return Check("model", ok, f"{model}: {detail}", advice)


def _face_models_check() -> Check:
    face_spec = importlib.util.find_spec("face_recognition_models")
    models = Path(next(iter(face_spec.submodule_search_locations))) / "models" if face_spec else None
    ok = bool(models and (models / "shape_predictor_5_face_landmarks.dat").is_file())
    return Check(
        "face models",
        ok,
        str(models) if ok else "face-recognition-models not found",
        "" if ok else "pip install face-recognition-models (or learn with --no-align)",
    )


def run_checks(home: Path, run: RunOptions) -> tuple[dict[str, object], list[Check]]:
    """What this machine has (`facts`, for --json) and each check, in the order `doctor` prints them."""
    facts: dict[str, object] = {
        "crossinit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "library": str(home),
        "config": str(config.config_path()),
        "settings": run.settings(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", ""),
    }
    checks: list[Check] = []
    missing = [p for p, v in facts["packages"].items() if v is None]  # type: ignore[union-attr]
    checks.append(
        Check(
            "packages",
            not missing,
            "all installed" if not missing else f"missing: {', '.join(missing)}",
            f"pip install {' '.join(missing)}" if missing else "",
        )
    )
    if _version("torch"):
        checks.append(_device_check(run, facts))
    ok, detail = _writable(home)
    checks.append(Check("library", ok, f"{home}: {detail}", "" if ok else "pass --home or set CROSSINIT_HOME"))
    checks.extend(_catalog_check(home, facts))
    checks.append(_model_check(run.model))
    checks.append(_face_models_check())
    return facts, checks
