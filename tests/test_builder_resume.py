"""Crash safety: `kill -9` in the middle of `dbr build-chains`, re-run, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.store.candidate_store import KEY, SHARD_GLOB

from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

IMAGES = 60  # 3 per (domain, class)


def command(url: str, data_dir: Path, out: Path, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "domainbed_reasoning", "build-chains", "SynthDG",
        "--data-dir", str(data_dir), "--out", str(out), "--teacher-url", url,
        "--teacher-model", "sim-teacher", "--candidates", "2", "--max-rounds", "4",
        "--concurrency", "4", "--no-progress", "--workers", str(workers),
    ]  # fmt: skip


def children(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (Linux /proc), zombies excepted."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_run_then_rerun_resolves_every_image_exactly_once(
    tmp_path: Path, workers: int
) -> None:
    data_dir, out = tmp_path / "data", tmp_path / "out"
    generate(data_dir, images_per_class=3, seed=0, size=32)
    shards = out / "SynthDG" / "candidates"
    teacher = SimTeacherConfig(latency_ms=150, p_wrong=0.4, p_malformed=0.1, seed=5)
    with run_sim_teacher(teacher, data_dir) as url:
        victim = subprocess.Popen(
            command(url, data_dir, out, workers), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while (
            not list(shards.glob(SHARD_GLOB))
            and victim.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert victim.poll() is None, (
            f"the build ended before it could be killed: {victim.stderr.read()!r}"
        )
        helpers = children(victim.pid)
        assert len(helpers) >= workers * (workers > 1), "the workers were not running"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        deadline = time.monotonic() + 1  # the kernel kills them at once; orphans would run on
        while any(map(alive, helpers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, helpers)), "a worker outlived the killed build"
        before = pl.read_parquet(shards / SHARD_GLOB)
        assert 0 < before["id"].n_unique() < IMAGES, "the kill did not land mid-run"
        assert not (out / "SynthDG" / "chains.parquet").exists()

        rerun = subprocess.run(
            command(url, data_dir, out, workers),
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rerun.returncode == 0, rerun.stderr

    raw = pl.read_parquet(shards / SHARD_GLOB)
    assert raw.height == raw.unique(subset=list(KEY)).height, "a candidate was recorded twice"
    assert raw.join(before, on=list(KEY), how="semi").height == before.height, (
        "a flushed candidate was lost"
    )
    rounds = raw.group_by("id").agg(pl.col("round").unique().sort())
    assert all(r == list(range(1, len(r) + 1)) for r in rounds["round"].to_list()), (
        "a round was skipped or repeated"
    )
    chains = pl.read_parquet(out / "SynthDG" / "chains.parquet")
    stats = json.loads((out / "SynthDG" / "stats.json").read_text())
    assert chains["id"].is_unique().all()
    assert stats["images"]["attempted"] == IMAGES and stats["images"].get("pending", 0) == 0
    assert stats["images"].get("accepted", 0) + stats["images"].get("exhausted", 0) == IMAGES
    accepted_ids = set(raw.filter(pl.col("reason") == "accepted")["id"])
    assert set(chains["id"]) == accepted_ids
    resumed = raw.join(before, on=list(KEY), how="anti")
    assert stats["run"]["requests"] == resumed.filter(pl.col("candidate_index") == 0).height
