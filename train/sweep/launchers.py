"""The engines that run a sweep's trials; none of them is a scheduler of ours.

- `local`: one trial after another on this machine, each using every visible GPU
  (training through `accelerate launch`).
- `local-gpus`: one trial per GPU at a time, by a thread pool over a queue of free
  GPU ids; each trial sees only its GPU. Without a GPU it degrades to `local`.
- `slurm`: one Slurm job per trial through submitit (a job array), with the
  partition, GPUs per job, time limit and account as options and any other sbatch
  setting submitit knows as `--slurm KEY=VALUE`. Job ids go to
  `<sweep>/slurm/jobs.json`, which `dbr sweep --status` reads. `cluster="local"`
  runs the very same submission through submitit's LocalExecutor (the tests do).
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import submitit
from domainbed_reasoning.train.config import parse_overrides
from domainbed_reasoning.train.sweep.plan import Trial
from domainbed_reasoning.train.sweep.trial import TrialFailed, run_trial, visible_gpus
from submitit.core.utils import FailedSubmissionError

from domainbed_reasoning import atomic
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console

LAUNCHERS = ("local", "local-gpus", "slurm")
JOBS_FILE = "jobs.json"
ACTIVE_JOB_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
}
JOB_CLASSES = {"slurm": submitit.SlurmJob, "local": submitit.LocalJob}


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpus_per_job: int = 1
    time: str = "24:00:00"
    account: str | None = None
    extra: tuple[str, ...] = ()  # KEY=VALUE: any other parameter submitit's SlurmExecutor takes
    cluster: str = "slurm"


def check_launcher(launcher: str, slurm: SlurmOptions) -> None:
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    given = [
        flag
        for flag, value in (
            ("--partition", slurm.partition),
            ("--account", slurm.account),
            ("--slurm", slurm.extra),
        )
        if value
    ]
    if launcher != "slurm" and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UserError(
            f"{', '.join(given)} {verb} only to --launcher slurm: drop it or launch on Slurm"
        )


def slurm_folder(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "slurm"


# --- Slurm through submitit -------------------------------------------------------------------------


def time_minutes(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) as whole minutes."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    try:
        numbers = [int(part) for part in parts]
        day_count = int(days) if days else 0
    except ValueError:
        numbers = []
    if not numbers or len(numbers) > 3 or any(n < 0 for n in numbers):
        raise UserError(
            f"--time {text!r} is not a Slurm time: write minutes or [D-]HH:MM:SS, e.g. 24:00:00"
        )
    if days:
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: [0, numbers[0], 0], 2: [0, *numbers], 3: numbers}[
            len(numbers)
        ]
    total = math.ceil(((day_count * 24 + hours) * 60 + minutes) + seconds / 60)
    if total < 1:
        raise UserError(f"--time {text!r} leaves no time to run: give at least one minute")
    return total


def extra_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """`--slurm KEY=VALUE` pairs, typed as `--set` values are (YAML scalars)."""
    malformed = [pair for pair in pairs if "=" not in pair or not pair.partition("=")[0].strip()]
    if malformed:
        raise UserError(
            f"--slurm {malformed[0]!r} is not KEY=VALUE: write e.g. --slurm qos=high --slurm cpus_per_task=16"
        )
    return parse_overrides(list(pairs))


def slurm_parameters(options: SlurmOptions) -> dict[str, Any]:
    """The job parameters, checked by submitit itself (in a scratch folder) before any job exists."""
    if options.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError(
            "--launcher slurm needs Slurm (sbatch, srun) on this machine: run the sweep from a login node, "
            "or use --launcher local or local-gpus"
        )
    if options.gpus_per_job < 0:
        raise UserError(f"--gpus-per-job must be 0 or more, not {options.gpus_per_job}")
    parameters = {
        "name": "dbr-sweep",
        "timeout_min": time_minutes(options.time),
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": options.gpus_per_job or None,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        **{f"slurm_{key}": value for key, value in extra_parameters(options.extra).items()},
    }
    parameters = {key: value for key, value in parameters.items() if value is not None}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            submitit.AutoExecutor(folder=scratch, cluster=options.cluster).update_parameters(
                **parameters
            )
        except (ValueError, NameError, AssertionError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"submitit rejects the Slurm options ({reason}): fix --slurm, --partition, --time or --account"
            ) from None
    return parameters


def submit(
    trials: Sequence[Trial], options: SlurmOptions, parameters: dict[str, Any], sweep_dir: Path
) -> list[submitit.Job]:
    """One job per trial, as one job array; each job id is recorded under its trial's key."""
    executor = submitit.AutoExecutor(folder=slurm_folder(sweep_dir), cluster=options.cluster)
    executor.update_parameters(**parameters)
    try:
        with executor.batch():
            jobs = [executor.submit(run_trial, trial) for trial in trials]
    except (subprocess.CalledProcessError, FailedSubmissionError) as err:
        output = getattr(err, "output", None) or str(err)
        reason = (output.decode() if isinstance(output, bytes) else output).strip().splitlines()[0]
        raise UserError(
            f"sbatch refused the sweep's jobs ({reason}): fix the Slurm options and run again"
        ) from None
    submitted = datetime.now(UTC).isoformat(timespec="seconds")
    entries = read_jobs(sweep_dir) | {
        trial.key: {"job_id": job.job_id, "cluster": executor.cluster, "submitted": submitted}
        for trial, job in zip(trials, jobs, strict=True)
    }
    atomic.write_json(slurm_folder(sweep_dir) / JOBS_FILE, entries)
    for trial, job in zip(trials, jobs, strict=True):
        console.print(f"  submitted {trial.key}: job {job.job_id}", highlight=False)
    return jobs


