"""`dbr sweep`: bad input refused in one line with nothing started, the plan (--dry-run, --json), a
whole reduced sweep on SynthDG with the tiny model (2 held-out domains x 2 methods x 2 seeds) run by
real `dbr train`/`dbr eval` subprocesses, its resume, its report with trials, the Slurm path through
submitit's LocalExecutor, and the multi-node accelerate configuration started as two nodes."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from domainbed_reasoning.train.config import build_config, save_config
from domainbed_reasoning.train.sweep import launchers
from domainbed_reasoning.train.sweep.launchers import SlurmOptions, run_local_gpus, time_minutes
from domainbed_reasoning.train.sweep.plan import RemoteModel, SweepSpec, parse_seeds, plan
from domainbed_reasoning.train.sweep.sweep import LaunchOptions, sweep_command
from domainbed_reasoning.train.sweep.trial import ACCELERATE_DIR, command, visible_gpus
from rich.console import Console
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.serving.vllm_server import free_port

# A trial is two subprocesses (`dbr train`, `dbr eval`), each paying Python's start-up and torch's
# import, which is most of a tiny trial's time: 16 of them in the reduced sweep.
pytestmark = pytest.mark.timeout(1800)

TARGETS = ("sketch", "photo")
QUICK_EVAL = ["--direct-tokens", "4", "--max-new-tokens", "12"]


def sweep_args(
    export: Path, model: Path, out: Path, fast: dict, *extra: str, targets: tuple[str, ...] = TARGETS
) -> list[str]:
    settings = [arg for key, value in fast.items() for arg in ("--set", f"{key}={value}")]
    return [
        "sweep", "SynthDG", "--model", str(model), "--data", str(export), "--out", str(out),
        "--targets", ",".join(targets), "--methods", "cls,mtct", "--seeds", "0,1",
        *settings, *QUICK_EVAL, *extra,
    ]  # fmt: skip


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


# --- bad input: one line each, nothing started ------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ["--methods", "cls,sarr"],
            "unknown method(s) sarr: choose from mtct, cls, reasoning, rd-mldg",
        ),
        (
            ["--seeds", "0,one"],
            "seed list '0,one' does not parse: write whole numbers separated by commas",
        ),
        (["--seeds", "1,1"], "seed list '1,1' repeats a seed"),
        (
            ["--targets", "clipart"],
            "SynthDG has no domain 'clipart': choose from cartoon, painting, photo, sketch",
        ),
        (
            ["--set", "seed=3"],
            "--set seed=... conflicts with the sweep's own seed: give it with --seeds",
        ),
        (["--set", "learning_rat=1"], "unknown training setting(s) learning_rat"),
        (["--launcher", "pbs"], "unknown launcher 'pbs': choose one of local, local-gpus, slurm"),
        (["--partition", "gpu"], "--partition applies only to --launcher slurm"),
        (["--launcher", "slurm"], "--launcher slurm needs Slurm (sbatch, srun) on this machine"),
        (["--json"], "--json prints a plan: use it with --dry-run or --status"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(
    export_dir: Path,
    tiny_qwen2vl: Path,
    fast_train: dict,
    tmp_path: Path,
    change: list[str],
    message: str,
) -> None:
    out = tmp_path / "sweep"
    args = sweep_args(export_dir, tiny_qwen2vl, out, fast_train)
    for option in change[::2]:  # replace an option already given, or add it
        if option in args:
            index = args.index(option)
            del args[index : index + 2]
    result = invoke(args + change)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


def test_a_dataset_missing_from_the_export_is_refused(export_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("SynthDG", "PACS"), "some/model", tmp_path / "sweep", data=str(export_dir))
    with pytest.raises(
        UserError, match=r"has no PACS \(it has SynthDG\): export it with `dbr export PACS`"
    ):
        plan(spec)
    with pytest.raises(
        UserError, match="no DomainBed-Reasoning at .*nowhere.*: pass the export folder"
    ):
        plan(
            SweepSpec(
                ("SynthDG",), "some/model", tmp_path / "sweep", data=str(tmp_path / "nowhere")
            )
        )
    assert not (tmp_path / "sweep").exists()


def test_a_held_out_domain_missing_from_the_export_is_refused(
    export_dir: Path, tmp_path: Path
) -> None:
    export = tmp_path / "domainbed-reasoning"
    shutil.copytree(export_dir, export, ignore=shutil.ignore_patterns(".cache", "sketch-*"))
    card = (export / "README.md").read_text()  # the card without the sketch split (files and info)
    card = card.replace("  - split: sketch\n    path: SynthDG/sketch-*.parquet\n", "")
    (export / "README.md").write_text(re.sub(r"  - name: sketch\n(    .*\n)+", "", card))
    spec = SweepSpec(("SynthDG",), "some/model", tmp_path / "sweep", data=str(export))
    with pytest.raises(UserError, match="holds no SynthDG images of sketch: re-export SynthDG"):
        plan(spec)
    assert len(plan(replace(spec, targets=("photo",)))) == 12  # 4 methods x 3 seeds


def test_a_run_made_with_other_settings_is_refused(export_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(
        ("SynthDG",), "some/model", tmp_path / "sweep", data=str(export_dir), targets=("sketch",)
    )
    earlier = tmp_path / "sweep" / "train" / "seed-1" / "SynthDG" / "sketch" / "mtct"
    save_config(
        build_config({"method": "mtct", "seed": 1, "learning_rate": 1e-4}), earlier / "config.yaml"
    )
    with pytest.raises(UserError, match="mtct was trained with other settings \\(learning_rate\\)"):
        plan(spec)
    assert plan(replace(spec, overrides=("learning_rate=1e-4",), methods=("mtct",), seeds=(1,)))


def test_a_slurm_option_submitit_rejects_starts_nothing(export_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(
        ("SynthDG",), "some/model", tmp_path / "sweep", data=str(export_dir), targets=("sketch",)
    )
    for options, message in (
        (
            SlurmOptions(extra=("cpus_per_tsk=8",), cluster="local"),
            r"submitit rejects the Slurm options \(Unknown argument 'cpus_per_tsk' for executor 'slurm'",
        ),
        (SlurmOptions(extra=("qos",), cluster="local"), "--slurm 'qos' is not KEY=VALUE"),
        (SlurmOptions(time="1 day", cluster="local"), "--time '1 day' is not a Slurm time"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=message):
            sweep_command(spec, spec.out, LaunchOptions("slurm", options))
    assert not spec.out.exists()


def test_slurm_times_and_seed_lists_parse() -> None:
    assert [time_minutes(text) for text in ("90", "30:30", "24:00:00", "2-00", "1-12:30", "0:0:59")] == [
        90, 31, 1440, 2880, 2190, 1,
    ]  # fmt: skip
    assert parse_seeds(" 0, 1,2") == (0, 1, 2)


# --- launching: the commands, the GPUs ------------------------------------------------------------------


def test_training_on_several_gpus_goes_through_accelerate(export_dir: Path, tmp_path: Path) -> None:
    trial = next(
        t for t in plan(SweepSpec(("SynthDG",), "m", tmp_path, data=str(export_dir))) if t.seed == 0
    )
    train, evaluate = trial.steps
    assert command(train, 1) == [sys.executable, "-m", "domainbed_reasoning", *train.argv]
    assert command(train, 4)[:7] == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_DIR / "ddp.yaml"), "--num_processes", "4",
    ]  # fmt: skip
    assert command(evaluate, 4) == [sys.executable, "-m", "domainbed_reasoning", *evaluate.argv]
    assert (ACCELERATE_DIR / "ddp.yaml").is_file()
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_local_gpus_without_a_gpu_runs_one_trial_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    console = Console(record=True, width=200)
    monkeypatch.setattr(launchers, "console", console)
    assert run_local_gpus([]) == []
    printed = console.export_text()
    assert "local-gpus: no GPU visible, so one trial at a time on the CPU" in printed
    assert "local: 0 trial(s), one after another, each on the CPU (no GPU visible)" in printed


# --- the plan --------------------------------------------------------------------------------------------


def test_dry_run_prints_every_trial_as_json_and_starts_nothing(
    export_dir: Path, tiny_qwen2vl: Path, fast_train: dict, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    extra = (
        "--zero-shot",
        "--zero-shot-remote",
        "https://api.example.com/v1",
        "gpt-4o",
        "--dry-run",
        "--json",
    )
    result = invoke(sweep_args(export_dir, tiny_qwen2vl, out, fast_train, *extra))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    keys = [trial["key"] for trial in data["trials"]]
    zero_shot = f"zeroshot-{tiny_qwen2vl.name}"
    assert keys == [
        f"SynthDG.{target}.{run}"
        for target in TARGETS
        for run in (
            zero_shot,
            "zeroshot-gpt-4o",
            "cls.seed0",
            "cls.seed1",
            "mtct.seed0",
            "mtct.seed1",
        )
    ]
    assert data["totals"] == {
        "trials": 12, "done": 0, "to_run": 12, "measured_gpu_hours": 0,
        "estimated_gpu_hours_to_run": 0, "to_run_without_estimate": 12,
    }  # fmt: skip
    first = next(trial for trial in data["trials"] if trial["key"] == "SynthDG.sketch.mtct.seed1")
    assert first["folder"] == str(out / "train" / "seed-1" / "SynthDG" / "sketch" / "mtct")
    assert first["state"] == "pending" and first["hours"] is None
    train, evaluate = first["commands"]
    assert train[:4] == ["dbr", "train", "SynthDG", "--data"] and train[-2:] == ["--set", "seed=1"]
    assert {"--resume", "--no-evaluate"} <= set(train) and train[
        train.index("--method") + 1
    ] == "mtct"
    assert (
        evaluate[:3] == ["dbr", "eval", "--run"]
        and evaluate[evaluate.index("--max-new-tokens") + 1] == "12"
    )
    remote = next(
        trial for trial in data["trials"] if trial["key"] == "SynthDG.photo.zeroshot-gpt-4o"
    )
    (evaluate,) = remote["commands"]
    assert evaluate[evaluate.index("--engine") + 1 :][:3] == [
        "remote",
        "--base-url",
        "https://api.example.com/v1",
    ]
    assert remote["folder"] == str(out / "zeroshot" / "SynthDG" / "photo" / "zeroshot-gpt-4o")
    assert not out.exists()


# --- a whole sweep, for real -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(
    export_dir: Path, tiny_qwen2vl: Path, fast_train: dict, tmp_path_factory: pytest.TempPathFactory
):
    """1 held-out domain x 2 methods x 2 seeds, two trials at a time on two (CPU-backed) 'GPUs'."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    args = sweep_args(
        export_dir, tiny_qwen2vl, out, fast_train, "--launcher", "local-gpus", targets=("sketch",)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        result = invoke(args)
    assert result.exit_code == 0, result.output
    return out, args, result.output


