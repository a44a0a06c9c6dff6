"""Which layers get LoRA, found from the model itself rather than a table per checkpoint.

The paper puts rank-8 LoRA on the vision encoder AND the language model. Module
names differ per architecture (Qwen2-VL's `visual.blocks.N.attn.qkv`, LLaVA's
`vision_tower...self_attn.out_proj`, InternVL's `vision_tower...attention.q_proj`), but
transformers 5 names the two halves consistently enough to find them: every
`nn.Linear` under a vision-tower module, and every one under `language_model`.

One rule for the vision-language projector on every architecture: it stays FROZEN
under LoRA - Qwen2-VL's `merger` (which sits inside `visual`), InternVL's and LLaVA's
`multi_modal_projector` alike. The paper adapts the two encoders, and InternVL's own
LoRA recipe freezes its MLP projector. The LM head stays out too (an adapter on
`lm_head` is not supported by TRL's fused head). Full fine-tuning trains every
weight, the projector included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from peft import LoraConfig
from torch import nn

from domainbed_reasoning.errors import UserError

VISION_PARTS = ("vision_tower", "visual", "vision_model")
LANGUAGE_PARTS = ("language_model",)
PROJECTOR_PARTS = ("multi_modal_projector", "merger")


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def is_projector(name: str) -> bool:
    """Whether a module belongs to the vision-language projector (frozen under LoRA)."""
    return not set(name.split(".")).isdisjoint(PROJECTOR_PARTS)


def _part_of(name: str, parts: tuple[str, ...]) -> str | None:
    """The prefix of `name` up to and including the first segment listed in `parts`."""
    segments = name.split(".")
    for index, segment in enumerate(segments):
        if segment in parts:
            return ".".join(segments[: index + 1])
    return None


def _leaf(name: str) -> str:
    """The last two segments (`attn.proj`, `mlp.0`): one segment would also match a conv
    layer of the same name (`patch_embed.proj`) or a numbered block (`blocks.0`)."""
    return ".".join(name.split(".")[-2:])


def target_modules_regex(layer_names: Iterable[str], train_vision: bool = True) -> str:
    """A PEFT `target_modules` regex (full match) for the language model and, optionally, the vision tower.

    Built from prefixes plus leaf names, so an 8B model's adapter config stays one short line.
    """
    parts = LANGUAGE_PARTS + (VISION_PARTS if train_vision else ())
    leaves_by_prefix: dict[str, set[str]] = {}
    for name in layer_names:
        prefix = _part_of(name, parts)
        if prefix is not None and not is_projector(name):
            leaves_by_prefix.setdefault(prefix, set()).add(_leaf(name))
    if not any(_part_of(prefix, LANGUAGE_PARTS) for prefix in leaves_by_prefix):
        raise UserError(
            "found no linear layers under a `language_model` module: the model is not a "
            "transformers image-text-to-text model this stage knows; pass a LLaVA / Qwen2-VL / InternVL checkpoint"
        )
    alternatives = [
        rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(sorted(map(re.escape, leaves)))})"
        for prefix, leaves in sorted(leaves_by_prefix.items())
    ]
    frozen = "|".join(map(re.escape, PROJECTOR_PARTS))
    return rf"^(?!(?:.*\.)?(?:{frozen})\.)(?:" + "|".join(alternatives) + ")$"


def lora_config(
    model: nn.Module, rank: int, alpha: int, dropout: float, train_vision: bool
) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules_regex(linear_layer_names(model), train_vision),
        task_type="CAUSAL_LM",
    )
