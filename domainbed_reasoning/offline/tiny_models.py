"""Tiny random-initialised MLLMs built from configs, because nothing can be downloaded.

Tests, the offline demo and the benchmarks need a real checkpoint folder that
`AutoProcessor` / `AutoModelForImageTextToText`, TRL's SFTTrainer and vLLM's CPU
server all accept. Each builder writes one such folder (config, weights,
processor, a byte-level BPE tokenizer trained on the spot, a chat template);
`cached_tiny_model` keeps the result on disk so a test session builds it once.

Every architecture is built by one function, `build_tiny_model`, over a row of
`ARCHITECTURES`: its special tokens, chat template, model class and shape (sizes,
config, processor). A new architecture is one more shape and one more row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.utils.chat_template_utils import render_jinja_template

STAGE_TAGS = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")

# Text the tokenizer is trained on besides the caller's words: the chain format and
# the prompt vocabulary, so chains tokenize into a sensible number of tokens.
BASE_CORPUS = (
    "You are a helpful assistant. Look at the image and answer with the class name.",
    "Which of these classes does the image show? Think step by step.",
    "The image shows an object drawn in a particular style. The shape and texture suggest it.",
    "Therefore the answer is the class that best matches the visual evidence.",
    *(f"<{tag}> text </{tag}>" for tag in STAGE_TAGS),
)

QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's own template: string or content-part messages, `{"type": "image"}` and
# OpenAI-style `image_url` parts become one vision placeholder each.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Patch 14, merge 2: one vision token covers 28x28 pixels, so a 64x64 image becomes
# 4 tokens and no image more than 16; vLLM's start-up profiling stays small too.
QWEN2VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}

Builder = Callable[..., Path]


def train_tokenizer(
    words: Iterable[str],
    special_tokens: Sequence[str],
    chat_template: str,
    *,
    vocab_size: int = 1024,
    eos_token: str,
    pad_token: str,
    corpus: Iterable[str] = (),
    split_words: bool = True,
    min_frequency: int = 0,
    token_roles: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text (a teacher's chain, a class name) encodes without <unk>.

    `corpus` adds whole texts (e.g. chains, or whole conversations: the special tokens in
    them are cut out first, as encoding does): merges learnt from them keep those sequences
    short. `split_words=False` lets merges cross word boundaries (SentencePiece without its
    whitespace split), so text seen over and over - a fixed prompt, a chain's stock
    phrases - becomes a few tokens; `min_frequency` keeps one-off text from becoming a
    token of its own. `token_roles` names special tokens as attributes a processor reads
    (`tokenizer.start_image_token`).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=split_words
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    specials = re.compile("|".join(re.escape(token) for token in special_tokens))
    texts = [*BASE_CORPUS, *(f"{w} the {w.replace('_', ' ')}." for w in words), *corpus]
    pieces = [piece for text in texts for piece in specials.split(text) if piece]
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[t for t in special_tokens if t not in (eos_token, pad_token)],
        chat_template=chat_template,
        model_max_length=4096,
        **({"extra_special_tokens": dict(token_roles)} if token_roles else {}),
    )


# SynthDG's 64x64 images at native resolution: 16-pixel patches, 2x2 merge -> 4 vision tokens.
DEMO_PIXELS = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
DEMO_PATCH = 16
# A merge must be seen this often in the demo's conversations to become a token.
DEMO_MIN_FREQUENCY = 10


def chat_corpus(conversations: Iterable[tuple[str, str]], chat_template: str) -> list[str]:
    """Each (prompt, answer) with an image, rendered as training renders it."""
    return [
        render_jinja_template(
            [[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]],
            chat_template=chat_template,
        )[0][0]
        for prompt, answer in conversations
    ]  # fmt: skip


def build_demo_qwen2vl(
    out_dir: Path,
    *,
    conversations: Iterable[tuple[str, str]] = (),
    seed: int = 0,
    vocab_size: int = 4096,
) -> Path:
    """The `dbr demo` model: a Qwen2-VL small enough to train on 2 CPU cores in minutes.

    Its tokenizer learns from the demo's own training conversations (prompt, answer), with
    merges across words: the fixed prompts and the chat template's text become a token or
    two, a chain a few dozen, so an example costs its image and little else. Its vision
    patches fit 64-pixel SynthDG images without resizing. Measured on 64 SynthDG images
    (full fine-tuning, lr 3e-4): 16-pixel patches (4 vision tokens) memorise them within
    400 steps where 8-pixel ones (16 tokens) are still near chance, and they halve the cost
    of every step.
    """
    return build_tiny_model(
        out_dir, "qwen2vl", hidden=128, layers=2, heads=2, vision_depth=2, seed=seed,
        corpus=chat_corpus(conversations, QWEN2VL_CHAT_TEMPLATE), vocab_size=vocab_size,
        patch_size=DEMO_PATCH, pixels=DEMO_PIXELS, split_words=False,
        min_frequency=DEMO_MIN_FREQUENCY,
    )  # fmt: skip


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like Qwen's 16/24/24."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")


def chatml_template(image_placeholder: str) -> str:
    """ChatML where each image part becomes `image_placeholder` on a line of its own."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        f"{image_placeholder}\n"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# LLaVA's single `<image>` placeholder, which LlavaProcessor expands to one token per vision patch.
