"""Generation over the OpenAI-compatible chat API, with the builder's own client.

GPT-4o, a `vllm serve` someone else runs and the vLLM engine's own server are all
reached through `domainbed_reasoning.builders.transport.teacher_client.TeacherPool`: the same retries, the same
request body (image first, then the prompt), the same failed-request-as-a-value
rule. So a zero-shot row, a SARR round and the chain builder differ only in the
model behind the URL.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import replace

from domainbed_reasoning.builders.transport.image_payload import sniff_mime, to_data_url
from domainbed_reasoning.builders.transport.replicas import HealthPolicy
from domainbed_reasoning.builders.transport.teacher_client import (
    Reply,
    TeacherConfig,
    TeacherPool,
    resolve_api_key,
)
from domainbed_reasoning.train.engines.base import (
    ClosingEngine,
    Generation,
    GenRequest,
    SamplingSpec,
    decode_image,
)
from rich.progress import Progress

from domainbed_reasoning.errors import UserError


def request_data_url(image: bytes) -> str:
    """PNG/JPEG travel as stored (the pixels training saw); any other format is sent as PNG."""
    mime = sniff_mime(image)
    if mime is not None:
        return to_data_url(image, mime)
    buffer = io.BytesIO()
    decode_image(image).save(buffer, format="PNG")
    return to_data_url(buffer.getvalue(), "image/png")


def to_generation(reply: Reply) -> Generation:
    if reply.error is not None:
        return Generation.failed(f"{reply.host}: {reply.error}")
    return Generation(
        tuple(sample.text for sample in reply.samples),
        tuple(sample.finish_reason for sample in reply.samples),
    )


class RemoteEngine(ClosingEngine):
    """An OpenAI-compatible endpoint serving `model`; checked at open so a dead URL fails in one line."""

    name = "remote"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key_env: str | None = None,
        concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 3,
        health: HealthPolicy | None = None,
    ) -> None:
        self.base = TeacherConfig(
            urls=(base_url,),
            model=model,
            api_key=resolve_api_key(api_key_env),
            api_key_explicit=api_key_env is not None,
            timeout=timeout,
            max_retries=max_retries,
            concurrency=concurrency,
            health=health or HealthPolicy(),
        )
        try:
            asyncio.run(self._check())
        except UserError as err:
            raise UserError(f"{self.name} engine: {err}") from None

    async def _check(self) -> None:
        async with TeacherPool(self.base) as pool:
            await pool.check()

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool = True
    ) -> list[Generation]:
        return asyncio.run(self._generate(requests, sampling, progress))

    async def _generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool
    ) -> list[Generation]:
        config = replace(self.base, max_tokens=sampling.max_new_tokens)
        slots = asyncio.Semaphore(config.concurrency)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"generating ({self.name})", total=len(requests))
            async with TeacherPool(config) as pool:

                async def one(request: GenRequest) -> Generation:
                    async with slots:
                        generation = await self._one(pool, request, sampling)
                    bar.advance(task)
                    return generation

                return list(await asyncio.gather(*(one(request) for request in requests)))

    @staticmethod
    async def _one(pool: TeacherPool, request: GenRequest, sampling: SamplingSpec) -> Generation:
        try:
            data_url = request_data_url(request.image)
        except UserError as err:
            return Generation.failed(f"image {request.id}: {err}")
        seed = None if sampling.greedy else sampling.request_seed(request.id)
        reply = await pool.complete(request.prompt, data_url, sampling.n, sampling.temperature, seed)
        return to_generation(reply)

    def close(self) -> None:
        """Nothing to release: each `generate` opens and closes its own connections."""
