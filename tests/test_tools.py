"""`export --to`: each tool's install folder, laid out as its repository and installer lay it out, and the folder
its own configuration makes it read embeddings from (start-up arguments, config files, defaults)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import safe_open

from crossinit_cli.store import Identity, Library
from tests.test_formats import a1111_read, comfyui_read, invokeai_read

WIDTH = 32

# The `--embeddings-dir` lines of each webui's own modules/cmd_args.py (AUTOMATIC1111 and lllyasviel's Forge
# default to the data folder, Haoming02's Forge Classic/Neo to the models folder).
A1111_CMD_ARGS = (
    'parser.add_argument("--embeddings-dir", type=normalized_filepath, default=os.path.join(data_path, '
    "'embeddings'), help=\"embeddings directory for textual inversion (default: embeddings)\")\n"
)
CLASSIC_CMD_ARGS = (
    'parser.add_argument("--embeddings-dir", type=normalized_filepath, default=os.path.join(models_path, '
    '"embeddings"), help="textual inversion directory")\n'
)
# webui-user.sh and webui-user.bat as the repositories ship them (COMMANDLINE_ARGS commented out / empty).
A1111_USER_SH = (
    "#!/bin/bash\n# Commandline arguments for webui.py, for example: "
    'export COMMANDLINE_ARGS="--medvram --opt-split-attention"\n#export COMMANDLINE_ARGS=""\n'
)
A1111_USER_BAT = "@echo off\n\nset PYTHON=\nset GIT=\nset VENV_DIR=\nset COMMANDLINE_ARGS=\n\ncall webui.bat\n"
CLASSIC_USER_BAT = "@echo off\n\n:: set PYTHON=\nset COMMANDLINE_ARGS= --no-download-sd-model\n\ncall webui.bat\n"
COMFY_CLONE = {
    "main.py": "",
    "folder_paths.py": "",
    "nodes.py": "",
    "server.py": "",
    "execution.py": "",
    "comfy/sd1_clip.py": "",
    "comfy_extras/": None,
    "utils/extra_config.py": "",
    "custom_nodes/example_node.py.example": "",
    "models/embeddings/put_embeddings_or_textual_inversion_concepts_here": "",
    "models/checkpoints/put_checkpoints_here": "",
    "input/": None,
    "output/": None,
    "extra_model_paths.yaml.example": "#Rename this to extra_model_paths.yaml and ComfyUI will load it\n",
}
WEBUI = {
    "webui.py": "",
    "launch.py": "",
    "webui.sh": "",
    "webui.bat": "",
    "webui-user.sh": A1111_USER_SH,
    "webui-user.bat": A1111_USER_BAT,
    "modules/paths_internal.py": "",
    "modules/cmd_args.py": A1111_CMD_ARGS,
    "models/Stable-diffusion/Put Stable Diffusion checkpoints here.txt": "",
    "extensions-builtin/": None,
    "scripts/": None,
    "javascript/": None,
    "html/": None,
}
LAYOUTS: dict[str, dict[str, str | None]] = {
    # AUTOMATIC1111/stable-diffusion-webui: embeddings/ is in the repository (with its placeholder file).
    "a1111": {
        **WEBUI,
        "embeddings/Place Textual Inversion embeddings here.txt": "",
        "textual_inversion_templates/": None,
    },
    # lllyasviel/stable-diffusion-webui-forge: A1111's layout plus its own packages.
    "forge": {**WEBUI, "embeddings/": None, "modules_forge/": None, "backend/": None, "packages_3rdparty/": None},
    # Haoming02/sd-webui-forge-classic (Classic and Neo): no embeddings/ at the root, models/embeddings/ instead.
    "forge-classic": {
        **{k: v for k, v in WEBUI.items() if k != "webui-user.bat"},
        "webui-user.bat": CLASSIC_USER_BAT,
        "modules/cmd_args.py": CLASSIC_CMD_ARGS,
        "modules_forge/": None,
        "ldm_patched/": None,
        "models/embeddings/Put Textual Inversion here.txt": "",
    },
    # vladmandic/sdnext: its installer beside webui.py; models/ holds the folders its paths.py creates.
    "sdnext": {
        "webui.py": "",
        "launch.py": "",
        "installer.py": "",
        "webui.sh": "",
        "webui.bat": "",
        "webui.ps1": "",
        "modules/paths.py": "",
        "modules/ui_definitions.py": "",
        "models/Stable-diffusion/": None,
        "extensions-builtin/": None,
        "pipelines/": None,
        "configs/": None,
        "wiki/": None,
    },
    "comfyui": COMFY_CLONE,
    # The Windows portable zip: the clone in ComfyUI/ beside its embedded Python and launchers.
    "comfyui-portable": {
        **{f"ComfyUI/{k}": v for k, v in COMFY_CLONE.items()},
        "python_embeded/python.exe": "",
        "run_nvidia_gpu.bat": ".\\python_embeded\\python.exe -s ComfyUI\\main.py --windows-standalone-build\n",
        "run_cpu.bat": "",
        "update/update_comfyui.bat": "",
        "README_VERY_IMPORTANT.txt": "",
    },
    # Comfy-Org/desktop's base directory (ComfyConfigManager.DEFAULT_DIRECTORIES), run with --base-directory.
    "comfyui-desktop": {
        "custom_nodes/": None,
        "input/": None,
        "output/": None,
        "user/default/": None,
        "models/checkpoints/": None,
        "models/embeddings/": None,
        "models/loras/": None,
        ".venv/": None,
    },
    # An InvokeAI 4+/5+/6+ root: invokeai.yaml beside the folders it manages.
    "invokeai": {
        "invokeai.yaml": "# Internal metadata - do not edit:\nschema_version: 4.0.2\n",
        "databases/invokeai.db": "",
        "models/": None,
        "outputs/": None,
        "nodes/": None,
    },
}
# Where each layout's tool reads embeddings (and so where crossinit must put them), the tool key, the setting named.
READS = {
    "a1111": ("embeddings", "a1111", "the default in its modules/cmd_args.py"),
    "forge": ("embeddings", "forge", "the default in its modules/cmd_args.py"),
    "forge-classic": ("models/embeddings", "forge", "the default in its modules/cmd_args.py"),
    "sdnext": ("models/embeddings", "sdnext", "SD.Next's default"),
    "comfyui": ("models/embeddings", "comfyui", "ComfyUI's default models/embeddings"),
    "comfyui-portable": ("ComfyUI/models/embeddings", "comfyui", "ComfyUI's default models/embeddings"),
    "comfyui-desktop": ("models/embeddings", "comfyui", "ComfyUI's default models/embeddings"),
    "invokeai": ("crossinit-embeddings", "invokeai", "InvokeAI 4+ reads none by itself"),
}
READERS = {"comfyui": comfyui_read, "invokeai": invokeai_read}


def install(root: Path, layout: str, **extra: str) -> Path:
    """`layout`'s install folder at `root` (files empty unless given), plus `extra` files (path: text)."""
    for item, text in {**LAYOUTS[layout], **extra}.items():
        target = root / item
        if item.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text or "")
    return root


