"""The teacher over the OpenAI-compatible chat API: vLLM replicas or GPT-4o, same code.

Requests are posted with aiohttp directly, the body encoded once per image and the
answer read as plain JSON: through the openai SDK, the client alone spent 1.9 ms of CPU
per request on a 2-core AMD EPYC (AVX2), against 0.7 ms this way
(`bench/bench_builder.py` prints both), and at hundreds of requests a second that CPU
is the ceiling. The SDK's retry rules are kept (retry_policy.py); replicas.py decides
where each attempt goes, so a retry lands on a healthy replica. A request that still
fails becomes a `Reply` with `error`, so one dead request never stops a build of
thousands; only what no retry can fix (a refused key, a 404) stops it, in one line.

Where a rate limiter, a token budget and a batch mode plug in: every attempt
passes through `TeacherPool._attempt`, where a limiter can await its slot before the post
and read the status, headers (Retry-After, x-ratelimit-*) and usage after it; and the
builder needs only `send(messages, n, temperature, seed) -> Reply`, which a batch client
can implement by queueing the body for a batch file and resolving the reply later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

import aiohttp
from domainbed_reasoning.builders.cost.pacing import Pacing, RunningUsage
from domainbed_reasoning.builders.cost.rate_limits import Permit
from domainbed_reasoning.builders.cost.token_estimate import check_detail
from domainbed_reasoning.builders.transport.replicas import HealthPolicy, Replica, ReplicaSet
from domainbed_reasoning.builders.transport.retry_policy import retry_delay, should_retry

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import err_console

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "EMPTY"
DETAIL_CHARS = 300
CHECK_TIMEOUT_S = 10.0
FATAL_STATUSES = frozenset({401, 403, 404})
# The openai SDK's exception names, so a recorded error reads as it did through the SDK.
STATUS_ERRORS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


@dataclass(frozen=True)
class TeacherConfig:
    urls: tuple[str, ...]
    model: str
    api_key: str = field(default=NO_KEY, repr=False)
    api_key_explicit: bool = False  # named by --api-key-env: sent over plain http too
    timeout: float = 120.0
    max_retries: int = 3
    concurrency: int = 256
    max_tokens: int = 1024
    top_p: float = 1.0
    health: HealthPolicy = field(default_factory=HealthPolicy)
    detail: str = "auto"  # OpenAI's image `detail`, sent to OpenAI's API only

    @property
    def openai(self) -> bool:
        """Every URL is OpenAI's own API, which takes `detail` and `max_completion_tokens`."""
        return all(is_openai(url) for url in self.urls)

    def __post_init__(self) -> None:
        check_detail(self.detail)
        checks = (
            ("--timeout", self.timeout, self.timeout > 0, "more than 0 seconds"),
            ("--max-retries", self.max_retries, self.max_retries >= 0, "0 or more"),
            ("--concurrency", self.concurrency, self.concurrency >= 1, "at least 1"),
            ("--max-tokens", self.max_tokens, self.max_tokens >= 1, "at least 1"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
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
    server_model: str | None = None
    system_fingerprint: str | None = None
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Failure:
    """One failed attempt: what to record, and whether the SDK's rules would retry it."""

    detail: str
    retryable: bool
    headers: Mapping[str, str] = field(default_factory=dict)


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


def is_openai(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "openai.com" or host.endswith(".openai.com")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_travels(url: str, explicit: bool) -> bool:
    """The key goes over https, to this machine, or where --api-key-env named it: a key found
    in OPENAI_API_KEY by default must not cross a network in clear text to a vLLM node."""
    parts = urlsplit(url)
    return explicit or parts.scheme == "https" or is_loopback(parts.hostname or "")


def withheld_key_urls(config: TeacherConfig) -> list[str]:
    """The replicas the configured key is not sent to (see `key_travels`)."""
    if config.api_key == NO_KEY:
        return []
    return [url for url in config.urls if not key_travels(url, config.api_key_explicit)]


def request_messages(
    prompt: str, data_url: str, text_first: bool = False, detail: str | None = None
) -> list[dict]:
    """The whole request content: the prompt and the image. Nothing about the label exists here.

    The teacher gets the text first, so every request of a dataset starts with the same
    long prefix (the class list) that vLLM's prefix cache reuses; the prompt says so, so the
    order is part of its version. The student keeps the image first, as it was trained.
    """
    text = {"type": "text", "text": prompt}
    url = {"url": data_url} if detail is None else {"url": data_url, "detail": detail}
    image = {"type": "image_url", "image_url": url}
    return [{"role": "user", "content": [text, image] if text_first else [image, text]}]


def encode_messages(
    prompt: str, data_url: str, text_first: bool = False, detail: str | None = None
) -> bytes:
    """The messages as JSON, made once per image: the image's base64 is the bulk of every
    body, and re-encoding it for each round and each request costs more than the rest."""
    return json.dumps(request_messages(prompt, data_url, text_first, detail)).encode()


IMAGE_SLOT = "\x00image\x00"


@dataclass(frozen=True)
class MessagesTemplate:
    """Every request's messages in a build, encoded once: only the image differs, and a data
    URL (base64) needs no JSON escaping, so each image is spliced between two byte strings
    instead of JSON-encoding the long prompt and the image again for every image."""

    head: bytes
    tail: bytes

    @classmethod
    def for_prompt(
        cls, prompt: str, text_first: bool, detail: str | None = None
    ) -> MessagesTemplate:
        slot = json.dumps(IMAGE_SLOT).encode()[1:-1]
        head, tail = encode_messages(prompt, IMAGE_SLOT, text_first, detail).split(slot)
        return cls(head, tail)

    def fill(self, data_url: str) -> bytes:
        return self.head + data_url.encode("ascii") + self.tail


def request_fields(config: TeacherConfig, n: int, temperature: float, seed: int | None) -> dict:
    """A request's parameters besides the messages; OpenAI's API takes the completion limit as
    `max_completion_tokens` (`max_tokens` is deprecated there), vLLM as `max_tokens`."""
    limit = "max_completion_tokens" if config.openai else "max_tokens"
    fields = {
        "model": config.model,
        "n": n,
        "temperature": temperature,
        "top_p": config.top_p,
        limit: config.max_tokens,
    }
    return fields if seed is None else fields | {"seed": seed}


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


def error_message(raw: bytes) -> str:
    """The `message` of an OpenAI-style (or vLLM) error body, else the body's start."""
    try:
        payload = json.loads(raw)
        inner = payload.get("error", payload)
        return str(inner.get("message") if isinstance(inner, dict) else inner)
    except (ValueError, AttributeError):
        return raw[:DETAIL_CHARS].decode(errors="replace")


def served_models(raw: bytes) -> list[str] | None:
    """Model ids of a GET /models answer, None when the body is not an OpenAI model list."""
    try:
        return [str(card["id"]) for card in json.loads(raw)["data"]]
    except (ValueError, KeyError, TypeError):
        return None


class TeacherPool:
    """One HTTP session over every replica; each attempt goes to a healthy replica (replicas.py)."""

    def __init__(
        self,
        config: TeacherConfig,
        say: Callable[[str], None] | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        self.config = config
        self.pacing = pacing or Pacing(RunningUsage(prompt_tokens=0.0), answers=1)
        self.say = say or (lambda text: err_console.print(f"[yellow]{text}[/]", highlight=False))
        self.replicas: ReplicaSet | None = None
        self.session: aiohttp.ClientSession | None = None

    def _headers(self, url: str) -> dict[str, str]:
        travels = key_travels(url, self.config.api_key_explicit)
        key = self.config.api_key if travels else NO_KEY
        return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    async def __aenter__(self) -> Self:
        urls = self.config.urls
        connector = aiohttp.TCPConnector(
            limit=self.config.concurrency + len(urls), ttl_dns_cache=300
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.config.timeout)
        )
        replicas = [Replica(url, url_host(url), self._headers(url)) for url in urls]
        self.replicas = ReplicaSet(replicas, self.config.health, self._probe, self.say)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.replicas.close()
        await self.session.close()

    def _scrub(self, text: str) -> str:
        if self.config.api_key != NO_KEY:
            text = text.replace(self.config.api_key, "***")
        return text[:DETAIL_CHARS]

    async def _get_models(self, replica: Replica) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=min(CHECK_TIMEOUT_S, self.config.timeout))
        async with self.session.get(
            replica.models_url, headers=replica.headers, timeout=timeout
        ) as response:
            return response.status, await response.read()

    async def _probe(self, replica: Replica) -> bool:
        try:
            status, _ = await self._get_models(replica)
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    async def check(self) -> None:
        """Fail at start, in one line, when a replica is down, is not OpenAI-compatible, refuses
        the key or does not serve the model."""
        for replica in self.replicas.replicas:
            url = replica.url
            try:
                status, raw = await self._get_models(replica)
            except (aiohttp.ClientError, TimeoutError) as err:
                raise UserError(
                    f"teacher at {url} is not reachable ({type(err).__name__}): "
                    "start it with `make serve-teacher` or pass --teacher-url"
                ) from None
            if status in (401, 403):
                raise UserError(self._key_refused(replica, status))
            served = served_models(raw)
            if status != 200 or served is None:
                raise UserError(
                    f"teacher at {url} is not an OpenAI-compatible API (GET {replica.models_url} "
                    f"answered HTTP {status}): pass the base URL the API lives under, e.g. "
                    "http://HOST:8000/v1"
                )
            if served and self.config.model not in served:
                raise UserError(
                    f"teacher at {url} does not serve model {self.config.model!r} "
                    f"(it serves {', '.join(served[:5])}): pass --teacher-model"
                )

    def _key_refused(self, replica: Replica, status: int) -> str:
        withheld = self.config.api_key != NO_KEY and replica.headers["Authorization"].endswith(
            NO_KEY
        )
        fix = (
            f"it was not sent over plain http; pass --api-key-env {DEFAULT_KEY_ENV} to send it"
            if withheld
            else f"set {DEFAULT_KEY_ENV} or pass --api-key-env NAME"
        )
        return f"teacher at {replica.url} refused the API key (HTTP {status}): {fix}"

    async def complete(
        self, prompt: str, data_url: str, n: int, temperature: float, seed: int | None = None
    ) -> Reply:
        """`n` samples from one image prefill (image first, as the student was trained)."""
        return await self.send(encode_messages(prompt, data_url), n, temperature, seed)

    async def send(
        self, messages: bytes, n: int, temperature: float, seed: int | None = None
    ) -> Reply:
        """`complete` for messages already encoded by `encode_messages`.

        A retry goes to a healthy replica other than the one that just failed when there is
        one, at once; a retry on the same replica first waits as the SDK would (backoff, or
        the server's Retry-After), which gives a struggling server room and nothing else.
        """
        body = request_body(messages, request_fields(self.config, n, temperature, seed))
        estimate = await self.pacing.reserve()
        reply = await self._send(body)
        self.pacing.settle(estimate, reply.prompt_tokens, reply.completion_tokens)
        return reply

    async def _send(self, body: bytes) -> Reply:
        start = time.perf_counter()
        failed, delay = None, 0.0
        for retries_taken in range(self.config.max_retries + 1):
            replica = await self.replicas.acquire(avoid=failed)
            if replica is failed:
                await asyncio.sleep(delay)
            permit = await self.pacing.acquire()
            outcome = await self._attempt(replica, body, start, permit)
            if isinstance(outcome, Reply):
                self.pacing.release(permit, outcome.prompt_tokens + outcome.completion_tokens)
                return outcome
            self.pacing.release(permit, None)
            if not outcome.retryable:
                break
            failed, delay = replica, retry_delay(retries_taken, outcome.headers)
        return Reply((), 0, 0, time.perf_counter() - start, replica.host, outcome.detail)

    async def _attempt(
        self, replica: Replica, body: bytes, start: float, permit: Permit | None
    ) -> Reply | Failure:
        replica.in_flight += 1
        try:
            async with self.session.post(
                replica.chat_url, data=body, headers=replica.headers
            ) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except aiohttp.ClientConnectorError as err:
            return self._failed(replica, f"APIConnectionError: {err}", hard=True)
        except TimeoutError:
            detail = f"APITimeoutError: no answer within {self.config.timeout:g} s"
            return self._failed(replica, detail, hard=False)
        except aiohttp.ClientError as err:
            return self._failed(
                replica, f"APIConnectionError: {type(err).__name__}: {err}", hard=False
            )
        finally:
            replica.in_flight -= 1
        self.pacing.observe(permit, status, headers)
        if status == 200:
            return self._answer(replica, raw, start)
        name = STATUS_ERRORS.get(
            status, "InternalServerError" if status >= 500 else "APIStatusError"
        )
        detail = self._scrub(f"{name}: HTTP {status}: {error_message(raw)}")
        if status in FATAL_STATUSES:
            raise UserError(self._fatal(replica, status, detail))
        if status >= 500:
            self.replicas.failed(replica, detail, hard=False)
        return Failure(detail, should_retry(status, headers), headers)

    def _failed(self, replica: Replica, detail: str, *, hard: bool) -> Failure:
        detail = self._scrub(detail)
        self.replicas.failed(replica, detail, hard=hard)
        return Failure(detail, retryable=True)

    def _answer(self, replica: Replica, raw: bytes, start: float) -> Reply | Failure:
        try:
            payload = json.loads(raw)
            samples, prompt_tokens, completion_tokens = parse_completion(payload)
        except ValueError as err:
            return Failure(self._scrub(f"APIResponseValidationError: {err}"), retryable=False)
        self.replicas.succeeded(replica)
        return Reply(
            samples,
            prompt_tokens,
            completion_tokens,
            time.perf_counter() - start,
            replica.host,
            server_model=payload.get("model"),
            system_fingerprint=payload.get("system_fingerprint"),
        )

    def _fatal(self, replica: Replica, status: int, detail: str) -> str:
        if status in (401, 403):
            return self._key_refused(replica, status)
        return (
            f"teacher at {replica.url} answered 404 to a chat completion ({detail}): "
            "check --teacher-model and that the URL ends in /v1"
        )
