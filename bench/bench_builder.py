"""Builder throughput against a fixed-latency teacher: how close to C / latency does it get?

The simulated teacher runs in its own process (`dbr sim-teacher`) so the builder's
event loop is the only thing measured. With latency L and concurrency C a perfect
client completes C / L requests per second; the ratio to that is the figure of merit
(goal >= 0.9 at C = 256). The builder runs twice on fresh output folders: in one
process (the default, --workers 1) and with --workers 2. Measured in the same
run for contrast: a naive loop, one request at a time through the same client, and
the client alone at C loops with no builder work in one process, the ceiling the
openai SDK's per-request CPU allows one event loop. The machine's load average is
printed with the figures: on a shared machine they only compare at similar load.

    .venv/bin/python bench/bench_builder.py [--images-per-class 500] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from builders.build import build_chains
from builders.build_config import BuildConfig
from builders.image_payload import PayloadPolicy, image_data_url
from builders.rejection_sampling import SamplingPlan
from builders.teacher_client import TeacherConfig, TeacherPool, encode_messages
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.offline.synth import generate

SPEC = get_spec("SynthDG")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_teacher(data_dir: Path, port: int, latency_ms: float) -> subprocess.Popen:
    dbr = Path(sys.executable).with_name("dbr")
    process = subprocess.Popen(
        [
            str(dbr),
            "sim-teacher",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sim-teacher exited: {process.stderr.read().decode()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("sim-teacher did not become ready within 60 s")


async def client_only(
    url: str, data_dir: Path, requests: int, concurrency: int, candidates: int
) -> float:
    """The ceiling set by the openai client itself: `concurrency` loops that only send
    (no judging, no records, no shards). Returns requests per second."""
    paths = scan_dataset(SPEC, data_dir).frame["path"].head(requests).to_list()
    prompt = load_prompt("teacher").render(classes=class_list(SPEC.classes))
    bodies = iter(
        [encode_messages(prompt, image_data_url(path, PayloadPolicy())) for path in paths]
    )
    async with TeacherPool(TeacherConfig((url,), "sim-teacher", concurrency=concurrency)) as pool:

        async def loop() -> None:
            for messages in bodies:
                reply = await pool.send(messages, candidates, 0.7)
                assert reply.error is None, reply.error

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return len(paths) / (time.perf_counter() - start)


def build_once(
    url: str, data_dir: Path, out: Path, args: argparse.Namespace, workers: int
) -> dict:
    config = BuildConfig(
        "SynthDG",
        data_dir,
        out,
        TeacherConfig((url,), "sim-teacher", concurrency=args.concurrency),
        plan=SamplingPlan(candidates=args.candidates, max_rounds=1),
        show_progress=False,
        workers=workers,
    )
    return build_chains(config)["run"]


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images-per-class", type=int, default=500, help="20 images per unit: 500 -> 10,000 requests"
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=30, help="requests in the naive loop")
    args = parser.parse_args()

    print(f"before: {load()} on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    try:
        data_dir = work / "data"
        generate(data_dir, args.images_per_class, seed=0, size=64)
        port = free_port()
        teacher = start_teacher(data_dir, port, args.latency_ms)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            runs = {
                workers: build_once(url, data_dir, work / f"out-{workers}", args, workers)
                for workers in (1, 2)
            }
            naive = asyncio.run(client_only(url, data_dir, args.sequential, 1, args.candidates))
            ceiling = asyncio.run(
                client_only(url, data_dir, runs[1]["requests"], args.concurrency, args.candidates)
            )
        finally:
            teacher.terminate()
            teacher.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latency = args.latency_ms / 1000
    ideal = args.concurrency / latency
    print(f"ideal C/latency = {args.concurrency}/{latency:g} s = {ideal:.1f} req/s")
    for workers, run in runs.items():
        label = f"--workers {workers}"
        achieved = run["requests"] / run["seconds"]
        print(
            f"builder {label}: {run['requests']} requests x {args.candidates} candidates "
            f"in {run['seconds']:.2f} s = {achieved:.1f} req/s, ratio {achieved / ideal:.3f} "
            "(goal >= 0.9)"
        )
    best = max(run["requests"] / run["seconds"] for run in runs.values())
    print(f"naive sequential loop: {naive:.2f} req/s; ideal 1/latency = {1 / latency:.2f} req/s")
    print(f"  ratio {naive * latency:.3f}; the best builder is {best / naive:.0f}x the naive loop")
    print(
        f"client-only ceiling (same client, C loops that only send, one process): {ceiling:.1f} req/s"
    )
    print(f"  ratio {ceiling / ideal:.3f}")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
