"""A simulated teacher: an OpenAI-compatible server that writes true chains for SynthDG images.

It exists for the offline demo (a teacher that needs no weights), for fault injection (every
failure the builder must survive, on demand and counted: bad answers, 429s, 5xx, dropped and
stalled requests, an outage window in which every endpoint answers 503, and vLLM's dead
engine, after which every completion answers 500 while /models still answers; a replica that
dies is this server's process killed) and for benchmarks (a server cheap
enough that the client is what gets measured). It recognises an image only by the hash of the
bytes it receives (or of their decoded pixels), looked up in the SynthDG sidecar, and never reads
the prompt: like a real teacher, it cannot be told the label.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import islice
from pathlib import Path

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from domainbed_reasoning.chains.chain_format import STAGES, format_chain
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_batches import SimBatchConfig, SimBatches
from domainbed_reasoning.offline.synth import SPEC, ShapeAttributes, pixel_sha256, read_sidecar
from domainbed_reasoning.terminal import console

IMAGE_TOKENS = 64
MAX_N = 128
MAX_BODY_BYTES = 64 * 2**20
CONTENT_FAULTS = ("wrong", "malformed", "empty")
TRANSPORT_FAULTS = ("429", "500", "drop", "stall")
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)
WORD = re.compile(r"\S+")
STAT_KEYS = (
    "requests",
    "completions",
    "choices",
    "unknown_image",
    "bad_request",
    "outage",
    "rate_limited",
    "files_uploaded",
    "batches_created",
    "engine_dead",
    *TRANSPORT_FAULTS,
    *CONTENT_FAULTS,
)
NON_NEGATIVE = frozenset(
    {"latency_ms", "jitter_ms", "retry_after", "stall_s", "outage_after", "outage_s", "rpm_limit"}
    | {"engine_dead_after"}
)
# What vLLM's API server answers (HTTP 500) to every request once its EngineCore has died.
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
STAGE_BLOCK = re.compile(r"<(" + "|".join(STAGES) + r")>.*?</\1>", re.DOTALL)


@dataclass(frozen=True)
class SimTeacherConfig:
    """Fault probabilities are per request (transport) and per choice (content), seeded."""

    model: str = "sim-teacher"
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    p_wrong: float = 0.0
    p_malformed: float = 0.0
    p_empty: float = 0.0
    p_429: float = 0.0
    retry_after: float = 1.0
    p_500: float = 0.0
    p_drop: float = 0.0
    p_stall: float = 0.0
    stall_s: float = 30.0
    outage_after: int | None = None  # chat requests answered before the outage begins
    outage_s: float = 0.0  # how long every endpoint then answers 503
    engine_dead_after: int | None = None  # chat requests answered before the engine dies for good
    rpm_limit: float = 0.0
    rate_headers: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            flag = "--" + item.name.replace("_", "-")
            if item.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be a probability between 0 and 1, got {value}")
            if item.name in NON_NEGATIVE and value is not None and value < 0:
                raise UserError(f"{flag} must be zero or more, got {value}")
        for group, kind in ((CONTENT_FAULTS, "answer"), (TRANSPORT_FAULTS, "request")):
            total = sum(self.probability(fault) for fault in group)
            if total > 1.0 + 1e-9:
                flags = " + ".join(f"--p-{fault}" for fault in group)
                raise UserError(
                    f"{flags} must sum to at most 1 (one fault per {kind}), got {total:g}"
                )

    def probability(self, fault: str) -> float:
        return getattr(self, f"p_{fault}")


@dataclass(frozen=True)
class KnownImage:
    attrs: ShapeAttributes
    image_size: int


class BadRequest(Exception):
    """A request the OpenAI API would refuse; the message goes back to the client."""

    status = 400
    kind = "invalid_request_error"


class UnknownModel(BadRequest):
    """404, as vLLM answers a model name it does not serve."""

    status = 404
    kind = "NotFoundError"


class ImageIndex:
    """The sidecar, hashed once at start-up so a request costs one sha256 and a dict look-up."""

    def __init__(self, images: list[tuple[str, str, KnownImage]]) -> None:
        self.by_sha = {sha: image for sha, _, image in images}
        self.by_pixels = {pixels: image for _, pixels, image in images}

    @classmethod
    def load(cls, data_dir: Path) -> ImageIndex:
        attr_names = [item.name for item in fields(ShapeAttributes)]
        images = []
        for row in read_sidecar(data_dir).iter_rows(named=True):
            attrs = ShapeAttributes(**{name: row[name] for name in attr_names})
            images.append(
                (row["sha256"], row["pixel_sha256"], KnownImage(attrs, row["image_size"]))
            )
        return cls(images)

    def __len__(self) -> int:
        return len(self.by_sha)

    def lookup(self, data: bytes) -> KnownImage | None:
        """Exact bytes first; decoding is paid only by images that were re-encoded (or unknown)."""
        found = self.by_sha.get(hashlib.sha256(data).hexdigest())
        if found is not None:
            return found
        try:
            with Image.open(io.BytesIO(data)) as image:
                return self.by_pixels.get(pixel_sha256(image))
        except (UnidentifiedImageError, OSError) as err:
            raise BadRequest(f"the image_url data is not a readable image: {err}") from err


SHAPE_EVIDENCE = {
    "circle": (
        "it has no corners at all",
        "a single smooth curved edge that stays the same distance from the centre",
        "no points",
        "A square or a triangle would show corners and straight sides, and there are none",
    ),
    "cross": (
        "it has twelve corners, all of them right angles",
        "twelve straight edges that form four arms of equal width",
        "four blunt, square-ended arms and no sharp points",
        "A star also has many corners, but its points are sharp, while these arms are blunt",
    ),
    "square": (
        "it has four corners, each a right angle",
        "four straight edges of equal length",
        "no points sticking out",
        "A triangle would have three corners and a cross twelve",
    ),
    "star": (
        "it has ten corners, five pointing outwards and five pointing inwards",
        "ten straight edges",
        "five sharp points spread evenly around the centre",
        "A cross also has many corners, but they are right angles, while these points are sharp",
    ),
    "triangle": (
        "it has three corners",
        "three straight edges",
        "three points",
        "A square would have four corners and a star ten",
    ),
}
STYLE = {
    "photo": "a photograph-like rendering: the shape is shaded as if lit from the upper left and casts a soft shadow",
    "cartoon": "a cartoon: flat colours inside a thick dark outline",
    "sketch": "a pencil sketch: a thin line drawing with no fill",
    "painting": "a painting: the shape is laid down in loose, noisy brush strokes",
}
SUMMARIES = (
    "I will describe the image, count the corners, edges and points of the main shape, and name the shape.",
    "The image shows one shape drawn as {style_short}; I will identify it from its outline alone.",
)
REFLECTIONS = (
    (
        "Checking again: the {domain} style changes colour and texture but not the outline, and the corners and "
        "edges are clear, so the answer holds."
    ),
    (
        "Comparing the outline once more with a circle, cross, square, star and triangle, only a {class_name} "
        "fits every observation."
    ),
)
UNKNOWN_STAGES = {
    "SUMMARY": "I will try to identify the main shape in the image.",
    "CAPTION": "The image does not match any shape I can recognise; its content is unclear.",
    "REASONING": "Without a recognisable outline I cannot count corners, edges or points.",
    "REFLECTION": "Naming a shape here would not rest on visual evidence, so I do not guess.",
    "CONCLUSION": "unknown",
}


def _position(x: int, y: int, image_size: int) -> str:
    rows, cols = ("upper", "middle", "lower"), ("left", "centre", "right")
    row, col = rows[min(2, 3 * y // image_size)], cols[min(2, 3 * x // image_size)]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def _size_word(size: int, image_size: int) -> str:
    fraction = size / image_size
    return "small" if fraction < 0.45 else "medium-sized" if fraction < 0.58 else "large"


def true_stages(image: KnownImage, variant: int) -> dict[str, str]:
    """A chain built from what was drawn; `variant` picks the wording, as sampling would."""
    attrs = image.attrs
    corners, edges, points, contrast = SHAPE_EVIDENCE[attrs.class_name]
    style = STYLE[attrs.domain]
    ink = f"{attrs.colour} lines" if attrs.domain == "sketch" else f"{attrs.colour} shape"
    wording = {
        "style_short": style.split(":")[0],
        "domain": attrs.domain,
        "class_name": attrs.class_name,
    }
    return {
        "SUMMARY": SUMMARIES[variant % len(SUMMARIES)].format(**wording),
        "CAPTION": (
            f"A {_size_word(attrs.size, image.image_size)} {ink}, about {attrs.size} pixels across, in the "
            f"{_position(attrs.x, attrs.y, image.image_size)} of the image (centre at x={attrs.x}, y={attrs.y}), "
            f"turned {attrs.rotation} degrees, on {attrs.background}. The image is {style}."
        ),
        "REASONING": (
            f"Looking at the outline, {corners}. Its boundary is {edges}, and it has {points}. {contrast}, "
            f"so the shape is a {attrs.class_name}."
        ),
        "REFLECTION": REFLECTIONS[variant % len(REFLECTIONS)].format(**wording),
        "CONCLUSION": attrs.class_name,
    }


def malform(chain: str, rng: random.Random) -> str:
    """Break the structure the way real teachers do: drop a stage, swap two, or leave one unclosed."""
    blocks = [match.group(0) for match in STAGE_BLOCK.finditer(chain)]
    kind = rng.randrange(3)
    if kind == 0:
        del blocks[rng.randrange(len(blocks))]
    elif kind == 1:
        first = rng.randrange(len(blocks) - 1)
        blocks[first], blocks[first + 1] = blocks[first + 1], blocks[first]
    else:
        stage = rng.choice(STAGES[:-1])
        blocks = [block.replace(f"</{stage}>", "") for block in blocks]
    return "\n".join(blocks)


def _stages(image: KnownImage | None, variant: int) -> dict[str, str]:
    return true_stages(image, variant) if image else UNKNOWN_STAGES


@lru_cache(maxsize=2**16)
def _clean_chain(image: KnownImage | None, variant: int) -> str:
    """Candidates repeat the same few wordings, so a fault-free answer costs a dict look-up."""
    return format_chain(_stages(image, variant))


def write_answer(
    image: KnownImage | None, fault: str | None, variant: int, rng: random.Random
) -> str:
    if fault == "empty":
        return ""
    if fault == "wrong":
        stages = _stages(image, variant)
        wrong = rng.choice([c for c in SPEC.classes if c != stages["CONCLUSION"]])
        return format_chain(stages | {"CONCLUSION": wrong})
    chain = _clean_chain(image, variant)
    return malform(chain, rng) if fault == "malformed" else chain


def _draw(rng: random.Random, config: SimTeacherConfig, faults: tuple[str, ...]) -> str | None:
    """At most one fault from the group, each with its own probability."""
    point, edge = rng.random(), 0.0
    for fault in faults:
        edge += config.probability(fault)
        if point < edge:
            return fault
    return None


def _truncate(text: str, max_tokens: int | None) -> tuple[str, str, int]:
    """Words stand in for tokens: enough to make `finish_reason="length"` really happen."""
    count = len(text.split())
    if max_tokens is None or count <= max_tokens:
        return text, "stop", count
    *_, last = islice(WORD.finditer(text), max_tokens)
    return text[: last.end()], "length", max_tokens


def _image_bytes(body: dict) -> tuple[bytes, int]:
    """The one data-URL image across the messages, and the prompt's word count."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    words, urls = 0, []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
            raise BadRequest("each message needs a 'content' string or a list of content parts")
        for part in parts:
            if part.get("type") == "text":
                words += len(str(part.get("text", "")).split())
            elif part.get("type") == "image_url":
                urls.append(str((part.get("image_url") or {}).get("url", "")))
    if len(urls) != 1:
        raise BadRequest(f"exactly one image_url part is supported, got {len(urls)}")
    match = DATA_URL.fullmatch(urls[0])
    if match is None:
        raise BadRequest(
            "the image_url must be a data:image/...;base64,... URL (this server is offline)"
        )
    try:
        return base64.b64decode(match.group(1), validate=True), words
    except binascii.Error as err:
        raise BadRequest(f"the image_url base64 payload does not decode: {err}") from err


