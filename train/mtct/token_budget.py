"""Does the longest request fit the engine's context? Asked before a long run, not hours into it.

A request is the chat-templated prompt, the image's tokens and the answer's token
limit. The image's share depends on the architecture and on the image: InternVL3
cuts an image into up to 12 tiles plus a thumbnail (256 tokens each, about 3,300 for
a 4:3 photo), Qwen2-VL spends a token per 28x28 pixels up to its `max_pixels`, LLaVA
a fixed count. Rather than a formula per architecture, the model's own processor
counts (`_get_num_multimodal_tokens`, the count vLLM's transformers backend relies on)
for probe sizes of every aspect ratio tiling favours, large enough to reach every cap;
the most expensive probe is the bound. The text's share is measured once with a
small image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from domainbed_reasoning.train.mtct.mtct_data import user_message
from PIL import Image
from transformers import AutoConfig, ProcessorMixin
from trl.data_utils import apply_chat_template

from domainbed_reasoning.errors import UserError

# width:height ratios; InternVL's tile grids up to 12 tiles all appear (12:1 ... 1:12).
PROBE_RATIOS = (
    (1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2),
    (3, 1), (1, 3), (4, 1), (1, 4), (5, 1), (1, 5), (6, 1), (1, 6), (12, 1), (1, 12),
)  # fmt: skip
PROBE_PIXELS = 4096 * 3072  # above every tiling or pixel cap in use


@dataclass(frozen=True)
class Budget:
    """What the longest request of one kind needs, against what the engine holds."""

    prompt_tokens: int
    max_new_tokens: int
    context: int

    @property
    def needed(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def fits(self) -> bool:
        return self.needed <= self.context


def probe_size(ratio: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of PROBE_PIXELS pixels at `ratio` (width:height)."""
    width = round(math.sqrt(PROBE_PIXELS * ratio[0] / ratio[1]))
    return round(PROBE_PIXELS / width), width


def image_tokens(processor: ProcessorMixin, sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens the processor spends on images of these (height, width) sizes."""
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"])


def longest_prompt(processor: ProcessorMixin, prompt: str) -> int:
    """Tokens of the chat-templated `prompt` with the image that costs the most tokens."""
    text = apply_chat_template({"prompt": user_message(prompt)}, processor)["prompt"]
    small = Image.new("RGB", (32, 32))
    with_small = processor(images=[[small]], text=[text], add_special_tokens=False)["input_ids"][0]
    text_only = len(with_small) - image_tokens(processor, [(32, 32)])[0]
    return text_only + max(image_tokens(processor, [probe_size(r) for r in PROBE_RATIOS]))


def model_context(model: str) -> int:
    """The longest sequence the checkpoint's language model was built for."""
    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", 0) or 0) or 2**31


def check_budget(
    processor: ProcessorMixin, prompt: str, max_new_tokens: int, context: int, what: str, fix: str
) -> Budget:
    """The budget of `what` (e.g. "SARR self-labelling"); a UserError naming `fix` when it does not fit."""
    budget = Budget(longest_prompt(processor, prompt), max_new_tokens, context)
    if not budget.fits:
        raise UserError(
            f"{what} needs up to {budget.needed:,} tokens per request (image and prompt "
            f"{budget.prompt_tokens:,} + up to {max_new_tokens:,} new tokens), more than the context of "
            f"{context:,}: {fix}"
        )
    return budget
