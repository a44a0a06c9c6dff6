"""The current model (base + adapter) served by a vLLM server of our own, queried like the teacher.

vLLM applies LoRA to the language model only. An adapter that stays there is served
as is (`--enable-lora`, requested by its LoRA name), which costs nothing; an adapter
that also adapts the vision encoder - RD-MLDG's default - is merged into a checkpoint
that vLLM serves instead (merge.py): in the caller's `merge_dir`, shared by the machine's
processes, or else in a temporary folder removed again on close. Decoding ignores the
checkpoint's sampling defaults (`--generation-config vllm`), as the transformers
engine does, so both engines draw from the same distribution, and the image limits
(processor.py) reach vLLM's copy of the processor as `--mm-processor-kwargs`, so
both engines see an image as the same tokens.

Under several processes each rank serves on its own GPU(s): rank r of a machine gets
the r-th group of `tensor_parallel_size` visible GPUs, so the ranks label their
shares side by side (sharding.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from domainbed_reasoning.builders.transport.replicas import AllReplicasDown, HealthPolicy
from domainbed_reasoning.train.engines.base import (
    ClosingEngine,
    Generation,
    GenRequest,
    SamplingSpec,
    adapter_config,
)
from domainbed_reasoning.train.engines.merge import merged_checkpoint
from domainbed_reasoning.train.engines.remote_engine import RemoteEngine
from domainbed_reasoning.train.model.lora import VISION_PARTS, linear_layer_names
from domainbed_reasoning.train.model.processor import ImageLimits, limit_images
from domainbed_reasoning.train.mtct.token_budget import model_context
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.model_folder import check_model_folder
from domainbed_reasoning.serving.vllm_server import (
    ServerConfig,
    VLLMServer,
    free_port,
    resolve_vllm_python,
)

SERVED_NAME = "model"
LORA_NAME = "adapter"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
NEUTRAL_DECODING = ("--generation-config", "vllm")
# One image per request and no video: an unlisted modality makes vLLM profile 999 of them at start-up.
IMAGE_ONLY = {"image": 1, "video": 0}
DEFAULT_MAX_MODEL_LEN = 8192
# vLLM's own default (0.92) leaves too little of a 40 GB card for the CUDA context and NCCL's buffers.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85
# The engine's own server does not come back once it has died (`check_alive` names the exit),
# so an outage is waited out for a minute, not the builder's half hour.
OWN_SERVER_HEALTH = HealthPolicy(outage_wait_s=60.0)


def _exit_on_signal(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the servers' shutdown short
    raise SystemExit(128 + signum)


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind the process as Ctrl-C does, so that every open engine's block closes it.

    An engine's server runs in a session of its own (so that stopping it reaches vLLM's
    workers), out of reach of the signals its process gets: when one rank fails, torchrun
    SIGTERMs the others, and without this their servers would outlive them holding the GPUs.
    A handler someone else installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)


def vision_layer_names(model: str) -> list[str]:
    """Linear layers of the vision encoder, from a weightless (meta-device) copy of the model."""
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))
    return [
        name
        for name in linear_layer_names(skeleton)
        if not set(name.split(".")).isdisjoint(VISION_PARTS)
    ]


def touches_vision(model: str, adapter: Path) -> bool:
    """Whether PEFT would put this adapter's LoRA on any vision-encoder layer of `model`."""
    config = LoraConfig.from_pretrained(str(adapter))
    return any(check_target_module_exists(config, name) for name in vision_layer_names(model))


def max_lora_rank(adapter: Path) -> int:
    """The smallest rank vLLM accepts that holds every rank in the adapter."""
    config = adapter_config(adapter)
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    fitting = [choice for choice in VLLM_LORA_RANKS if choice >= rank]
    if not fitting:
        raise UserError(
            f"adapter {adapter} has LoRA rank {rank}, above vLLM's maximum {VLLM_LORA_RANKS[-1]}: "
            "use the transformers engine"
        )
    return fitting[0]


