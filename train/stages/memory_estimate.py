"""Will one training step fit the GPU? Estimated before training, so a too-large batch is named in
one line instead of an out-of-memory error minutes into the first step.

The estimate is the usual first-order count for one device: the weights (sharded under
ZeRO-3), the trainable weights' gradients and Adam states with their float32 copies,
the activations (one saved hidden state per layer with gradient checkpointing, plus one
layer's working set being recomputed; every layer's without), and the logits over the
vocabulary for every token in the training dtype plus the float32 copy the loss takes and
its gradient. It leaves out the allocator's fragmentation, which is why only a share of the
GPU counts as usable. Only checked where a GPU is present; the result is advice, printed,
since a first-order estimate must not stop a run that would have fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from domainbed_reasoning.train.mtct.mtct_data import class_names, task_prompt
from domainbed_reasoning.train.mtct.token_budget import longest_prompt
from domainbed_reasoning.train.sarr.sharding import process_state
from domainbed_reasoning.train.stages.stage import Prepared, TrainRequest
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

from domainbed_reasoning.terminal import console

GIB = 2**30
USABLE_SHARE = 0.9  # of the GPU's memory: the rest goes to the CUDA context, NCCL and fragmentation
ADAM_BYTES = 16  # per trainable weight: float32 master copy, gradient, and Adam's two moments
LAYER_WORKING_SET = 34  # bytes x hidden per token of one transformer layer's activations (16-bit)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    trainable: int
    hidden_size: int
    layers: int
    vocab_size: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    optimiser: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.optimiser + self.activations + self.logits


def estimate_peak(
    shape: ModelShape,
    batch: int,
    tokens: int,
    weight_bytes: int,
    gradient_checkpointing: bool,
    shards: int = 1,
) -> MemoryEstimate:
    """Bytes one device holds at the peak of a step of `batch` sequences of `tokens` tokens.

    `shards` is how many devices ZeRO-3 splits the weights and optimiser states over (1 otherwise).
    """
    per_token_layer = LAYER_WORKING_SET * shape.hidden_size
    saved_layers = 1 if gradient_checkpointing else shape.layers
    checkpoints = shape.layers * shape.hidden_size * weight_bytes if gradient_checkpointing else 0
    return MemoryEstimate(
        weights=shape.parameters * weight_bytes // shards,
        optimiser=shape.trainable * ADAM_BYTES // shards,
        activations=batch * tokens * (checkpoints + saved_layers * per_token_layer),
        logits=batch * tokens * shape.vocab_size * (weight_bytes + 8),
    )


def memory_advice(
    estimate: MemoryEstimate, total_memory: int, per_device_batch_size: int, gradient_checkpointing: bool
) -> str | None:
    """None when the estimate fits the usable share of `total_memory`; else one line naming what to lower."""
    usable = total_memory * USABLE_SHARE
    if estimate.total <= usable:
        return None
    smaller = max(2, per_device_batch_size // 2 // 2 * 2)  # MTCT keeps an image's two examples together
    fixes = []
    if not gradient_checkpointing:
        fixes.append("--set gradient_checkpointing=true")
    if smaller < per_device_batch_size:
        fixes.append(
            f"--set per_device_batch_size={smaller} (gradient accumulation keeps global_batch_size)"
        )
    fixes.append("a lower image_max_tiles / image_max_pixels (fewer image tokens)")
    return (
        f"training needs about {estimate.total / GIB:.1f} GiB per GPU (weights {estimate.weights / GIB:.1f}, "
        f"activations {estimate.activations / GIB:.1f}, logits {estimate.logits / GIB:.1f}), more than the "
        f"{usable / GIB:.1f} GiB usable of this GPU's {total_memory / GIB:.1f} GiB: try {', or '.join(fixes)}"
    )


def model_shape(model: str, finetune: str, lora_rank: int) -> ModelShape:
    """The sizes that count, from a weightless (meta-device) copy of the model; LoRA's trainable
    weights are counted as if every linear layer were adapted (an upper bound)."""
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    parameters = sum(param.numel() for param in skeleton.parameters())
    trainable = parameters
    if finetune == "lora":
        linears = [module for module in skeleton.modules() if isinstance(module, nn.Linear)]
        trainable = sum(lora_rank * (layer.in_features + layer.out_features) for layer in linears)
    text = config.get_text_config()
    return ModelShape(parameters, trainable, text.hidden_size, text.num_hidden_layers, text.vocab_size)


def longest_example(prepared: Prepared, max_length: int | None) -> int:
    """Tokens of the longest training example: the most expensive image's prompt plus the longest chain."""
    processor = prepared.processor
    prompt = longest_prompt(processor, task_prompt("reasoning", class_names(prepared.splits["train"])))
    chains = [row[0]["content"][0]["text"] for row in prepared.train_examples["completion"]]
    completion = max((len(ids) for ids in processor.tokenizer(chains)["input_ids"]), default=0)
    return min(prompt + completion, max_length or prompt + completion)


def check_training_memory(request: TrainRequest, prepared: Prepared) -> None:
    """On a GPU, print one line naming the setting to lower when a step will likely not fit."""
    state = process_state()
    if not torch.cuda.is_available() or not state.is_main_process:
        return
    config = request.config
    zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    estimate = estimate_peak(
        model_shape(request.model, config.finetune, config.lora_rank),
        config.per_device_batch_size,
        longest_example(prepared, config.max_length),
        config.dtype().itemsize,
        config.gradient_checkpointing,
        shards=state.num_processes if zero3 else 1,
    )
    total = torch.cuda.get_device_properties(state.device).total_memory
    advice = memory_advice(estimate, total, config.per_device_batch_size, config.gradient_checkpointing)
    if advice is not None:
        console.print(f"[yellow]memory[/]: {advice}", highlight=False)
