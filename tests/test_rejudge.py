"""`dbr build-chains --rejudge`: a store judged by an older judge, judged again without the teacher.

The store is a real build against the simulated teacher whose shards are then given
the verdicts the previous judge stored for such text: it ignored words after
</CONCLUSION> (so those chains were accepted) and called "It is a circle, not a
square" ambiguous (so those images had no chain).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.store.candidate_store import SHARD_GLOB, read_candidates
from domainbed_reasoning.builders.store.rejudge import rejudge
from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig
from typer.testing import CliRunner

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.chains.chain_format import parse_chain
from domainbed_reasoning.chains.verdict import judge_version
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

SPEC = get_spec("SynthDG")
IMAGES = 20
PLAN = SamplingPlan(candidates=2, max_rounds=2, temperatures=(0.5, 0.8))
DEAD_TEACHER = "http://127.0.0.1:9/v1"  # nothing listens: a re-judge must not ask


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=1, seed=0, size=32)
    return root


@pytest.fixture(scope="module")
def teacher(data_dir: Path) -> Iterator[str]:
    with run_sim_teacher(SimTeacherConfig(latency_ms=1.0, seed=5), data_dir) as url:
        yield url


def config(url: str, data_dir: Path, out: Path) -> BuildConfig:
    teacher = TeacherConfig(urls=(url,), model="sim-teacher", timeout=5.0, max_retries=0)
    return BuildConfig("SynthDG", data_dir, out, teacher, plan=PLAN, show_progress=False)


def other_class(name: str) -> str:
    return next(other for other in SPEC.classes if other != name)


def age_the_store(folder: Path, trailing: list[str], ambiguous: list[str]) -> None:
    """Give the shards the verdicts the previous judge stored, and its unrecorded version."""

    def old(text: str, reason: str, id_: str, label: str) -> tuple[str, str]:
        if id_ in trailing:
            return text + f"\nOn second thought, a {other_class(label)}.", reason
        if id_ in ambiguous:
            conclusion = f"It is a {label}, not a {other_class(label)}."
            return text.replace(f"<CONCLUSION>{label}</CONCLUSION>", f"<CONCLUSION>{conclusion}</CONCLUSION>"), "ambiguous"
        return text, reason

    for path in folder.glob(f"candidates/{SHARD_GLOB}"):
        frame = pl.read_parquet(path)
        labels = [id_.split("/")[2] for id_ in frame["id"]]
        rows = [
            old(text, reason, id_, label)
            for text, reason, id_, label in zip(
                frame["text"], frame["reason"], frame["id"], labels, strict=True
            )
        ]
        atomic.write_parquet(
            path,
            frame.with_columns(
                text=pl.Series([text for text, _ in rows]),
                reason=pl.Series([reason for _, reason in rows]),
            ),
        )
    stats = json.loads(artefacts.stats_path(folder).read_text())
    stats.pop("judge_version")
    atomic.write_json(artefacts.stats_path(folder), stats)


def test_rejudge_applies_the_current_judge_to_the_stored_answers(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    first = build_chains(config(teacher, data_dir, tmp_path))
    assert first["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    folder = artefacts.chains_dir(tmp_path, SPEC)
    ids = sorted(read_candidates(artefacts.candidates_dir(folder))["id"].unique())
    trailing, ambiguous = ids[:3], ids[3:5]
    age_the_store(folder, trailing, ambiguous)
    shard_schema = pl.read_parquet_schema(next(folder.glob(f"candidates/{SHARD_GLOB}")))

    with pytest.raises(UserError, match="judged by judge of an older dbr.* --rejudge"):
        build_chains(config(teacher, data_dir, tmp_path))

    done = CliRunner().invoke(
        app,
        ["build-chains", "SynthDG", "--rejudge", "--out", str(tmp_path), "--data-dir", str(data_dir),
         "--teacher-url", DEAD_TEACHER, "--candidates", "2", "--max-rounds", "2"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "10 of 40 candidates changed" in done.output

    changes = json.loads(artefacts.rejudge_path(folder).read_text())
    assert changes["transitions"] == {"accepted -> trailing_text": 6, "ambiguous -> accepted": 4}
    assert changes["newly_rejected_by_rule"] == {"trailing_text": 6}
    assert changes["images_newly_pending"] == trailing
    assert changes["images_newly_accepted"] == ambiguous
    assert (changes["judge_version"], changes["previous_judge_version"]) == (judge_version(), None)
    assert "accepted -> trailing_text | 6" in (folder / "rejudge.md").read_text()

    stats = json.loads(artefacts.stats_path(folder).read_text())
    assert stats["judge_version"] == judge_version() and stats["run"]["action"] == "rejudge"
    assert stats["images"] == {"attempted": IMAGES, "accepted": IMAGES - 3, "pending": 3}
    assert stats["rejections_by_rule"] == {"trailing_text": 6}
    report = (folder / "report.md").read_text()
    assert "| trailing_text | 6 | words follow </CONCLUSION>" in report
    assert "re-judged the 40 stored candidates" in report
    chains = pl.read_parquet(artefacts.chains_path(folder))
    assert set(chains["id"]) == set(ids) - set(trailing)
    kept = chains.filter(pl.col("id") == ambiguous[0]).row(0, named=True)
    assert kept["conclusion"] == parse_chain(kept["chain"]).conclusion
    assert kept["conclusion"].startswith(f"It is a {kept['class_name']}, not a")
    assert pl.read_parquet_schema(next(folder.glob(f"candidates/{SHARD_GLOB}"))) == shard_schema

    again = rejudge(config(DEAD_TEACHER, data_dir, tmp_path))
    assert (again.changed, again.shards_rewritten) == (0, 0)

    resumed = build_chains(config(teacher, data_dir, tmp_path))
    assert resumed["run"]["requests"] == 3  # round 2 of the three images that lost their chain
    assert resumed["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    assert resumed["rounds_needed"] == {"1": IMAGES - 3, "2": 3}


def test_rejudge_without_a_build_says_what_to_run(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing to re-judge in .*SynthDG.*`dbr build-chains SynthDG`"):
        rejudge(config(DEAD_TEACHER, data_dir, tmp_path))
