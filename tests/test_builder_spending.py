"""The builder with a paid, rate-limited teacher: the dry run, the budget, tokens and cost in
the outputs, OpenAI's request fields, and 429 storms, against the simulated teacher."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.build_config import BuildConfig, Spending
from domainbed_reasoning.builders.cost import rate_limits
from domainbed_reasoning.builders.cost.rate_limits import RateLimits
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.store.candidate_store import read_candidates
from domainbed_reasoning.builders.transport.teacher_client import (
    MessagesTemplate,
    TeacherConfig,
    request_fields,
)
from typer.testing import CliRunner

from domainbed_reasoning import artefacts
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

SPEC = get_spec("SynthDG")
PRICES = Spending(price_in=1000.0, price_out=2000.0)  # dollars per million: cents per request here


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=2, seed=0, size=32)
    return root


@pytest.fixture
def teacher(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    settings = {"latency_ms": 5.0, "retry_after": 0.01, "seed": 3} | getattr(request, "param", {})
    with run_sim_teacher(SimTeacherConfig(**settings), data_dir) as url:
        yield url


def config(url: str, data_dir: Path, out: Path, **overrides) -> BuildConfig:
    teacher = TeacherConfig(
        urls=(url,),
        model="sim-teacher",
        timeout=5.0,
        max_retries=overrides.pop("max_retries", 0),
        concurrency=overrides.pop("concurrency", 4),
    )
    plan = SamplingPlan(candidates=2, max_rounds=2, temperatures=(0.5, 0.8))
    return BuildConfig(
        "SynthDG", data_dir, out, teacher, plan=plan, show_progress=False, workers=1, **overrides
    )


def requests_served(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)["requests"]


def test_openai_gets_max_completion_tokens_and_the_detail() -> None:
    openai = TeacherConfig(urls=("https://api.openai.com/v1",), model="gpt-4o", detail="low")
    local = TeacherConfig(urls=("http://127.0.0.1:8000/v1",), model="teacher")
    assert request_fields(openai, 4, 0.7, 1)["max_completion_tokens"] == 1024
    assert "max_tokens" not in request_fields(openai, 4, 0.7, 1)
    assert request_fields(local, 4, 0.7, 1)["max_tokens"] == 1024
    messages = json.loads(MessagesTemplate.for_prompt("p", True, detail="low").fill("data:x"))
    assert messages[0]["content"][1]["image_url"] == {"url": "data:x", "detail": "low"}
    with pytest.raises(UserError, match="--detail 'tiny'"):
        TeacherConfig(urls=("https://api.openai.com/v1",), model="gpt-4o", detail="tiny")


def test_a_dry_run_prints_the_estimate_and_sends_nothing(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "build-chains", "SynthDG", "--data-dir", str(data_dir), "--out", str(tmp_path),
            "--teacher-url", teacher, "--teacher-model", "sim-teacher", "--dry-run",
            "--candidates", "2", "--max-rounds", "3",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Dry run for SynthDG (online mode): nothing was sent." in result.output
    assert "40 (every image accepted at its next round) to 120" in result.output
    assert "no price known for model 'sim-teacher'" in result.output
    assert requests_served(teacher) == 0 and not artefacts.stats_path(tmp_path / "SynthDG").exists()


def test_after_a_trial_the_dry_run_uses_measured_figures(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    build_chains(config(teacher, data_dir, tmp_path, limit=8))
    served = requests_served(teacher)
    lines = "\n".join(
        CliRunner().invoke(
            app,
            [
                "build-chains", "SynthDG", "--data-dir", str(data_dir), "--out", str(tmp_path),
                "--teacher-url", teacher, "--teacher-model", "sim-teacher", "--dry-run",
                "--candidates", "2", "--max-rounds", "2", "--price-in", "1", "--price-out", "2",
            ],
        ).output.splitlines()
    )  # fmt: skip
    assert "images to resolve   32 of 40 selected" in lines
    assert "measured: mean of 8 answered requests" in lines and "expected requests" in lines
    assert "cost " in lines and requests_served(teacher) == served


def test_tokens_and_cost_reach_stats_and_report(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    stats = build_chains(config(teacher, data_dir, tmp_path, spending=PRICES))
    raw = read_candidates(artefacts.candidates_dir(tmp_path / "SynthDG"))
    requests = raw.filter(pl.col("candidate_index") == 0)
    expected = (requests["prompt_tokens"].sum() * 1000 + requests["completion_tokens"].sum() * 2000) / 1e6
    assert set(raw["mode"]) == {"online"}
    assert stats["cost"]["usd"] == pytest.approx(expected, rel=1e-3)
    assert stats["run"]["spent_usd"] == pytest.approx(expected, rel=1e-3)
    assert stats["cost"]["by_mode"]["online"]["requests"] == requests.height
    report = artefacts.report_path(tmp_path / "SynthDG").read_text()
    assert "## Tokens and cost" in report and f"${expected:,.2f}" in report
    assert "$1,000.00 in / $2,000.00 out per 1M tokens (--price-in/--price-out)" in report


def test_a_budget_stops_the_build_and_a_spent_one_sends_nothing(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    budget = Spending(price_in=1000.0, price_out=2000.0, budget_usd=1.0)
    stats = build_chains(config(teacher, data_dir, tmp_path, spending=budget, concurrency=2))
    assert "--budget-usd is spent" in stats["run"]["stopped"]
    assert 1.0 <= stats["cost"]["usd"] < 1.0 + 3 * 0.5  # at most the requests in flight past it
    assert stats["images"].get("pending", 0) + stats["run"]["unresolved"] > 0
    served = requests_served(teacher)
    with pytest.raises(UserError, match=r"budget spent: \$1\.\d\d of --budget-usd 1\.00 .* nothing was sent"):
        build_chains(config(teacher, data_dir, tmp_path, spending=budget))
    assert requests_served(teacher) == served
    more = Spending(price_in=1000.0, price_out=2000.0, budget_usd=1000.0)
    assert build_chains(config(teacher, data_dir, tmp_path, spending=more))["run"]["unresolved"] == 0


def test_a_budget_needs_a_price(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--budget-usd needs a price for model 'sim-teacher'"):
        build_chains(config(teacher, data_dir, tmp_path, spending=Spending(budget_usd=5.0)))


@pytest.fixture
def statuses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The HTTP status of every attempt, in the order the limiter saw them."""
    seen: list[int] = []
    observe = rate_limits.RateLimiter.observe
    monkeypatch.setattr(
        rate_limits.RateLimiter,
        "observe",
        lambda self, permit, status, headers: seen.append(status) or observe(self, permit, status, headers),
    )
    return seen


