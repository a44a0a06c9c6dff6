"""Which trained weights a run's evaluation tests: DomainBed's model selection rule.

`last`, the paper's rule: the weights training ended with. `training-domain`,
DomainBed's training-domain validation: every checkpoint the run kept (the last
`save_total_limit` saves; the Trainer always saves the final step) is scored on the
validation split - the 20% of each training domain held out from training - and the
checkpoint with the best validation accuracy, averaged over the evaluated modes, is
tested; a tie goes to the later checkpoint. That is one validation pass per kept
checkpoint before the test, which `SelectionCost` states before it starts and
metrics.json records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainbed_reasoning.train.config import SELECTIONS
from domainbed_reasoning.train.model.weights import TrainedWeights, saved_checkpoints

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.errors import UserError

LAST, TRAINING_DOMAIN = SELECTIONS


@dataclass(frozen=True)
class SelectionCost:
    """What `training-domain` adds to an evaluation: a validation pass per kept checkpoint."""

    checkpoints: int
    validation_images: int
    modes: int

    @property
    def generations(self) -> int:
        return self.checkpoints * self.validation_images * self.modes

    def record(self) -> dict[str, int]:
        return {
            "checkpoints": self.checkpoints,
            "validation_images": self.validation_images,
            "modes": self.modes,
            "generations": self.generations,
        }

    def line(self) -> str:
        return (
            f"model selection training-domain: {self.checkpoints} checkpoint(s) x "
            f"{self.validation_images:,} validation images x {self.modes} mode(s) = "
            f"{self.generations:,} generations before the test"
        )


def check_selection(rule: str) -> str:
    if rule not in SELECTIONS:
        raise UserError(f"unknown model selection {rule!r}: choose one of {', '.join(SELECTIONS)}")
    return rule


def trained_stage(run_dir: Path, method: str) -> Path:
    """The stage folder whose training ended in the run's weights: the run, or rd-mldg's last round."""
    if method != "rd-mldg":
        return run_dir
    final = atomic.read_json(artefacts.metrics_path(run_dir))["final_round"]
    return artefacts.round_dir(run_dir, final)


def kept_checkpoints(run_dir: Path, method: str) -> list[Path]:
    stage = trained_stage(run_dir, method)
    checkpoints = saved_checkpoints(stage)
    if not checkpoints:
        raise UserError(
            "model selection training-domain needs the checkpoints training saved, and "
            f"{artefacts.checkpoints_dir(stage)} holds none: use --selection last, or train again "
            "keeping them (save_steps, save_total_limit)"
        )
    return checkpoints


def checkpoint_weights(checkpoint: Path, weights: TrainedWeights) -> TrainedWeights:
    """A LoRA run's checkpoint is an adapter over the same base model; a full fine-tune's is a whole model."""
    if weights.adapter is not None:
        return TrainedWeights(weights.model, checkpoint)
    return TrainedWeights(str(checkpoint))


def best_checkpoint(accuracy: dict[str, float]) -> str:
    """The name with the highest accuracy; `accuracy` is in checkpoint order, a tie goes to the later."""
    names = list(accuracy)
    return max(reversed(names), key=lambda name: accuracy[name])
