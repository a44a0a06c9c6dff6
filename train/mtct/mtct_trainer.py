"""TRL's SFTTrainer, taught the MTCT objective.

A few small changes, each where the Trainer expects them to be made:
- the collator carries each row's task (cls / reasoning) into the batch as a tensor;
- the train sampler shuffles images, not rows, so an image's two paths stay adjacent
  and (with an even per-device batch) share a micro-batch and so an optimisation step;
- `get_batch_samples` counts the tasks of the whole accumulation window (all devices)
  and `compute_loss` uses those counts (see mtct_loss.py), so the loss is the same
  whatever the gradient accumulation;
- the batch's layout (shared_prefix.py): with `shared_prefix` an image's two paths are one
  packed row (the image and the prompt they share computed once), and where the attention
  backend cannot take that but runs examples apart (flash-attention), with `padding_free`
  each micro-batch is one row without padding. The loss is the same in every layout.
Everything else - chat templates, image processing, prompt masking, the fused LM
head, LoRA wrapping, checkpoints - is TRL's and transformers' own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from domainbed_reasoning.train.mtct.mtct_data import image_sizes
from domainbed_reasoning.train.mtct.mtct_loss import (
    per_example_nll,
    task_counts,
    task_ids,
    task_loss,
)
from domainbed_reasoning.train.mtct.shared_prefix import (
    flat_blocker,
    pack_batch,
    packed_example_nll,
    packed_positions,
    prefix_mask,
    sharing_blocker,
)
from domainbed_reasoning.train.mtct.token_budget import image_tokens
from torch.utils.data import Sampler, SequentialSampler
from trl import SFTTrainer

from domainbed_reasoning.errors import UserError

ROW_KEYS = ("task", "id")
# Rows whose estimated lengths are closer than this many tokens count as equal when grouping.
LENGTH_STEP = 32
# An answer's characters per token, near enough to rank rows without tokenising them.
CHARS_PER_TOKEN = 4
logger = logging.getLogger(__name__)


@dataclass
class TaskCollator:
    """Wraps TRL's vision collator: it builds the tensors, this adds `task` (0 cls, 1 reasoning).

    The wrapped collator must not truncate (`max_length` is checked here instead: a cut
    chain would lose its conclusion). With `packing` "shared", an image's rows are packed
    into one row sharing their prefix; with "flat", the micro-batch is one padding-free row;
    a batch whose layout cannot be packed stays as it is. The batch's `layout` is
    `[example tokens, positions computed, real positions]`, for the logs.
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    max_length: int | None = None
    packing: str | None = None
    image_token_id: int = 0
    pad_token_id: int = 0
    warned: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: v for k, v in row.items() if k not in ROW_KEYS} for row in rows])
        lengths = batch["attention_mask"].sum(1)
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            row = rows[int(lengths.argmax())]
            raise UserError(
                f"the {row['task']} example of {row['id']} is {int(lengths.max()):,} tokens, more than "
                f"max_length {self.max_length:,}: raise max_length, or set it to null (no truncation)"
            )
        packed = None
        if self.packing is not None:
            keys = [row["id"] for row in rows]
            packed = pack_batch(batch, keys, self.image_token_id, self.pad_token_id, self.packing)
            if packed is None and not self.warned:
                self.warned = True
                setting = "mtct_shared_prefix" if self.packing == "shared" else "padding_free"
                logger.warning(
                    f"{setting}: training padded rows, since the collator's batch "
                    f"({', '.join(sorted(batch))}) is not a layout packing knows"
                )
        real = int(lengths.sum())
        if packed is not None:
            batch = packed
            computed = batch["shared_prefix"]["segment"]
            layout = [real, computed.numel(), int((computed >= 0).sum())]
        else:
            layout = [real, batch["attention_mask"].numel(), real]
        batch["task"] = task_ids([row["task"] for row in rows])
        batch["layout"] = torch.tensor(layout, dtype=torch.long)
        return batch


