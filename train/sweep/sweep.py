"""`dbr sweep`: plan a sweep, show it (`--dry-run`, `--status`), or run what is left of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from domainbed_reasoning.train.sweep.launchers import (
    SlurmOptions,
    check_launcher,
    run_local,
    run_local_gpus,
    slurm_parameters,
    submit,
)
from domainbed_reasoning.train.sweep.plan import DONE, SweepSpec, load_spec, plan, save_spec
from domainbed_reasoning.train.sweep.status import (
    TrialStatus,
    print_commands,
    print_status,
    status_json,
    statuses,
)

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console

ACTIONS = ("run", "dry-run", "status")


@dataclass(frozen=True)
class LaunchOptions:
    launcher: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


def show(found: list[TrialStatus], title: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status_json(found), indent=2, default=str))
        return
    print_status(found, title)
    if found:
        print_commands(found[-1].trial)


def sweep_command(
    spec: SweepSpec | None,
    out: Path,
    launch: LaunchOptions,
    action: str = "run",
    as_json: bool = False,
) -> list[TrialStatus] | list[submitit.Job]:
    """Check everything, then show the plan, or run the unfinished trials with the chosen launcher.

    Nothing starts before every check has passed: the request (plan), the launcher's
    options and, on Slurm, submitit's own checks of the job parameters.
    """
    if as_json and action == "run":
        raise UserError("--json prints a plan: use it with --dry-run or --status")
    if spec is None:
        if action != "status":
            raise UserError(
                "name the datasets to sweep, e.g. `dbr sweep PACS VLCS --model ...`, "
                "or pass --status to see the sweep in --out"
            )
        spec = load_spec(out)
    check_launcher(launch.launcher, launch.slurm)
    trials = plan(spec)
    if action != "run":
        found = statuses(trials)
        show(
            found,
            f"sweep {spec.out}" + (" (dry run: nothing started)" if action == "dry-run" else ""),
            as_json,
        )
        return found
    parameters = slurm_parameters(launch.slurm) if launch.launcher == "slurm" else None
    found = statuses(trials)
    todo = [item.trial for item in found if item.state != DONE and not item.held]
    save_spec(spec)
    held = sum(1 for item in found if item.held)
    console.print(
        f"sweep {spec.out}: {len(trials)} trials, {len(trials) - len(todo) - held} done, "
        f"{held} held by Slurm jobs, {len(todo)} to run",
        highlight=False,
    )
    if not todo:
        console.print(f"nothing to run: `dbr report {spec.out}` tabulates it", highlight=False)
        return found
    if parameters is not None:
        return submit(todo, launch.slurm, parameters, spec.out)
    failures = run_local(todo) if launch.launcher == "local" else run_local_gpus(todo)
    found = statuses(trials)
    print_status(found, f"sweep {spec.out}")
    if failures:
        raise UserError(
            f"{len(failures)} of {len(todo)} trial(s) failed, first: {failures[0]}; "
            "fix it and run the same command again (finished trials are skipped)"
        )
    console.print(
        f"[green]sweep finished[/]: `dbr report {spec.out}` tabulates it", highlight=False
    )
    return found
