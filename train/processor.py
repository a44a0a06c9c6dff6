"""The model's processor, loaded once and checked, for training and in-process generation alike.

A leaf module: the generation engines need the processor without the training stack.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor, ProcessorMixin

from domainbed_reasoning.errors import UserError


def load_processor(model: str) -> ProcessorMixin:
    """The model's processor, which must be multimodal and carry a chat template."""
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not Path(model).is_dir() and not looks_like_hub_id:
        raise UserError(
            f"model folder {model} not found: pass a local checkpoint folder or a Hub id (org/name)"
        )
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
    return processor