class GroupShuffleSampler(Sampler[int]):
    """Shuffles groups of rows (an image's examples) and yields each group's rows together.

    An image without an accepted chain has one row, so two such images are yielded as one
    unit of two rows: every unit but the last is a pair, and an even micro-batch never
    splits an image's two paths. With `lengths`, the units of each run of `megabatch` rows
    are sorted longest first (as transformers' LengthGroupedSampler does with single rows),
    so a micro-batch holds images of similar length and pads little. Seeded by (seed,
    epoch), so a resumed run sees the same order as an uninterrupted one.
    """

    def __init__(
        self,
        keys: Sequence[str],
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        megabatch: int = 0,
    ) -> None:
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.seed = seed
        self.epoch = 0
        self.lengths = lengths
        self.megabatch = megabatch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups)

    def __iter__(self) -> Iterator[int]:
        units = self._units()
        if self.lengths is not None and self.megabatch > 0:
            units = self._grouped_by_length(units)
        for unit in units:
            yield from unit

    def _units(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        units: list[list[int]] = []
        waiting: list[int] = []
        for position in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[position]
            if len(group) != 1:
                units.append(group)
                continue
            waiting += group
            if len(waiting) == 2:
                units.append(waiting)
                waiting = []
        return units + ([waiting] if waiting else [])

    def _grouped_by_length(self, units: list[list[int]]) -> list[list[int]]:
        ordered: list[list[int]] = []
        run: list[list[int]] = []
        for unit in units:
            run.append(unit)
            if sum(len(u) for u in run) >= self.megabatch:
                ordered += sorted(run, key=self._unit_length, reverse=True)
                run = []
        return ordered + sorted(run, key=self._unit_length, reverse=True)

    def _unit_length(self, unit: list[int]) -> int:
        return max(self.lengths[index] for index in unit)


def length_keys(
    answers: Iterable[str], image_tokens: Iterable[int], step: int = LENGTH_STEP
) -> list[int]:
    """What the length-grouped sampler sorts rows by: the row's image tokens and its answer's
    (estimated from its characters), in steps of `step` tokens.

    The rest of a row, the chat template and the question, is alike across a dataset; the
    image is not where the processor tiles it (InternVL) or counts its pixels (Qwen2-VL), and
    is then most of the row. Counting in steps keeps rows that differ by a few tokens - every
    class name - in their shuffled order: sorted by exact length, class names of equal length
    would fill whole micro-batches with one class, a skewed gradient that saves no padding.
    """
    return [
        (tokens + len(answer) // CHARS_PER_TOKEN) // step
        for answer, tokens in zip(answers, image_tokens, strict=True)
    ]


def batch_layout(config: Any, shared_prefix: bool, padding_free: bool) -> tuple[str | None, str | None]:
    """The packing a model trains with ("shared", "flat" or None for padded rows), and the one
    log line that says why the shared prefix asked for is not used."""
    if shared_prefix and (blocker := sharing_blocker(config)) is None:
        return "shared", None
    flat = "flat" if padding_free and flat_blocker(config) is None else None
    if not shared_prefix:
        return flat, None
    rows = "one padding-free row per micro-batch" if flat else "each path as its own row"
    return flat, f"mtct_shared_prefix: training {rows}, since {blocker}"


class MTCTTrainer(SFTTrainer):
    """SFTTrainer whose loss is MTCT's; rows need `images`, `prompt`, `completion`, `task`, `id`."""

    # `compute_loss` already divides by the step's example counts, so the Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        reasoning_weight: float = 1.0,
        shared_prefix: bool = True,
        padding_free: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reasoning_weight = reasoning_weight
        config = self.accelerator.unwrap_model(self.model).config
        self._attention = getattr(config, "_attn_implementation", None) or "sdpa"
        self._model_type = config.model_type
        packing, why = batch_layout(config, shared_prefix, padding_free)
        if why and self.accelerator.is_main_process:
            logger.warning(why)
        base = self.data_collator
        max_length = getattr(base, "max_length", None)
        base.max_length = None
        self.data_collator = TaskCollator(
            base,
            max_length,
            packing,
            self.processing_class.image_token_id,
            self.processing_class.tokenizer.pad_token_id,
        )
        self._step_counts: torch.Tensor | None = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *ROW_KEYS]

    def _get_train_sampler(self, train_dataset=None) -> Sampler[int]:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return GroupShuffleSampler(dataset["id"], seed=self.args.seed)
        answers = (turns[0]["content"][0]["text"] for turns in dataset["completion"])
        lengths = length_keys(answers, image_tokens(self.processing_class, image_sizes(dataset)))
        megabatch = 50 * self.args.per_device_train_batch_size * self.args.world_size
        return GroupShuffleSampler(dataset["id"], self.args.seed, lengths, megabatch)

    def _get_eval_sampler(self, eval_dataset) -> Sampler[int] | None:
        """Evaluation keeps the dataset's order: the length grouping above is for training only
        (transformers would group evaluation by `input_ids`, which rows here do not have yet)."""
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        counts = sum(
            (task_counts(batch["task"]) for batch in batch_samples),
            torch.zeros(2, dtype=torch.long),
        )
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.to(device)).view(-1, counts.numel()).sum(0)
        self._step_counts = counts
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        ids = inputs.pop("task")
        layout = inputs.pop("layout")
        packing = inputs.pop("shared_prefix", None)
        if packing is None:
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
            per_example = per_example_nll(outputs.log_probs, outputs.label_mask)
        else:
            outputs = self._packed_forward(model, inputs, packing)
            per_example = packed_example_nll(
                outputs.log_probs, outputs.label_mask, packing["example_of"], len(ids)
            )
        # Training sees the whole step's counts (gathered across devices, whose gradients DDP
        # averages, hence the factor); evaluation batches stand alone.
        if mode == "train" and self._step_counts is not None:
            counts, scale = self._step_counts, self.accelerator.num_processes
        else:
            counts, scale = task_counts(ids), 1
        parts = task_loss(per_example, ids, counts, self.reasoning_weight)
        self._record(mode, parts, outputs, layout)
        loss = parts.total * scale
        return (loss, outputs) if return_outputs else loss

    def _packed_forward(self, model, inputs: dict[str, Any], packing: dict[str, Any]):
        """The forward of a packed batch: each token at its own row's position, behind the
        prefix mask (shared), or with no mask, the positions telling examples apart (flat)."""
        backbone = self.accelerator.unwrap_model(model)
        if hasattr(backbone, "get_base_model"):
            backbone = backbone.get_base_model()
        dtype = backbone.get_input_embeddings().weight.dtype
        mask = None
        if packing["layout"] == "shared":
            mask = prefix_mask(packing["segment"], self._attention, dtype)
        return model(
            **inputs,
            attention_mask=mask,
            position_ids=packed_positions(backbone.model, self._model_type, packing),
            use_cache=False,
            fused_lm_head=True,
        )

    def _record(self, mode: str, parts, outputs, layout: torch.Tensor) -> None:
        """Per-task losses, token accuracy, tokens seen and padding, summed over every process, for the logs."""
        device = parts.task_sums.device
        local = torch.cat(
            [
                parts.task_sums.float(),
                parts.task_counts.to(device, torch.float32),
                torch.stack([outputs.is_top1.sum(), outputs.label_mask.sum()]).to(
                    device, torch.float32
                ),
                layout.to(device, torch.float32),
            ]
        )
        sums, counts, (correct, valid), (tokens, positions, real) = (
            self.accelerator.gather(local).view(-1, local.numel()).sum(0).tolist()[i:j]
            for i, j in ((0, 2), (2, 4), (4, 6), (6, 9))
        )
        metrics = self._metrics[mode]
        for name, total, count in zip(("loss_cls", "loss_reasoning"), sums, counts, strict=True):
            if count:
                metrics[name].append(total / count)
        metrics["mean_token_accuracy"].append(correct / max(valid, 1.0))
        metrics["padding_fraction"].append(1.0 - real / max(positions, 1.0))
        if mode == "train":
            self._total_train_tokens += int(tokens)
            metrics["num_tokens"] = [self._total_train_tokens]
