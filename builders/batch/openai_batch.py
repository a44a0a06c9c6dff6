"""OpenAI's Batch API through the openai client: upload a part, create its batch, poll, download.

Every id is written to the journal the moment the API returns it. A run killed after
the upload re-uses the file; one killed after creating the batch polls it; one killed
between the API creating a batch and the journal recording it finds the batch again
by its input file before creating another, so no request is ever paid for twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import openai
from domainbed_reasoning.builders.batch.batch_files import ENDPOINT, Journal, Part

from domainbed_reasoning import atomic
from domainbed_reasoning.errors import UserError

TERMINAL = ("completed", "failed", "expired", "cancelled")
COMPLETION_WINDOW = "24h"
FINISHED_AT = ("completed_at", "failed_at", "expired_at", "cancelled_at")


class OpenAIBatches:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        metadata: dict[str, str] | None = None,
        poll_s: float = 30.0,
        timeout: float = 600.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )
        self.base_url = base_url
        self.host = urlsplit(base_url).netloc
        self.metadata = metadata or {}
        self.poll_s = poll_s
        self.sleep = sleep

    def close(self) -> None:
        self.client.close()

    def _fail(self, doing: str, err: openai.APIError) -> UserError:
        status = getattr(err, "status_code", None)
        code = f"HTTP {status}" if status else type(err).__name__
        fix = (
            "check OPENAI_API_KEY or --api-key-env"
            if status in (401, 403)
            else "re-run the same command to resume"
        )
        return UserError(f"Batch API at {self.base_url}: {doing} failed ({code}): {fix}")

    def submit(self, part: Part, journal: Journal) -> None:
        """Upload the part and create its batch, unless the journal says that is done."""
        try:
            if part.input_file_id is None:
                with open(part.input_path, "rb") as handle:
                    part.input_file_id = self.client.files.create(file=handle, purpose="batch").id
                journal.save()
            if part.batch_id is None:
                part.batch_id = self.find_batch(part.input_file_id) or self.client.batches.create(
                    input_file_id=part.input_file_id,
                    endpoint=ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata=self.metadata,
                ).id
                journal.save()
        except openai.APIError as err:
            raise self._fail(f"sending {Path(part.input_path).name}", err) from None

    def find_batch(self, input_file_id: str) -> str | None:
        """A batch already created for this input file (by a run killed before it could say so)."""
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                return batch.id
        return None

    def wait(
        self, part: Part, journal: Journal, report: Callable[[Part, int, int], None]
    ) -> None:
        """Poll until the batch ends, then download its results and errors beside the input."""
        try:
            while True:
                batch = self.client.batches.retrieve(part.batch_id)
                counts = batch.request_counts
                done = (counts.completed + counts.failed) if counts else 0
                report(part, done, counts.total if counts else part.requests)
                if batch.status in TERMINAL:
                    break
                self.sleep(self.poll_s)
            part.output_path = self.download(batch.output_file_id, part, "output")
            part.errors_path = self.download(batch.error_file_id, part, "errors")
        except openai.APIError as err:
            raise self._fail(f"polling batch {part.batch_id}", err) from None
        ended = next((getattr(batch, name) for name in FINISHED_AT if getattr(batch, name)), None)
        part.seconds = float(ended - batch.created_at) if ended else None
        part.status = batch.status
        journal.save()

    def download(self, file_id: str | None, part: Part, kind: str) -> str | None:
        if not file_id:
            return None
        target = Path(part.input_path).with_suffix(f".{kind}.jsonl")
        content = self.client.files.content(file_id).content
        atomic.write_with(target, lambda tmp: tmp.write_bytes(content))
        return str(target)
