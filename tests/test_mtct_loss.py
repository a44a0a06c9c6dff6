"""The MTCT loss on a fixed batch, checked against a hand computation, with and without accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from domainbed_reasoning.train.mtct.mtct_loss import (
    mtct_loss,
    per_example_nll,
    task_counts,
    task_ids,
)

# Four examples: image A's cls and reasoning paths, image B's cls and reasoning paths.
# Log-probs of each completion token; the mask marks completion tokens (prompt/padding are 0).
LOGPROBS = torch.tensor(
    [
        [-9.0, -1.0, 0.0, 0.0, 0.0],  # A cls: one completion token (-1.0); -9 is a prompt token
        [-9.0, -2.0, -4.0, -6.0, 0.0],  # A reasoning: three tokens, mean nll 4
        [-9.0, -3.0, 0.0, 0.0, 0.0],  # B cls: one token, nll 3
        [-9.0, -1.0, -1.0, -1.0, -1.0],  # B reasoning: four tokens, nll 1
    ]
)
MASK = torch.tensor(
    [
        [0, 1, 0, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1],
    ]
)
IDS = task_ids(["cls", "reasoning", "cls", "reasoning"])


def test_per_example_nll_is_the_mean_over_its_own_completion_tokens() -> None:
    assert per_example_nll(LOGPROBS, MASK).tolist() == [1.0, 4.0, 3.0, 1.0]


def test_row_without_completion_tokens_counts_zero_not_nan() -> None:
    assert per_example_nll(torch.tensor([[-5.0, -5.0]]), torch.tensor([[0, 0]])).tolist() == [0.0]


def test_task_counts() -> None:
    assert task_counts(IDS).tolist() == [2, 2]
    assert task_counts(task_ids(["cls", "cls", "cls"])).tolist() == [3, 0]


def test_unknown_task_is_refused() -> None:
    with pytest.raises(
        ValueError, match="unknown task\\(s\\) caption: rows must have task cls or reasoning"
    ):
        task_ids(["caption"])


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_full_batch_matches_hand_computation(weight: float) -> None:
    # L_cls = (1 + 3) / 2 = 2; L_reasoning = (4 + 1) / 2 = 2.5 - a token mean would give (2+4+6+4)/7.
    parts = mtct_loss(LOGPROBS, MASK, IDS, task_counts(IDS), reasoning_weight=weight)
    assert math.isclose(parts.total.item(), 2.0 + weight * 2.5)
    assert parts.cls_mean.item() == 2.0
    assert parts.reasoning_mean.item() == 2.5


def test_gradient_accumulation_sums_to_the_full_batch_loss_and_gradient() -> None:
    """Two micro-batches with uneven task mixes, given the step's counts, equal one big batch."""
    logits = LOGPROBS.clone().requires_grad_(True)
    full = mtct_loss(logits, MASK, IDS, task_counts(IDS), 0.7).total
    (full_grad,) = torch.autograd.grad(full, logits)

    logits = LOGPROBS.clone().requires_grad_(True)
    step_counts = task_counts(IDS)
    micro = [[0, 1, 2], [3]]  # first micro-batch has 2 cls + 1 reasoning, second only 1 reasoning
    accumulated = sum(
        mtct_loss(logits[rows], MASK[rows], IDS[rows], step_counts, 0.7).total for rows in micro
    )
    (accumulated_grad,) = torch.autograd.grad(accumulated, logits)

    assert math.isclose(accumulated.item(), full.item(), rel_tol=1e-6)
    assert math.isclose(full.item(), 2.0 + 0.7 * 2.5, rel_tol=1e-6)
    torch.testing.assert_close(accumulated_grad, full_grad)
    # each reasoning token of A gets weight 0.7 / (2 examples * 3 tokens)
    assert math.isclose(full_grad[1, 2].item(), -0.7 / 6, rel_tol=1e-6)


def test_micro_batch_local_means_would_be_wrong() -> None:
    """The reason step counts are passed in: averaging micro-batch means gives another number."""
    local = [
        mtct_loss(LOGPROBS[rows], MASK[rows], IDS[rows], task_counts(IDS[rows])).total.item()
        for rows in ([0, 1, 2], [3])
    ]
    assert not math.isclose(sum(local) / 2, 4.5)


def test_single_task_batch_has_no_mean_for_the_other_task() -> None:
    ids = task_ids(["cls", "cls"])
    parts = mtct_loss(LOGPROBS[[0, 2]], MASK[[0, 2]], ids, task_counts(ids))
    assert parts.total.item() == 2.0
    assert parts.reasoning_mean is None
