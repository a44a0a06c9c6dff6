"""The teacher over the OpenAI-compatible chat API: vLLM replicas or GPT-4o, same code.

Retries, backoff with jitter and Retry-After belong to the `openai` client
(`max_retries`); this module only spreads requests over replicas, sizes the
connection pool to the concurrency (httpx's default pool would otherwise queue
requests behind 100 keep-alive connections) and turns a request that still fails
into a value, so one dead request never stops a build of thousands.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

import httpx2
import openai

from domainbed_reasoning.errors import UserError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "EMPTY"
DETAIL_CHARS = 300


@dataclass(frozen=True)
class TeacherConfig:
    urls: tuple[str, ...]
    model: str
    api_key: str = field(default=NO_KEY, repr=False)
    timeout: float = 120.0
    max_retries: int = 3
    concurrency: int = 256
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        checks = (
            ("--timeout", self.timeout, self.timeout > 0, "more than 0 seconds"),
            ("--max-retries", self.max_retries, self.max_retries >= 0, "0 or more"),
            ("--concurrency", self.concurrency, self.concurrency >= 1, "at least 1"),
            ("--max-tokens", self.max_tokens, self.max_tokens >= 1, "at least 1"),
        )
        for flag, value, ok, rule in checks:
            if not ok:
                raise UserError(f"{flag} {value}: must be {rule}")


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class Reply:
    """One request's outcome: its samples, or the error that outlived every retry."""

    samples: tuple[Sample, ...]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    host: str
    error: str | None = None


def resolve_api_key(env_name: str | None) -> str:
    """The key named by `--api-key-env`, else OPENAI_API_KEY, else vLLM's placeholder."""
    if env_name is None:
        return os.environ.get(DEFAULT_KEY_ENV) or NO_KEY
    value = os.environ.get(env_name)
    if not value:
        raise UserError(
            f"--api-key-env {env_name}: environment variable {env_name} is not set; export it first"
        )
    return value


def url_host(url: str) -> str:
    """`host:port` only: what a record may say about the teacher without leaking credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"--teacher-url {url!r} is not an http(s) URL: pass e.g. http://127.0.0.1:8000/v1"
        )
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


def request_messages(prompt: str, data_url: str) -> list[dict]:
    """The whole request content: the image and the prompt. Nothing about the label exists here."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": prompt},
            ],
        }
    ]


def encode_messages(prompt: str, data_url: str) -> bytes:
    """The messages as JSON, made once per image: the image's base64 is the bulk of every
    body, and re-encoding it for each round and each request costs more than the rest."""
    return json.dumps(request_messages(prompt, data_url)).encode()


def request_body(messages: bytes, fields: dict) -> bytes:
    """A chat-completion body: the pre-encoded `messages` spliced beside the JSON of `fields`."""
    return b'{"messages": ' + messages + b", " + json.dumps(fields).encode()[1:]


def parse_completion(payload: object) -> tuple[tuple[Sample, ...], int, int]:
    """Samples and token usage of a chat completion; ValueError when the body is not one."""
    try:
        samples = tuple(
            Sample(choice["message"].get("content") or "", choice.get("finish_reason"))
            for choice in payload["choices"]
        )
        if not samples:
            raise ValueError("chat completion without choices")
        usage = payload.get("usage") or {}
        return (
            samples,
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"malformed chat completion ({type(err).__name__}: {err})") from None


class TeacherPool:
    """One client per replica; each request goes to the replica with the fewest in flight."""

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.hosts = [url_host(url) for url in config.urls]
        limits = httpx2.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self.clients = [
            openai.AsyncOpenAI(
                base_url=url,
                api_key=config.api_key,
                timeout=config.timeout,
                max_retries=config.max_retries,
                http_client=openai.DefaultAioHttpClient(limits=limits),
            )
            for url in config.urls
        ]
        self.in_flight = [0] * len(self.clients)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.close()

    def _scrub(self, text: str) -> str:
        if self.config.api_key != NO_KEY:
            text = text.replace(self.config.api_key, "***")
        return text[:DETAIL_CHARS]

    async def check(self) -> None:
        """Fail at start, in one line, when a replica is down or does not serve the model."""
        for url, client in zip(self.config.urls, self.clients, strict=True):
            try:
                page = await client.with_options(max_retries=0, timeout=10.0).models.list()
            except openai.AuthenticationError as err:
                raise UserError(
                    f"teacher at {url} refused the API key (HTTP {err.status_code}): "
                    f"set {DEFAULT_KEY_ENV} or pass --api-key-env NAME"
                ) from None
            except openai.APIError as err:
                raise UserError(
                    f"teacher at {url} is not reachable ({self._scrub(type(err).__name__)}): "
                    "start it with `make serve-teacher` or pass --teacher-url"
                ) from None
            served = [model.id for model in page.data]
            if served and self.config.model not in served:
                raise UserError(
                    f"teacher at {url} does not serve model {self.config.model!r} "
                    f"(it serves {', '.join(served[:5])}): pass --teacher-model"
                )

    async def complete(self, prompt: str, data_url: str, n: int, temperature: float) -> Reply:
        """`n` samples from one image prefill; a request that fails after retries is a Reply with `error`."""
        return await self.send(encode_messages(prompt, data_url), n, temperature)

    async def send(self, messages: bytes, n: int, temperature: float) -> Reply:
        """`complete` for messages already encoded by `encode_messages`.

        The body is posted as bytes and the answer read as plain JSON: the SDK's typed
        request transform and pydantic response models cost more CPU than the rest of
        the build, while its retries, backoff and timeouts are kept.
        """
        index = min(range(len(self.clients)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        start = time.perf_counter()
        fields = {
            "model": self.config.model,
            "n": n,
            "temperature": temperature,
            "max_tokens": self.config.max_tokens,
        }
        try:
            response = await self.clients[index].post(
                "/chat/completions",
                content=request_body(messages, fields),
                cast_to=httpx2.Response,
            )
            samples, prompt_tokens, completion_tokens = parse_completion(
                json.loads(await response.aread())
            )
        except (openai.APIError, ValueError) as err:
            detail = self._scrub(f"{type(err).__name__}: {err}")
            return Reply((), 0, 0, time.perf_counter() - start, self.hosts[index], detail)
        finally:
            self.in_flight[index] -= 1
        return Reply(
            samples,
            prompt_tokens,
            completion_tokens,
            time.perf_counter() - start,
            self.hosts[index],
        )
