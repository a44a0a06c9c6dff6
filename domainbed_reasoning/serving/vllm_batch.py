"""vLLM's offline batch runner: a local model answers a batch JSONL file, with no server.

`python -m vllm.entrypoints.openai.run_batch` reads the OpenAI Batch format and writes
OpenAI's result format, so a batch written for GPT-4o runs unchanged on a local
teacher. It runs from `.venv-vllm` like the server, with the same model and engine
flags; its output appears whole (written beside, then renamed) or not at all.
"""

from __future__ import annotations

from pathlib import Path

from domainbed_reasoning import atomic
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.serving.vllm_server import (
    ServerConfig,
    check_model,
    engine_args,
    is_cpu_build,
    log_tail,
    resolve_vllm_python,
    spawn,
    stop_group,
)

BATCH_MODULE = "vllm.entrypoints.openai.run_batch"
STOP_GRACE_S = 30.0


def batch_command(
    config: ServerConfig, python: Path, input_path: Path, output_path: Path, cpu_build: bool = False
) -> list[str]:
    return [
        str(python), "-m", BATCH_MODULE,
        "-i", str(input_path),
        "-o", str(output_path),
        *engine_args(config, cpu_build),
    ]  # fmt: skip


def run_batch(config: ServerConfig, input_path: Path, output_path: Path) -> Path:
    """Answer every request of `input_path` into `output_path`; vLLM's log goes to `config.log_path`."""
    python = resolve_vllm_python(config.vllm_python)
    check_model(config)
    config.log_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(output_path) as partial, open(config.log_path, "wb") as log:
        process = spawn(batch_command(config, python, input_path, partial, is_cpu_build(python)), config, log)
        try:
            code = process.wait()
        except BaseException:  # an interrupted build takes vLLM's engine workers down with it
            stop_group(process, STOP_GRACE_S)
            raise
        if code != 0:
            raise UserError(
                f"vLLM's batch runner exited with code {code} on {Path(input_path).name}: "
                f"{log_tail(config.log_path)} (full log: {config.log_path})"
            )
    return Path(output_path)