def _error(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class RequestBucket:
    """The account limit of `rpm_limit` requests a minute, enforced a second at a time as
    OpenAI does, with the `x-ratelimit-*` headers OpenAI sends about it."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1:
            self.level -= 1
            return 0.0
        return (1 - self.level) / self.rate

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": f"{self.per_minute:g}",
            "x-ratelimit-remaining-requests": str(int(self.level)),
            "x-ratelimit-reset-requests": f"{(self.capacity - self.level) / self.rate:.3f}s",
        }


class SimTeacher:
    """Request handlers plus the counters `/stats` reports; one instance per server."""

    def __init__(
        self, config: SimTeacherConfig, index: ImageIndex, batches: SimBatchConfig | None = None
    ) -> None:
        self.config = config
        self.index = index
        self.seen: Counter[str] = Counter()
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self.batches = SimBatches(self, batches or SimBatchConfig())
        self.bucket = RequestBucket(config.rpm_limit) if config.rpm_limit else None
        self.outage_began: float | None = None

    def in_outage(self) -> bool:
        """The outage begins with chat request `outage_after + 1` and lasts `outage_s` seconds."""
        after = self.config.outage_after
        if self.outage_began is None and after is not None and self.stats["requests"] > after:
            self.outage_began = time.monotonic()
        return (
            self.outage_began is not None
            and time.monotonic() < self.outage_began + self.config.outage_s
        )

    def request_rng(self, raw: bytes) -> random.Random:
        """The draws of one request, from the seed, the body and how often that body came before.

        A build sends its requests in whatever order they finish, so one RNG shared by all
        requests would give a re-run other faults and other wordings; keyed by the body
        (the image, the round's temperature) and its repeat count (retries), a re-run of
        the same build gets byte-identical answers.
        """
        digest = hashlib.sha256(raw).hexdigest()
        self.seen[digest] += 1
        return random.Random(f"{self.config.seed}:{digest}:{self.seen[digest]}")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/stats", self.report)
        self.batches.add_routes(app)
        return app

    def outage_reply(self) -> web.Response:
        self.stats["outage"] += 1
        return _error(503, "simulated outage", "service_unavailable")

    async def models(self, request: web.Request) -> web.Response:
        if self.in_outage():
            return self.outage_reply()
        card = {
            "id": self.config.model,
            "object": "model",
            "created": 0,
            "owned_by": "domainbed-reasoning",
        }
        return web.json_response({"object": "list", "data": [card]})

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.stats) | {"images_indexed": len(self.index)})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        response = await self._chat_completions(request)
        if self.bucket is not None and self.config.rate_headers:
            response.headers.update(self.bucket.headers())
        return response

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        if self.in_outage():
            return self.outage_reply()
        config = self.config
        if config.engine_dead_after is not None and self.stats["requests"] > config.engine_dead_after:
            self.stats["engine_dead"] += 1
            return _error(500, ENGINE_DEAD_MESSAGE, "InternalServerError")
        raw = await request.read()
        if self.bucket is not None and (wait := self.bucket.take()):
            self.stats["rate_limited"] += 1
            headers = {"retry-after-ms": f"{1000 * wait:.0f}"}
            return _error(429, "simulated account rate limit", "rate_limit_error", headers)
        rng = self.request_rng(raw)
        if config.latency_ms or config.jitter_ms:
            await asyncio.sleep((config.latency_ms + rng.uniform(0, config.jitter_ms)) / 1000)
        fault = _draw(rng, config, TRANSPORT_FAULTS)
        if fault:
            self.stats[fault] += 1
        if fault == "429":
            headers = {"Retry-After": f"{config.retry_after:g}"}
            return _error(429, "simulated rate limit", "rate_limit_error", headers)
        if fault == "500":
            return _error(500, "simulated server error", "internal_server_error")
        if fault == "drop":
            # Cancelling the handler makes aiohttp write nothing to the aborted socket.
            request.transport.abort()
            raise asyncio.CancelledError
        if fault == "stall":
            await asyncio.sleep(config.stall_s)
        try:
            return web.json_response(self.complete(json.loads(raw), rng))
        except BadRequest as err:
            self.stats["bad_request"] += 1
            return _error(err.status, str(err), err.kind)
        except ValueError as err:
            self.stats["bad_request"] += 1
            return _error(400, f"the request body is not valid JSON: {err}", BadRequest.kind)

    def answer(self, body: dict) -> tuple[int, dict]:
        """A batch line's answer, as (HTTP status, JSON body)."""
        try:
            return 200, self.complete(body, self.request_rng(json.dumps(body).encode()))
        except BadRequest as err:
            return err.status, {"error": {"message": str(err), "type": err.kind, "code": err.status}}

    def complete(self, body: object, rng: random.Random) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model") != self.config.model:
            raise UnknownModel(
                f"the model `{body.get('model')}` does not exist; this server serves `{self.config.model}`"
            )
        n = 1 if body.get("n") is None else body["n"]
        if not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}, got {n!r}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        data, prompt_words = _image_bytes(body)
        image = self.index.lookup(data)
        if image is None:
            self.stats["unknown_image"] += 1
        greedy = body.get("temperature") == 0
        choices, completion_tokens = [], 0
        for position in range(n):
            fault = _draw(rng, self.config, CONTENT_FAULTS)
            if fault:
                self.stats[fault] += 1
            variant = 0 if greedy else rng.randrange(len(SUMMARIES) * len(REFLECTIONS))
            content, finish, tokens = _truncate(
                write_answer(image, fault, variant, rng), max_tokens
            )
            completion_tokens += tokens
            message = {"role": "assistant", "content": content}
            choices.append(
                {"index": position, "message": message, "finish_reason": finish, "logprobs": None}
            )
        self.stats["completions"] += 1
        self.stats["choices"] += n
        prompt_tokens = prompt_words + IMAGE_TOKENS
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model,
            "system_fingerprint": f"sim-{self.config.seed}",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def build_app(
    config: SimTeacherConfig, data_dir: Path, batches: SimBatchConfig | None = None
) -> web.Application:
    return SimTeacher(config, ImageIndex.load(Path(data_dir)), batches).app()


def _bind_error(host: str, port: int, err: OSError) -> UserError:
    return UserError(
        f"cannot listen on {host}:{port} ({err.strerror or err}): pick another --port or --host"
    )


async def _stop(runner: web.AppRunner) -> None:
    """Also cancel handlers still sleeping (stalls), so the loop closes without stray tasks."""
    await runner.cleanup()
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@contextmanager
def run_sim_teacher(
    config: SimTeacherConfig,
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    batches: SimBatchConfig | None = None,
) -> Iterator[str]:
    """Serve from a background thread with its own event loop; yield the `/v1` base URL.

    For tests and benchmarks that drive the server from the same process.
    """
    runner = web.AppRunner(
        build_app(config, data_dir, batches),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.1,
    )
    loop = asyncio.new_event_loop()
    started: Future[str] = Future()

    def serve_forever() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
        except OSError as err:
            started.set_exception(_bind_error(host, port, err))
        else:
            bound_host, bound_port = runner.addresses[0][:2]
            started.set_result(f"http://{bound_host}:{bound_port}/v1")
            loop.run_forever()
        finally:
            loop.run_until_complete(_stop(runner))
            loop.close()

    thread = threading.Thread(target=serve_forever, name="sim-teacher", daemon=True)
    thread.start()
    base_url = started.result()
    try:
        yield base_url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def serve(
    config: SimTeacherConfig,
    data_dir: Path,
    host: str,
    port: int,
) -> None:
    """Serve in the foreground until Ctrl-C (the `dbr sim-teacher` command)."""
    app = build_app(config, data_dir)
    ready = f"sim-teacher serving `{config.model}` at http://{host}:{port}/v1 (Ctrl-C stops)"
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            print=lambda *_: console.print(ready, highlight=False),
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
    except OSError as err:
        raise _bind_error(host, port, err) from err
