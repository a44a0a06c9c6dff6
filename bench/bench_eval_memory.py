"""Evaluation memory: peak RSS of scoring a held-out domain of 1,000 and of 10,000 images, side by side.

Evaluation streams the domain through the engine a chunk at a time (train/sharding.py),
so its peak memory should not grow with the domain: the goal is a 10,000-image peak
within 1.2x of the 1,000-image one. Each size runs in a fresh process, measured by
the kernel (`wait4`'s ru_maxrss), through the real path: a DomainBed-Reasoning-shaped
Parquet split, `run_job` with the transformers engine and a tiny Qwen2-VL, the
predictions written as `dbr eval` writes them. Images are 224x224 JPEGs (PACS-sized).
Not a test: run `python bench/bench_eval_memory.py`.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
from domainbed_reasoning.train.engines.factory import open_engine
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.evaluation.evaluate import EvalJob, EvalSettings, run_job
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.tiny_models import build_tiny_model, cached_tiny_model

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tiny-models"
SPEC = get_spec("SynthDG")
DISTINCT_IMAGES = 64


def jpeg(index: int) -> bytes:
    """A 224x224 photo-like JPEG (about 5 KB): a shape on a gradient, different per index."""
    image = Image.linear_gradient("L").resize((224, 224)).convert("RGB")
    draw = ImageDraw.Draw(image)
    offset = 8 + 3 * (index % 40)
    draw.ellipse((offset, offset, offset + 80, offset + 60), fill=(40 * (index % 6), 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_split(images: int, path: Path) -> None:
    """A held-out domain as DomainBed-Reasoning stores it: id, domain, label, embedded image bytes."""
    pictures = [jpeg(index) for index in range(DISTINCT_IMAGES)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "domain": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(SPEC.classes)),
            "image": datasets.Image(),
        }
    )
    rows = {
        "id": [f"SynthDG/sketch/{SPEC.classes[i % 5]}/{i:06d}.jpg" for i in range(images)],
        "domain": ["sketch"] * images,
        "label": [i % len(SPEC.classes) for i in range(images)],
        "image": [{"bytes": pictures[i % DISTINCT_IMAGES], "path": None} for i in range(images)],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def evaluate_once(split_path: Path, model: Path, out: Path) -> None:
    """The child process: evaluate one split (direct mode, 1 new token: the memory path, not the answers)."""
    split = datasets.Dataset.from_parquet(str(split_path), cache_dir=str(out / "hf"))
    job = EvalJob(out / "run", "SynthDG", "bench", "sketch", "cls", str(model), None, "bench")
    settings = EvalSettings(modes=("direct",), splits=("test",), direct_tokens=1, progress=False)
    with open_engine(EngineSettings("transformers", batch_size=16), str(model)) as engine:
        metrics = run_job(job, engine, datasets.DatasetDict({"test": split}), settings)
    assert metrics["results"]["test"]["direct"]["n"] == len(split)


def measure(images: int, model: Path, folder: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh process evaluating `images` images."""
    split = folder / f"split-{images}.parquet"
    write_split(images, split)
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", str(split), str(model), str(folder / f"out-{images}")]
    )
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the {images}-image evaluation failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated image counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        evaluate_once(*(Path(value) for value in args.child))
        return
    console = Console()
    model = cached_tiny_model(build_tiny_model, CACHE, architecture="qwen2vl")
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="dbr-bench-eval-") as tmp:
        results = {images: measure(images, model, Path(tmp)) for images in sizes}
    table = Table(
        title=f"evaluation peak RSS ({platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f})"
    )
    for column in ("images", "peak RSS (MiB)", "vs smallest", "seconds", "images/s"):
        table.add_column(column, justify="right")
    smallest = results[sizes[0]][0]
    for images, (rss, seconds) in results.items():
        table.add_row(
            f"{images:,}", f"{rss:,.0f}", f"{rss / smallest:.2f}x", f"{seconds:.1f}",
            f"{images / seconds:.0f}",
        )  # fmt: skip
    console.print(table)
    ratio = results[sizes[-1]][0] / smallest
    verdict = "meets" if ratio <= 1.2 else "misses"
    console.print(f"{sizes[-1]:,} vs {sizes[0]:,} images: {ratio:.2f}x ({verdict} the 1.2x goal)")


if __name__ == "__main__":
    main()
