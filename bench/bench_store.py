"""Resume start-up and the final derivation on a week-long run's candidate store.

Builds a synthetic store of `--candidates` (default 3 million) teacher answers for a
DomainNet-sized manifest (586,575 images, 345 classes; K=4 answers per round, about
1.3 rounds per image, chains of `--text-chars` characters), laid out as merged shards,
then measures, each in a fresh process so its peak RSS is its own:

- start-up now: finish merges, check the store holds one teacher and prompt version (two
  columns), read three columns (id, round, reason), the pending images;
- start-up as before this change (every column of every shard, deduplicated), for contrast,
  with the same pending-task list built from it;
- the final derivation now: chains.parquet, stats.json and report.md from the store.

    .venv/bin/python bench/bench_store.py [--candidates 3000000] [--text-chars 900] [--no-old]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from domainbed_reasoning.builders.store.candidate_store import CANDIDATE_SCHEMA, shard_path

from domainbed_reasoning.chains.chain_format import STAGES, format_chain
from domainbed_reasoning.data.registry import get_spec

SPEC = get_spec("DomainNet")
IMAGES = 586_575
ROWS_PER_SHARD = 100_000

PEAK = """
def peak_gib():
    # VmHWM belongs to this process's address space: unlike ru_maxrss, nothing of the parent's
    # memory at fork time is counted.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return f"{int(line.split()[1]) / 2**20:.2f}"
"""

NEW_START = (
    PEAK
    + """
import sys, time
from pathlib import Path
import polars as pl
from domainbed_reasoning.builders.build import refuse_mixing
from domainbed_reasoning.builders.store.candidate_store import compact, scan_candidates
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan, pending_tasks, progress_by_image
store, manifest = Path(sys.argv[1]), pl.read_parquet(sys.argv[2])
start = time.perf_counter()
compact(store)
refuse_mixing(store, "teacher", "abcdef012345")
tasks = pending_tasks(manifest, progress_by_image(scan_candidates(store)), SamplingPlan(), PayloadPolicy())
print(f"{time.perf_counter() - start:.2f} {len(tasks)} {peak_gib()}")
"""
)

OLD_START = (
    PEAK
    + """
import sys, time
from pathlib import Path
import polars as pl
from domainbed_reasoning.builders.store.candidate_store import CANDIDATE_SCHEMA
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan, pending_tasks
store, manifest = Path(sys.argv[1]), pl.read_parquet(sys.argv[2])
start = time.perf_counter()
frame = pl.read_parquet(sorted(store.glob("part-*.parquet")), schema=CANDIDATE_SCHEMA)
frame = frame.unique(subset=["id", "round", "candidate_index"], keep="first", maintain_order=True)
done = frame.group_by("id").agg(pl.col("round").max().alias("rounds"), (pl.col("reason") == "accepted").any().alias("accepted"))
tasks = pending_tasks(manifest, done, SamplingPlan(), PayloadPolicy())
print(f"{time.perf_counter() - start:.2f} {len(tasks)} {peak_gib()}")
"""
)

DERIVE = (
    PEAK
    + """
import sys, time
from pathlib import Path
import polars as pl
from domainbed_reasoning.builders.build_report import RunInfo, write_outputs
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.data.registry import get_spec
store, manifest, out = Path(sys.argv[1]), pl.read_parquet(sys.argv[2]), Path(sys.argv[3])
run = RunInfo("DomainNet", "t", ["h:1"], 4, 3, [0.7, 0.9, 1.0], 0, 1.0, 1024, "0/1", None, manifest.height, 0, 0, 1.0)
start = time.perf_counter()
stats = write_outputs(out, manifest, manifest["id"], store, ClassMatcher(get_spec("DomainNet").classes), run)
print(f"{time.perf_counter() - start:.2f} {stats['images'].get('accepted', 0)} {peak_gib()}")
"""
)


def manifest_frame() -> pl.DataFrame:
    classes = np.arange(IMAGES) % len(SPEC.classes)
    domains = np.arange(IMAGES) % len(SPEC.domains)
    class_names = [SPEC.classes[c] for c in classes]
    domain_names = [SPEC.domains[d] for d in domains]
    ids = [
        f"DomainNet/{d}/{c}/{d}_{i:06d}.jpg"
        for i, (d, c) in enumerate(zip(domain_names, class_names, strict=True))
    ]
    return pl.DataFrame(
        {"id": ids, "dataset": "DomainNet", "domain": domain_names, "class_name": class_names,
         "label": classes.astype(np.int64), "path": [f"/data/{i}" for i in ids],
         "width": 300, "height": 300, "bytes": 20_000}
    )  # fmt: skip


def random_texts(count: int, chars: int, rng: np.random.Generator) -> pl.Series:
    """`count` distinct texts of lowercase words: they compress about as well as prose does
    not (zstd finds no repeats), so the store's size on disk is no flattering estimate."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ", dtype=np.uint8)
    raw = letters[rng.integers(0, len(letters), count * chars)].tobytes()
    return pl.Series("text", [raw[i * chars : (i + 1) * chars] for i in range(count)]).cast(
        pl.String
    )


