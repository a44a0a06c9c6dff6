"""Shared-prefix MTCT trains exactly as two rows: same per-task losses, same LoRA gradients.

The gradients are read as the optimiser sees them, after accumulation and across
processes. The rows (tests/workers/mtct_step.py) hold 7 images, 2 of
them without a chain (class-name path only), so a batch mixes packed pairs and lone rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from domainbed_reasoning.train.mtct import shared_prefix
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import batch_layout
from domainbed_reasoning.train.mtct.shared_prefix import pack_batch, prefix_mask
from safetensors.torch import load_file
from test_distributed import WORKERS, launch
from workers.mtct_step import CLASSES, GradientCapture, main, mtct_trainer, rows

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.real_shapes import build_real_shape_model

REPO = Path(__file__).resolve().parents[1]
# The real checkpoints' non-weight files: $DBR_REAL_SHAPES, else `shared/real_shapes` beside the checkout.
REAL_SHAPES = Path(os.environ.get("DBR_REAL_SHAPES") or REPO.parent / "shared" / "real_shapes")

ARCHITECTURES = ["tiny_qwen2vl", "tiny_llava", "tiny_internvl"]
SGD = {
    "optim": "sgd",
    "learning_rate": 1.0,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "use_cpu": True,
    "bf16": False,  # TRL's default turns on bf16 autocast, also on the CPU; the comparison is float32
}


def one_step(
    model_dir: Path,
    out: Path,
    shared: bool,
    attention: str | None = None,
    padding_free: bool = False,
    images: Sequence[int] = range(7),
    **settings,
) -> tuple[dict, dict]:
    """The LoRA gradients and the logged losses of one optimiser step."""
    trainer = mtct_trainer(model_dir, out, shared, attention, padding_free, images, **(SGD | settings))
    capture = GradientCapture()
    trainer.add_callback(capture)
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "loss_cls" in entry)
    return capture.grads, logs


def assert_same_step(shared: tuple[dict, dict], two_rows: tuple[dict, dict]) -> None:
    for key in ("loss", "loss_cls", "loss_reasoning"):
        assert shared[1][key] == pytest.approx(two_rows[1][key], rel=1e-5), key
    assert shared[1]["num_tokens"] == two_rows[1]["num_tokens"]
    names = sorted(two_rows[0])
    reference = torch.cat([two_rows[0][name].flatten() for name in names])
    packed = torch.cat([shared[0][name].flatten() for name in names])
    assert reference.norm() > 0
    assert (packed - reference).norm() < 1e-4 * reference.norm()


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_shared_prefix_step_equals_two_rows(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """All 12 rows in one micro-batch: 5 packed pairs and 2 class-name-only rows."""
    model_dir = request.getfixturevalue(fixture)
    shared = one_step(model_dir, tmp_path / "shared", True, per_device_train_batch_size=12)
    two_rows = one_step(model_dir, tmp_path / "rows", False, per_device_train_batch_size=12)
    assert shared[1]["padding_fraction"] < two_rows[1]["padding_fraction"]
    assert_same_step(shared, two_rows)


@pytest.mark.parametrize("checkpoint", ["internvl3_2b_hf", "qwen2_vl_2b_instruct"])
def test_shared_prefix_on_real_shapes(checkpoint: str, tmp_path: Path) -> None:
    """The real tokenizer, chat template and processor (InternVL's 256-token tiles, Qwen2-VL's
    M-RoPE over its pixel grid), one narrow layer per tower."""
    source = REAL_SHAPES / checkpoint
    if not (source / "config.json").is_file():
        pytest.skip(f"no real-shape files at {source}: set DBR_REAL_SHAPES to their folder")
    model_dir = build_real_shape_model(
        source, REPO / ".cache" / "real-shapes" / f"{checkpoint}-1x128", layers=1, width=128
    )
    # 4 rows, a packed pair and two class-name-only rows (images 2 and 5 have no chain): the
    # 151k-token LM head scores every position on a CPU, the step's main cost
    step = {"images": (0, 2, 5), "per_device_train_batch_size": 4}
    shared = one_step(model_dir, tmp_path / "shared", True, **step)
    two_rows = one_step(model_dir, tmp_path / "rows", False, **step)
    assert_same_step(shared, two_rows)


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_shared_prefix_with_gradient_accumulation(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """3 micro-batches of 4 rows: packed and unpacked give the same step (whose logged task
    losses are means over the micro-batches, in both layouts)."""
    model_dir = request.getfixturevalue(fixture)
    accumulated = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}
    shared = one_step(model_dir, tmp_path / "shared", True, **accumulated)
    two_rows = one_step(model_dir, tmp_path / "rows", False, **accumulated)
    assert_same_step(shared, two_rows)


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_shared_prefix_with_two_processes(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """2 processes x 6 packed rows (gloo) give the update of 1 process x 12 rows unpacked."""
    model_dir = request.getfixturevalue(fixture)
    launch(2, str(WORKERS / "mtct_step.py"), str(model_dir), str(tmp_path / "two"), "6", "shared")
    main(model_dir, tmp_path / "one", 12, "rows")
    runs = {}
    for name in ("two", "one"):
        folder = tmp_path / name
        report = json.loads((folder / "logs.json").read_text())
        runs[name] = (load_file(folder / "grads.safetensors"), report["logs"][0])
    assert_same_step(runs["two"], runs["one"])


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_a_padding_free_step_equals_padded_rows(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flash-attention's layout: the whole micro-batch one row without padding, each example at
    its own positions. On the CPU, sdpa runs that row through transformers' packed-sequence
    mask, built from the same positions flash-attention's varlen kernels read."""
    monkeypatch.setattr(shared_prefix, "VARLEN_BACKENDS", ("sdpa",))
    model_dir = request.getfixturevalue(fixture)
    flat = one_step(model_dir, tmp_path / "flat", False, padding_free=True, per_device_train_batch_size=12)
    two_rows = one_step(model_dir, tmp_path / "rows", False, per_device_train_batch_size=12)
    assert flat[1]["padding_fraction"] == 0 < two_rows[1]["padding_fraction"]
    assert_same_step(flat, two_rows)


