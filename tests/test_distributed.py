"""Several processes on the CPU, through `accelerate launch` (gloo): what a 4-GPU run relies on.

- MTCT: 2 processes x micro-batch b give the loss, the logged per-task losses and token
  counts, and the gradient of 1 process x 2b on the same rows.
- RD-MLDG: a round with 2 processes completes, and its self-labelled chains (from the same
  round-0 weights, same seed) are those of a 1-process run, each rank labelling its share.
  Rank 0 runs ahead to its first barrier before rank 1 looks at the run folder
  (workers/rank0_ahead.py), the interleaving in which a check made after rank 0's first
  writes fails.
- Evaluation with 2 processes gives exactly the 1-process predictions, every image scored.

Each launch starts fresh Python processes (about 30 s each on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from domainbed_reasoning.train.config import parse_overrides
from domainbed_reasoning.train.evaluation.evaluate import EvalSettings, evaluate_run
from domainbed_reasoning.train.sarr.sharding import part_path, shard_rows
from domainbed_reasoning.train.stages.run import train
from safetensors.torch import load_file

from domainbed_reasoning.artefacts import predictions_path
from domainbed_reasoning.serving.vllm_server import Endpoint, free_port

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"


def launch(
    processes: int, *argv: str, config: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`accelerate launch` on the CPU: torchrun's launcher with gloo, one process per rank
    (or the launcher `config` names, e.g. DeepSpeed's)."""
    if config is not None:
        mode = ["--config_file", str(config)]
    else:
        mode = ["--multi_gpu"] if processes > 1 else []
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode,
        "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *argv,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_mtct_with_two_processes_equals_one_process_with_twice_the_batch(
    tiny_llava: Path, tmp_path: Path
) -> None:
    """12 rows (5 images with both paths, 2 with the class-name path only) in one step."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, str(WORKERS / "mtct_step.py"), str(tiny_llava), str(one), "12")
    launch(2, str(WORKERS / "mtct_step.py"), str(tiny_llava), str(two), "6")
    logs = {
        name: json.loads((folder / "logs.json").read_text())
        for name, folder in (("one", one), ("two", two))
    }
    assert (logs["one"]["processes"], logs["two"]["processes"]) == (1, 2)
    first, second = logs["one"]["logs"][0], logs["two"]["logs"][0]
    assert second["num_tokens"] == first["num_tokens"]  # summed over both processes
    for key in ("loss", "loss_cls", "loss_reasoning"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key
    updates = [load_file(folder / "update.safetensors") for folder in (one, two)]
    whole = torch.cat([updates[0][name].flatten() for name in sorted(updates[0])])
    shared = torch.cat([updates[1][name].flatten() for name in sorted(updates[0])])
    assert whole.norm() > 0
    # float32 over differently padded micro-batches: ~0.2% apart; a loss normalised per process
    # (or DDP's average not undone) would be 50% or more off
    assert (shared - whole).norm() < 1e-2 * whole.norm()


SARR_2P = [
    "method=rd-mldg", "sarr_rounds=1", "max_steps=1", "max_train_images=8",
    "per_device_batch_size=2", "global_batch_size=4", "gradient_checkpointing=false",
    "save_steps=1", "logging_steps=1", "learning_rate=1e-2", "dataloader_num_workers=0",
    "self_label_candidates=2", "self_label_temperature=1.0", "self_label_max_new_tokens=12",
    "generation_batch_size=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_process_round(
    export_dir: Path, tiny_qwen2vl: Path, train_request, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(1-process rd-mldg run, 2-process rd-mldg run), both starting from one MTCT round 0."""
    root = tmp_path_factory.mktemp("distributed")
    settings = parse_overrides(SARR_2P)
    mtct = train(
        train_request(export_dir, tiny_qwen2vl, root / "mtct", **(settings | {"method": "mtct"}))
    ).run_dir
    one = train(
        train_request(
            export_dir, tiny_qwen2vl, root / "one", **settings, sarr_round0_from=str(mtct)
        )
    ).run_dir
    launch(
        2, str(WORKERS / "rank0_ahead.py"), str(root / "rank0-at-barrier"),
        "train", "SynthDG", "--data", str(export_dir),
        "--target", "sketch", "--model", str(tiny_qwen2vl), "--out", str(root / "two"),
        "--method", "rd-mldg", "--no-evaluate",
        *(arg for pair in [*SARR_2P, f"sarr_round0_from={mtct}"] for arg in ("--set", pair)),
    )  # fmt: skip
    return one, root / "two" / "SynthDG" / "sketch" / "rd-mldg"


def test_a_round_with_two_processes_keeps_the_chains_of_one_process(
    two_process_round: tuple[Path, Path],
) -> None:
    one, two = two_process_round
    for run_dir in (one, two):
        assert (run_dir / "metrics.json").is_file() and (run_dir / "adapter").is_dir()
    labels = [pl.read_parquet(run / "round-1" / "self_labels.parquet") for run in (one, two)]
    assert labels[0].height == 8 and labels[0].equals(labels[1])
    assert not list((two / "round-1").glob("*.rank-*"))  # the ranks' parts were merged away
    stats = json.loads((two / "round-1" / "self_label_stats.json").read_text())
    assert stats["images"] == 8 and stats["candidates"] == 16


