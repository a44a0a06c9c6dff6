"""Prompt tokens of one teacher request, before sending it: the image's and the text's.

For the gpt-4o family the image count is OpenAI's published tile formula (`detail`
low: a flat base; high: the image fitted into 2048x2048, its short side brought down
to 768, then a base plus a price per 512-pixel tile), which is exact. The text of an
OpenAI request is counted with OpenAI's rule of thumb of four characters a token
(their tokenizer's vocabulary is not shipped with any package here), plus the chat
format's few tokens. For a local model the model's own processor builds the real
inputs and counts them, image and text together, once per distinct image size.
Measured `usage` (a `--limit` trial) beats all of these, and the dry run prefers it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from domainbed_reasoning.errors import UserError

DETAILS = ("low", "high", "auto")
CHARS_PER_TOKEN = 4
CHAT_FORMAT_TOKENS = 7  # the role markers of one user message and the reply's start
FIT_SIDE = 2048
SHORT_SIDE = 768
TILE_SIDE = 512


@dataclass(frozen=True)
class TileCost:
    """Tokens of an image in OpenAI's tile formula: `base` always, `tile` per 512-px tile."""

    base: int
    tile: int


# gpt-4o-mini bills images at ~33x the tokens so their price matches gpt-4o's; longest prefix wins.
TILE_COSTS = {
    "gpt-4o-mini": TileCost(2833, 5667),
    "gpt-4o": TileCost(85, 170),
    "chatgpt-4o": TileCost(85, 170),
}


def tile_cost(model: str) -> TileCost | None:
    """The tile formula's constants for a gpt-4o-family model name, else None."""
    for prefix in sorted(TILE_COSTS, key=len, reverse=True):
        if model == prefix or model.startswith(prefix + "-"):
            return TILE_COSTS[prefix]
    return None


def check_detail(detail: str) -> str:
    if detail not in DETAILS:
        raise UserError(f"--detail {detail!r}: choose low, high or auto")
    return detail


def scaled(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width * factor)), max(1, round(height * factor))


def high_detail_tiles(width: int, height: int) -> int:
    """512-px tiles after the two downscales of `detail: high` (images are never enlarged)."""
    if max(width, height) > FIT_SIDE:
        width, height = scaled(width, height, FIT_SIDE / max(width, height))
    if min(width, height) > SHORT_SIDE:
        width, height = scaled(width, height, SHORT_SIDE / min(width, height))
    return math.ceil(width / TILE_SIDE) * math.ceil(height / TILE_SIDE)


def openai_image_tokens(width: int, height: int, detail: str, cost: TileCost) -> int:
    """`auto` lets the server choose; it is counted as `high`, the dearer of the two."""
    if check_detail(detail) == "low":
        return cost.base
    return cost.base + cost.tile * high_detail_tiles(width, height)


def text_tokens(prompt: str) -> int:
    return math.ceil(len(prompt) / CHARS_PER_TOKEN) + CHAT_FORMAT_TOKENS


def sent_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size the teacher receives: an image over `--max-side` is shrunk to it, as
    image_payload.py does before sending."""
    if max(width, height) <= max_side:
        return width, height
    return scaled(width, height, max_side / max(width, height))


def processor_prompt_tokens(
    processor_ref: str, prompt: str, sizes: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], int]:
    """Prompt tokens per image size as the model's processor builds them (chat template,
    image placeholder tokens, text), from a blank image of each size."""
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(processor_ref)
    except (OSError, ValueError) as err:
        raise UserError(
            f"--teacher-checkpoint {processor_ref!r}: no processor loads from it "
            f"({type(err).__name__}): pass the teacher's checkpoint folder or Hub id"
        ) from None
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    counts = {}
    for width, height in sorted(set(sizes)):
        inputs = processor(text=[text], images=[Image.new("RGB", (width, height))])
        counts[(width, height)] = len(inputs["input_ids"][0])
    return counts
