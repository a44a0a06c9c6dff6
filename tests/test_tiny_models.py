"""The tiny Qwen2-VL (and InternVL) are real checkpoints: transformers loads them, TRL trains them, the cache reuses them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from domainbed_reasoning.offline.tiny_models import (
    QWEN2VL_SPECIAL_TOKENS,
    STAGE_TAGS,
    build_tiny_model,
    cached_tiny_model,
)

IMAGE_MESSAGE = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Which class is this?"}],
    }
]


@pytest.fixture(scope="module")
def processor(tiny_qwen2vl: Path):
    return AutoProcessor.from_pretrained(tiny_qwen2vl)


@pytest.fixture(scope="module")
def model(tiny_qwen2vl: Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl)


def test_chat_template_renders_image_placeholder_and_generation_prompt(processor) -> None:
    text = processor.apply_chat_template(IMAGE_MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which class is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_openai_image_url_part_renders_like_an_image_part(processor) -> None:
    openai_style = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Which class is this?"},
            ],
        }
    ]
    render = processor.tokenizer.apply_chat_template
    assert render(openai_style, tokenize=False) == render(IMAGE_MESSAGE, tokenize=False)


def test_tokenizer_is_byte_level_with_single_token_specials(processor) -> None:
    tokenizer = processor.tokenizer
    text = "<SUMMARY>Ein Hund 🐕 — giraffe</SUMMARY>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for token in QWEN2VL_SPECIAL_TOKENS:
        assert len(tokenizer.encode(token)) == 1, token
    assert all(len(tokenizer.encode(tag)) == 1 for tag in STAGE_TAGS)
    assert len(tokenizer.encode(" giraffe")) == 1


def test_image_forward_pass_gives_a_finite_loss(processor, model) -> None:
    text = processor.apply_chat_template(
        [*IMAGE_MESSAGE, {"role": "assistant", "content": "giraffe"}], tokenize=False
    )
    batch = processor(text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == 4  # 64x64 -> 56x56 -> 4x4 patches of 14 -> 2x2 after merging
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_sft_trainer_trains_on_prompt_completion_image_rows(
    tiny_qwen2vl: Path, tmp_path: Path
) -> None:
    rows = [
        {
            "images": [Image.new("RGB", (64, 64), color)],
            "prompt": IMAGE_MESSAGE,
            "completion": [{"role": "assistant", "content": name}],
        }
        for color, name in [("red", "dog"), ("blue", "giraffe")] * 2
    ]
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl)
    before = next(p for n, p in model.named_parameters() if "lm_head" in n).detach().clone()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(tiny_qwen2vl),
    )
    result = trainer.train()
    after = next(p for n, p in model.named_parameters() if "lm_head" in n)
    assert result.global_step == 2
    assert not torch.equal(before, after.detach())


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_build_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    kwargs = {"hidden": 64, "heads": 1, "layers": 1, "vision_depth": 1, "vocab_words": ["cat"]}
    first = _digest(build_tiny_model(tmp_path / "a", "qwen2vl", seed=3, **kwargs))
    again = _digest(build_tiny_model(tmp_path / "b", "qwen2vl", seed=3, **kwargs))
    other = _digest(build_tiny_model(tmp_path / "c", "qwen2vl", seed=4, **kwargs))
    assert first == again
    assert first["model.safetensors"] != other["model.safetensors"]
    assert first["tokenizer.json"] == other["tokenizer.json"]


def test_cache_builds_once_per_kwargs(tmp_path: Path) -> None:
    calls: list[dict] = []

    def build_fake(out_dir: Path, **kwargs: object) -> Path:
        calls.append(kwargs)
        out_dir.mkdir(exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    first = cached_tiny_model(build_fake, tmp_path, seed=0, vocab_words=iter(["a", "b"]))
    second = cached_tiny_model(build_fake, tmp_path, seed=0, vocab_words=("a", "b"))
    third = cached_tiny_model(build_fake, tmp_path, seed=1, vocab_words=("a", "b"))
    assert first == second != third
    assert calls == [{"seed": 0, "vocab_words": ["a", "b"]}, {"seed": 1, "vocab_words": ["a", "b"]}]
    assert (first / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, third.name])


def test_cache_leaves_nothing_behind_when_the_build_fails(tmp_path: Path) -> None:
    def build_broken(out_dir: Path, **kwargs: object) -> Path:
        (out_dir / "partial").write_text("half a model")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        cached_tiny_model(build_broken, tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_tiny_internvl_is_internvl3s_layout_with_tiles(tiny_internvl: Path) -> None:
    """The `*-hf` InternVL: one `<IMG_CONTEXT>` per image part, expanded to <img> + 4 tokens a tile
    + </img>; a 4:1 image gets 4 tiles and a thumbnail, a square one a single tile."""
    internvl = AutoProcessor.from_pretrained(tiny_internvl)
    model = AutoModelForImageTextToText.from_pretrained(tiny_internvl)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    text = internvl.apply_chat_template(IMAGE_MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nWhich class is this?<|im_end|>\n<|im_start|>assistant\n"
    for size, tiles in (((224, 56), 5), ((56, 56), 1)):
        inputs = internvl(images=[[Image.new("RGB", size)]], text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(internvl.image_token_id) == 4 * tiles and inputs["pixel_values"].shape[0] == tiles
        assert ids.count(internvl.start_image_token_id) == ids.count(internvl.end_image_token_id) == 1
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        assert torch.isfinite(loss)
