"""The builder against a REAL vLLM server (CPU build) serving a tiny random VLM.

The tiny model's answers are gibberish, so every image must end exhausted with
parse reasons; what this proves is that vLLM accepts our request format (image
data URL, `n` samples, temperature schedule) and that the whole build path runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from builders.build import build_chains
from builders.build_config import BuildConfig
from builders.candidate_store import read_candidates
from builders.rejection_sampling import SamplingPlan
from builders.teacher_client import TeacherConfig
from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.serving.vllm_server import Endpoint

TRANSPORT_REASONS = {RejectReason.REQUEST_ERROR.value}


def test_build_chains_against_real_vllm(vllm_teacher: Endpoint, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    generate(data_dir, images_per_class=1, seed=3)
    plan = SamplingPlan(candidates=3, max_rounds=2, temperatures=(0.8, 1.0))
    config = BuildConfig(
        dataset="SynthDG",
        data_dir=data_dir,
        out=tmp_path / "chains",
        teacher=TeacherConfig(urls=(vllm_teacher.base_url,), model=vllm_teacher.model, max_tokens=24),
        plan=plan,
        show_progress=False,
    )
    stats = build_chains(config)

    spec = get_spec("SynthDG")
    images = len(spec.domains) * len(spec.classes)
    folder = artefacts.chains_dir(tmp_path / "chains", spec)
    candidates = read_candidates(artefacts.candidates_dir(folder))
    assert stats["images"] == {"attempted": images, "exhausted": images}
    assert candidates.height == images * plan.max_rounds * plan.candidates
    reasons = set(candidates["reason"].unique())
    assert reasons and not reasons & TRANSPORT_REASONS, f"vLLM refused requests: {reasons}"
    assert reasons <= {reason.value for reason in RejectReason}
    by_round = candidates.group_by("round").agg(pl.col("temperature").unique())
    assert dict(by_round.iter_rows()) == {1: [0.8], 2: [1.0]}
    assert candidates["completion_tokens"].min() > 0
    assert pl.read_parquet(artefacts.chains_path(folder)).height == 0
    assert json.loads(artefacts.stats_path(folder).read_text())["exhausted"].keys() == set(
        candidates["id"].unique()
    )
