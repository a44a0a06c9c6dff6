"""OpenAI's Files and Batches endpoints on the simulated teacher: the remote service, locally.

A batch build talks to `/v1/files` and `/v1/batches` exactly as it would to OpenAI,
and the simulated teacher answers each line as it answers `/v1/chat/completions`.
Batches are validated as the Batch API validates them (one endpoint, unique
custom_ids, one model, the request and size limits) and can be made to expire or
fail on demand, which is how a build's handling of a lost batch is tested.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1000 * 1000
OUTCOMES = ("completed", "expired", "failed")
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


@dataclass(frozen=True)
class SimBatchConfig:
    """`outcome` of every batch; an expired batch answers its first `answered` lines only.
    `delay_s` keeps a batch in progress that long before it is worked on."""

    outcome: str = "completed"
    answered: int = 0
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r}: choose one of {', '.join(OUTCOMES)}")


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def result_line(custom_id: str, status: int | None, body: dict | None, error: dict | None) -> bytes:
    response = None if status is None else {"status_code": status, "request_id": new_id("req"), "body": body}
    row = {"id": new_id("batch_req"), "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(row).encode() + b"\n"


def validation_errors(lines: list[dict], endpoint: str) -> list[dict]:
    """What the Batch API refuses a whole input file for."""
    problems = []
    if len(lines) > MAX_REQUESTS:
        problems.append(f"{len(lines)} requests, over the limit of {MAX_REQUESTS}")
    ids = [line.get("custom_id") for line in lines]
    if len(set(ids)) != len(ids) or None in ids:
        problems.append("every line needs a custom_id, unique in the file")
    if any(line.get("method") != "POST" or line.get("url") != endpoint for line in lines):
        problems.append(f"every line needs method POST and url {endpoint}")
    models = {json.dumps((line.get("body") or {}).get("model")) for line in lines}
    if len(models) > 1:
        problems.append("all requests of a batch must use the same model")
    return [{"code": "invalid_request", "message": problem, "line": None} for problem in problems]


class Answerer(Protocol):
    """What a batch needs of the teacher: an answer per body, and its counters."""

    stats: Counter[str]

    def answer(self, body: dict) -> tuple[int, dict]: ...


class SimBatches:
    """The files and batches one simulated teacher holds; batches run as background tasks."""

    def __init__(self, teacher: Answerer, config: SimBatchConfig) -> None:
        self.teacher = teacher
        self.config = config
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, dict] = {}
        self.tasks: set[asyncio.Task] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}", self.file_card)
        app.router.add_get("/v1/files/{id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{id}", self.retrieve)

    def _file(self, request: web.Request) -> StoredFile:
        found = self.files.get(request.match_info["id"])
        if found is None:
            raise web.HTTPNotFound(text=json.dumps({"error": {"message": "no such file"}}))
        return found

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "missing file"}}))
        data = upload.file.read()
        if len(data) > MAX_FILE_BYTES:
            raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "file too large"}}))
        stored = StoredFile(new_id("file"), upload.filename, str(form.get("purpose")), data)
        self.files[stored.id] = stored
        self.teacher.stats["files_uploaded"] += 1
        return web.json_response(stored.card())

    async def file_card(self, request: web.Request) -> web.Response:
        return web.json_response(self._file(request).card())

    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(body=self._file(request).data, content_type="application/octet-stream")

    async def create(self, request: web.Request) -> web.Response:
        params = await request.json()
        source = self.files.get(params.get("input_file_id"))
        if source is None:
            raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "unknown input_file_id"}}))
        batch = {
            "id": new_id("batch"),
            "object": "batch",
            "endpoint": params.get("endpoint"),
            "input_file_id": source.id,
            "completion_window": params.get("completion_window"),
            "status": "validating",
            "created_at": int(time.time()),
            "metadata": params.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
        }
        self.batches[batch["id"]] = batch
        self.teacher.stats["batches_created"] += 1
        task = asyncio.create_task(self.run(batch, source))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return web.json_response(batch)

    async def list(self, request: web.Request) -> web.Response:
        data = sorted(self.batches.values(), key=lambda batch: batch["created_at"], reverse=True)
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise web.HTTPNotFound(text=json.dumps({"error": {"message": "no such batch"}}))
        return web.json_response(batch)

    def _store(self, name: str, lines: list[bytes]) -> str | None:
        if not lines:
            return None
        stored = StoredFile(new_id("file"), name, "batch_output", b"".join(lines))
        self.files[stored.id] = stored
        return stored.id

    async def run(self, batch: dict, source: StoredFile) -> None:
        lines = [json.loads(line) for line in source.data.splitlines() if line.strip()]
        batch["request_counts"]["total"] = len(lines)
        errors = validation_errors(lines, batch["endpoint"])
        if errors or self.config.outcome == "failed":
            message = {"code": "simulated_failure", "message": "simulated batch failure", "line": None}
            batch |= {"status": "failed", "failed_at": int(time.time())}
            batch["errors"] = {"object": "list", "data": errors or [message]}
            return
        batch |= {"status": "in_progress", "in_progress_at": int(time.time())}
        await asyncio.sleep(self.config.delay_s)
        answered = len(lines) if self.config.outcome == "completed" else self.config.answered
        outputs, failures = [], []
        for position, line in enumerate(lines):
            if position >= answered:
                failures.append(result_line(line["custom_id"], None, None, EXPIRED_ERROR))
                continue
            status, body = self.teacher.answer(line["body"])
            target = outputs if status == 200 else failures
            target.append(result_line(line["custom_id"], status, body, None))
            batch["request_counts"]["completed" if status == 200 else "failed"] += 1
        batch["request_counts"]["failed"] = len(failures)
        status = "completed" if self.config.outcome == "completed" else "expired"
        batch |= {
            "status": status,
            f"{status}_at": int(time.time()),
            "output_file_id": self._store("output.jsonl", outputs),
            "error_file_id": self._store("errors.jsonl", failures),
        }
