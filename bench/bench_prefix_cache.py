"""vLLM's prefix cache with the teacher's request: the prompt before the image, or after it.

With DomainNet's 345 classes the teacher prompt is long, and it is the same for every
image of the dataset; vLLM's automatic prefix caching can only reuse it when it comes
first. This starts the REAL vLLM CPU server (.venv-vllm) with a tiny Qwen2-VL whose
tokenizer knows DomainNet's class names, sends the same DomainNet-class prompt with
distinct SynthDG images in both orders (image-first, text-first, and both again, each
phase with images not seen before), and prints per phase, side by side: the prefix-cache
hit rate from the server's /metrics (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`,
in tokens), the tokens prefilled per request, and the mean request latency. With n > 1 the
samples of one request share its prefill in either order, which is why image-first still
hits (n-1)/n of its queries; across images only text-first shares. It also prints the
server's own statement that prefix caching is on. The latencies are a tiny model's on a
CPU; on a GPU with an 8B teacher the saved prefill is the prompt's ~1,500 tokens per image.
The server asks for prefix caching, which `dbr serve-teacher` leaves off on vLLM 0.32's CPU
build: that build's engine dies when a seeded request is prefilled in parts ("CPU Generator
does not use offset"), as a cached prefix ending inside an image makes it. The tiny model's
images are a few dozen tokens, far below the step's encoder budget, so it does not arise here.

    .venv/bin/python bench/bench_prefix_cache.py [--images 48] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy, image_data_url
from domainbed_reasoning.builders.transport.teacher_client import (
    TeacherConfig,
    TeacherPool,
    encode_messages,
)

from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.offline.tiny_models import build_tiny_model, cached_tiny_model
from domainbed_reasoning.serving.vllm_server import ServerConfig, VLLMServer, free_port

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tiny-models"
PHASES = (
    ("image-first", False),
    ("text-first", True),
    ("image-first", False),
    ("text-first", True),
)


def prefix_counters(base_url: str) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the engine's label sets."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
    totals = []
    for name in ("hits", "queries"):
        pattern = rf"^vllm:prefix_cache_{name}_total(?:{{[^}}]*}})? (\S+)$"
        totals.append(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))
    return totals[0], totals[1]


async def run_phase(
    config: TeacherConfig, bodies: list[bytes], concurrency: int, candidates: int
) -> tuple[list[float], int]:
    """Latency of every request and the prompt tokens vLLM counted for one of them."""
    queue = iter(bodies)
    latencies: list[float] = []
    prompt_tokens = 0

    async with TeacherPool(config) as pool:

        async def slot() -> None:
            nonlocal prompt_tokens
            for body in queue:
                reply = await pool.send(body, candidates, 0.7, 0)
                assert reply.error is None, reply.error
                latencies.append(reply.latency_s)
                prompt_tokens = reply.prompt_tokens

        await asyncio.gather(*(slot() for _ in range(concurrency)))
    return latencies, prompt_tokens


def caching_statement(log: Path) -> str:
    text = log.read_text(errors="replace")
    found = re.search(r"enable_prefix_caching=\w+", text)
    return found.group(0) if found else "(the log does not state enable_prefix_caching)"


def measure_phases(
    base_url: str, prompt: str, paths: list[str], args: argparse.Namespace
) -> list[tuple]:
    """Per phase: order, requests, prompt tokens, hit rate, tokens prefilled per request,
    mean latency, seconds."""
    teacher = TeacherConfig(
        urls=(base_url,), model="tiny-teacher", max_tokens=args.max_tokens,
        concurrency=args.concurrency, timeout=600,
    )  # fmt: skip
    rows = []
    for index, (name, text_first) in enumerate(PHASES):
        chosen = paths[index * args.images : (index + 1) * args.images]
        bodies = [
            encode_messages(prompt, image_data_url(path, PayloadPolicy()).data_url, text_first)
            for path in chosen
        ]
        hits, queries = prefix_counters(base_url)
        start = time.perf_counter()
        latencies, prompt_tokens = asyncio.run(
            run_phase(teacher, bodies, args.concurrency, args.candidates)
        )
        seconds = time.perf_counter() - start
        after_hits, after_queries = prefix_counters(base_url)
        queried, hit = after_queries - queries, after_hits - hits
        rows.append(
            (name, len(bodies), prompt_tokens, hit / max(queried, 1),
             (queried - hit) / len(bodies), statistics.mean(latencies), seconds)
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="distinct images per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    domainnet = get_spec("DomainNet")
    synth = get_spec("SynthDG")
    prompt = load_prompt("teacher").render(classes=class_list(domainnet.classes))
    model = cached_tiny_model(
        build_tiny_model, CACHE, architecture="qwen2vl", vocab_words=list(domainnet.classes)
    )
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    try:
        per_class = -(-args.images * len(PHASES) // (len(synth.domains) * len(synth.classes)))
        generate(work / "data", per_class, seed=0, size=112)
        paths = scan_dataset(synth, work / "data").frame["path"].to_list()
        print(f"before: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        server_config = ServerConfig(
            model=str(model), served_model_name="tiny-teacher", port=free_port(),
            max_model_len=4096, dtype="float32", log_path=work / "vllm.log",
            extra_args=("--enable-prefix-caching",),
        )  # fmt: skip
        started = time.perf_counter()
        with VLLMServer(server_config) as server:
            ready = time.perf_counter() - started
            caching = caching_statement(server_config.log_path)
            print(f"vLLM CPU server ready in {ready:.0f} s; {caching}")
            rows = measure_phases(server.base_url, prompt, paths, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"DomainNet prompt ({len(domainnet.classes)} classes, {len(prompt):,} characters); "
        f"n={args.candidates}, max_tokens={args.max_tokens}, concurrency {args.concurrency}"
    )
    print(
        f"{'order':<12} {'requests':>8} {'prompt tok':>10} {'hit rate':>9} "
        f"{'prefilled tok/req':>17} {'mean lat':>9} {'req/s':>7}"
    )
    for name, count, tokens, rate, prefilled, latency, seconds in rows:
        print(
            f"{name:<12} {count:>8} {tokens:>10} {rate:>9.3f} {prefilled:>17.0f} "
            f"{latency:>8.3f}s {count / seconds:>7.1f}"
        )
    mean = {
        order: statistics.mean(row[5] for row in rows if row[0] == order)
        for order in ("image-first", "text-first")
    }
    print(f"text-first / image-first mean latency: {mean['text-first'] / mean['image-first']:.2f}")
    print(f"after: load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