@pytest.fixture(autouse=True)
def no_start_up_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools read these from their environment; this machine's own must not leak into a test."""
    for name in ("COMMANDLINE_ARGS", "SD_DATADIR", "SD_CONFIG", "SD_MODELSDIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def alice(library: Library) -> np.ndarray:
    vectors = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    library.add(Identity(name="alice", tokens=2, width=WIDTH, family="sd2"), vectors)
    return vectors


def deliver(cli, root: Path) -> tuple[Path, str]:
    """Run `export alice --to root --json`; the file written, and the setting it names plus what went to stderr."""
    result = cli("export", "alice", "--to", root, "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["status"] in ("written", "unchanged")
    return Path(record["path"]), f"{record['setting']}\n{result.stderr}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_gets_the_file_where_its_tool_reads_and_says_why(
    layout: str, cli, alice: np.ndarray, tmp_path: Path
) -> None:
    root = install(tmp_path / layout, layout)
    result = cli("export", "alice", "--to", root)
    assert result.exit_code == 0, result.stderr
    folder, key, setting = READS[layout]
    path = root / folder / "alice.safetensors"
    np.testing.assert_array_equal(READERS.get(key, a1111_read)(path).numpy(), alice)
    assert setting in result.stderr and f"embeddings go to {root / folder}" in result.stderr
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors"))
    assert written == [f"{folder}/alice.safetensors"]  # nowhere else (not a leftover embeddings/ either)
    before = path.stat()
    record = json.loads(cli("export", "alice", "--to", root, "--json").stdout)[0]
    assert (record["tool"], record["status"]) == (key, "unchanged") and setting in record["setting"]
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_a1111_embeddings_dir_in_webui_user_sh_wins_over_embeddings(cli, alice, tmp_path: Path) -> None:
    shared = tmp_path / "shared embeddings"
    script = A1111_USER_SH + f"export COMMANDLINE_ARGS=\"--xformers --embeddings-dir '{shared}'\"  # mine\n"
    root = install(tmp_path / "webui", "a1111", **{"webui-user.sh": script})
    path, said = deliver(cli, root)
    assert path == shared / "alice.safetensors"
    assert "--embeddings-dir in webui-user.sh COMMANDLINE_ARGS" in said
    assert sorted(os.listdir(root / "embeddings")) == ["Place Textual Inversion embeddings here.txt"]


def test_the_environment_counts_unless_webui_user_sh_replaces_it(
    cli, alice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMANDLINE_ARGS", f"--medvram --data-dir={tmp_path / 'data'}")
    root = install(tmp_path / "webui", "a1111")
    path, said = deliver(cli, root)
    assert path == tmp_path / "data" / "embeddings" / "alice.safetensors"  # A1111: <data-dir>/embeddings
    assert "--data-dir in the COMMANDLINE_ARGS environment variable" in said
    appended = install(
        tmp_path / "webui2", "a1111", **{"webui-user.sh": 'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --x"\n'}
    )
    assert deliver(cli, appended)[0] == path
    replaced = install(tmp_path / "webui3", "a1111", **{"webui-user.sh": 'export COMMANDLINE_ARGS="--medvram"\n'})
    assert deliver(cli, replaced)[0] == replaced / "embeddings" / "alice.safetensors"


def test_forge_webui_user_bat_with_continued_lines_and_variables(cli, alice, tmp_path: Path) -> None:
    a1111 = tmp_path / "A1111"
    bat = (  # Forge's own webui-user.bat example, uncommented: reference an existing A1111 checkout
        "@echo off\n\nset PYTHON=\nset GIT=\nset VENV_DIR=\nset COMMANDLINE_ARGS=\n\n"
        f"set A1111_HOME={a1111}\n\nset VENV_DIR=%A1111_HOME%/venv\nset COMMANDLINE_ARGS=%COMMANDLINE_ARGS% ^\n"
        " --ckpt-dir %A1111_HOME%/models/Stable-diffusion ^\n --hypernetwork-dir %A1111_HOME%/models/hypernetworks ^\n"
        " --embeddings-dir %A1111_HOME%/embeddings ^\n --lora-dir %A1111_HOME%/models/Lora\n\ncall webui.bat\n"
    )
    root = install(tmp_path / "forge", "forge", **{"webui-user.bat": bat})
    path, said = deliver(cli, root)
    assert path == a1111 / "embeddings" / "alice.safetensors"
    assert "--embeddings-dir in webui-user.bat COMMANDLINE_ARGS" in said
    assert f"Forge at {root}: embeddings go to {a1111 / 'embeddings'}" in cli("export", "alice", "--to", root).stderr


def test_forge_ref_a1111_home_points_embeddings_at_the_other_install(cli, alice, tmp_path: Path) -> None:
    a1111 = install(tmp_path / "A1111", "a1111")
    script = f'export COMMANDLINE_ARGS="--forge-ref-a1111-home {a1111}"\n'
    forge = install(tmp_path / "forge", "forge", **{"webui-user.sh": script})
    path, said = deliver(cli, forge)  # launch_utils.configure_forge_reference_checkout: <home>/embeddings
    assert path == a1111 / "embeddings" / "alice.safetensors" and "--forge-ref-a1111-home in webui-user.sh" in said
    explicit = script.replace('"\n', f' --embeddings-dir {tmp_path / "mine"}"\n')
    (forge / "webui-user.sh").write_text(explicit)  # an explicit --embeddings-dir is kept
    assert deliver(cli, forge)[0] == tmp_path / "mine" / "alice.safetensors"


def test_if_not_defined_in_webui_user_bat_yields_to_the_environment(
    cli, alice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bat = f"@echo off\nif not defined COMMANDLINE_ARGS set COMMANDLINE_ARGS=--embeddings-dir {tmp_path / 'bat'}\n"
    root = install(tmp_path / "webui", "a1111", **{"webui-user.bat": bat})
    assert deliver(cli, root)[0] == tmp_path / "bat" / "alice.safetensors"
    monkeypatch.setenv("COMMANDLINE_ARGS", f"--embeddings-dir {tmp_path / 'env'}")
    path, said = deliver(cli, root)
    assert path == tmp_path / "env" / "alice.safetensors" and "environment variable" in said


def test_forge_classic_ignores_an_embeddings_folder_the_user_made(cli, alice, tmp_path: Path) -> None:
    root = install(tmp_path / "classic", "forge-classic", **{"embeddings/": None})
    path, said = deliver(cli, root)
    assert path == root / "models" / "embeddings" / "alice.safetensors"
    assert "Forge Classic/Neo at" in cli("export", "alice", "--to", root).stderr
    assert os.listdir(root / "embeddings") == []
    script = f'export COMMANDLINE_ARGS="--model-ref {tmp_path / "all-models"}"\n'
    moved = install(tmp_path / "moved", "forge-classic", **{"webui-user.sh": script})
    path, said = deliver(cli, moved)  # Classic's default follows its models folder
    assert path == tmp_path / "all-models" / "embeddings" / "alice.safetensors"
    assert "--model-ref in webui-user.sh COMMANDLINE_ARGS" in said


CLASSIC_PATHS_INTERNAL = (  # Haoming02/sd-webui-forge-classic modules/paths_internal.py (its parser_pre)
    'parser_pre.add_argument("--data-dir", type=str, default=os.path.dirname(modules_path))\n'
    'parser_pre.add_argument("--model-ref", type=str, default=None, help="base path for all models")\n'
    'models_path = cmd_opts_pre.model_ref or os.path.join(data_path, "models")\n'
)


def test_forge_classic_without_cmd_args_py_gets_its_layouts_default_and_cites_what_was_read(
    cli, alice, tmp_path: Path
) -> None:
    root = install(tmp_path / "classic", "forge-classic", **{"modules/paths_internal.py": CLASSIC_PATHS_INTERNAL})
    (root / "modules" / "cmd_args.py").unlink()
    (root / "webui-user.bat").unlink()
    path, said = deliver(cli, root)
    assert path == root / "models" / "embeddings" / "alice.safetensors"
    assert "per its modules/paths_internal.py; it has no modules/cmd_args.py" in said
    assert "no folder set in COMMANDLINE_ARGS or webui-user.sh" in said
    assert "the default in its modules/cmd_args.py" not in said and "webui-user.bat" not in said  # neither was read
    assert "Forge Classic/Neo at" in cli("export", "alice", "--to", root).stderr
    (root / "modules" / "paths_internal.py").unlink()  # nothing to read: the folder the layout has
    path, said = deliver(cli, root)
    assert path == root / "models" / "embeddings" / "alice.safetensors"
    assert (
        "models/embeddings/ is there, embeddings/ is not" in said
        and "no modules/cmd_args.py or paths_internal.py to read" in said
    )


def test_sdnext_reads_embeddings_dir_from_config_json_not_an_old_embeddings_folder(cli, alice, tmp_path: Path) -> None:
    root = install(tmp_path / "sdnext", "sdnext", **{"embeddings/old.pt": ""})
    assert deliver(cli, root)[0] == root / "models" / "embeddings" / "alice.safetensors"
    (root / "config.json").write_text(json.dumps({"embeddings_dir": str(tmp_path / "ti"), "theme_type": "Modern"}))
    path, said = deliver(cli, root)
    assert path == tmp_path / "ti" / "alice.safetensors" and "embeddings_dir in config.json" in said
    (root / "config.json").write_text(json.dumps({"embeddings_dir": "models/ti"}))  # relative: to the install
    assert deliver(cli, root)[0] == root / "models" / "ti" / "alice.safetensors"
    (root / "config.json").write_text(json.dumps({"models_dir": "big-disk", "sd_model_checkpoint": "x"}))
    path, said = deliver(cli, root)
    assert path == root / "big-disk" / "embeddings" / "alice.safetensors" and "models_dir in config.json" in said
    assert os.listdir(root / "embeddings") == ["old.pt"]


def test_sdnext_start_up_folders_from_commandline_args_and_its_environment_variables(
    cli, alice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = install(tmp_path / "sdnext", "sdnext")
    monkeypatch.setenv("SD_MODELSDIR", str(tmp_path / "env-models"))  # modules/cmd_args.py's default
    path, said = deliver(cli, root)
    assert path == tmp_path / "env-models" / "embeddings" / "alice.safetensors" and "SD_MODELSDIR" in said
    monkeypatch.setenv("COMMANDLINE_ARGS", f"--models-dir {tmp_path / 'flag-models'} --data-dir data")
    (root / "data").mkdir()
    (root / "data" / "config.json").write_text(json.dumps({"models_dir": "ignored: the flag wins"}))
    path, said = deliver(cli, root)
    assert path == tmp_path / "flag-models" / "embeddings" / "alice.safetensors"
    assert "--models-dir in the COMMANDLINE_ARGS environment variable" in said
    (root / "data" / "config.json").write_text(json.dumps({"embeddings_dir": "ti"}))  # relative to the data dir
    assert deliver(cli, root)[0] == root / "data" / "ti" / "alice.safetensors"


def sdnext_read(path: Path, hidden_sizes: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """SD.Next modules/textual_inversion.py: open_embeddings reads every tensor of the file, then
    load_diffusers_embedding skips a file whose widths the model lacks and insert_vectors puts each tensor into
    the text encoder of its width."""
    with safe_open(str(path), framework="pt") as handle:
        vec = [handle.get_tensor(k) for k in handle.keys()]
    sizes = [v.shape[-1] for v in vec]
    skipped = (
        not all(s in hidden_sizes for s in sizes)
        or len(sizes) > len(hidden_sizes)
        or (len(sizes) < len(hidden_sizes) and len(sizes) != 2)
    )
    assert not skipped, f"SD.Next skips this embedding for a model with widths {hidden_sizes}"
    return {size: v for v, size in zip(vec, sizes)}


def test_sdxl_identities_are_delivered_to_sdnext_which_matches_them_by_width(
    cli, library: Library, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    xl = {"clip_l": rng.standard_normal((2, 768)), "clip_g": rng.standard_normal((2, 1280))}
    xl = {k: v.astype(np.float32) for k, v in xl.items()}
    library.add(Identity(name="xl", tokens=2, width=768, family="sdxl"), xl)
    root = install(tmp_path / "sdnext", "sdnext")
    result = cli("export", "xl", "--to", root, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["status"] == "written"
    loaded = sdnext_read(root / "models" / "embeddings" / "xl.safetensors", (768, 1280))
    np.testing.assert_array_equal(loaded[768].numpy(), xl["clip_l"])
    np.testing.assert_array_equal(loaded[1280].numpy(), xl["clip_g"])


def test_comfyui_extra_model_paths_yaml_is_read_as_comfyui_reads_it(cli, alice, tmp_path: Path) -> None:
    root = install(tmp_path / "ComfyUI", "comfyui")
    yaml_text = (
        "a1111:\n    base_path: ../webui/\n    checkpoints: models/Stable-diffusion\n    embeddings: embeddings\n"
    )
    (root / "extra_model_paths.yaml").write_text(yaml_text)
    path, said = deliver(cli, root)  # appended after models/embeddings: the default stays first
    assert path == root / "models" / "embeddings" / "alice.safetensors"
    assert f"ComfyUI's default models/embeddings; it also reads {tmp_path / 'webui' / 'embeddings'}" in said
    (root / "extra_model_paths.yaml").write_text(
        "comfyui:\n    base_path: ~/unused\n    is_default: true\n    embeddings: |\n"
        f"        {tmp_path / 'first'}\n        {tmp_path / 'second'}\n"
    )
    path, said = deliver(cli, root)  # is_default entries go first, each one inserted before the others
    assert path == tmp_path / "second" / "alice.safetensors"
    assert "`comfyui: embeddings` in extra_model_paths.yaml (is_default)" in said
    (root / "extra_model_paths.yaml").write_text("a1111:\n  embeddings: [unclosed\n")
    broken = cli("export", "alice", "--to", root)
    assert broken.exit_code == 1 and broken.stderr.count("\n") == 1 and "extra_model_paths.yaml" in broken.stderr


def test_invokeai_gets_a_named_folder_and_the_one_step_to_take(cli, alice, tmp_path: Path) -> None:
    root = install(tmp_path / "invokeai", "invokeai")
    path, said = deliver(cli, root)
    assert path == root / "crossinit-embeddings" / "alice.safetensors"
    assert f"next: in InvokeAI's Model Manager: Add Models > Scan Folder, paste {path.parent}" in said
    again = cli("export", "alice", "--to", root).stderr  # nothing new: the step is still the one to take
    assert (
        "unchanged" in again
        and f"next: in InvokeAI's Model Manager: Add Models > Scan Folder, paste {path.parent}" in again
    )
    assert not (root / "autoimport").exists()


def test_to_may_name_the_embeddings_folder_the_tool_reads_and_no_other(cli, alice, tmp_path: Path) -> None:
    comfy = install(tmp_path / "ComfyUI", "comfyui")
    assert deliver(cli, comfy / "models" / "embeddings")[0] == comfy / "models" / "embeddings" / "alice.safetensors"
    classic = install(tmp_path / "classic", "forge-classic", **{"embeddings/": None})
    wrong = cli("export", "alice", "--to", classic / "embeddings")
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1
    assert f"reads embeddings from {classic / 'models' / 'embeddings'}" in wrong.stderr
    assert os.listdir(classic / "embeddings") == []
    assert deliver(cli, classic / "models" / "embeddings")[0].parent == classic / "models" / "embeddings"


def test_folders_that_are_no_install_are_refused_naming_every_layout(cli, alice, tmp_path: Path) -> None:
    lookalike = tmp_path / "lookalike"
    for item in ("embeddings/", "models/embeddings/", "webui.py", "comfy/"):  # pieces, never a whole layout
        (lookalike / item).mkdir(parents=True) if item.endswith("/") else (lookalike / item).write_text("")
    result = cli("export", "alice", "--to", lookalike / "embeddings")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    for looked_for in ("SD.Next", "Forge Classic/Neo", "folder_paths.py", "python_embeded/", "user/", "invokeai.yaml"):
        assert looked_for in result.stderr
    assert not list(lookalike.rglob("*.safetensors"))


def test_an_a1111_install_without_cmd_args_is_not_cited_for_it(cli, alice: np.ndarray, tmp_path: Path) -> None:
    root = install(tmp_path / "webui", "a1111")
    (root / "modules" / "cmd_args.py").unlink()  # an older or trimmed install: the file was never read
    path, said = deliver(cli, root)
    assert path == root / "embeddings" / "alice.safetensors"
    assert "the default in its modules/cmd_args.py" not in said  # never cited as read
    assert "it has no modules/cmd_args.py" in said and "; no folder set in COMMANDLINE_ARGS" in said
