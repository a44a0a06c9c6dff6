"""Batch input and output files in the OpenAI Batch format, and the journal of parts sent.

OpenAI's Batch API and vLLM's offline runner (`run_batch`) read the same JSONL (one
`{"custom_id", "method", "url", "body"}` request a line) and write the same results
(`{"custom_id", "response": {"status_code", "body"}, "error"}`), so one writer and one
parser serve both. A round's requests are split into parts under the API's limits
(50,000 requests and 200 MB a file). The journal records what happened to each part
(file and batch ids, downloaded results, ingestion) the moment it happens, atomically:
a killed run reads it back and carries on from there instead of sending twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from domainbed_reasoning import atomic
from domainbed_reasoning.errors import UserError

ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1000 * 1000
JOURNAL = "batches.json"
ERROR_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """What a result line needs, besides the answer, to become candidate records."""

    id: str
    round: int
    temperature: float
    seed: int | None = None
    downscaled: bool = False


REQUEST_SCHEMA = {
    "custom_id": pl.String,
    "id": pl.String,
    "round": pl.Int32,
    "temperature": pl.Float64,
    "seed": pl.Int64,
    "downscaled": pl.Boolean,
}


def requests_path(part: Path) -> Path:
    """The sidecar naming what each custom_id of a part asked: short ids travel, not paths
    (some OpenAI-compatible batch APIs cap custom_id at 64 characters)."""
    return Path(part).with_suffix(".requests.parquet")


def read_requests(part: Path) -> pl.DataFrame:
    return pl.read_parquet(requests_path(part), schema=REQUEST_SCHEMA)


def custom_id(round_: int, index: int) -> str:
    """Unique within a part, and of one length for every index a part can hold."""
    return f"r{round_}-{index:06d}"


def request_line(custom: str, body: bytes) -> bytes:
    """One JSONL line; `body` is an already encoded chat-completion body (the image's base64
    is most of it, so it is spliced in, not decoded and encoded again)."""
    head = {"custom_id": custom, "method": "POST", "url": ENDPOINT}
    return json.dumps(head).encode()[:-1] + b', "body": ' + body + b"}\n"


def write_parts(
    requests: Iterable[tuple[BatchRequest, bytes]],
    folder: Path,
    stem: str,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_BYTES,
) -> list[Path]:
    """Write (request, encoded body) pairs into `<stem>-NNN.jsonl` parts of at most
    `max_requests` lines and `max_bytes` bytes, each with its sidecar of requests; every
    file appears whole (atomic rename) or not at all, the sidecar first."""
    paths: list[Path] = []
    lines: list[bytes] = []
    rows: list[dict] = []
    size = 0

    def flush() -> None:
        path = Path(folder) / f"{stem}-{len(paths):03d}.jsonl"
        sidecar = pl.DataFrame(rows, schema=REQUEST_SCHEMA, orient="row")
        atomic.write_parquet(requests_path(path), sidecar)
        atomic.write_with(path, lambda tmp: tmp.write_bytes(b"".join(lines)))
        paths.append(path)

    for request, body in requests:
        length = len(request_line(custom_id(request.round, 0), body))
        if length > max_bytes:
            raise UserError(
                f"one batch request is {length:,} bytes, over the {max_bytes:,}-byte file limit: "
                "lower --max-side so images are sent smaller"
            )
        if lines and (len(lines) >= max_requests or size + length > max_bytes):
            flush()
            lines, rows, size = [], [], 0
        custom = custom_id(request.round, len(rows))
        lines.append(request_line(custom, body))
        rows.append({"custom_id": custom} | asdict(request))
        size += length
    if lines:
        flush()
    return paths


@dataclass(frozen=True)
class BatchResult:
    """One request's outcome: the chat completion, or why there is none."""

    custom_id: str
    completion: dict | None
    error: str | None


def error_text(error: object, status: int | None) -> str:
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict):
            error = f"{inner.get('code') or inner.get('type') or ''}: {inner.get('message', '')}"
    text = str(error) if error else f"HTTP {status}"
    return text[:ERROR_DETAIL_CHARS]


def parse_results(text: str) -> Iterator[BatchResult]:
    """Result lines of an output or error file; a line without a 200 body is an error."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            custom = row["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"batch result line {number} is not a result: {line[:80]!r}") from None
        response = row.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict) and not row.get("error"):
            yield BatchResult(custom, body, None)
        else:
            yield BatchResult(custom, None, error_text(row.get("error") or body, status))


@dataclass
class Part:
    """One JSONL part and everything known about its trip through a batch runner."""

    input_path: str
    requests: int
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    output_path: str | None = None
    errors_path: str | None = None
    seconds: float | None = None
    ingested: bool = False


@dataclass
class Journal:
    """The parts of every batch this output folder has sent, saved after each change."""

    path: Path
    parts: list[Part] = field(default_factory=list)

    @classmethod
    def load(cls, folder: Path) -> Journal:
        path = Path(folder) / JOURNAL
        if not path.is_file():
            return cls(path)
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["parts"]
            return cls(path, [Part(**row) for row in rows])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"batch journal {path} is unreadable ({type(err).__name__}): restore it, or move it "
                "away to forget the batches it lists (they may then be paid for again)"
            ) from None

    def save(self) -> None:
        atomic.write_json(self.path, {"parts": [asdict(part) for part in self.parts]})

    def open_parts(self) -> list[Part]:
        """Parts sent or written but not yet ingested: a resumed run finishes these first."""
        return [part for part in self.parts if not part.ingested]
