"""Random-weight models with a real checkpoint's tokenizer, chat template, processor and config.

The tiny models (tiny_models.py) carry tokenizers and templates made here; a user's
`--model` carries the real ones: a 151k-token vocabulary whose embedding may be smaller
than the tokenizer, a template that adds a system prompt, a processor that tiles large
images into thousands of tokens, a tokenizer that pads on the left. These builders take a
folder holding a real checkpoint's non-weight files (what `save_pretrained` writes besides
the weights) and write a loadable checkpoint with those files kept and random weights from
its config, with fewer layers and, where asked, narrower. Heads keep 64 dimensions (the
smallest vLLM's CPU attention accepts, and what the real checkpoints use) and, for Qwen2-VL,
an mrope_section that sums to head_dim / 2, as vLLM requires; the vocabulary, the special
tokens and every image size stay the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

HEAD_DIM = 64
SUITE_LAYERS = 2
SUITE_WIDTH = 128  # two heads: trains and serves on a CPU in seconds


def build_real_shape_model(
    source: Path, out: Path, layers: int = SUITE_LAYERS, width: int | None = None, seed: int = 0
) -> Path:
    """Save a float32 random-weight model of `source`'s architecture to `out` (reused when there)."""
    out = Path(out)
    marker = out / "real_shape.json"
    settings = {"source": str(source), "layers": layers, "width": width, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return out
    config = AutoConfig.from_pretrained(source)
    shrink(config, layers, width)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(source).save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def build_real_shape(out_dir: Path, *, source: Path, seed: int = 0) -> Path:
    """The test suite's size: 2 layers, width 128 in both towers."""
    return build_real_shape_model(Path(source), Path(out_dir), SUITE_LAYERS, SUITE_WIDTH, seed)


def shrink(config, layers: int, width: int | None) -> None:
    """`layers` language and vision layers; with `width`, that hidden size in both towers."""
    text, vision = config.get_text_config(), config.vision_config
    text.num_hidden_layers = layers
    if hasattr(text, "max_window_layers"):
        text.max_window_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    depth = "depth" if config.model_type == "qwen2_vl" else "num_hidden_layers"
    setattr(vision, depth, layers)
    if width is None:
        return
    heads = max(width // HEAD_DIM, 1)
    text.hidden_size, text.intermediate_size = width, 2 * width
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, 1, HEAD_DIM
    if config.model_type == "qwen2_vl":
        vision.embed_dim, vision.num_heads, vision.hidden_size = width, heads, width
        sections = {"mrope_section": [8, 12, 12]}  # sums to HEAD_DIM / 2, as [16, 24, 24] to 128 / 2
        text.rope_parameters = {**(text.rope_parameters or {}), **sections}
    else:
        vision.hidden_size, vision.intermediate_size = width, 2 * width
        vision.num_attention_heads = heads
