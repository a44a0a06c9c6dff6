"""The build's progress bar reads the images/s it shows from rich's recent samples, and from the
images done over the time since the start where rich has none (a build that finished between two
samples showed 0.0 img/s)."""

from __future__ import annotations

import re

from domainbed_reasoning.builders.progress import RateColumn, progress_bar
from rich.console import Console
from rich.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bar() -> tuple[Progress, Clock, int]:
    clock = Clock()
    progress = Progress(RateColumn(), get_time=clock, disable=True)
    task = progress.add_task("SynthDG chains", total=40, accepted=0)
    return progress, clock, task


def rate(progress: Progress, task: int) -> str:
    return RateColumn().render(progress.tasks[task]).plain


def test_no_image_done_yet_shows_no_rate() -> None:
    progress, clock, task = bar()
    clock.now += 1.0

    assert rate(progress, task) == "- img/s, accepted -"


def test_a_build_done_in_one_update_shows_images_over_elapsed_time() -> None:
    progress, clock, task = bar()
    clock.now += 0.25
    progress.update(task, completed=40, accepted=40)
    clock.now += 5.0  # the bar's last render comes later; the rate is the build's

    assert progress.tasks[task].speed is None
    assert rate(progress, task) == "160.0 img/s, accepted 100.0%"


def test_rich_samples_give_the_recent_rate() -> None:
    progress, clock, task = bar()
    clock.now += 1.0
    progress.update(task, completed=10, accepted=9)
    clock.now += 1.0
    progress.update(task, completed=30, accepted=27)

    assert rate(progress, task) == "20.0 img/s, accepted 90.0%"


def test_the_bar_renders_the_rate_column() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    with progress_bar(console, show=True) as progress:
        task = progress.add_task("SynthDG chains", total=4, accepted=0)
        progress.update(task, completed=4, accepted=4)
    shown = re.search(r"(\S+) img/s, accepted 100.0%", console.export_text())

    assert shown is not None and float(shown[1]) > 0, console.export_text()
