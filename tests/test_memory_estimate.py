"""The training memory estimate: its arithmetic, its advice at the paper's size, and the model shape it reads."""

from __future__ import annotations

from pathlib import Path

from domainbed_reasoning.train.stages.memory_estimate import (
    GIB,
    ModelShape,
    estimate_peak,
    longest_example,
    memory_advice,
    model_shape,
)
from domainbed_reasoning.train.stages.stage import prepare
from transformers import AutoModelForImageTextToText

SMALL = ModelShape(parameters=1000, trainable=10, hidden_size=4, layers=3, vocab_size=50)
# InternVL3-8B as the paper trains it: LoRA rank 8, 8 examples per device, ~1,792 image tokens + the chain
PAPER = ModelShape(parameters=7_900_000_000, trainable=20_000_000, hidden_size=3584, layers=28, vocab_size=151_674)


def test_the_estimate_adds_weights_optimiser_activations_and_logits() -> None:
    checkpointed = estimate_peak(SMALL, batch=2, tokens=5, weight_bytes=2, gradient_checkpointing=True)
    # 10 tokens x (3 saved hidden states x 4 x 2 bytes + one layer's 34 x 4), logits 10 x 50 x (2 + 8)
    assert checkpointed == type(checkpointed)(weights=2000, optimiser=160, activations=1600, logits=5000)
    assert checkpointed.total == 8760
    every_layer = estimate_peak(SMALL, 2, 5, 2, gradient_checkpointing=False)
    assert every_layer.activations == 10 * 3 * 34 * 4
    sharded = estimate_peak(SMALL, 2, 5, 2, True, shards=2)
    assert (sharded.weights, sharded.optimiser) == (1000, 80)


def test_the_papers_size_fits_80_gb_and_on_40_gb_names_the_batch_and_the_tiles() -> None:
    estimate = estimate_peak(PAPER, batch=8, tokens=1792 + 300, weight_bytes=2, gradient_checkpointing=True)
    assert 30 * GIB < estimate.total < 50 * GIB
    assert memory_advice(estimate, 80 * GIB, 8, True) is None
    advice = memory_advice(estimate, 40 * GIB, 8, True)
    assert advice is not None and "\n" not in advice
    assert advice.startswith(f"training needs about {estimate.total / GIB:.1f} GiB per GPU")
    assert "--set per_device_batch_size=4 (gradient accumulation keeps global_batch_size)" in advice
    assert "image_max_tiles / image_max_pixels" in advice
    assert "gradient_checkpointing=true" in memory_advice(estimate, 40 * GIB, 2, False)


def test_the_shape_and_the_longest_example_come_from_the_real_model_and_data(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    shape = model_shape(str(tiny_llava), "full", 8)
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    assert shape.parameters == shape.trainable == sum(p.numel() for p in loaded.parameters())
    assert 0 < model_shape(str(tiny_llava), "lora", 8).trainable < shape.parameters
    prepared = prepare(train_request(export_dir, tiny_llava, tmp_path))
    longest = longest_example(prepared, None)
    assert longest > 0 and longest_example(prepared, 16) == 16