def on_the_cpu(args: list[str]) -> list[str]:
    """The sweep's command with the default launcher (local: one trial after another)."""
    at = args.index("--launcher")
    return args[:at] + args[at + 2 :]


def _records(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (out / "trials").glob("*.json")}


@pytest.mark.slow
def test_every_trial_trained_and_evaluated_one_per_gpu(swept) -> None:
    out, _, printed = swept
    records = _records(out)
    assert len(records) == 4
    for key, record in records.items():
        dataset, target, method, seed = key.split(".")
        run = out / "train" / seed.replace("seed", "seed-") / dataset / target / method
        assert (run / "eval" / "metrics.json").is_file() and (
            run / "adapter" / "adapter_config.json"
        ).is_file()
        assert json.loads((run / "run.json").read_text())["target"] == target
        assert [step["name"] for step in record["steps"]] == ["train", "eval"] and record["whole"]
        assert record["gpus"] == 1 and record["returncode"] == 0
        log = Path(record["log"]).read_text()
        assert f"domainbed_reasoning eval --run {run} " in log and "--no-evaluate" in log
    # two trials at a time, one per GPU: no GPU ever ran two at once
    by_gpu: dict[str, list[tuple[str, str]]] = {}
    for record in records.values():
        by_gpu.setdefault(record["cuda_visible_devices"], []).append(
            (record["started"], record["finished"])
        )
    assert set(by_gpu) == {"0", "1"}
    for spans in by_gpu.values():
        spans.sort()
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
    assert "local-gpus: 4 trial(s), one per GPU at a time on GPU(s) 0,1" in printed
    assert "sweep finished" in printed


