"""What one `dbr build-chains` is asked to do: its dataset, teacher, sampling plan, shard,
mode (online or batch) and what it may spend."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from domainbed_reasoning.builders.cost.pricing import MODES, Price, resolve_price
from domainbed_reasoning.builders.cost.rate_limits import RateLimits
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan, parse_temperatures
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy
from domainbed_reasoning.builders.transport.replicas import HealthPolicy
from domainbed_reasoning.builders.transport.teacher_client import (
    TeacherConfig,
    resolve_api_key,
    url_host,
)

from domainbed_reasoning.errors import UserError

SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Machine `index` of `count` (0-based) takes the ids whose stable hash falls on it."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = SHARD_SPEC.match(text)
        if not match or not int(match[1]) < int(match[2]):
            raise UserError(
                f"--shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4 for the first of four machines"
            )
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Spending:
    """`--price-in` / `--price-out` (dollars per million tokens) and `--budget-usd`."""

    price_in: float | None = None
    price_out: float | None = None
    budget_usd: float | None = None

    def prices(self, model: str) -> dict[str, Price | None]:
        """The price of each mode: the user's for both, else the model's list prices."""
        return {
            mode: resolve_price(model, self.price_in, self.price_out, batch=mode == "batch")
            for mode in MODES
        }


@dataclass(frozen=True)
class BatchRunner:
    """`--mode batch`: the Batch API at --teacher-url, polled every `poll_s`; or, given
    --teacher-checkpoint, vLLM's offline runner on it, with `vllm_args` passed on."""

    vllm_args: tuple[str, ...] = ()
    poll_s: float = 30.0


@dataclass(frozen=True)
class BuildConfig:
    dataset: str
    data_dir: Path
    out: Path
    teacher: TeacherConfig
    plan: SamplingPlan = field(default_factory=SamplingPlan)
    policy: PayloadPolicy = field(default_factory=PayloadPolicy)
    shard: Shard = field(default_factory=Shard)
    limit: int | None = None
    flush_rows: int = 2048
    flush_seconds: float = 2.0
    show_progress: bool = True
    workers: int = 0  # 0: chosen from the free cores (workers.py)
    allow_mixed: bool = False  # add to a store that holds another teacher's or prompt's answers
    mode: str = "online"
    dry_run: bool = False
    spending: Spending = field(default_factory=Spending)
    limits: RateLimits = field(default_factory=RateLimits)
    batch: BatchRunner = field(default_factory=BatchRunner)
    teacher_checkpoint: str | None = None  # the local teacher's weights: its processor, run_batch

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r}: choose online or batch")
        if self.workers < 0:
            raise UserError(
                f"--workers {self.workers}: must be 0 (choose from the free cores) or more"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(
                f"--limit {self.limit}: must be at least 1 (leave it out for every image)"
            )
        if not self.teacher.urls:
            raise UserError(
                "no --teacher-url given: pass e.g. --teacher-url http://127.0.0.1:8000/v1"
            )
        for url in self.teacher.urls:
            url_host(url)


@dataclass(frozen=True)
class BuildOptions:
    """`dbr build-chains`' flags as typed, one field a flag; `config()` groups them into the
    BuildConfig the build takes, so the command line stays a list of flags."""

    dataset: str
    data_dir: Path
    out: Path
    teacher_url: list[str]
    teacher_model: str
    candidates: int
    max_rounds: int
    temperatures: str
    top_p: float
    seed: int
    concurrency: int
    timeout: float
    max_retries: int
    outage_wait: float
    shard: str
    limit: int | None
    max_side: int
    max_tokens: int
    api_key_env: str | None
    allow_mixed: bool
    progress: bool
    workers: int
    rejudge: bool
    mode: str
    dry_run: bool
    budget_usd: float | None
    max_requests_per_minute: float | None
    max_tokens_per_minute: float | None
    detail: str
    price_in: float | None
    price_out: float | None
    teacher_checkpoint: str | None
    vllm_arg: list[str]
    batch_poll_s: float

    def teacher(self) -> TeacherConfig:
        return TeacherConfig(
            urls=tuple(self.teacher_url),
            model=self.teacher_model,
            api_key=resolve_api_key(self.api_key_env),
            api_key_explicit=self.api_key_env is not None,
            timeout=self.timeout,
            max_retries=self.max_retries,
            concurrency=self.concurrency,
            max_tokens=self.max_tokens,
            top_p=self.top_p,
            health=HealthPolicy(outage_wait_s=self.outage_wait),
            detail=self.detail,
        )

    def config(self) -> BuildConfig:
        return BuildConfig(
            dataset=self.dataset,
            data_dir=self.data_dir,
            out=self.out,
            teacher=self.teacher(),
            plan=SamplingPlan(
                self.candidates, self.max_rounds, parse_temperatures(self.temperatures), self.seed
            ),
            policy=PayloadPolicy(max_side=self.max_side),
            shard=Shard.parse(self.shard),
            limit=self.limit,
            show_progress=self.progress,
            workers=self.workers,
            allow_mixed=self.allow_mixed,
            mode=self.mode,
            dry_run=self.dry_run,
            spending=Spending(self.price_in, self.price_out, self.budget_usd),
            limits=RateLimits(self.max_requests_per_minute, self.max_tokens_per_minute),
            batch=BatchRunner(tuple(self.vllm_arg), self.batch_poll_s),
            teacher_checkpoint=self.teacher_checkpoint,
        )
