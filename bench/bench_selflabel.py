"""SARR self-labelling throughput: the transformers engine and the vLLM engine side by side.

Both engines get the same tiny Qwen2-VL, the same SynthDG images and the same
sampling (K candidates per image with the reasoning prompt, as a SARR round asks);
start-up (model load, or vLLM's start and warm-up) is timed apart from generation.
A random model never emits its end token, so every candidate is exactly
`--max-new-tokens` long and both engines do the same work.
Not a test: run `python bench/bench_selflabel.py` (needs .venv-vllm for the vLLM row).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from domainbed_reasoning.train.engines.base import GenRequest, SamplingSpec
from domainbed_reasoning.train.engines.factory import open_engine
from domainbed_reasoning.train.engines.settings import EngineSettings
from rich.console import Console
from rich.table import Table

from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.offline.demo_clock import machine
from domainbed_reasoning.offline.synth import SPEC, generate, read_sidecar
from domainbed_reasoning.offline.tiny_models import build_tiny_model, cached_tiny_model

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tiny-models"
WARM_UP_IMAGES = 4


def this_machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    # The load average says whether other work shared the cores during the run.
    load = os.getloadavg()[0]
    return f"{machine()} (load {load:.1f}), {gpu}, torch {torch.__version__}"


def synth_requests(images: int, folder: Path) -> list[GenRequest]:
    per_class = -(-images // (len(SPEC.domains) * len(SPEC.classes)))
    generate(folder, per_class, seed=0, size=64)
    prompt = load_prompt("reason").render(classes=class_list(SPEC.classes))
    root = folder / SPEC.dirname
    relpaths = sorted(read_sidecar(folder)["relpath"].to_list())[:images]
    return [GenRequest(relpath, (root / relpath).read_bytes(), prompt) for relpath in relpaths]


def measure(
    kind: str, model: str, requests: list[GenRequest], sampling: SamplingSpec, options: dict
) -> dict:
    """Start-up (open + a small warm-up batch) and steady-state generation, timed apart."""
    start = time.perf_counter()
    with open_engine(EngineSettings(kind, **options), model) as engine:
        engine.generate(requests[:WARM_UP_IMAGES], sampling, progress=False)
        ready = time.perf_counter()
        generations = engine.generate(requests, sampling, progress=False)
        elapsed = time.perf_counter() - ready
    candidates = sum(len(g.texts) for g in generations)
    return {
        "engine": kind,
        "startup_s": round(ready - start, 1),
        "generate_s": round(elapsed, 2),
        "images": len(requests),
        "candidates": candidates,
        "errors": sum(g.error is not None for g in generations),
        "images_per_s": round(len(requests) / elapsed, 2),
        "candidates_per_s": round(candidates / elapsed, 1),
        "options": {key: str(value) for key, value in options.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n", type=int, default=4, help="candidates per image")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers engine batch")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="vLLM engine requests in flight"
    )
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--vllm-python", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    model = str(cached_tiny_model(build_tiny_model, CACHE, architecture="qwen2vl"))
    sampling = SamplingSpec(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    options = {
        "transformers": {"batch_size": args.batch_size},
        "vllm": {"concurrency": args.concurrency, "vllm_python": args.vllm_python},
    }
    with tempfile.TemporaryDirectory() as tmp:
        requests = synth_requests(args.images, Path(tmp) / "synth")
        options["vllm"]["log_path"] = Path(tmp) / "vllm.log"
        rows = [
            measure(kind, model, requests, sampling, options[kind])
            for kind in args.engines.split(",")
        ]

    console = Console()
    table = Table(
        title=f"SARR self-labelling, tiny Qwen2-VL, {args.images} SynthDG images, "
        f"n={args.n}, {args.max_new_tokens} new tokens - {this_machine()}"
    )
    for column in ("engine", "start-up s", "generate s", "images/s", "candidates/s", "errors"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for row in rows:
        table.add_row(
            row["engine"],
            f"{row['startup_s']:.1f}",
            f"{row['generate_s']:.2f}",
            f"{row['images_per_s']:.2f}",
            f"{row['candidates_per_s']:.1f}",
            str(row["errors"]),
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": this_machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
