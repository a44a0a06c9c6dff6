"""The model's processor, loaded once and checked, for training and in-process generation alike.

Image limits are applied here, once, for every architecture: how many tiles InternVL
cuts an image into (each tile is 256 tokens in InternVL3, up to 12 plus a thumbnail by
default: about 3,300 tokens) and how many pixels Qwen2-VL keeps (a 28x28 patch is one
token). The processor saved beside the trained weights carries them, so training,
evaluation and both generation engines see an image as the same number of tokens.

A leaf module: the generation engines need the processor without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoProcessor, ProcessorMixin

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.model_folder import check_model_folder


@dataclass(frozen=True)
class ImageLimits:
    """Caps on an image's size in tokens; None keeps the checkpoint's own setting.

    `max_tiles` is InternVL's `max_patches` (crops, plus one thumbnail when there are
    several), `max_pixels` Qwen2-VL's `longest_edge` (pixels after resizing). A cap never
    raises a checkpoint's smaller limit, and an architecture without the knob (LLaVA's
    fixed 336-pixel crop) is left as it is.
    """

    max_tiles: int | None = None
    max_pixels: int | None = None


def limit_images(processor: ProcessorMixin, limits: ImageLimits) -> dict[str, Any]:
    """Apply `limits` to the processor in place; returns the image-processor settings it changed
    (what a vLLM server, which loads the checkpoint's own processor, must be given as
    `--mm-processor-kwargs` to agree)."""
    image_processor = processor.image_processor
    changed: dict[str, Any] = {}
    tiles = getattr(image_processor, "max_patches", None)
    if limits.max_tiles is not None and tiles is not None and limits.max_tiles < tiles:
        image_processor.max_patches = changed["max_patches"] = limits.max_tiles
    size = getattr(image_processor, "size", None)
    pixels = size["longest_edge"] if size and hasattr(image_processor, "merge_size") else None
    if limits.max_pixels is not None and pixels is not None and limits.max_pixels < pixels:
        size = {key: size[key] for key in ("shortest_edge", "longest_edge")}
        size["longest_edge"] = limits.max_pixels
        image_processor.size = changed["size"] = size
    return changed


def load_processor(model: str, limits: ImageLimits | None = None) -> ProcessorMixin:
    """The model's processor, which must be multimodal and carry a chat template, with `limits` applied."""
    check_model_folder(model)
    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load a processor from {model} ({str(err).strip().splitlines()[0]}): "
            "pass a transformers image-text-to-text checkpoint"
        ) from None
    if not isinstance(processor, ProcessorMixin):
        raise UserError(
            f"{model} has a text-only tokenizer, no image processor: pass a multimodal checkpoint"
        )
    if not processor.chat_template:
        raise UserError(
            f"the processor of {model} has no chat template: use the instruction-tuned (`*-hf` / `-Instruct`) "
            "checkpoint, or add a chat_template.jinja to the folder"
        )
    if limits is not None:
        limit_images(processor, limits)
    return processor
