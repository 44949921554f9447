"""The Stable Diffusion tools `export --to DIR` delivers into: how each one's install folder is recognised,
and which folder in it holds textual-inversion embeddings.

Each tool is known by marker files of its own install layout (see docs/formats.md for the sources):

- AUTOMATIC1111 and Forge: `webui.py` beside `embeddings/` (Forge also has `modules_forge/`);
- SD.Next: `webui.py`, `installer.py` and `modules/`; embeddings in `models/embeddings/` (its default), or
  `embeddings/` where an older install has that one;
- ComfyUI: the `comfy/` package beside `models/embeddings/`;
- InvokeAI: `invokeai.yaml` in its root folder; embeddings go to `autoimport/embedding/` there (read at
  start-up by InvokeAI 3; InvokeAI 4 and later add them with Model Manager > Scan Folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crossinit_cli.errors import CrossinitError

LOOKED_FOR = (
    "webui.py beside embeddings/ (AUTOMATIC1111, Forge), webui.py + installer.py + modules/ (SD.Next), "
    "comfy/ beside models/embeddings/ (ComfyUI), invokeai.yaml (InvokeAI)"
)


@dataclass(frozen=True)
class Tool:
    key: str  # "a1111", "forge", "sdnext", "comfyui", "invokeai": formats.format_for_tool's first key
    label: str
    root: Path
    embeddings: Path  # where the files go (created if the tool's default folder does not exist yet)
    hint: str  # how to use a delivered identity there; {stem} is its file's stem


def detect(folder: Path) -> Tool:
    """The tool installed at `folder`, or a one-line CrossinitError listing what was looked for."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CrossinitError(f"{root} is not a folder")
    if (root / "webui.py").is_file() and (root / "installer.py").is_file() and (root / "modules").is_dir():
        where = root / "embeddings" if (root / "embeddings").is_dir() else root / "models" / "embeddings"
        return Tool("sdnext", "SD.Next", root, where, "write `{stem}` in a prompt (after Refresh)")
    if (root / "webui.py").is_file() and (root / "embeddings").is_dir():
        if (root / "modules_forge").is_dir():
            return Tool("forge", "Forge", root, root / "embeddings", "write `{stem}` in a prompt")
        return Tool("a1111", "AUTOMATIC1111", root, root / "embeddings", "write `{stem}` in a prompt")
    if (root / "comfy").is_dir() and (root / "models" / "embeddings").is_dir():
        return Tool("comfyui", "ComfyUI", root, root / "models" / "embeddings", "write `embedding:{stem}` in a prompt")
    if (root / "invokeai.yaml").is_file():
        where = root / "autoimport" / "embedding"
        hint = f"InvokeAI 3 adds it at start-up; InvokeAI 4+: Model Manager > Scan Folder {where}; prompt <{{stem}}>"
        return Tool("invokeai", "InvokeAI", root, where, hint)
    raise CrossinitError(f"{root} is not an install folder crossinit knows; looked for {LOOKED_FOR}")
