"""Random-weight models with a real checkpoint's tokenizer, chat template, processor and config.

The tiny models (tiny_models.py) carry tokenizers and templates made here; a user's
`--model` carries the real ones: a 151k-token vocabulary whose embedding may be smaller
than the tokenizer, a template that adds a system prompt, a processor that tiles large
images into thousands of tokens, a tokenizer that pads on the left. `build_real_shape`
takes a folder holding a real checkpoint's non-weight files (what `save_pretrained`
writes besides the weights) and writes a loadable checkpoint with those files kept and
random weights from its config, shrunk to 2 layers and narrow widths so that it trains
and serves on a CPU. The widths keep head_dim 64 (the smallest vLLM's CPU attention
accepts) and, for Qwen2-VL, an mrope_section that sums to head_dim / 2, as vLLM requires;
the vocabulary, the special tokens and every image size stay the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PretrainedConfig,
)

LAYERS = 2
HIDDEN = 128
HEADS = 2  # head_dim 64
KV_HEADS = 1  # grouped-query attention, as both checkpoints use
INTERMEDIATE = 256
# Qwen2-VL's 16/24/24 split of head_dim 128 / 2, halved for head_dim 64.
MROPE_SECTION = [8, 12, 12]


def _shrink_text(text: PretrainedConfig) -> None:
    text.num_hidden_layers = LAYERS
    text.max_window_layers = LAYERS
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:LAYERS]
    text.hidden_size = HIDDEN
    text.intermediate_size = INTERMEDIATE
    text.num_attention_heads = HEADS
    text.num_key_value_heads = KV_HEADS
    text.head_dim = HIDDEN // HEADS
    if "mrope_section" in (text.rope_parameters or {}):
        text.rope_parameters["mrope_section"] = list(MROPE_SECTION)


def shrunk_config(source: Path) -> PretrainedConfig:
    """`source`'s config with 2 layers and head_dim-64 widths in both towers; the rest kept."""
    config = AutoConfig.from_pretrained(source)
    _shrink_text(config.text_config)
    vision = config.vision_config
    if config.model_type == "qwen2_vl":
        vision.depth = LAYERS
        vision.embed_dim = HIDDEN
        vision.num_heads = HEADS
        vision.hidden_size = HIDDEN  # the merger's output: the language model's width
    else:
        vision.num_hidden_layers = LAYERS
        vision.hidden_size = HIDDEN
        vision.intermediate_size = INTERMEDIATE
        vision.num_attention_heads = HEADS
    return config


def build_real_shape(out_dir: Path, *, source: Path, seed: int = 0) -> Path:
    """A checkpoint folder: `source`'s tokenizer, template, processor and generation config,
    random weights of its shrunk config."""
    config = shrunk_config(source)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(source).save_pretrained(out_dir)
    return Path(out_dir)