@pytest.mark.parametrize("teacher", [{"p_429": 0.3}], indirect=True)
def test_thirty_percent_429s_lose_nothing(
    teacher: str, data_dir: Path, tmp_path: Path, statuses: list[int]
) -> None:
    stats = build_chains(config(teacher, data_dir, tmp_path, max_retries=8))
    assert stats["run"]["unresolved"] == 0 and stats["images"]["accepted"] == 40
    assert 0.15 < statuses.count(429) / len(statuses) < 0.45


@pytest.mark.parametrize(
    "teacher", [{"rpm_limit": 600.0, "rate_headers": False, "latency_ms": 200.0}], indirect=True
)
def test_a_429_storm_cuts_concurrency_and_the_share_of_429s_falls(
    teacher: str, data_dir: Path, tmp_path: Path, statuses: list[int]
) -> None:
    """An account limit of 10 requests a second met with 32 in flight at 0.2 s a request:
    Retry-After and AIMD alone (no rate-limit headers, no limits typed in) bring the 429s
    down; nothing is lost."""
    stats = build_chains(config(teacher, data_dir, tmp_path, max_retries=10, concurrency=32))
    assert stats["run"]["unresolved"] == 0 and stats["images"]["accepted"] == 40
    half = len(statuses) // 2
    first, second = statuses[:half].count(429) / half, statuses[half:].count(429) / (len(statuses) - half)
    assert first >= 0.3, statuses
    assert second < first / 2, (first, second)


@pytest.mark.parametrize("teacher", [{"rpm_limit": 600.0}], indirect=True)
def test_limits_typed_in_keep_429s_away(
    teacher: str, data_dir: Path, tmp_path: Path, statuses: list[int]
) -> None:
    limits = RateLimits(requests_per_minute=540)  # under the account's 600
    stats = build_chains(config(teacher, data_dir, tmp_path, limits=limits, max_retries=4, concurrency=16))
    assert stats["run"]["unresolved"] == 0
    assert statuses.count(429) <= 2, statuses
