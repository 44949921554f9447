"""Embedding files from strangers through a real `crossinit import`: refused with one line, in bounded time
and memory, no code run, the library byte-identical. Builds on tests/test_formats.py's hostile files (run
there in-process) and adds what only a process shows: device files, FIFOs, zip bombs, a pickle that runs
code at load time, and the memory a file can make the importer allocate."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from crossinit_cli.store import Library
from tests.reliability.harness import assert_one_line_error, crossinit, tree, write_embedding
from tests.test_formats import _hostile_files

pytestmark = pytest.mark.reliability

WIDTH = 32
MAX_RSS_MIB = 768
"""What importing a hostile file may cost in memory: the process with torch loaded is ~250 MiB."""


def _safetensors_raw(path: Path, header: bytes | dict, payload: bytes = b"\0" * 256) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def _zip_bomb(path: Path, unpacked_mib: int) -> Path:
    """A valid torch zip whose one storage record unpacks to `unpacked_mib` MiB (deflate: ~1000:1)."""
    good = path.with_suffix(".good")
    torch.save({"emb_params": torch.ones(2, WIDTH)}, good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w", compresslevel=1) as bomb:
        for info in source.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(entry, "w", force_zip64=True) as handle:
                    for _ in range(unpacked_mib):
                        handle.write(b"\0" * (1 << 20))
            else:
                bomb.writestr(info.filename, source.read(info.filename))
    good.unlink()
    return path


class _Declared:
    """Pickles as a tensor that claims 10^10 elements over a 64-element storage."""

    def __reduce_ex__(self, protocol: int):
        storage = torch.ones(2, WIDTH).untyped_storage()
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, 0, (100000, 100000), (100000, 1), False, collections.OrderedDict()),
        )


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _more_hostile_files(tmp_path: Path) -> dict[str, Path]:
    """What tests/test_formats.py does not already have."""
    files: dict[str, Path] = {}
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy-code.pt"
    with open(legacy, "wb") as handle:  # the pre-zip torch format, with code in its pickle
        torch.save({"emb_params": _RunsCode(marker)}, handle, _use_new_zipfile_serialization=False)
    files["legacy-pickle-with-code"] = legacy
    files["official-bin-with-code"] = tmp_path / "learned_embeds.bin"
    torch.save({"x_v0": torch.ones(WIDTH), "x_v1": _RunsCode(marker)}, files["official-bin-with-code"])
    files["protocol-0-pickle"] = tmp_path / "p0.pt"
    files["protocol-0-pickle"].write_bytes(pickle.dumps({"emb_params": [1.0] * WIDTH}, protocol=0))
    files["declared-10G-elements"] = tmp_path / "declared.pt"
    torch.save({"emb_params": _Declared()}, files["declared-10G-elements"])
    files["zip-bomb-100MiB"] = _zip_bomb(tmp_path / "bomb.pt", 100)
    files["symlink-to-dev-zero"] = tmp_path / "zero.safetensors"
    files["symlink-to-dev-zero"].symlink_to("/dev/zero")
    files["symlink-to-dev-urandom"] = tmp_path / "urandom.bin"
    files["symlink-to-dev-urandom"].symlink_to("/dev/urandom")
    files["fifo"] = tmp_path / "fifo.pt"
    os.mkfifo(files["fifo"])
    files["dangling-symlink"] = tmp_path / "dangling.pt"
    files["dangling-symlink"].symlink_to(tmp_path / "nowhere")
    files["folder-named-like-a-file"] = tmp_path / "folder.safetensors"
    files["folder-named-like-a-file"].mkdir()
    files["64MiB-plus-one"] = tmp_path / "big.bin"
    with open(files["64MiB-plus-one"], "wb") as handle:
        handle.truncate(64 * 2**20 + 1)
    header = {"emb_params": {"dtype": "F32", "shape": [2, WIDTH], "data_offsets": [0, 256]}}
    for label, raw in {
        "header-not-json": b"{not json at all}",
        "header-not-utf8": b'{"\xff\xfe": 1}',
        "header-a-list": b"[1, 2, 3]   ",
        "header-zero-length": b"",
        "offsets-past-the-end": {"emb_params": {**header["emb_params"], "data_offsets": [0, 10**12]}},
        "offsets-overlap": {
            "emb_params": header["emb_params"],
            "x": {"dtype": "F32", "shape": [2, WIDTH], "data_offsets": [0, 256]},
        },
        "negative-shape": {"emb_params": {**header["emb_params"], "shape": [-2, WIDTH]}},
        "shape-overflows-int64": {"emb_params": {**header["emb_params"], "shape": [2**62, 2**62]}},
        "unknown-dtype": {"emb_params": {**header["emb_params"], "dtype": "X99"}},
        "shape-disagrees-with-offsets": {"emb_params": {**header["emb_params"], "shape": [3, WIDTH]}},
        "metadata-not-strings": {**header, "__metadata__": {"crossinit_name": {"nested": 1}}},
    }.items():
        files[label] = _safetensors_raw(tmp_path / f"{label}.safetensors", raw)
    for label, tensor in {
        "float64-overflows-float32": torch.full((2, WIDTH), 1e300, dtype=torch.float64),
        "complex": torch.ones(2, WIDTH, dtype=torch.complex64),
        "bool": torch.ones(2, WIDTH, dtype=torch.bool),
        "int8": torch.ones(2, WIDTH, dtype=torch.int8),
        "scalar": torch.tensor(1.0),
        "no-rows": torch.ones(0, WIDTH),
        "no-columns": torch.ones(2, 0),
        "one-nan": torch.ones(2, WIDTH).index_fill_(1, torch.tensor([5]), float("nan")),
        "negative-inf": torch.full((2, WIDTH), float("-inf")),
    }.items():
        files[f"{label}.safetensors"] = tmp_path / f"{label}.safetensors"
        save_file({"emb_params": tensor}, str(files[f"{label}.safetensors"]))
        if label in ("complex", "scalar", "one-nan"):  # the same checks through the pickle path
            files[f"{label}.pt"] = tmp_path / f"{label}.pt"
            torch.save({"string_to_param": {"*": tensor}, "name": "x"}, files[f"{label}.pt"])
    files["string-to-param-a-list"] = tmp_path / "list-param.pt"
    torch.save({"string_to_param": {"*": [1.0] * WIDTH}}, files["string-to-param-a-list"])
    files["official-widths-differ"] = tmp_path / "widths.bin"
    torch.save({"x_v0": torch.ones(WIDTH), "x_v1": torch.ones(WIDTH + 1)}, files["official-widths-differ"])
    return files


PROCESS_LEVEL = {
    "legacy-pickle-with-code", "official-bin-with-code", "declared-10G-elements", "zip-bomb-100MiB",
    "symlink-to-dev-zero", "symlink-to-dev-urandom", "fifo", "dangling-symlink", "folder-named-like-a-file",
    "64MiB-plus-one", "header-not-utf8", "shape-overflows-int64", "float64-overflows-float32.safetensors",
}  # fmt: skip
"""What only a process shows (hangs, memory, code run at load) plus a few header and dtype cases; the slow
test runs all of them, and all of tests/test_formats.py's, through a real import."""


