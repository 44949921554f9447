"""Files crossinit did not write, read by a real `crossinit` process (issue 28): a pickle hash bomb, a FIFO or
`/dev/zero` where a tool's settings or the config file should be, and `config set` run four at a time on a
config file with comments, unknown keys and tables. Each is refused in one line within seconds, or, for
`config set`, keeps every key of every run and everything the user wrote."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from crossinit_cli.store import Library
from tests.reliability.harness import assert_one_line_error, crossinit, start, tree, write_embedding

pytestmark = pytest.mark.reliability

WIDTH = 32
QUICK_S = 30
"""What a refusal may take, process start included (a few seconds on the shared 2-core machine)."""


def hash_bomb(depth: int = 12, fan: int = 10) -> bytes:
    """A ~330-byte pickle of {t: 1} where t is a tuple of `fan` references to one tuple, `depth` levels deep:
    putting t in the dict hashes fan**depth tuples (10^12: hours of C code that ignores Ctrl-C)."""
    nested: tuple = ()
    for _ in range(depth):
        nested = (nested,) * fan
    body = pickle.dumps(nested, protocol=2)[2:-1]  # its opcodes, without PROTO and STOP
    return b"\x80\x02}" + body + b"K\x01s."


def _torch_zip_with(pickled: bytes, path: Path) -> Path:
    """A valid torch zip (one [2, 32] tensor) whose data.pkl is replaced by `pickled`."""
    import torch

    buffer = io.BytesIO()
    torch.save({"emb_params": torch.ones(2, WIDTH)}, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = pickled if info.filename.endswith("/data.pkl") else source.read(info.filename)
            target.writestr(info.filename, data)
    return path


def _timed(*args: object, env: dict[str, str], label: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    try:
        done = crossinit(*args, env=env, timeout=QUICK_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{label}: still running after {QUICK_S} s")
    return done, time.perf_counter() - started


@pytest.mark.parametrize("where", ["bare pickle .pt", "torch zip data.pkl"])
def test_a_pickle_hash_bomb_is_refused_in_seconds(where: str, rhome: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Problem 7: today `import` spins at 100% CPU for as long as it is let, Ctrl-C or not."""
    bomb = hash_bomb()
    assert len(bomb) < 400
    path = tmp_path / "bomb.pt"
    if where == "bare pickle .pt":
        path.write_bytes(bomb)
    else:
        _torch_zip_with(bomb, path)
    write_embedding(tmp_path / "alice.safetensors", 1)
    assert crossinit("import", tmp_path / "alice.safetensors", "--name", "alice", env=env).returncode == 0
    before = tree(rhome)
    done, took = _timed("import", path, "--name", "bomb", env=env, label=where)
    assert_one_line_error(done, "bomb.pt", "refused")
    assert tree(rhome) == before
    print(f"{where}: a {len(bomb)}-byte hash bomb refused in {took:.1f} s")