def serving_plan(
    model: str, adapter: Path | None, work_dir: Path, limits: ImageLimits | None = None
) -> tuple[str, dict[str, Path], str]:
    """(the checkpoint vLLM loads, its LoRA modules, the model name requests ask for)."""
    if adapter is None:
        return model, {}, SERVED_NAME
    if touches_vision(model, adapter):
        return str(merged_checkpoint(model, adapter, work_dir, limits)), {}, SERVED_NAME
    return model, {LORA_NAME: Path(adapter)}, LORA_NAME


def processor_kwargs(model: str, limits: ImageLimits | None) -> dict[str, object]:
    """The image limits as vLLM's processor overrides (empty when nothing is limited)."""
    if limits is None:
        return {}
    return limit_images(AutoProcessor.from_pretrained(model), limits)


def rank_gpus(tensor_parallel_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for this rank's server, or None (one process, or no GPU: vLLM's own choice)."""
    state = PartialState()
    if state.num_processes == 1 or not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = state.local_process_index * tensor_parallel_size
    if first + tensor_parallel_size > len(gpus):
        raise UserError(
            f"local rank {state.local_process_index} x vllm_tensor_parallel_size {tensor_parallel_size} needs GPUs "
            f"{first}..{first + tensor_parallel_size - 1}, but {len(gpus)} are visible: set "
            "vllm_tensor_parallel_size=1 when every process serves its own share"
        )
    return ",".join(gpus[first : first + tensor_parallel_size])


class VLLMEngine(ClosingEngine):
    name = "vllm"

    def __init__(
        self,
        model: str,
        adapter: Path | None = None,
        *,
        vllm_python: Path | None = None,
        port: int | None = None,
        dtype: str | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        image_limits: ImageLimits | None = None,
        concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 1,
        log_path: Path = Path("runs/vllm/engine.log"),
        merge_dir: Path | None = None,
        startup_timeout_s: float = 900.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        check_model_folder(model)
        unwind_on_sigterm()
        python = resolve_vllm_python(vllm_python)
        rank = max_lora_rank(adapter) if adapter is not None else 8
        # vLLM refuses a context beyond the model's own; the budget check used the same bound.
        max_model_len = min(max_model_len, model_context(model))
        self.server: VLLMServer | None = None
        # A merge_dir is the caller's to share between processes and remove; else the engine's own.
        self.owns_work_dir = merge_dir is None
        self.work_dir = Path(merge_dir or tempfile.mkdtemp(prefix="dbr-vllm-engine-"))
        try:
            served, lora_modules, request_model = serving_plan(
                model, adapter, self.work_dir, image_limits
            )
            config = ServerConfig(
                model=served,
                served_model_name=SERVED_NAME,
                port=port or free_port(),
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                limit_mm_per_prompt=IMAGE_ONLY,
                mm_processor_kwargs=processor_kwargs(served, image_limits),
                cuda_visible_devices=rank_gpus(tensor_parallel_size),
                # The CPU build would cast an fp32 checkpoint to 16 bits under "auto".
                dtype=dtype or ("auto" if torch.cuda.is_available() else "float32"),
                lora_modules=lora_modules,
                max_lora_rank=rank,
                extra_args=(
                    *NEUTRAL_DECODING,
                    *("--gpu-memory-utilization", str(gpu_memory_utilization)),
                    *extra_args,
                ),
                vllm_python=python,
                log_path=log_path,
                startup_timeout_s=startup_timeout_s,
            )
            self.server = VLLMServer(config).start()
            self.client = RemoteEngine(
                request_model,
                base_url=config.base_url,
                concurrency=concurrency,
                timeout=timeout,
                max_retries=max_retries,
                health=replace(OWN_SERVER_HEALTH, server_log=str(log_path)),
            )
        except BaseException:
            self.close()
            raise

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool = True
    ) -> list[Generation]:
        """Per-request failures come back as values; a server that died meanwhile is a UserError."""
        self.server.check_alive()
        try:
            generations = self.client.generate(requests, sampling, progress)
        except AllReplicasDown:
            self.server.check_alive()
            raise
        self.server.check_alive()
        return generations

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
