"""Write docs/commands/<command>.md: each command's --help (from the code itself) and worked examples.

Run after changing a command; tests/test_command_docs.py fails when a page differs from what this writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "learn": [
        ("Learn from one photo in the paper's fast mode (25 steps)", "crossinit learn alice.jpg --fast"),
        (
            "Full mode (320 steps, batch 8) from a folder of photos, with a name",
            "crossinit learn photos/alice/ --name alice",
        ),
        (
            "On a local model, on the CPU, reproducibly",
            "crossinit learn bob.png --fast --model ./sd21-base --device cpu --seed 7",
        ),
        ("A photo that is already a tight face crop", "crossinit learn crop.png --no-align --name carol"),
        (
            "Keep a snapshot every 20 steps, then continue a run that was cut off",
            "crossinit learn photos/alice/ --snapshot-every 20\ncrossinit learn --resume alice",
        ),
        (
            "Many identities over 4 GPUs",
            "accelerate launch --multi_gpu --num_processes 4 -m crossinit_cli learn --batch people.csv",
        ),
    ],
    "generate": [
        ("One prompt, four images", 'crossinit generate "<alice> as an astronaut, oil painting" -n 4 --seed 7'),
        ("A plain prompt with --identity", 'crossinit generate --identity alice "smiling, on the beach"'),
        ("Two identities in one picture", 'crossinit generate "<alice> and <bob> playing chess in a park"'),
        (
            "From a shell script, one prompt a line",
            "cat prompts.txt | crossinit generate --prompts - --json | jq -r '.[].path'",
        ),
        (
            "Different settings per line, one model load (JSON Lines in and out)",
            'printf \'%s\\n\' \'{"prompt": "<alice> as a knight", "seed": 1, "n": 4}\' \\\n'
            '  \'{"prompt": "<bob> on the moon", "size": "768x512", "steps": 40}\' \\\n'
            "  | crossinit generate --manifest - | jq -r .path",
        ),
    ],
    "list": [
        ("Everything, or just the names", "crossinit list\ncrossinit list --json | jq -r '.[].name'"),
        (
            "Finding things",
            "crossinit list --tag family --sort created --limit 5\ncrossinit list --family sd2 --search berlin",
        ),
    ],
    "show": [("One identity, its training record and crops", "crossinit show alice\ncrossinit show alice --json")],
    "edit": [
        ("Notes and tags", 'crossinit edit alice --note "from the 2026 holiday" --tag family'),
        (
            "Trade fidelity for editability, then undo it",
            "crossinit edit alice --strength 0.8\ncrossinit edit alice --strength 1",
        ),
        ("Rename", "crossinit edit alice --rename alice-2026"),
        (
            "Use the vectors of step 160 of the run, then the final ones again",
            "crossinit edit alice --use-snapshot 160\ncrossinit edit alice --use-snapshot final",
        ),
        ("Edit the metadata in your editor", "EDITOR=nano crossinit edit alice"),
    ],
    "remove": [
        ("Remove without a question (scripts)", "crossinit remove alice --yes"),
        (
            "Clear an unfinished run instead of resuming it",
            "crossinit list    # unfinished run: alice at step 85 of 320 ...\ncrossinit remove alice --yes",
        ),
    ],
    "export": [
        (
            "AUTOMATIC1111 / Forge (write `alice` in a prompt)",
            "crossinit export alice -o ~/stable-diffusion-webui/embeddings/",
        ),
        ("ComfyUI (`embedding:alice`)", "crossinit export alice -o ~/ComfyUI/models/embeddings/"),
        (
            "Every identity into a tool's own folder (run again: only what changed is rewritten)",
            "crossinit export --all --to ~/ComfyUI\ncrossinit export --tag family --to ~/stable-diffusion-webui",
        ),
        ("diffusers", "crossinit export alice --format diffusers -o alice.safetensors"),
        ("The official code's layout", "crossinit export alice --format official"),
    ],
    "import": [
        (
            "An identity learned by the official code",
            "crossinit import 28017.bin --name celeb --model stabilityai/stable-diffusion-2-1-base",
        ),
        ("An A1111 embedding", "crossinit import ~/stable-diffusion-webui/embeddings/bob.safetensors"),
        (
            "Every embedding file of a folder (one line per file skipped, and why)",
            "crossinit import ~/Downloads/embeddings/",
        ),
    ],
    "eval": [
        ("Likeness and prompt fidelity of one identity", "crossinit eval alice"),
        ("Fast vs full of one person, side by side", "crossinit eval alice-fast alice-full --compare -n 8"),
        (
            "Score every snapshot, then make the best one active",
            "crossinit eval alice --snapshots\ncrossinit eval alice --pick-best",
        ),
        ("A gate in a script (exit status 3 below 0.8)", "crossinit eval alice --fail-below 0.8 --quiet > /dev/null"),
    ],
    "doctor": [
        ("Before your first run, or when something fails", "crossinit doctor\ncrossinit doctor --json"),
        (
            "Check the install end to end, before downloading weights (paste its output into a bug report)",
            "crossinit doctor --self-test\ncrossinit doctor --self-test --json",
        ),
    ],
    "config": [
        ("Where things live and the defaults", "crossinit config"),
        ("Make a local model the default", "crossinit config set model /models/sd21-base"),
        ("Back to the default device", "crossinit config unset device"),
    ],
}


def help_text(command: str) -> str:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="100", TERM="dumb")
    code = "import sys; sys.argv[0] = 'crossinit'; from crossinit_cli.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, command, "--help"], env=env, capture_output=True, text=True, check=True
    )
    return "\n".join(line.rstrip() for line in done.stdout.strip("\n").splitlines())


def render(command: str) -> str:
    parts = [f"# crossinit {command}", "", "```text", help_text(command), "```", "", "## Examples", ""]
    for title, example in EXAMPLES[command]:
        parts += [f"{title}:", "", "```bash", example, "```", ""]
    return "\n".join(parts)


def main(folder: Path = ROOT / "docs" / "commands") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for command in EXAMPLES:
        (folder / f"{command}.md").write_text(render(command), encoding="utf-8")
    index = ["# Commands", ""] + [f"- [crossinit {c}]({c}.md)" for c in EXAMPLES] + [""]
    (folder / "README.md").write_text("\n".join(index), encoding="utf-8")
    print(f"wrote {len(EXAMPLES)} pages into {folder}")


if __name__ == "__main__":
    main()
