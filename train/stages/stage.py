"""One training stage of RD-MLDG: MTCT (or a single path) with LoRA or full fine-tuning on one LODO split.

`run.train` runs one stage for cls/reasoning/mtct; SARR (sarr.py) runs one per round.

Everything a user can get wrong is checked before a model is loaded - an 8B
checkpoint takes minutes to load, a typo should take a second to report. The
run folder `<out>/<DATASET>/<target>/<method>/` then holds, each written
atomically: split.parquet (which image went where), config.yaml (the resolved
settings, reusable with --config), run.json, checkpoints/ (for --resume),
logs/ (TensorBoard), adapter/ (LoRA weights, processor, model card) - or model/
(the whole checkpoint, with `finetune: full`) - and metrics.json, written last,
which marks the run finished.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml
from datasets import Dataset, DatasetDict
from domainbed_reasoning.train.config import TrainConfig, load_config, save_config
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.model.processor import load_processor
from domainbed_reasoning.train.model.weights import (
    TrainedWeights,
    saved_checkpoints,
    stage_weights,
    weights_dirname,
)
from domainbed_reasoning.train.mtct.mtct_data import (
    SplitCounts,
    build_examples,
    check_split,
    class_names,
)
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from domainbed_reasoning.train.sarr.sharding import process_state
from domainbed_reasoning.train.stages.progress import StageProgress
from peft import PeftModel
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    PrinterCallback,
    ProcessorMixin,
)
from transformers.integrations import TensorBoardCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import SFTConfig

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.data.registry import DatasetSpec, get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.loading import load_lodo
from domainbed_reasoning.templates import render
from domainbed_reasoning.terminal import console

MODEL_CARD_TEMPLATE = "model_card.md.j2"


@dataclass(frozen=True)
class TrainRequest:
    dataset: str
    data: str
    target: str
    model: str
    out: Path
    config: TrainConfig
    resume: bool = False


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    weights: TrainedWeights
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Prepared:
    """What `train` has checked and built before touching the model."""

    spec: DatasetSpec
    run_dir: Path
    processor: ProcessorMixin
    splits: DatasetDict
    counts: dict[str, SplitCounts]
    train_examples: Dataset
    eval_examples: Dataset


def prepare(request: TrainRequest) -> Prepared:
    """Validate every input and build the examples; loads no model."""
    spec = get_spec(request.dataset)
    if request.target not in spec.domains:
        raise UserError(
            f"unknown target domain {request.target!r} for {spec.name}: choose one of {', '.join(spec.domains)}"
        )
    config = request.config
    run_dir = artefacts.run_dir(request.out, spec.name, request.target, config.method)
    _check_run_dir(run_dir, config, request.resume)
    _check_reporting(config)
    processor = load_processor(request.model, config.image_limits())
    splits = load_lodo(
        request.data, spec.name, request.target, config.holdout_fraction, config.seed
    )
    counts = {name: check_split(splits[name], config.method, name) for name in ("train", "validation")}
    counts["test"] = SplitCounts(len(splits["test"]), 0)
    classes = class_names(splits["train"])
    train_examples = build_examples(
        splits["train"], config.method, classes, config.max_train_images, config.seed
    )
    eval_examples = build_examples(splits["validation"], config.method, classes)
    return Prepared(spec, run_dir, processor, splits, counts, train_examples, eval_examples)


def _check_reporting(config: TrainConfig) -> None:
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError(
            "report_to wandb needs the wandb package: `pip install wandb` (and `wandb login`), "
            "or --set report_to=tensorboard"
        )


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    if resume:
        saved = artefacts.run_config_path(run_dir)
        if saved.is_file() and load_config(saved) != config:
            raise UserError(
                f"--resume with settings that differ from {saved}: resume with --config {saved}, or use another --out"
            )
        return
    if artefacts.metrics_path(run_dir).is_file():
        raise UserError(
            f"{run_dir} already holds a finished run: pass --resume to reuse it, or use another --out"
        )
    if last_checkpoint(run_dir) is not None:
        raise UserError(
            f"{run_dir} holds checkpoints of an unfinished run: pass --resume to continue it, or delete the folder"
        )


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = saved_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def write_inputs(request: TrainRequest, prepared: Prepared) -> None:
    split_ids = pl.concat(
        pl.DataFrame({"id": prepared.splits[name]["id"], "split": name}) for name in prepared.splits
    )
    atomic.write_parquet(artefacts.split_path(prepared.run_dir), split_ids)
    save_config(request.config, artefacts.run_config_path(prepared.run_dir))
    atomic.write_json(
        artefacts.run_info_path(prepared.run_dir),
        {
            "dataset": prepared.spec.name,
            "data": request.data,
            "target": request.target,
            "model": request.model,
            "train_images": prepared.counts["train"].images,
            "train_images_with_chain": prepared.counts["train"].with_chain,
            "validation_images": prepared.counts["validation"].images,
            "test_images": prepared.counts["test"].images,
            "train_examples": len(prepared.train_examples),
            "validation_examples": len(prepared.eval_examples),
            "dtype": request.config.dtype_name(),
        },
    )


def claim_mixed_precision(bf16: bool) -> None:
    """The training config's `bf16` decides, on every launcher: transformers and accelerate read
    ACCELERATE_MIXED_PRECISION (which `accelerate launch --config_file` sets from the launch yaml)
    before the arguments' own bf16, so without this a yaml's `mixed_precision: bf16` would win
    over `bf16: false`."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"


