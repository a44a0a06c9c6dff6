"""One progress bar per training stage, with its latest loss.

The Trainer's own display (a tqdm bar that prints every log dictionary, and a nested bar per
evaluation) is replaced by this callback; the logs themselves go where `report_to` sends them
(TensorBoard under the run's `logs/`, or wandb) and into `metrics.json`'s `log_history`.
"""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from domainbed_reasoning.terminal import console


class StageProgress(TrainerCallback):
    """Optimiser steps done of the stage's total, the last logged loss, elapsed and remaining
    time; drawn by the main process only."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(self.title, total=state.max_steps, loss="")
        self.progress.update(self.task, completed=state.global_step)
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        loss = (logs or {}).get("loss", (logs or {}).get("train_loss"))  # the stage's mean at its end
        if self.progress is not None and loss is not None:
            self.progress.update(self.task, loss=f"loss {float(loss):.3f}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