LLAVA_CHAT_TEMPLATE = chatml_template("<image>")


INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
# The attributes InternVLProcessor reads from its tokenizer, as OpenGVLab's `*-hf` checkpoints name them.
INTERNVL_TOKEN_ROLES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# One `<IMG_CONTEXT>` per image part, which InternVLProcessor expands to
# `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`, as InternVL3's template does.
INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>")


EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"  # also the begin-of-sequence token, as in Qwen2


def text_config(
    ids: Mapping[str, int], vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int
) -> dict[str, Any]:
    """The Qwen2 language model every tiny architecture decodes with."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": ids[PAD_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }  # fmt: skip


@dataclass(frozen=True)
class Qwen2VLShape:
    """A Qwen2-VL with head_dim 64 (the smallest vLLM's CPU attention accepts). Its tokenizer's
    options are here too: the demo model trains its tokenizer on its own conversations."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    vision_depth: int = 2
    vision_width: int | None = None
    patch_size: int = 14
    pixels: dict[str, int] | None = None
    vocab_size: int = 1024
    corpus: Iterable[str] = ()
    split_words: bool = True
    min_frequency: int = 0

    def tokenizer_options(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "corpus": self.corpus, "split_words": self.split_words,
                "min_frequency": self.min_frequency}  # fmt: skip

    def config(self, ids: Mapping[str, int], vocab: int) -> Qwen2VLConfig:
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0,
                "mrope_section": _mrope_section(self.hidden // self.heads)}  # fmt: skip
        text = text_config(ids, vocab, self.hidden, self.layers, self.heads, self.heads, 2 * self.hidden)
        return Qwen2VLConfig(
            text_config=text | {"max_window_layers": self.layers, "rope_parameters": rope},
            vision_config={"depth": self.vision_depth, "embed_dim": self.vision_width or self.hidden,
                           "hidden_size": self.hidden, "num_heads": self.heads, "patch_size": self.patch_size},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )  # fmt: skip

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
        pixels = self.pixels or QWEN2VL_PIXELS
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=self.patch_size),
            video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=self.patch_size),
            tokenizer=tokenizer,
            chat_template=QWEN2VL_CHAT_TEMPLATE,
        )