def dataloader_workers(setting: int | None) -> int:
    """`null` (auto): 4 loader processes per GPU process, none on the CPU (they would compete with it)."""
    if setting is not None:
        return setting
    return 4 if torch.cuda.is_available() else 0


def sft_config(config: TrainConfig, run_dir: Path, has_eval: bool) -> SFTConfig:
    """The paper's settings, expressed as TRL/transformers arguments."""
    bf16 = config.uses_bf16()
    claim_mixed_precision(bf16)
    state = process_state(config.distributed_timeout_s)
    # transformers 5 reads a warmup_steps below 1 as a fraction of the training steps (config.py
    # keeps warmup_ratio in [0, 1), so it is never taken for a step count).
    return SFTConfig(
        output_dir=str(artefacts.checkpoints_dir(run_dir)),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        # MTCTTrainer's sampler keeps an image's paths together either way; "group_by_length" also
        # sorts images by length within windows of micro-batches
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        gradient_accumulation_steps=config.gradient_accumulation_steps(state.num_processes),
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        optim=config.optimizer,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.gradient_checkpointing,
        max_length=config.max_length,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="epoch" if has_eval else "no",
        seed=config.seed,
        # TensorBoard is written to <run>/logs by our own callback (train_stage); wandb by its own.
        report_to="wandb" if config.report_to == "wandb" else "none",
        disable_tqdm=True,  # StageProgress draws the stage's one bar instead (train_stage)
        run_name=str(run_dir),
        dataloader_num_workers=dataloader_workers(config.dataloader_num_workers),
        ddp_timeout=config.distributed_timeout_s,
        model_init_kwargs={
            "dtype": config.dtype(),
            "attn_implementation": config.attn_implementation,
        },
    )


def train_stage(
    model: str,
    processor: ProcessorMixin,
    train_examples: Dataset,
    eval_examples: Dataset | None,
    config: TrainConfig,
    run_dir: Path,
    card: str = "",
    init_adapter: Path | None = None,
) -> StageResult:
    """Train `model` with the MTCT loss; reusable by later stages (SARR rounds) with their own examples.

    `finetune: lora` trains a fresh LoRA (or continues `init_adapter`, SARR's `sarr_init:
    continue`), saved as one adapter over the base `model`; `finetune: full` trains every
    weight of `model` - a random-initialised model has nothing worth freezing - and saves
    the whole checkpoint. The returned weights say which.
    """
    _fit(model, processor, train_examples, eval_examples, config, run_dir, card, init_adapter)
    release_memory("training")
    return stage_result(run_dir, model)


