"""The build's progress bar: images done, images/s, the share accepted, images whose request
failed, and the tokens and dollars spent so far."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def images_per_second(task: Task) -> float | None:
    """rich's estimate from its recent samples; where it has none (a build that finished between
    two samples), the images done over the time since the start."""
    speed = task.finished_speed or task.speed
    if speed:
        return speed
    elapsed = task.elapsed if task.finished_time is None else task.finished_time
    return task.completed / elapsed if task.completed and elapsed else None


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = images_per_second(task)
        rate = "-" if speed is None else f"{speed:.1f}"
        accepted = task.fields.get("accepted", 0)
        share = f"{100 * accepted / task.completed:.1f}%" if task.completed else "-"
        failed = task.fields.get("failed", 0)
        pending = f", {failed} left pending by failed requests" if failed else ""
        spend = task.fields.get("spend")
        spent = f", {spend}" if spend else ""
        return Text(f"{rate} img/s, accepted {share}{pending}{spent}")


def progress_bar(console: Console | None, show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
    )