def _webui(root: Path) -> Path:
    """An AUTOMATIC1111 install as `tools.detect` recognises it."""
    for name in ("webui.py", "launch.py", "webui-user.sh", "modules/cmd_args.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


def _comfy(root: Path) -> Path:
    for name in ("main.py", "folder_paths.py", "comfy/sd1_clip.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


SETTINGS = [
    ("a1111", "webui-user.sh"),
    ("a1111", "modules/cmd_args.py"),
    ("comfyui", "extra_model_paths.yaml"),
]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize(("tool", "setting"), SETTINGS)
def test_a_tools_settings_file_that_is_a_fifo_or_a_device_is_refused(
    tool: str, setting: str, kind: str, rhome: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """Problem 9: today a FIFO there hangs `export --to`, and /dev/zero eats memory to a MemoryError."""
    root = (_webui if tool == "a1111" else _comfy)(tmp_path / tool)
    target = root / setting
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    write_embedding(tmp_path / "alice.safetensors", 1)
    assert crossinit("import", tmp_path / "alice.safetensors", "--name", "alice", env=env).returncode == 0
    done, took = _timed("export", "alice", "--to", root, env=env, label=f"{setting} as {kind}")
    assert_one_line_error(done, Path(setting).name, "not a regular file")
    assert not list(root.rglob("*.safetensors"))
    print(f"{setting} as {kind}: refused in {took:.1f} s")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_config_file_that_is_a_fifo_or_a_device_is_refused(kind: str, env: dict[str, str], tmp_path: Path) -> None:
    """Problem 9: today CROSSINIT_CONFIG=/dev/zero or a FIFO makes `config` hang."""
    config = tmp_path / "weird.toml"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "folder":
        config.mkdir()
    else:
        config = Path("/dev/zero")
    env = {**env, "CROSSINIT_CONFIG": str(config)}
    for command in (["config"], ["config", "set", "device", "cpu"]):
        done, _ = _timed(*command, env=env, label=f"{' '.join(command)} on a {kind}")
        assert_one_line_error(done, str(config), "not a regular file")
    assert kind != "folder" or not list(config.iterdir())


BASE_CONFIG = """\
# my defaults: the laptop's
output_dir = "renders"  # where pictures go
future_option = 3

[profiles.work]
model = "/models/work"
"""
PARALLEL = {"device": "cpu", "dtype": "fp32", "model": "/models/mine", "output_dir": "elsewhere"}


def test_config_set_keeps_what_the_user_wrote(env: dict[str, str], tmp_path: Path) -> None:
    """Problem 5: today `config set` rewrites the file with the known keys only."""
    config = tmp_path / "config.toml"
    config.write_text(BASE_CONFIG)
    env = {**env, "CROSSINIT_CONFIG": str(config)}
    assert crossinit("config", "set", "dtype", "fp16", env=env).returncode == 0
    assert crossinit("config", "unset", "output_dir", env=env).returncode == 0
    text = config.read_text()
    for kept in ("# my defaults: the laptop's", "future_option = 3", "[profiles.work]", 'model = "/models/work"'):
        assert kept in text, text
    assert 'dtype = "fp16"' in text and "renders" not in text, text


def test_four_config_sets_at_once_keep_every_key(env: dict[str, str], tmp_path: Path) -> None:
    """Problem 5: today four `config set` runs at once on different keys lost a setting in 7 of 8 rounds, all
    exiting 0. Each round starts them together on a fresh file and checks every key and the user's lines."""
    config = tmp_path / "config.toml"
    env = {**env, "CROSSINIT_CONFIG": str(config)}
    lost = []
    for round_ in range(8):
        config.write_text(BASE_CONFIG)
        procs = {key: start("config", "set", key, value, env=env) for key, value in PARALLEL.items()}
        for key, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "Traceback" not in err, f"round {round_} {key}: {err}"
        text = config.read_text()
        lost += [f"round {round_}: {key}" for key, value in PARALLEL.items() if f'{key} = "{value}"' not in text]
        assert "future_option = 3" in text and "[profiles.work]" in text and "# my defaults" in text, text
    assert not lost, f"settings lost: {lost}"
    print("8 rounds of 4 parallel `config set`: every key kept")


def test_the_library_is_untouched_by_refused_foreign_files(rhome: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Several hostile files of this module at once in one folder: one process, every one skipped in a line."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "bomb.pt").write_bytes(hash_bomb())
    _torch_zip_with(hash_bomb(), folder / "bomb-zip.pt")
    write_embedding(folder / "good.safetensors", 2)
    done = crossinit("import", folder, env=env, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 2 and all("refused" in line for line in skipped), done.stderr
    assert [entry.name for entry in Library(rhome).list()] == ["good"]


SHRINKING = """
import sys, threading, time
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file
from crossinit_cli import formats
from crossinit_cli.errors import CrossinitError

path = Path(sys.argv[1])
save_file({"emb_params": np.ones((8192, 1024), np.float32)}, str(path))  # 32 MiB
data = path.read_bytes()
stop = threading.Event()

def shrink_and_restore():
    while not stop.is_set():
        with open(path, "r+b") as handle:
            handle.truncate(4096)
            handle.seek(0)
            handle.write(data)

threading.Thread(target=shrink_and_restore, daemon=True).start()
reads = refusals = 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        formats.read_embedding_file(path)
        reads += 1
    except CrossinitError as exc:
        assert "\\n" not in str(exc), exc
        refusals += 1
stop.set()
print(reads, refusals)
"""


def test_a_file_shrunk_while_it_is_imported_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Problem 10: today the import memory-maps the file, and a writer truncating it meanwhile kills the process
    with SIGBUS, silently. A thread truncates and restores a 32 MiB file for 5 s while it is read in a loop."""
    done = subprocess.run(
        [sys.executable, "-c", SHRINKING, str(tmp_path / "shrinking.safetensors"), "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"rc={done.returncode} (-7: SIGBUS) {done.stderr[-2000:]}"
    reads, refusals = map(int, done.stdout.split())
    assert reads + refusals > 10, done.stdout
    print(f"file shrunk while read: {reads + refusals} reads in 5 s ({reads} whole, {refusals} refused), no signal")


def test_settings_nested_past_pythons_recursion_limit_are_one_line(tmp_path: Path) -> None:
    """A config.json, extra_model_paths.yaml or config.toml of 100,000 nested brackets: the parsers recurse."""
    from crossinit_cli import config, tools
    from crossinit_cli.errors import CrossinitError

    sdnext = tmp_path / "sdnext"
    for name in ("webui.py", "installer.py", "modules/cmd_args.py"):
        (sdnext / name).parent.mkdir(parents=True, exist_ok=True)
        (sdnext / name).write_text("")
    (sdnext / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert tools.detect(sdnext).embeddings == sdnext / "models" / "embeddings"  # unreadable: SD.Next's defaults
    comfy = _comfy(tmp_path / "comfy")
    (comfy / "extra_model_paths.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CrossinitError, match="cannot read .*extra_model_paths.yaml"):
        tools.detect(comfy)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CrossinitError, match="cannot read config"):
        config.load_config(deep)
    with pytest.raises(CrossinitError, match="cannot read config"):
        config.update_config({"device": "cpu"}, deep)


@pytest.mark.parametrize("after_s", [0.8, 1.6, 2.4])
def test_ctrl_c_while_a_hash_bomb_is_read_ends_the_import_at_once(
    after_s: float, rhome: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """A stuck read is never left ignoring Ctrl-C: the code before spun in C (hashing 10^12 tuples) and went on
    after SIGINT until it was killed. Now the import ends within seconds of Ctrl-C, or has already refused the
    file, in one line either way, the library untouched."""
    import signal

    path = tmp_path / "bomb.pt"
    _torch_zip_with(hash_bomb(), path)
    write_embedding(tmp_path / "alice.safetensors", 1)
    assert crossinit("import", tmp_path / "alice.safetensors", "--name", "alice", env=env).returncode == 0
    before = tree(rhome)
    proc = start("import", path, "--name", "bomb", env=env)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=QUICK_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"import still running {QUICK_S} s after Ctrl-C")
    lines = [line for line in err.splitlines() if line.strip()]
    # 130, or death by SIGINT itself (-2, which a shell reports as 130) when Ctrl-C lands as it exits; or 1:
    # the file was refused first.
    assert proc.returncode in (130, -signal.SIGINT, 1), (proc.returncode, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert tree(rhome) == before