def _fit(
    model: str,
    processor: ProcessorMixin,
    train_examples: Dataset,
    eval_examples: Dataset | None,
    config: TrainConfig,
    run_dir: Path,
    card: str,
    init_adapter: Path | None,
) -> None:
    """Train and save; the trainer, model, optimiser and DeepSpeed engine die with this frame
    (`release_memory` collects them), and ZeRO-3 stops applying to later model loads."""
    args = sft_config(
        config, run_dir, has_eval=eval_examples is not None and len(eval_examples) > 0
    )
    base = load_start(model, init_adapter, args)
    args.model_init_kwargs = None
    fresh_lora = config.finetune == "lora" and init_adapter is None
    callbacks = [StageProgress(f"train {run_dir.parent.name}/{run_dir.name}")]
    if config.report_to == "tensorboard":
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(artefacts.logs_dir(run_dir))
        callbacks.append(tensorboard)
    trainer = MTCTTrainer(
        model=base,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples if args.eval_strategy != "no" else None,
        processing_class=processor,
        peft_config=lora_config(
            base, config.lora_rank, config.lora_alpha, config.lora_dropout, config.train_vision
        )
        if fresh_lora
        else None,
        callbacks=callbacks,
        reasoning_weight=config.reasoning_weight,
        shared_prefix=config.mtct_shared_prefix,
        padding_free=config.padding_free,
    )
    trainer.remove_callback(PrinterCallback)  # the log dictionaries go to report_to, not the terminal
    checkpoint = last_checkpoint(run_dir)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    save_weights(trainer, processor, run_dir / weights_dirname(config.finetune), card)
    if trainer.accelerator.is_main_process:
        metrics = {**output.metrics, "log_history": trainer.state.log_history}
        atomic.write_json(artefacts.metrics_path(run_dir), metrics)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.free_memory()
    # accelerate keeps the DeepSpeed plugin in a process-wide singleton, which keeps transformers'
    # ZeRO-3 switch on: every later from_pretrained (evaluation, SARR's next round) would build
    # the model sharded, with empty weights outside the engine. The next training sets it again.
    unset_hf_deepspeed_config()


def load_start(model: str, init_adapter: Path | None, args: SFTConfig) -> PreTrainedModel:
    """The weights training starts from: `model`, with `init_adapter` trainable on top.

    Under ZeRO-3 the adapter keeps the base's dtype, as TRL keeps a fresh LoRA's: PEFT would
    upcast it to float32, and ZeRO-3, which gathers parameters in one dtype, fails at the first
    step with a bfloat16 base."""
    base = AutoModelForImageTextToText.from_pretrained(model, **args.model_init_kwargs)
    if init_adapter is None:
        return base
    zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
    return PeftModel.from_pretrained(
        base, init_adapter, is_trainable=True, autocast_adapter_dtype=not zero3
    )


def release_memory(after: str) -> None:
    """Collect what `after` left (under mixed precision the model sits in a reference cycle:
    accelerate rebinds `model.forward` to an autocast wrapper bound to the model) and hand
    PyTorch's cached blocks back, so a vLLM server starting next finds
    the GPU free; what is still held is logged."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        gib = 2**30
        console.print(
            f"GPU memory after {after}: {torch.cuda.memory_allocated() / gib:.2f} GiB allocated, "
            f"{torch.cuda.memory_reserved() / gib:.2f} GiB reserved",
            highlight=False,
        )


def save_weights(trainer: MTCTTrainer, processor: ProcessorMixin, target: Path, card: str) -> None:
    """Every process takes part (under ZeRO-3 each holds a shard of every weight, which
    `Trainer.save_model` gathers); the main process writes. Saved beside the target and
    renamed into place: a weights folder is complete or absent."""
    state = trainer.accelerator
    staging = target.with_name(f".{target.name}.saving")
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(staging))
    state.wait_for_everyone()
    if state.is_main_process:
        processor.save_pretrained(staging)
        (staging / "training_args.bin").unlink(missing_ok=True)
        (staging / "README.md").write_text(card, encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    state.wait_for_everyone()


def stage_result(run_dir: Path, model: str) -> StageResult:
    metrics = atomic.read_json(artefacts.metrics_path(run_dir))
    return StageResult(run_dir, stage_weights(run_dir, model), metrics)


def model_card(request: TrainRequest, prepared: Prepared, sarr_round: int | None = None) -> str:
    """The README.md saved beside the weights; a SARR round's card also says which round it is."""
    config = request.config
    lora = config.finetune == "lora"
    front = {
        "base_model": request.model,
        "library_name": "peft" if lora else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["domainbed-reasoning", "rd-mldg", config.method, config.finetune, "trl"],
        "datasets": [request.data],
    }
    return render(
        __package__,
        MODEL_CARD_TEMPLATE,
        front_matter=yaml.safe_dump(front, sort_keys=False),
        spec=prepared.spec,
        target=request.target,
        model=request.model,
        config=config,
        lora=lora,
        counts=prepared.counts["train"],
        examples=len(prepared.train_examples),
        sarr_round=sarr_round,
        # the card sits in the round's weights folder, the stats in the round's folder above it
        self_label_stats=artefacts.self_label_stats_path(Path("..")).as_posix(),
    )