@dataclass(frozen=True)
class LlavaShape:
    """LLaVA-1.5's shape (CLIP tower, 2-layer projector, decoder LM) with a Qwen2 LM.

    A second architecture whose module names (`vision_tower`, `self_attn.out_proj`) and
    image-token scheme differ from Qwen2-VL's, so per-architecture code is really tested.
    The sizes are fields so the GPU benchmark can build a real-size model from here;
    `vocab_size` pads the embedding to a real model's vocabulary.
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vocab_size: int | None = None

    def tokenizer_options(self) -> dict[str, Any]:
        return {}

    def config(self, ids: Mapping[str, int], vocab: int) -> LlavaConfig:
        vocab = max(self.vocab_size or 0, vocab)
        text = text_config(ids, vocab, self.hidden, self.layers, self.heads, self.kv_heads, 4 * self.hidden)
        return LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=self.vision_hidden, intermediate_size=4 * self.vision_hidden,
                num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                image_size=self.image_size, patch_size=self.patch_size,
            ),
            text_config=Qwen2Config(**text, tie_word_embeddings=False),
            image_token_id=ids["<image>"],
            image_seq_length=(self.image_size // self.patch_size) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )  # fmt: skip

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
        return LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": self.image_size},
                crop_size={"height": self.image_size, "width": self.image_size},
            ),
            tokenizer=tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )


@dataclass(frozen=True)
class InternVLShape:
    """InternVL3's `*-hf` layout (InternViT tower, pixel-shuffle projector, Qwen2 LM) at toy size.

    The paper's backbone. As in InternVL3 the processor tiles an image into up to
    `max_tiles` crops plus a thumbnail (InternVL3: 448-pixel tiles, up to 12, 256 tokens
    each); here a 56-pixel tile of 14-pixel patches gives 4 tokens after the 0.5 pixel
    shuffle, so the tiling is exercised at a size tests afford. Head dim 64 on both
    towers: the smallest vLLM's CPU attention accepts.
    """

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    tile_size: int = 56
    patch_size: int = 14
    max_tiles: int = 4
    downsample_ratio: float = 0.5

    @property
    def tokens_per_tile(self) -> int:
        return int((self.tile_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def tokenizer_options(self) -> dict[str, Any]:
        return {}

    def config(self, ids: Mapping[str, int], vocab: int) -> InternVLConfig:
        text = text_config(ids, vocab, self.hidden, self.layers, self.heads, self.heads, 2 * self.hidden)
        return InternVLConfig(
            vision_config={
                "hidden_size": self.vision_hidden, "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads, "intermediate_size": 2 * self.vision_hidden,
                "image_size": [self.tile_size, self.tile_size], "patch_size": [self.patch_size, self.patch_size],
            },
            text_config={"model_type": "qwen2", **text, "tie_word_embeddings": False},
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=self.tokens_per_tile,
            downsample_ratio=self.downsample_ratio,
            tie_word_embeddings=False,
        )  # fmt: skip

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> InternVLProcessor:
        size = {"height": self.tile_size, "width": self.tile_size}
        return InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=size, crop_to_patches=self.max_tiles > 1, min_patches=1, max_patches=self.max_tiles
            ),
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size=size),
            image_seq_length=self.tokens_per_tile,
            chat_template=INTERNVL_CHAT_TEMPLATE,
        )


@dataclass(frozen=True)
class TinyArchitecture:
    """One row of ARCHITECTURES: the tokens and chat template its tokenizer carries, the model
    class, and the shape (sizes, config and processor) a build may change."""

    special_tokens: tuple[str, ...]
    chat_template: str
    model_class: type[PreTrainedModel]
    shape: type[Qwen2VLShape | LlavaShape | InternVLShape]
    token_roles: Mapping[str, str] | None = None


ARCHITECTURES = {
    "qwen2vl": TinyArchitecture(
        QWEN2VL_SPECIAL_TOKENS, QWEN2VL_CHAT_TEMPLATE, Qwen2VLForConditionalGeneration, Qwen2VLShape
    ),
    "llava": TinyArchitecture(
        LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, LlavaForConditionalGeneration, LlavaShape
    ),
    "internvl": TinyArchitecture(
        INTERNVL_SPECIAL_TOKENS, INTERNVL_CHAT_TEMPLATE, InternVLForConditionalGeneration, InternVLShape,
        INTERNVL_TOKEN_ROLES,
    ),
}


def build_tiny_model(
    out_dir: Path, architecture: str, *, seed: int = 0, vocab_words: Iterable[str] = (), **shape: Any
) -> Path:
    """A checkpoint folder of `architecture` (a key of ARCHITECTURES), `shape` its shape's fields:
    a tokenizer trained on the spot, the config, random weights drawn from `seed`, the processor."""
    row = ARCHITECTURES[architecture]
    sizes = row.shape(**shape)
    tokenizer = train_tokenizer(
        vocab_words, row.special_tokens, row.chat_template, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        token_roles=row.token_roles, **sizes.tokenizer_options(),
    )  # fmt: skip
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in row.special_tokens}
    config = sizes.config(ids, len(tokenizer))
    torch.manual_seed(seed)
    model = row.model_class(config)
    model.generation_config.eos_token_id = ids[EOS_TOKEN]
    model.generation_config.pad_token_id = ids[PAD_TOKEN]
    model.save_pretrained(out_dir)
    sizes.processor(tokenizer).save_pretrained(out_dir)
    return Path(out_dir)


def cached_tiny_model(builder: Builder, cache_dir: Path, **kwargs: object) -> Path:
    """Build once per distinct (builder, kwargs); later calls and other processes reuse the folder.

    `cached_tiny_model(build_tiny_model, cache_dir, architecture="qwen2vl", ...)` caches a tiny
    model: the architecture is one of the kwargs, so it is part of the key.

    The folder is built under a temporary name and renamed into place, so a crash or
    a concurrent builder never leaves a half-written model behind the cache key.
    """
    # One-shot iterables (generators) must be materialised before they are hashed and used.
    kwargs = {k: _materialised(v) for k, v in kwargs.items()}
    target = Path(cache_dir) / _cache_key(builder, kwargs)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        builder(staging, **kwargs)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _materialised(value: object) -> object:
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value


def _cache_key(builder: Builder, kwargs: dict[str, object]) -> str:
    """Keyed on the kwargs and the builder's module source, so editing a builder rebuilds; named
    after the builder, or `tiny_<architecture>` for build_tiny_model."""
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode())
    digest.update(Path(inspect.getfile(builder)).read_bytes())
    name = builder.__name__.removeprefix("build_")
    if builder is build_tiny_model:
        name = f"tiny_{kwargs.get('architecture')}"
    return f"{name}-{digest.hexdigest()[:12]}"
