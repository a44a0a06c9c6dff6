"""The MTCT objective: L = L_cls + reasoning_weight * L_reasoning.

Each example's loss is the mean negative log-likelihood over its OWN completion
tokens, so a 300-token chain weighs as much as a one-token class name (the
paper's normalisation; a plain token mean would let long chains drown the
classification path). L_cls and L_reasoning are then means over the examples of
each task in the whole optimisation step - every micro-batch of the
gradient-accumulation window and every device - which is why the counts are
passed in rather than taken from the micro-batch: summing the micro-batch
losses then gives exactly the full-batch loss, whatever the accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("cls", "reasoning")
CLS, REASONING = range(len(TASKS))


@dataclass(frozen=True)
class MTCTLoss:
    """`total` is this micro-batch's share of the step's loss; the per-task sums are for logging.

    `task_sums` (detached) and `task_counts` are `[cls, reasoning]` over this micro-batch's
    examples, so several devices' logs add up before they are divided.
    """

    total: torch.Tensor
    task_sums: torch.Tensor
    task_counts: torch.Tensor

    @property
    def cls_mean(self) -> torch.Tensor | None:
        return self._mean(CLS)

    @property
    def reasoning_mean(self) -> torch.Tensor | None:
        return self._mean(REASONING)

    def _mean(self, task: int) -> torch.Tensor | None:
        count = int(self.task_counts[task])
        return self.task_sums[task] / count if count else None


def task_ids(tasks: list[str]) -> torch.Tensor:
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}: rows must have task {' or '.join(TASKS)}"
        )
    return torch.tensor([TASKS.index(task) for task in tasks], dtype=torch.long)


def task_counts(ids: torch.Tensor) -> torch.Tensor:
    """Examples per task, `[n_cls, n_reasoning]`."""
    return torch.bincount(ids.flatten().cpu(), minlength=len(TASKS))


def per_example_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's completion tokens, shape `[batch]`; a row without any is 0."""
    mask = mask.to(token_logprobs.dtype)
    return -(token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def mtct_loss(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    ids: torch.Tensor,
    step_counts: torch.Tensor,
    reasoning_weight: float = 1.0,
) -> MTCTLoss:
    """This micro-batch's contribution to the step loss, given the step's per-task example counts."""
    return task_loss(per_example_nll(token_logprobs, mask), ids, step_counts, reasoning_weight)


def task_loss(
    per_example: torch.Tensor,
    ids: torch.Tensor,
    step_counts: torch.Tensor,
    reasoning_weight: float = 1.0,
) -> MTCTLoss:
    """The MTCT loss from each example's own mean NLL, however the batch was laid out."""
    ids = ids.to(per_example.device)
    weights = torch.tensor(
        [1.0, reasoning_weight], device=per_example.device, dtype=per_example.dtype
    )
    denominators = step_counts.to(per_example.device, per_example.dtype).clamp(min=1)
    total = (per_example * (weights / denominators)[ids]).sum()
    sums = torch.zeros(len(TASKS), device=per_example.device, dtype=per_example.dtype)
    sums.index_add_(0, ids, per_example.detach())
    return MTCTLoss(total=total, task_sums=sums, task_counts=task_counts(ids))