@pytest.mark.parametrize("which", ["process-level", pytest.param("all", marks=pytest.mark.slow)])
def test_hostile_embedding_files_are_refused_by_a_real_import(
    which: str, rhome: Path, env: dict[str, str], tmp_path: Path
) -> None:
    write_embedding(tmp_path / "alice.safetensors", 1)
    assert crossinit("import", tmp_path / "alice.safetensors", "--name", "alice", env=env).returncode == 0
    files = _more_hostile_files(tmp_path)
    if which == "all":
        files.update(_hostile_files(tmp_path))
    else:
        files = {label: path for label, path in files.items() if label in PROCESS_LEVEL}
        assert len(files) == len(PROCESS_LEVEL)
    before = tree(rhome)

    def one(item: tuple[str, Path]) -> tuple[str, subprocess.CompletedProcess]:
        label, path = item
        try:
            return label, crossinit("import", path, "--name", "intruder", env=env, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{label}: import still running after 60 s")

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, files.items()))
    for label, done in results.items():
        assert_one_line_error(done)
        assert str(files[label].name) in done.stderr or label == "fifo", f"{label}: the message names the file"
    assert not (tmp_path / "pwned").exists(), "a pickle ran code"
    assert tree(rhome) == before
    assert [e.name for e in Library(rhome).list()] == ["alice"]
    print(f"{len(files)} hostile embedding files refused")


