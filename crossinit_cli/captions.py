"""The text side of a training step: the captions, the learned rows in the token table, the UNet's conditioning.

Paper step 5's data pairs each latent with a caption from the textual-inversion example's templates
filled with "face of <v0> <v1> person" (`TEMPLATES`, `caption_ids`); `splice_rows` makes each text
encoder read the learned rows for the placeholder tokens, and `condition` turns caption ids into what
the UNet takes, as the model family's pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crossinit_cli import families
from crossinit_cli.crossinit import PHRASE
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import torch

    from crossinit_cli.families import Family, Slot

# diffusers' textual-inversion `imagenet_templates_small`; the official code repeats it with "an
# illustration of" and "a depiction of" in place of "a photo of" (81 captions, duplicates kept).
_SMALL_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

TEMPLATES = tuple(
    t.replace("a photo of", medium)
    for medium in ("a photo of", "an illustration of", "a depiction of")
    for t in _SMALL_TEMPLATES
)


def caption_ids(tokenizer: Any, token_ids: list[int]) -> torch.Tensor:
    """Every caption template filled with the phrase, as one encoder's padded ids [81, 77]."""
    captions = tokenizer(
        [t.format(PHRASE) for t in TEMPLATES],
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    if not all((captions == i).any(dim=1).all() for i in token_ids):
        raise CrossinitError("this model's tokenizer does not keep the placeholder tokens whole; cannot train")
    return captions


def condition(
    family: Family, slots: Sequence[Slot], captions: Sequence[torch.Tensor], size: int, clip_skip: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The UNet's text conditioning for caption ids (one tensor per encoder), as the family's pipeline makes it
    (at the text encoder's layer -`clip_skip`, through its final layer norm, for SD 1.x/2.x)."""
    return families.conditioning(family, list(zip(slots, captions)), size, clip_skip)


def gather(conditioning: tuple[torch.Tensor, dict[str, torch.Tensor] | None], index: torch.Tensor, dtype: Any) -> Any:
    """Rows `index` of a conditioning (distinct captions -> batch items), in the UNet's dtype."""
    states, added = conditioning
    if added is not None:
        added = {k: v[index].to(dtype) for k, v in added.items()}
    return states[index].to(dtype), added


def splice_rows(text_encoder: Any, token_ids: list[int], rows: torch.Tensor) -> Any:
    """Make the token-embedding layer return `rows` for the placeholder ids; returns the hook handle.

    The rows are gathered in their own float32, so autocast never rounds the learned vectors themselves.
    """
    import torch

    table = text_encoder.get_input_embeddings()
    wanted = torch.tensor(token_ids, device=table.weight.device)

    def splice(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        hit = args[0].unsqueeze(-1) == wanted  # [batch, length, k]
        which = hit.int().argmax(dim=-1)
        return torch.where(hit.any(dim=-1, keepdim=True), rows[which].to(output.dtype), output)

    return table.register_forward_hook(splice)
