"""The contact sheet of one evaluation: the stored crops, then a row of images per prompt under its scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossinit_cli.likeness import identity_summary, mean_of

if TYPE_CHECKING:
    from PIL import Image

    from crossinit_cli.evalresult import Evaluation, PromptResult

SHEET_TILE = 256  # px per image on the contact sheet (a full-size 4 x 10 sheet of 512 px tiles is ~15 MB)

SHEET_CROPS = 4  # stored crops shown in the sheet's first row, at least


def contact_sheet(result: Evaluation) -> Image.Image:
    """The stored crops in the first row, then one row per prompt, each under a label with its scores."""
    from PIL import Image, ImageDraw

    first = result.prompts[0].images[0] if result.prompts and result.prompts[0].images else None
    tile = min(SHEET_TILE, first.width if first is not None else SHEET_TILE)
    n = max((len(p.images) for p in result.prompts), default=1)
    cols = max(n, min(len(result.crops), SHEET_CROPS), 1)
    band = max(12, tile // 12)
    font = _font(int(band * 0.75))
    rows: list[tuple[str, list[Image.Image]]] = []
    crops_label = f"stored crops of <{result.name}> ({len(result.crops)})" if result.crops else "no stored crops"
    rows.append((crops_label, result.crops[:cols]))
    for entry in result.prompts:
        rows.append((_row_label(entry, result.has_identity), entry.images))
    sheet = Image.new("RGB", (cols * tile, len(rows) * (band + tile)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (band + tile)
        draw.text((3, top + 1), _fit(draw, label, font, cols * tile - 6), fill="black", font=font)
        for c, image in enumerate(images[:cols]):
            sheet.paste(_square(image, tile), (c * tile, top + band))
    return sheet


def _row_label(entry: PromptResult, with_identity: bool) -> str:
    parts = [entry.prompt]
    if with_identity:
        faces = identity_summary(entry.matches)
        parts.append(f"faces {faces['faces']}/{faces['images']}")
        if faces["cosine"] is not None:
            parts.append(f"cos {faces['cosine']:.3f}")
    if entry.clip_scores:
        parts.append(f"CLIP {mean_of(entry.clip_scores):.3f}")
    return "  ·  ".join(parts)


def _square(image: Image.Image, side: int) -> Image.Image:
    from PIL import Image, ImageOps

    return ImageOps.fit(image.convert("RGB"), (side, side), Image.Resampling.LANCZOS)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or built without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