def read_jobs(sweep_dir: Path) -> dict[str, dict[str, str]]:
    path = slurm_folder(sweep_dir) / JOBS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def job_state(sweep_dir: Path, entry: dict[str, str]) -> str:
    """What the cluster says of a recorded job (Slurm asks sacct); UNKNOWN when it cannot say."""
    job_class = JOB_CLASSES.get(entry.get("cluster", ""))
    if job_class is None:
        return "UNKNOWN"
    return job_class(folder=slurm_folder(sweep_dir), job_id=entry["job_id"]).state


# --- this machine -----------------------------------------------------------------------------------


def _describe(gpus: list[str]) -> str:
    return f"GPU(s) {','.join(gpus)}" if gpus else "the CPU (no GPU visible)"


def run_local(trials: Sequence[Trial]) -> list[str]:
    """One trial after another, each on every visible GPU; returns the failures, one line each."""
    gpus = visible_gpus(os.environ)
    console.print(
        f"local: {len(trials)} trial(s), one after another, each on {_describe(gpus)}",
        highlight=False,
    )
    failures = []
    for index, trial in enumerate(trials, 1):
        console.print(f"[{index}/{len(trials)}] {trial.key}", highlight=False)
        try:
            run_trial(trial)
        except TrialFailed as err:
            failures.append(str(err))
    return failures


def run_local_gpus(trials: Sequence[Trial]) -> list[str]:
    """One trial per free GPU at a time; returns the failures, one line each."""
    gpus = visible_gpus(os.environ)
    if not gpus:
        console.print(
            "local-gpus: no GPU visible, so one trial at a time on the CPU", highlight=False
        )
        return run_local(trials)
    console.print(
        f"local-gpus: {len(trials)} trial(s), one per GPU at a time on {_describe(gpus)}",
        highlight=False,
    )
    free: queue.Queue[str] = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def on_a_free_gpu(trial: Trial) -> None:
        gpu = free.get()
        try:
            console.print(f"GPU {gpu}: {trial.key}", highlight=False)
            run_trial(trial, os.environ | {"CUDA_VISIBLE_DEVICES": gpu})
        finally:
            free.put(gpu)

    failures = []
    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        for future in as_completed([pool.submit(on_a_free_gpu, trial) for trial in trials]):
            try:
                future.result()
            except TrialFailed as err:
                failures.append(str(err))
    return failures
