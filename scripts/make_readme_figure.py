"""Draw docs/img/pipeline.png, the README's picture, from crossinit's own output.

It runs the real commands (learn, then generate) on the tiny random model of crossinit_cli/synthetic.py,
so the "generated" panel is what an untrained random model draws: the figure shows the pipeline's
stages and files, not image quality. Usage: python scripts/make_readme_figure.py [OUT.png]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "astronaut.png"
TILE = 192


def crossinit(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "crossinit_cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return done.stdout


def main(out: Path) -> None:
    from crossinit_cli.synthetic import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_sd(work / "tiny")
        env = dict(os.environ, CROSSINIT_HOME=str(work / "home"), CROSSINIT_CONFIG=str(work / "c.toml"))
        record = json.loads(crossinit(env, "learn", str(PHOTO), "--fast", "--model", str(model), "-q", "--json"))
        files = json.loads(
            crossinit(env, "generate", "<astronaut> on the beach", "-n", "3", "--seed", "1", "--steps", "20",
                      "--model", str(model), "-o", str(work / "out"), "-q", "--json")
        )  # fmt: skip
        panels = [
            ("your photo", ImageOps.fit(Image.open(PHOTO).convert("RGB"), (TILE, TILE))),
            ("aligned crop (stored)", Image.open(record["crops"][0]).convert("RGB").resize((TILE, TILE))),
        ] + [
            (f"generate, seed {f['seed']}", Image.open(f["path"]).convert("RGB").resize((TILE, TILE), Image.NEAREST))
            for f in files
        ]
    gap, label_h = 16, 22
    sheet = Image.new("RGB", (len(panels) * (TILE + gap) + gap, TILE + 2 * label_h + 2 * gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(panels):
        x = gap + i * (TILE + gap)
        sheet.paste(image, (x, gap + label_h))
        draw.text((x, gap // 2), label, fill="black")
    note = (
        "crossinit learn astronaut.png --fast  ->  crossinit generate '<astronaut> on the beach' -n 3   "
        "(tiny random test model: its images are noise by design)"
    )
    draw.text((gap, TILE + label_h + gap + 6), note, fill=(80, 80, 80))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "pipeline.png")
