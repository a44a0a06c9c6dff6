"""TRL's SFTTrainer, taught the MTCT objective.

Three small changes, each where the Trainer expects them to be made:
- the collator carries each row's task (cls / reasoning) into the batch as a tensor;
- the train sampler shuffles images, not rows, so an image's two paths stay adjacent
  and (with an even per-device batch) share a micro-batch and so an optimisation step;
- `get_batch_samples` counts the tasks of the whole accumulation window (all devices)
  and `compute_loss` uses those counts (see mtct_loss.py), so the loss is the same
  whatever the gradient accumulation.
Everything else - chat templates, image processing, prompt masking, the fused LM
head, LoRA wrapping, checkpoints - is TRL's and transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from domainbed_reasoning.train.mtct.mtct_loss import mtct_loss, task_counts, task_ids
from torch.utils.data import Sampler
from trl import SFTTrainer

ROW_KEYS = ("task", "id")


@dataclass
class TaskCollator:
    """Wraps TRL's vision collator: it builds the tensors, this adds `task` (0 cls, 1 reasoning)."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: v for k, v in row.items() if k not in ROW_KEYS} for row in rows])
        batch["task"] = task_ids([row["task"] for row in rows])
        return batch


class GroupShuffleSampler(Sampler[int]):
    """Shuffles groups of rows (an image's examples) and yields each group's rows together.

    An image without an accepted chain has one row, so two such images are yielded as one
    unit of two rows: every unit but the last is a pair, and an even micro-batch never
    splits an image's two paths. Seeded by (seed, epoch), so a resumed run sees the same
    order as an uninterrupted one.
    """

    def __init__(self, keys: Sequence[str], seed: int = 0) -> None:
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        waiting: list[int] = []
        for position in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[position]
            if len(group) != 1:
                yield from group
                continue
            waiting += group
            if len(waiting) == 2:
                yield from waiting
                waiting = []
        yield from waiting


class MTCTTrainer(SFTTrainer):
    """SFTTrainer whose loss is MTCT's; rows need `images`, `prompt`, `completion`, `task`, `id`."""

    # `compute_loss` already divides by the step's example counts, so the Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, reasoning_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reasoning_weight = reasoning_weight
        self.data_collator = TaskCollator(self.data_collator)
        self._step_counts: torch.Tensor | None = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *ROW_KEYS]

    def _get_train_sampler(self, train_dataset=None) -> Sampler[int]:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return GroupShuffleSampler(dataset["id"], seed=self.args.seed)

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
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        # Training sees the whole step's counts (gathered across devices, whose gradients DDP
        # averages, hence the factor); evaluation batches stand alone.
        if mode == "train" and self._step_counts is not None:
            counts, scale = self._step_counts, self.accelerator.num_processes
        else:
            counts, scale = task_counts(ids), 1
        parts = mtct_loss(outputs.log_probs, outputs.label_mask, ids, counts, self.reasoning_weight)
        self._record(mode, parts, outputs, inputs)
        loss = parts.total * scale
        return (loss, outputs) if return_outputs else loss

    def _record(self, mode: str, parts, outputs, inputs: dict[str, Any]) -> None:
        """Per-task losses, token accuracy and tokens seen, summed over every process, for the logs."""
        device = parts.task_sums.device
        local = torch.cat(
            [
                parts.task_sums.float(),
                parts.task_counts.to(device, torch.float32),
                torch.stack(
                    [
                        outputs.is_top1.sum(),
                        outputs.label_mask.sum(),
                        inputs["attention_mask"].sum(),
                    ]
                ).to(device, torch.float32),
            ]
        )
        sums, counts, (correct, valid, tokens) = (
            self.accelerator.gather(local).view(-1, local.numel()).sum(0).tolist()[i:j]
            for i, j in ((0, 2), (2, 4), (4, 7))
        )
        metrics = self._metrics[mode]
        for name, total, count in zip(("loss_cls", "loss_reasoning"), sums, counts, strict=True):
            if count:
                metrics[name].append(total / count)
        metrics["mean_token_accuracy"].append(correct / max(valid, 1.0))
        if mode == "train":
            self._total_train_tokens += int(tokens)
            metrics["num_tokens"] = [self._total_train_tokens]