@pytest.mark.parametrize(
    ("attention", "shared", "padding_free", "layout", "line"),
    [
        ("sdpa", True, True, "shared", None),
        ("sdpa", False, True, None, None),
        ("flash_attention_2", True, True, "flat", "training one padding-free row per micro-batch"),
        ("flash_attention_2", True, False, None, "training each path as its own row"),
        ("flash_attention_2", False, True, "flat", None),
        ("flex_attention", True, True, None, "training each path as its own row"),
    ],
)
def test_the_layout_follows_the_attention_backend(
    attention: str, shared: bool, padding_free: bool, layout: str | None, line: str | None
) -> None:
    config = SimpleNamespace(model_type="qwen2_vl", _attn_implementation=attention)
    chosen, why = batch_layout(config, shared, padding_free)
    assert chosen == layout
    assert (why is None) if line is None else (why.startswith(f"mtct_shared_prefix: {line}, since"))


def test_a_prefix_holds_the_image_and_stops_before_the_answer(tiny_qwen2vl: Path) -> None:
    """The packed row's image tokens appear once and each suffix sees the prefix, not the other suffix."""
    trainer = mtct_trainer(tiny_qwen2vl, Path("/nonexistent"), shared_prefix=True, **SGD)
    collator = trainer.data_collator
    examples = build_examples(rows(), "mtct", CLASSES)
    batch = collator([examples[i] for i in range(2)])
    packing = batch["shared_prefix"]
    segment = packing["segment"][0]
    image_id = trainer.processing_class.image_token_id
    two_rows = packing["rows"]["input_ids"]
    assert batch["input_ids"].shape[0] == 1
    assert (batch["input_ids"] == image_id).sum() == (two_rows[0] == image_id).sum()
    unpacked = collator.base(
        [{k: examples[i][k] for k in ("images", "prompt", "completion")} for i in range(2)]
    )
    assert 2 * batch["pixel_values"].shape[0] == unpacked["pixel_values"].shape[0]  # one image's pixels
    prefix = int((segment == 0).sum())
    assert (batch["shift_labels"][0, :prefix] == -100).all()
    mask = prefix_mask(packing["segment"], "sdpa", torch.float32)[0, 0]
    first, second = (int((segment == s).nonzero()[0]) for s in (1, 2))
    assert mask[second, prefix - 1] and mask[second, second] and not mask[second, first]
    assert mask[first, prefix - 1] and not mask[first, second]


def test_a_pair_whose_image_is_not_shared_stays_two_rows(tiny_llava: Path) -> None:
    """Prompts that differ before the image share nothing: both rows keep their image."""
    trainer = mtct_trainer(tiny_llava, Path("/nonexistent"), shared_prefix=True, **SGD)
    examples = build_examples(rows(), "mtct", CLASSES)
    batch = trainer.data_collator.base(
        [{k: examples[i][k] for k in ("images", "prompt", "completion")} for i in range(2)]
    )
    batch["input_ids"][1, 0] += 1  # the rows now differ from their first token
    packed = pack_batch(batch, ["a", "a"], trainer.processing_class.image_token_id, 0)
    assert packed["input_ids"].shape[0] == 2
    assert packed["pixel_values"].shape == batch["pixel_values"].shape


def test_eager_attention_shares_with_an_additive_mask(tiny_llava: Path, tmp_path: Path) -> None:
    shared = one_step(
        tiny_llava, tmp_path / "shared", True, "eager", per_device_train_batch_size=12
    )
    two_rows = one_step(
        tiny_llava, tmp_path / "rows", False, "eager", per_device_train_batch_size=12
    )
    assert_same_step(shared, two_rows)


def test_a_backend_that_cannot_share_trains_as_two_rows_and_says_why(
    tiny_internvl: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """flex attention takes no 4-D tensor mask: one log line, then today's two rows."""
    trainer = mtct_trainer(
        tiny_internvl, tmp_path, shared_prefix=True, attention="flex_attention", **SGD
    )
    lines = [r.message for r in caplog.records if r.message.startswith("mtct_shared_prefix")]
    assert len(lines) == 1 and "since attention backend flex_attention cannot take" in lines[0]
    examples = build_examples(rows(), "mtct", CLASSES)
    batch = trainer.data_collator([examples[i] for i in range(4)])
    assert "shared_prefix" not in batch and batch["input_ids"].shape[0] == 4


def test_an_example_longer_than_max_length_is_a_one_line_error(
    tiny_llava: Path, tmp_path: Path
) -> None:
    trainer = mtct_trainer(tiny_llava, tmp_path, shared_prefix=True, max_length=40, **SGD)
    examples = build_examples(rows(), "mtct", CLASSES)
    with pytest.raises(
        UserError, match="is [0-9]+ tokens, more than max_length 40: raise max_length"
    ):
        trainer.data_collator([examples[i] for i in range(2)])
