"""Builder throughput and client CPU per request against a fixed-latency teacher.

The simulated teacher runs in its own process (`dbr sim-teacher`), and every variant runs in
a fresh process of its own, so what is measured is the client. With latency L and
concurrency C a perfect client completes C / L requests per second; the ratio to that is the
figure of merit (goal >= 0.8 at C = 256 on a 2-core AVX2 machine). Throughput depends on
what else the machine runs, so each variant also reports the client's CPU time per request
(user + sys of the client process and its workers, over the sampling only), which does not:
that is the figure to judge a change of the client by.

Variants: the builder with --workers 1, 2 and 0 (chosen from the free cores); the client
alone, in C loops that only send, through our HTTP path and through the openai SDK (the
builder's earlier path: `AsyncOpenAI.post` with raw bytes over its aiohttp
transport); and a naive loop, one request at a time. The CPU model, its vector ISA and the
load average are printed with the figures.

    .venv/bin/python bench/bench_builder.py [--images-per-class 500] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.serving.vllm_server import free_port

CHILD_SETUP = """
import asyncio, json, resource, sys, time
from pathlib import Path

def cpu_seconds():
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

url, data_dir, out, concurrency, candidates, extra = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
"""

BUILDER = (
    CHILD_SETUP
    + """
from domainbed_reasoning.builders import build
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig
from domainbed_reasoning.builders.workers import worker_count

measured = {}
sample = build.sample

def timed_sample(share, config, console, selection):
    measured["workers"] = worker_count(config.workers, len(share.tasks), config.teacher.concurrency)
    before = cpu_seconds()
    counters = sample(share, config, console, selection)
    measured["cpu"] = cpu_seconds() - before
    return counters

build.sample = timed_sample
config = BuildConfig(
    "SynthDG", data_dir, out, TeacherConfig((url,), "sim-teacher", concurrency=concurrency),
    plan=SamplingPlan(candidates=candidates, max_rounds=1), show_progress=False, workers=extra,
)
run = build.build_chains(config)["run"]
print(json.dumps({"requests": run["requests"], "seconds": run["seconds"]} | measured))
"""
)

CLIENT_BODIES = """
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy, image_data_url
from domainbed_reasoning.builders.transport.teacher_client import encode_messages, request_body
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset

spec = get_spec("SynthDG")
prompt = load_prompt("teacher").render(classes=class_list(spec.classes))
paths = scan_dataset(spec, data_dir).frame["path"].to_list()[:extra]
bodies = [encode_messages(prompt, image_data_url(path, PayloadPolicy()).data_url, True) for path in paths]
fields = {"model": "sim-teacher", "n": candidates, "temperature": 0.7, "top_p": 1.0, "max_tokens": 1024}

async def measure(send):
    queue = iter(bodies)
    async def loop():
        for messages in queue:
            await send(messages)
    before, start = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"requests": len(bodies), "seconds": time.perf_counter() - start, "cpu": cpu_seconds() - before}
"""

LEAN_CLIENT = (
    CHILD_SETUP
    + CLIENT_BODIES
    + """
from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig, TeacherPool

async def main():
    async with TeacherPool(TeacherConfig((url,), "sim-teacher", concurrency=concurrency)) as pool:
        async def send(messages):
            reply = await pool.send(messages, candidates, 0.7, 0)
            assert reply.error is None, reply.error
        return await measure(send)

print(json.dumps(asyncio.run(main())))
"""
)

SDK_CLIENT = (
    CHILD_SETUP
    + CLIENT_BODIES
    + """
import httpx2, openai

async def main():
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with openai.AsyncOpenAI(
        base_url=url, api_key="EMPTY", max_retries=3, http_client=openai.DefaultAioHttpClient(limits=limits)
    ) as client:
        async def send(messages):
            response = await client.post(
                "/chat/completions", content=request_body(messages, fields), cast_to=httpx2.Response
            )
            assert json.loads(await response.aread())["choices"]
        return await measure(send)

print(json.dumps(asyncio.run(main())))
"""
)


def start_teacher(data_dir: Path, port: int, latency_ms: float) -> subprocess.Popen:
    dbr = Path(sys.executable).with_name("dbr")
    process = subprocess.Popen(
        [str(dbr), "sim-teacher", "--data-dir", str(data_dir), "--port", str(port),
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
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


def run_child(script: str, *args: object) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], check=False, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"a measured variant failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_description() -> str:
    """The CPU model and the widest x86 vector ISA it offers, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    isa = "AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} CPUs, {isa}, Python {platform.python_version()}"


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=500,
        help="20 images per unit: 500 -> 10,000 requests",
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=30, help="requests in the naive loop")
    args = parser.parse_args()

    print(f"machine: {cpu_description()}")
    print(f"before: {load()}")
    work = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    rows: list[tuple[str, dict]] = []
    try:
        data_dir = work / "data"
        generate(data_dir, args.images_per_class, seed=0, size=64)
        requests = args.images_per_class * 20
        port = free_port()
        teacher = start_teacher(data_dir, port, args.latency_ms)
        url = f"http://127.0.0.1:{port}/v1"
        common = (url, data_dir)
        try:
            for workers in (1, 2, 0):
                result = run_child(
                    BUILDER,
                    *common,
                    work / f"out-{workers}",
                    args.concurrency,
                    args.candidates,
                    workers,
                )
                label = f"builder --workers {workers}" + (
                    f" (auto: {result['workers']})" if workers == 0 else ""
                )
                rows.append((label, result))
            rows.append(
                (
                    "client alone, our HTTP path",
                    run_child(
                        LEAN_CLIENT, *common, "-", args.concurrency, args.candidates, requests
                    ),
                )
            )
            rows.append(
                (
                    "client alone, openai SDK",
                    run_child(
                        SDK_CLIENT, *common, "-", args.concurrency, args.candidates, requests
                    ),
                )
            )
            naive = run_child(LEAN_CLIENT, *common, "-", 1, args.candidates, args.sequential)
        finally:
            teacher.terminate()
            teacher.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latency = args.latency_ms / 1000
    ideal = args.concurrency / latency
    print(
        f"ideal C/latency = {args.concurrency}/{latency:g} s = {ideal:.1f} req/s ({args.candidates} candidates per request)"
    )
    print(f"{'variant':<34} {'requests':>8} {'req/s':>8} {'ratio':>6} {'client CPU ms/req':>18}")
    for label, result in rows:
        rate = result["requests"] / result["seconds"]
        cpu_ms = 1000 * result["cpu"] / result["requests"]
        print(
            f"{label:<34} {result['requests']:>8} {rate:>8.1f} {rate / ideal:>6.3f} {cpu_ms:>18.3f}"
        )
    naive_rate = naive["requests"] / naive["seconds"]
    best = max(
        result["requests"] / result["seconds"]
        for label, result in rows
        if label.startswith("builder")
    )
    print(
        f"naive sequential loop: {naive_rate:.2f} req/s (ideal 1/latency {1 / latency:.2f}); "
        f"the best builder is {best / naive_rate:.0f}x the naive loop"
    )
    print("goal: builder ratio >= 0.8 on a 2-core AVX2 machine; judge client changes by CPU ms/req")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
