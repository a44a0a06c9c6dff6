"""Throughput after losing one teacher replica of two, beside one healthy replica alone.

Two simulated teachers run in their own processes (fixed latency, no capacity limit), and
the builder samples the same images twice on fresh output folders: once against one
healthy replica, once against both while the second is SIGKILLed after it has answered
`--kill-after` requests, as a node lost mid-run. Because a simulated replica has no capacity
limit, both runs could reach C / latency: the ratio isolates what the loss costs the
build (requests in flight on the dead node retried elsewhere, its ejection, probes), not
the lost capacity. Goal: >= 0.8. Every image must resolve in both runs.

    .venv/bin/python bench/bench_replicas.py [--images-per-class 250] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_builder import cpu_description, load, start_teacher
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig

from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.serving.vllm_server import free_port


def completions(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return json.load(response)["completions"]


def build(urls: tuple[str, ...], data_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    config = BuildConfig(
        "SynthDG", data_dir, out, TeacherConfig(urls, "sim-teacher", concurrency=args.concurrency),
        plan=SamplingPlan(candidates=args.candidates, max_rounds=1), show_progress=False, workers=1,
    )  # fmt: skip
    return build_chains(config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images-per-class", type=int, default=250, help="x20 images")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=500, help="answers before the kill")
    args = parser.parse_args()

    print(f"machine: {cpu_description()}")
    print(f"before: {load()}")
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    try:
        data_dir = work / "data"
        generate(data_dir, args.images_per_class, seed=0, size=64)
        ports = [free_port(), free_port()]
        survivor, doomed = (start_teacher(data_dir, port, args.latency_ms) for port in ports)
        urls = tuple(f"http://127.0.0.1:{port}/v1" for port in ports)
        try:
            alone = build(urls[:1], data_dir, work / "alone", args)
            killed: list[float] = []

            def kill() -> None:
                while completions(urls[1]) < args.kill_after:
                    time.sleep(0.01)
                doomed.send_signal(signal.SIGKILL)
                killed.append(time.monotonic())

            killer = threading.Thread(target=kill, daemon=True)
            start = time.monotonic()
            killer.start()
            lost = build(urls, data_dir, work / "lost", args)
            killer.join(timeout=1)
        finally:
            for process in (survivor, doomed):
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {
        name: run["run"]["requests"] / run["run"]["seconds"]
        for name, run in (("alone", alone), ("lost", lost))
    }
    ideal = args.concurrency / (args.latency_ms / 1000)
    for name, run in (("one healthy replica alone", alone), ("two, one killed mid-run", lost)):
        images = run["images"]
        key = "alone" if run is alone else "lost"
        print(
            f"{name:<28} {run['run']['requests']:>6} requests in {run['run']['seconds']:6.2f} s = "
            f"{rate[key]:7.1f} req/s ({rate[key] / ideal:.3f} of C/latency); accepted "
            f"{images.get('accepted', 0)}/{images['attempted']}, unresolved {run['run']['unresolved']}"
        )
    when = f"{killed[0] - start:.1f} s into the run" if killed else "never (the run ended first)"
    print(f"the second replica was killed {when}, after {args.kill_after} answers")
    print(
        f"ratio (two, one killed) / (one alone) = {rate['lost'] / rate['alone']:.3f} (goal >= 0.8)"
    )
    print(f"after: {load()}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