def test_evaluation_with_two_processes_scores_every_image_like_one_process(
    two_process_round: tuple[Path, Path], export_dir: Path, tmp_path: Path
) -> None:
    _, run_dir = two_process_round
    settings = {"direct_tokens": 4, "reasoning_tokens": 8, "progress": False}
    single = evaluate_run(run_dir, EvalSettings(**settings, cache_dir=tmp_path / "hf"))
    expected = {
        (split, mode): pl.read_parquet(predictions_path(run_dir / "eval", split, mode))
        for split in ("test", "validation")
        for mode in ("direct", "reasoning")
    }
    shutil.rmtree(run_dir / "eval")
    launch(
        2, str(WORKERS / "rank0_ahead.py"), str(tmp_path / "rank0-at-barrier"),
        "eval", "--run", str(run_dir), "--direct-tokens", "4", "--max-new-tokens", "8", "--no-progress",
    )  # fmt: skip
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["results"] == json.loads(json.dumps(single["results"]))
    for (split, mode), frame in expected.items():
        assert pl.read_parquet(predictions_path(run_dir / "eval", split, mode)).equals(frame)
    manifest = pl.read_parquet(export_dir.parent / "chains" / "SynthDG" / "manifest.parquet")
    assert metrics["results"]["test"]["direct"]["n"] == manifest.filter(
        pl.col("domain") == "sketch"
    ).height


AUTO_DEEPSPEED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def zero3_launch_config(folder: Path, init_flag: bool) -> Path:
    """An accelerate config for DeepSpeed ZeRO-3 on 2 CPU processes, every parameter partitioned;
    `init_flag` builds each model sharded from the start (`zero3_init_flag`), as train/accelerate/zero3.yaml does."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional extra: pip install -e '.[deepspeed]'")
    ds_config = folder / "ds_zero3.json"
    ds_config.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 0,  # partition even the small LoRA matrices
                    "stage3_gather_16bit_weights_on_model_save": True,
                },
                **dict.fromkeys(AUTO_DEEPSPEED_KEYS, "auto"),
            }
        )
    )
    accelerate_config = folder / "zero3.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds_config}\n  zero3_init_flag: {str(init_flag).lower()}\n"
        "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nuse_cpu: false\n"
    )
    return accelerate_config


def test_zero3_saves_whole_lora_weights_gathered_from_every_rank(
    tiny_llava: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-3 on the CPU (gloo), every parameter partitioned: the adapter `save_weights`
    writes holds every LoRA tensor whole, equal to the gathered parameters; the main process
    alone would have written empty tensors."""
    accelerate_config = zero3_launch_config(tmp_path, init_flag=False)
    out = tmp_path / "out"
    launch(2, str(WORKERS / "zero3_save.py"), str(tiny_llava), str(out), config=accelerate_config)
    report = json.loads((out / "report.json").read_text())
    assert (report["zero_stage"], report["processes"]) == (3, 2)
    assert sum(report["local"].values()) == 0  # rank 0 holds no LoRA element itself
    assert report["alone_elements"] == 0  # what the main process alone used to save
    assert report["matched"] == len(report["saved"]) == len(report["local"]) > 0
    assert report["equal"] and report["saved_elements"] > 0


def test_after_zero3_training_evaluation_and_a_sarr_round_load_whole_models(
    export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    """`dbr train --method rd-mldg` under ZeRO-3 with zero3_init_flag (2 processes): round 0 trains
    sharded, then round 1's self-labelling, round 1's training and the default evaluation each
    load a model; outside training none may be built sharded (a merge over empty shards fails).
    Round 1 continues round 0's adapter (`sarr_init: continue`), which must keep the base's dtype
    under ZeRO-3; a fresh adapter on the base trains as round 0 does."""
    accelerate_config = zero3_launch_config(tmp_path, init_flag=True)
    launch(
        2, "-m", "domainbed_reasoning", "train", "SynthDG", "--data", str(export_dir),
        "--target", "sketch", "--model", str(tiny_llava), "--out", str(tmp_path / "runs"),
        "--method", "rd-mldg", *(arg for pair in SARR_2P for arg in ("--set", pair)),
        "--set", "self_label_max_new_tokens=8", "--set", "sarr_init=continue",
        config=accelerate_config,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "SynthDG" / "sketch" / "rd-mldg"
    labels = pl.read_parquet(run_dir / "round-1" / "self_labels.parquet")
    assert labels.height == 8
    assert (run_dir / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["results"]["test"]["direct"]["n"] > 0


def test_a_resumed_share_redraws_the_first_tries_samples(vllm_teacher: Endpoint, tmp_path: Path) -> None:
    """Two processes sample a split from a real vLLM server; a run killed after rank 0's part
    is resumed, and rank 1, redoing its share alone beside other requests than the first time,
    draws the very same samples: each request's seed comes from (run seed, image id, round)."""
    worker = (str(WORKERS / "seeded_share.py"), vllm_teacher.base_url, vllm_teacher.model)
    first = tmp_path / "first"
    launch(2, *worker, str(first))
    answers = pl.read_parquet(first / "answers.parquet")
    assert answers.height == 6 and answers["texts"].list.len().to_list() == [2] * 6
    assert len(set(map(tuple, answers["texts"].to_list()))) > 1

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    rank_0 = shard_rows(answers.height, 0, 2)
    part = part_path(resumed / "answers.parquet", 0, 2)
    answers.slice(rank_0.start, len(rank_0)).write_parquet(part)
    launch(2, *worker, str(resumed))
    assert pl.read_parquet(resumed / "answers.parquet").equals(answers)
