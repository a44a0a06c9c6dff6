"""The builder against a REAL vLLM server (CPU build) serving a tiny random VLM.

The tiny model's answers are gibberish, so every image must end exhausted with
parse reasons; what this proves is that vLLM accepts our request format (the prompt,
then the image as a data URL, `n` samples, temperature schedule, seed, top_p), that the
whole build path runs, that vLLM honours the seed we record, and that its prefix cache
reuses the prompt that precedes the image.

vLLM 0.32's CPU build kills its engine when it prefills a seeded request in parts ("CPU
Generator does not use offset"); `dbr serve-teacher` runs the CPU build without chunked prefill
and without prefix caching (vllm_server.CPU_BUILD_ARGS), and a real-size prompt is served so in
test_real_shapes.py. The tiny teacher here asks for prefix caching back, which its tiny images
make safe (conftest.TINY_TEACHER_ARGS).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import polars as pl
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.store.candidate_store import read_candidates
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy, image_data_url
from domainbed_reasoning.builders.transport.teacher_client import (
    TeacherConfig,
    TeacherPool,
    encode_messages,
)

from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.serving.vllm_server import Endpoint

TRANSPORT_REASONS = {RejectReason.REQUEST_ERROR.value}


def test_build_chains_against_real_vllm(vllm_teacher: Endpoint, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    generate(data_dir, images_per_class=1, seed=3)
    plan = SamplingPlan(candidates=2, max_rounds=2, temperatures=(0.8, 1.0))
    config = BuildConfig(
        dataset="SynthDG",
        data_dir=data_dir,
        out=tmp_path / "chains",
        teacher=TeacherConfig(
            urls=(vllm_teacher.base_url,), model=vllm_teacher.model, max_tokens=24, concurrency=1
        ),
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
    assert set(candidates["server_model"]) == {vllm_teacher.model}
    assert candidates.select("id", "round", "seed").unique().height == images * plan.max_rounds
    assert pl.read_parquet(artefacts.chains_path(folder)).height == 0
    assert json.loads(artefacts.stats_path(folder).read_text())["exhausted"].keys() == set(
        candidates["id"].unique()
    )


def teacher_bodies(data_dir: Path, count: int, text_first: bool) -> list[bytes]:
    spec = get_spec("SynthDG")
    paths = scan_dataset(spec, data_dir).frame["path"].to_list()[:count]
    prompt = load_prompt("teacher").render(classes=class_list(spec.classes))
    return [
        encode_messages(prompt, image_data_url(path, PayloadPolicy()).data_url, text_first)
        for path in paths
    ]


def tiny_teacher(endpoint: Endpoint) -> TeacherConfig:
    return TeacherConfig(urls=(endpoint.base_url,), model=endpoint.model, max_tokens=24)


def test_vllm_honours_the_seed_every_candidate_records(
    vllm_teacher: Endpoint, tmp_path: Path
) -> None:
    generate(tmp_path, images_per_class=1, seed=4)
    messages = teacher_bodies(tmp_path, 1, text_first=True)[0]

    async def sample(seed: int) -> tuple[str, ...]:
        async with TeacherPool(tiny_teacher(vllm_teacher)) as pool:
            reply = await pool.send(messages, 2, 1.0, seed)
        assert reply.error is None, reply.error
        return tuple(sample.text for sample in reply.samples)

    first, again, other = (asyncio.run(sample(seed)) for seed in (7, 7, 8))
    assert first == again, "the same seed gave other answers"
    assert first != other
    assert len(set(first)) > 1, "the n samples of one request must differ"


def prefix_cache(endpoint: Endpoint) -> tuple[float, float]:
    """(hits, queries) in tokens, from the server's Prometheus /metrics."""
    text = (
        urllib.request.urlopen(endpoint.base_url.removesuffix("/v1") + "/metrics").read().decode()
    )
    totals = []
    for name in ("hits", "queries"):
        pattern = rf"^vllm:prefix_cache_{name}_total(?:{{[^}}]*}})? (\S+)$"
        totals.append(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))
    return totals[0], totals[1]


def test_the_prompt_before_the_image_is_served_from_vllms_prefix_cache(
    vllm_teacher: Endpoint, tmp_path: Path
) -> None:
    """With the text first, every request after the first reuses the prompt's KV blocks; with
    the image first, only the chat template's few tokens could match."""
    generate(tmp_path, images_per_class=1, seed=5)

    async def send_all(bodies: list[bytes]) -> None:
        async with TeacherPool(tiny_teacher(vllm_teacher)) as pool:
            for body in bodies:
                assert (await pool.send(body, 1, 0.0, 0)).error is None

    rates = {}
    for text_first, images in ((False, slice(0, 6)), (True, slice(6, 12))):
        bodies = teacher_bodies(tmp_path, 12, text_first)[images]
        hits, queries = prefix_cache(vllm_teacher)
        asyncio.run(send_all(bodies))
        after_hits, after_queries = prefix_cache(vllm_teacher)
        rates[text_first] = (after_hits - hits) / (after_queries - queries)
    assert rates[True] > 0.5, rates
    assert rates[False] < 0.2, rates