def test_a_zip_bomb_is_refused_before_it_is_unpacked(rhome: Path, env: dict[str, str], tmp_path: Path) -> None:
    """A 1 MiB torch file whose storage record inflates to 1 GiB: torch.load would allocate all of it
    (64 MiB of such a file: ~64 GiB), so the archive's declared sizes are checked first."""
    bomb = _zip_bomb(tmp_path / "bomb.pt", 1024)
    assert bomb.stat().st_size < 2 * 2**20
    script = (
        "import resource, sys\n"
        "from crossinit_cli.cli import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as exc:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n    raise\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "import", str(bomb), "--name", "bomb"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    *message, peak_kib = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(message) == 1 and message[0].startswith("error:"), done.stderr
    assert int(peak_kib) / 1024 < MAX_RSS_MIB, f"peak memory {int(peak_kib) >> 10} MiB"
    print(f"zip bomb of {bomb.stat().st_size >> 10} KiB (1 GiB unpacked): refused, peak RSS {int(peak_kib) >> 10} MiB")
    assert not Library(rhome).list()


def test_fp16_files_are_welcome(rhome: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Half precision is what many shared embeddings use: imported, widened to float32 exactly."""
    half = torch.randn(2, WIDTH).half()
    save_file({"emb_params": half}, str(tmp_path / "half.safetensors"))
    done = crossinit("import", tmp_path / "half.safetensors", "--name", "half", env=env)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(Library(rhome).vectors("half").learned, half.float().numpy())


# --- pickles that would run code: refused, and nothing of them runs --------------------------------


class _Reduce:
    """Pickles as a call of `func(*args)`: what a hand-made REDUCE payload does when it is unpickled."""

    def __init__(self, func: object, *args: object) -> None:
        self.call = (func, args)

    def __reduce__(self):
        return self.call


def _payloads(marker: Path) -> dict[str, object]:
    """Each would create `marker` (a file named for the payload) if it ran."""
    return {
        "os-system": _Reduce(os.system, f"touch {marker}-os-system"),
        "builtins-exec": _Reduce(exec, f"open({str(marker) + '-builtins-exec'!r}, 'w').close()"),
        "builtins-eval": _Reduce(eval, f"open({str(marker) + '-builtins-eval'!r}, 'w')"),
        "subprocess-call": _Reduce(subprocess.call, ["touch", f"{marker}-subprocess-call"]),
        "subprocess-popen": _Reduce(subprocess.Popen, ["touch", f"{marker}-subprocess-popen"]),
    }


def _code_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The payloads as embedding files: bare pickles, torch files, inside a real ParameterDict (its
    parameters, and its module state), and inside a PNG embedding's text chunk and coded edges."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for label, payload in _payloads(marker).items():
        files[f"{label}.pt"] = folder / f"{label}.pt"
        torch.save({"string_to_param": {"*": payload}, "name": "x"}, files[f"{label}.pt"])
        files[f"{label}-raw.bin"] = folder / f"{label}-raw.bin"
        files[f"{label}-raw.bin"].write_bytes(pickle.dumps({"emb_params": payload}, protocol=2))
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, WIDTH))})
        vars(params)["_parameters"]["*"] = payload  # the one class allowed, carrying the call
        files[f"{label}-in-parameterdict.pt"] = folder / f"{label}-in-parameterdict.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, files[f"{label}-in-parameterdict.pt"])
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, WIDTH))})
        vars(params)["_forward_hooks"] = collections.OrderedDict({0: payload})  # in its module state
        files[f"{label}-in-module-state.pt"] = folder / f"{label}-in-module-state.pt"
        torch.save({"string_to_param": params}, files[f"{label}-in-module-state.pt"])
        info = PngInfo()
        info.add_text("sd-ti-embedding", base64.b64encode(pickle.dumps({"emb_params": payload})).decode())
        files[f"{label}-in-png-text.png"] = folder / f"{label}-in-png-text.png"
        Image.new("RGB", (32, 32), (128, 128, 128)).save(files[f"{label}-in-png-text.png"], pnginfo=info)
    return files


def _run_as_pickle(path: Path) -> None:
    """What loading without the allow-list would do (plain unpickling): the control that the payload is live."""
    if path.suffix == ".png":
        from PIL import Image

        pickle.loads(base64.b64decode(Image.open(path).text["sd-ti-embedding"]))
    else:
        torch.load(path, weights_only=False)


def test_pickles_that_would_run_code_are_refused_and_nothing_runs(
    rhome: Path, env: dict[str, str], tmp_path: Path
) -> None:
    control = _code_files(tmp_path / "control", tmp_path / "control" / "ran")
    for path in control.values():  # each payload really runs code when unpickled plainly
        with contextlib.suppress(Exception):  # what the call returns may not unpickle further
            _run_as_pickle(path)
    ran = lambda: sorted(p.name for p in (tmp_path / "control").glob("ran-*"))  # noqa: E731
    deadline = time.monotonic() + 10  # Popen's child finishes on its own
    while time.monotonic() < deadline and len(ran()) < len(_payloads(tmp_path)):
        time.sleep(0.1)
    assert ran() == sorted(f"ran-{label}" for label in _payloads(tmp_path))

    marker = tmp_path / "pwned"
    files = _code_files(tmp_path / "hostile", marker)
    before = tree(rhome)
    one = crossinit("import", files["os-system-in-parameterdict.pt"], env=env, timeout=120)
    assert_one_line_error(one, "refused")
    every = crossinit("import", tmp_path / "hostile", env=env, timeout=300)  # all of them, one process
    assert every.returncode == 1 and "Traceback" not in every.stderr and "\x1b" not in every.stderr
    skipped = [line for line in every.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == len(files), every.stderr
    assert every.stderr.splitlines()[-1].startswith("error: nothing imported")
    for line in skipped:
        assert "refused" in line or "not JSON" in line, line
    time.sleep(1)  # a Popen payload would have finished by now
    assert not list(tmp_path.glob("pwned*")), "a payload ran"
    assert tree(rhome) == before
    print(f"{len(files)} files with code refused; none ran")
