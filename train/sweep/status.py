"""Where a sweep stands: each trial's state, its last attempt, its Slurm job, and what it costs.

The state comes from the run folder (the files a finished step writes last), so it
is right whoever ran the trial; the trial record adds how the last attempt ended,
and jobs.json the job Slurm holds for it. Cost is measured, never guessed: a trial
that ran whole records its hours and GPUs, and a trial still to run is estimated
from the measured trials of the same dataset and method, or left without an
estimate when none has run yet.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any

from domainbed_reasoning.train.sweep.launchers import ACTIVE_JOB_STATES, job_state, read_jobs
from domainbed_reasoning.train.sweep.plan import DONE, Trial
from rich.table import Table

from domainbed_reasoning.terminal import console


@dataclass(frozen=True)
class Cost:
    hours: float
    gpus: float
    measured: bool  # False: the mean of the measured trials of the same dataset and method

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus


@dataclass(frozen=True)
class TrialStatus:
    trial: Trial
    state: str
    record: dict[str, Any] | None
    job: dict[str, str] | None
    cost: Cost | None

    @property
    def held(self) -> bool:
        """A Slurm job for it is still pending or running: a re-run leaves it alone."""
        return (
            self.state != DONE and self.job is not None and self.job["state"] in ACTIVE_JOB_STATES
        )


def read_record(trial: Trial) -> dict[str, Any] | None:
    if not trial.record.is_file():
        return None
    try:
        return json.loads(trial.record.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _state(trial: Trial, record: dict[str, Any] | None, job: dict[str, str] | None) -> str:
    """The run folder's state, told more precisely by the job and the last attempt where they know."""
    state = trial.state()
    if state == DONE:
        return state
    if job is not None and job["state"] in ACTIVE_JOB_STATES:
        return f"slurm {job['state'].lower()}"
    if record is not None and "finished" not in record:
        return "started (running, or killed: re-run to resume)"
    if record is not None and record.get("returncode"):
        return f"failed (exit {record['returncode']}, see log)"
    return state


def _measured(record: dict[str, Any] | None) -> Cost | None:
    if not record or not record.get("whole"):
        return None
    return Cost(record["seconds"] / 3600, record["gpus"], measured=True)


def statuses(trials: Sequence[Trial]) -> list[TrialStatus]:
    """Every trial's state and cost; the cluster is asked (Slurm: sacct) about each recorded job."""
    jobs = read_jobs(trials[0].sweep_dir) if trials else {}
    records = {trial.key: read_record(trial) for trial in trials}
    by_kind: dict[tuple[str, str], list[Cost]] = defaultdict(list)
    for trial in trials:
        if (cost := _measured(records[trial.key])) is not None:
            by_kind[(trial.dataset, trial.method)].append(cost)
    found = []
    for trial in trials:
        job = jobs.get(trial.key)
        if job is not None:
            job = job | {"state": job_state(trial.sweep_dir, job)}
        cost = _measured(records[trial.key])
        costs = by_kind.get((trial.dataset, trial.method))
        if cost is None and costs:
            cost = Cost(mean(c.hours for c in costs), mean(c.gpus for c in costs), measured=False)
        found.append(
            TrialStatus(
                trial, _state(trial, records[trial.key], job), records[trial.key], job, cost
            )
        )
    return found


def _hours(cost: Cost | None) -> tuple[str, str]:
    if cost is None:
        return "—", "—"
    mark = "" if cost.measured else "~"
    return f"{mark}{cost.hours:.2f}", f"{mark}{cost.gpu_hours:.2f}"


def totals(found: Sequence[TrialStatus]) -> dict[str, Any]:
    todo = [item for item in found if item.state != DONE]
    return {
        "trials": len(found),
        "done": len(found) - len(todo),
        "to_run": len(todo),
        "measured_gpu_hours": sum(
            item.cost.gpu_hours for item in found if item.cost and item.cost.measured
        ),
        "estimated_gpu_hours_to_run": sum(item.cost.gpu_hours for item in todo if item.cost),
        "to_run_without_estimate": sum(1 for item in todo if item.cost is None),
    }


def print_status(found: Sequence[TrialStatus], title: str) -> None:
    table = Table(title=title)
    for column in ("trial", "folder", "state", "job", "hours", "GPU-h"):
        table.add_column(column, overflow="fold")
    for item in found:
        folder = item.trial.folder.relative_to(item.trial.sweep_dir)
        job = f"{item.job['job_id']} {item.job['state']}" if item.job else ""
        table.add_row(item.trial.key, str(folder), item.state, job, *_hours(item.cost))
    console.print(table)
    summary = totals(found)
    console.print(
        f"{summary['trials']} trials: {summary['done']} done, {summary['to_run']} to run. GPU-hours: "
        f"{summary['measured_gpu_hours']:.2f} measured; ~{summary['estimated_gpu_hours_to_run']:.2f} estimated "
        "to run (~: the mean of the measured trials of the same dataset and method)",
        highlight=False,
    )
    if summary["to_run_without_estimate"]:
        console.print(
            f"{summary['to_run_without_estimate']} trial(s) to run have no measured trial of their dataset and "
            "method to estimate from: run one of each (e.g. --seeds 0 --targets DOMAIN), then --dry-run again",
            highlight=False,
        )


def print_commands(trial: Trial) -> None:
    """What one trial runs, as a user would type it (`dbr` = `python -m domainbed_reasoning`)."""
    console.print(f"each trial runs its unfinished steps; {trial.key}:", highlight=False)
    for step in trial.steps:
        console.print(f"  dbr {' '.join(step.argv)}", highlight=False, soft_wrap=True)


def status_json(found: Sequence[TrialStatus]) -> dict[str, Any]:
    return {
        "sweep": str(found[0].trial.sweep_dir) if found else None,
        "totals": totals(found),
        "trials": [
            {
                "key": item.trial.key,
                "dataset": item.trial.dataset,
                "target": item.trial.target,
                "method": item.trial.method,
                "seed": item.trial.seed,
                "model": item.trial.model,
                "folder": str(item.trial.folder),
                "state": item.state,
                "commands": [["dbr", *step.argv] for step in item.trial.steps],
                "log": str(item.trial.log),
                "record": item.record,
                "job": item.job,
                "hours": item.cost.hours if item.cost else None,
                "gpu_hours": item.cost.gpu_hours if item.cost else None,
                "estimated": bool(item.cost and not item.cost.measured),
            }
            for item in found
        ],
    }