def write_store(store: Path, manifest: pl.DataFrame, candidates: int, chars: int) -> None:
    """Rounds of 4 answers per image until `candidates` rows, written a shard at a time; a third
    of the images get an accepted (parseable, label-consistent) chain, the rest random text."""
    rng = np.random.default_rng(0)
    chains = {
        name: format_chain(dict(zip(STAGES, ("s", "c", "r", "f", name), strict=True)))
        for name in SPEC.classes
    }
    four = pl.DataFrame({"candidate_index": [0, 1, 2, 3]}, schema={"candidate_index": pl.Int32})
    store.mkdir(parents=True)
    written, round_ = 0, 1
    while written < candidates:
        for offset in range(0, IMAGES, ROWS_PER_SHARD // 4):
            take = min(ROWS_PER_SHARD // 4, IMAGES - offset, (candidates - written) // 4)
            if take <= 0:
                break
            frame = manifest.slice(offset, take).select("id", "class_name").join(four, how="cross")
            accept = ((pl.int_range(pl.len()) // 4 + offset) % 3 == 0) & (
                pl.col("candidate_index") == 0
            )
            frame = frame.with_columns(
                text=pl.when(accept)
                .then(pl.col("class_name").replace_strict(chains))
                .otherwise(random_texts(frame.height, chars, rng)),
                round=pl.lit(round_, pl.Int32), temperature=pl.lit(0.7), finish_reason=pl.lit("stop"),
                reason=pl.when(accept).then(pl.lit("accepted")).otherwise(pl.lit("wrong_class")),
                predicted=pl.col("class_name"), detail=pl.lit("concluded"), prompt_tokens=pl.lit(1500, pl.Int64),
                completion_tokens=pl.lit(1200, pl.Int64), latency_s=pl.lit(3.1), teacher=pl.lit("teacher"),
                teacher_url=pl.lit("10.0.0.1:8000"), prompt_version=pl.lit("abcdef012345"),
                seed=pl.lit(7, pl.Int64), top_p=pl.lit(1.0), max_tokens=pl.lit(1024, pl.Int32),
                server_model=pl.lit("teacher"), system_fingerprint=pl.lit(None, pl.String),
                timestamp=pl.lit(None, pl.Datetime("us", "UTC")), downscaled=pl.lit(False),
            )  # fmt: skip
            frame.select(list(CANDIDATE_SCHEMA)).cast(CANDIDATE_SCHEMA).write_parquet(
                shard_path(store, 2)
            )
            written += frame.height
        round_ += 1


def run_child(script: str, *args: str) -> list[str]:
    """Run `script` in a fresh interpreter; the words it prints (its last one: peak RSS, GiB)."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], check=False, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"the measured script failed: {done.stderr[-2000:]}")
    return done.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", type=int, default=3_000_000)
    parser.add_argument("--text-chars", type=int, default=900)
    parser.add_argument(
        "--no-old", action="store_true", help="skip the old start-up (it holds every text)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        manifest = manifest_frame()
        manifest.write_parquet(work / "manifest.parquet")
        start = time.perf_counter()
        write_store(work / "candidates", manifest, args.candidates, args.text_chars)
        files = sorted((work / "candidates").glob("*.parquet"))
        size = sum(path.stat().st_size for path in files) / 2**30
        print(
            f"store: {args.candidates:,} candidates for {IMAGES:,} images in {len(files)} shards, "
            f"{size:.2f} GiB on disk (written in {time.perf_counter() - start:.0f} s); "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )
        store, manifest_file = str(work / "candidates"), str(work / "manifest.parquet")
        seconds, pending, rss = run_child(NEW_START, store, manifest_file)
        print(f"start-up now:    {seconds} s, peak RSS {rss} GiB, {int(pending):,} images pending")
        if not args.no_old:
            old_seconds, old_pending, old_rss = run_child(OLD_START, store, manifest_file)
            print(
                f"start-up before: {old_seconds} s, peak RSS {old_rss} GiB, {int(old_pending):,} "
                f"images pending; now / before: time {float(seconds) / float(old_seconds):.2f}, "
                f"RSS {float(rss) / float(old_rss):.2f}"
            )
        (work / "out").mkdir()
        derive_seconds, accepted, derive_rss = run_child(
            DERIVE, store, manifest_file, str(work / "out")
        )
        print(
            f"final derivation now: {derive_seconds} s, peak RSS {derive_rss} GiB "
            f"({int(accepted):,} chains)"
        )
        print(f"after: load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