@pytest.mark.slow
def test_the_report_shows_two_trials_per_cell(swept, tmp_path: Path) -> None:
    out, _, _ = swept
    result = invoke(["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    for row in data["rows"]:
        synth = row["datasets"]["SynthDG"]
        assert (synth["held_out"], synth["trials"]) == (1, 2), row["label"]
        assert set(synth["domains"]) == {"sketch"}
        assert all(set(cell["seeds"]) == {"0", "1"} for cell in synth["domains"].values())
    assert {(row["label"].split(" (")[0], row["mode"]) for row in data["rows"]} == {
        ("CLS only", "direct"), ("MTCT", "reasoning"), ("MTCT", "direct"),
    }  # fmt: skip
    # n per domain: the whole held-out domain, chain or not (10 SynthDG images each in the test export)
    assert data["images"]["SynthDG"]["sketch"]["test_images"] == [10]
    assert " (2; 1/4 domains) |" in (tmp_path / "report" / "results.md").read_text()


@pytest.mark.slow
def test_status_and_a_rerun_skip_what_is_done(swept) -> None:
    out, args, _ = swept
    before = {key: record["finished"] for key, record in _records(out).items()}
    status = invoke(["sweep", "--status", "--json", "--out", str(out)])
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["totals"]["done"] == 4 and data["totals"]["to_run"] == 0
    assert all(trial["state"] == "done" and trial["hours"] > 0 for trial in data["trials"])
    again = invoke(on_the_cpu(args))
    assert again.exit_code == 0, again.output
    assert "0 to run" in again.output and "nothing to run" in again.output
    assert {key: record["finished"] for key, record in _records(out).items()} == before


@pytest.mark.slow
def test_a_killed_trial_resumes_and_an_unevaluated_one_is_only_evaluated(swept) -> None:
    out, args, _ = swept
    killed = out / "train" / "seed-1" / "SynthDG" / "sketch" / "mtct"
    unevaluated = out / "train" / "seed-0" / "SynthDG" / "sketch" / "cls"
    (killed / "metrics.json").unlink()  # training had not finished: its checkpoints remain
    (killed / "eval" / "metrics.json").unlink()
    (unevaluated / "eval" / "metrics.json").unlink()
    checkpoints = sorted(path.name for path in (killed / "checkpoints").glob("checkpoint-*"))
    weights = (unevaluated / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    plan_now = json.loads(invoke([*on_the_cpu(args), "--dry-run", "--json"]).stdout)
    states = {trial["key"]: trial["state"] for trial in plan_now["trials"]}
    assert (
        states["SynthDG.sketch.mtct.seed1"] == "partial"
        and states["SynthDG.sketch.cls.seed0"] == "trained"
    )
    # trials still to run are estimated from the measured ones of the same dataset and method
    estimated = next(t for t in plan_now["trials"] if t["key"] == "SynthDG.sketch.cls.seed0")
    assert estimated["estimated"] is False and estimated["hours"] > 0  # its own record is whole
    result = invoke(on_the_cpu(args))
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert [step["name"] for step in records["SynthDG.sketch.mtct.seed1"]["steps"]] == [
        "train",
        "eval",
    ]
    assert [step["name"] for step in records["SynthDG.sketch.cls.seed0"]["steps"]] == ["eval"]
    assert not records["SynthDG.sketch.cls.seed0"]["whole"]
    log = Path(records["SynthDG.sketch.mtct.seed1"]["log"]).read_text()
    assert "--resume" in log and (killed / "eval" / "metrics.json").is_file()
    assert (
        sorted(path.name for path in (killed / "checkpoints").glob("checkpoint-*")) == checkpoints
    )
    assert (unevaluated / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.slow
def test_more_seeds_are_estimated_from_the_measured_trials(swept) -> None:
    _, args, _ = swept
    seeds = args.index("--seeds")
    more = [*args[:seeds], "--seeds", "0,1,2", *args[seeds + 2 :], "--dry-run", "--json"]
    data = json.loads(invoke(on_the_cpu(more)).stdout)
    new = [trial for trial in data["trials"] if trial["seed"] == 2]
    assert len(new) == 2 and all(
        trial["state"] == "pending" and trial["estimated"] for trial in new
    )
    measured = [
        t["hours"]
        for t in data["trials"]
        if t["method"] == "cls" and t["seed"] != 2 and not t["estimated"]
    ]
    cls = next(trial for trial in new if trial["method"] == "cls")
    assert cls["hours"] == pytest.approx(sum(measured) / len(measured))
    assert data["totals"]["to_run"] == 2 and data["totals"]["to_run_without_estimate"] == 0


# --- the Slurm path, through submitit's local executor --------------------------------------------------


@pytest.mark.slow
def test_slurm_path_submits_records_job_ids_and_reports_failures(
    export_dir: Path, tiny_qwen2vl: Path, tmp_path: Path
) -> None:
    """The same submission Slurm gets, run by submitit's LocalExecutor: the base model zero-shot (passes)
    and a remote model at a dead URL (fails: the job fails and the status says so)."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    spec = SweepSpec(
        ("SynthDG",), str(tiny_qwen2vl), tmp_path / "sweep", methods=(), data=str(export_dir),
        targets=("sketch",), zero_shot=True, remote=RemoteModel(dead, "gpt-4o"),
        direct_tokens=4, reasoning_tokens=12,
    )  # fmt: skip
    options = SlurmOptions(gpus_per_job=0, time="15", extra=("cpus_per_task=1",), cluster="local")
    jobs = sweep_command(spec, spec.out, LaunchOptions("slurm", options))
    assert len(jobs) == 2
    entries = json.loads((spec.out / "slurm" / "jobs.json").read_text())
    assert {key: entry["job_id"] for key, entry in entries.items()} == {
        f"SynthDG.sketch.zeroshot-{tiny_qwen2vl.name}": jobs[0].job_id,
        "SynthDG.sketch.zeroshot-gpt-4o": jobs[1].job_id,
    }
    assert jobs[0].result()["returncode"] == 0
    with pytest.raises(Exception, match="`dbr eval` exited 2"):
        jobs[1].result()
    status = json.loads(invoke(["sweep", "--status", "--json", "--out", str(spec.out)]).stdout)
    states = {trial["key"]: (trial["state"], trial["job"]["job_id"]) for trial in status["trials"]}
    assert states == {
        f"SynthDG.sketch.zeroshot-{tiny_qwen2vl.name}": ("done", jobs[0].job_id),
        "SynthDG.sketch.zeroshot-gpt-4o": ("failed (exit 2, see log)", jobs[1].job_id),
    }
    log = (spec.out / "logs" / "SynthDG.sketch.zeroshot-gpt-4o.log").read_text()
    assert "error:" in log and "127.0.0.1" in log


# --- one run across nodes ---------------------------------------------------------------------------------

NODE_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {total.item()}", flush=True)
    """
)


def listening_port_no_client_can_take() -> int:
    """A free port below the kernel's ephemeral range. Node 1 retries its connection to node 0's
    port until node 0 listens; with an ephemeral port, one of those tries can be given that very
    port as its source and connect to itself, and node 0 then finds its port taken."""
    lowest = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(lowest - 8000, 1024), lowest), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.mark.slow
def test_the_multinode_config_joins_two_nodes(tmp_path: Path) -> None:
    """README's per-node command with train/accelerate/multinode.yaml, two 'nodes' on this machine (CPU,
    gloo): both join one process group of two ranks. A GPU cluster adds one process per GPU per node."""
    config = ACCELERATE_DIR / "multinode.yaml"
    assert "num_machines: 2" in config.read_text()
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    port = str(listening_port_no_client_can_take())

    def node(rank: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
            str(script),
        ]  # fmt: skip

    # Each node logs to a file: a node that waits for the other retries its connection with a
    # warning each time, and into a pipe nobody reads yet that would block it, and both with it.
    logs = [tmp_path / f"node-{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            nodes.append(subprocess.Popen(node(rank), stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    try:  # a node that fails leaves the other waiting for it: stop at the first failure
        while time.monotonic() < deadline:
            codes = [node.poll() for node in nodes]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.5)
    finally:
        for running in nodes:
            running.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert "rank 0 of 2: sum 3.0" in outputs[0] and "rank 1 of 2: sum 3.0" in outputs[1]
