"""What a training stage left to generate with: a LoRA adapter over the base model, or a whole model.

A LoRA stage saves `adapter/` (PEFT weights, meaningless without the base checkpoint
recorded in run.json); full fine-tuning saves `model/`, a complete checkpoint that
takes the base's place. Evaluation, SARR's next round and its resume checks all ask
`stage_weights` instead of assuming a folder name, so both kinds flow through alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainbed_reasoning import artefacts
from domainbed_reasoning.errors import UserError

ADAPTER = "adapter"
MODEL = "model"


def weights_dirname(finetune: str) -> str:
    return MODEL if finetune == "full" else ADAPTER


@dataclass(frozen=True)
class TrainedWeights:
    """What an engine loads: `model` (a checkpoint) with `adapter` applied when there is one."""

    model: str
    adapter: Path | None = None

    @property
    def folder(self) -> Path:
        """The folder the stage saved: the adapter, or the full checkpoint."""
        return self.adapter if self.adapter is not None else Path(self.model)


def find_weights(stage_dir: Path, base_model: str) -> TrainedWeights | None:
    """The weights a finished stage in `stage_dir` saved on top of `base_model`, if it saved any."""
    stage_dir = Path(stage_dir)
    if (stage_dir / ADAPTER / "adapter_config.json").is_file():
        return TrainedWeights(base_model, stage_dir / ADAPTER)
    if (stage_dir / MODEL / "config.json").is_file():
        return TrainedWeights(str(stage_dir / MODEL))
    return None


def saved_checkpoints(stage_dir: Path) -> list[Path]:
    """The Trainer's `checkpoints/checkpoint-<step>` folders of a stage, oldest first."""
    return sorted(
        artefacts.checkpoints_dir(Path(stage_dir)).glob("checkpoint-*"),
        key=lambda path: int(path.name.rsplit("-", 1)[-1]),
    )


def stage_weights(stage_dir: Path, base_model: str) -> TrainedWeights:
    weights = find_weights(stage_dir, base_model)
    if weights is None:
        raise UserError(
            f"{stage_dir} has no trained weights ({ADAPTER}/adapter_config.json or {MODEL}/config.json): "
            "run `dbr train` first (or `dbr train --resume` to finish it)"
        )
    return weights
