"""Running one trial: its `dbr` commands as subprocesses, on whatever GPUs the job was given.

Every launcher calls `run_trial`, in this process (local), in a thread per GPU
(local-gpus) or inside a Slurm job (submitit pickles the call), so a trial runs the
same way everywhere: each step whose last file is missing runs, training through
`accelerate launch` when several GPUs are visible, its output appended to the
trial's log. What was run, for how long and on how many GPUs goes to the trial's
record, which the plan's GPU-hour estimates are made from.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainbed_reasoning.train.sweep.plan import Step, Trial

from domainbed_reasoning import atomic

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "accelerate"
DBR = ("-m", "domainbed_reasoning")


class TrialFailed(RuntimeError):
    """A step exited non-zero; its log says why (usually one `error:` line)."""


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs a process started with `env` sees: CUDA_VISIBLE_DEVICES, else every one nvidia-smi lists."""
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        return [gpu.strip() for gpu in chosen.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    return [str(index) for index in range(count)] if listing.returncode == 0 else []


def command(step: Step, gpus: int) -> list[str]:
    """`python -m domainbed_reasoning ...`, or under `accelerate launch` for training on several GPUs."""
    if step.distributed and gpus > 1:
        launch = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE_DIR / "ddp.yaml"), "--num_processes", str(gpus),
        ]  # fmt: skip
        return [*launch, *DBR, *step.argv]
    return [sys.executable, *DBR, *step.argv]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_trial(trial: Trial, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run every unfinished step of `trial`; raises TrialFailed when one fails. Returns its record.

    The record is written when the trial starts and again when it ends, so one left
    without `finished` is a trial still running or killed. `whole` says every step ran
    in this attempt: only such records measure what a trial costs.
    """
    env = dict(os.environ if env is None else env)
    gpus = len(visible_gpus(env))
    record: dict[str, Any] = {
        "key": trial.key, "dataset": trial.dataset, "target": trial.target, "method": trial.method,
        "seed": trial.seed, "host": socket.gethostname(), "gpus": gpus,
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"), "started": _now(),
        "log": str(trial.log), "steps": [],
    }  # fmt: skip
    atomic.write_json(trial.record, record)
    trial.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for step in trial.steps:
        if step.done.is_file():
            continue
        record["steps"].append(_run_step(step, gpus, env, trial.log))
        if record["steps"][-1]["returncode"] != 0:
            break
    returncode = record["steps"][-1]["returncode"] if record["steps"] else 0
    record |= {
        "seconds": round(time.monotonic() - start, 1),
        "finished": _now(),
        "returncode": returncode,
        "whole": returncode == 0 and len(record["steps"]) == len(trial.steps),
    }
    atomic.write_json(trial.record, record)
    if returncode != 0:
        raise TrialFailed(
            f"{trial.key}: `dbr {record['steps'][-1]['name']}` exited {returncode}, see {trial.log}"
        )
    return record


def _run_step(step: Step, gpus: int, env: dict[str, str], log: Path) -> dict[str, Any]:
    argv = command(step, gpus)
    start = time.monotonic()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n=== {_now()} {' '.join(argv)}\n")
        out.flush()
        returncode = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    return {
        "name": step.name,
        "argv": argv,
        "returncode": returncode,
        "seconds": round(time.monotonic() - start, 1),
    }
