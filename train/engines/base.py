"""One generation interface for SARR self-labelling and evaluation, whatever runs the model.

SARR and evaluation only ever say "these images, this prompt, K samples (or greedy)":
whether a vLLM server, an in-process `transformers` model or a remote OpenAI-compatible
API answers is the engine's business. Every engine returns one `Generation` per
request, in request order, and turns a request that fails into `Generation(error=...)`
so one bad image never stops a round over thousands.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from domainbed_reasoning.builders.rejection_sampling import request_seed
from PIL import Image, UnidentifiedImageError

from domainbed_reasoning.errors import UserError

KINDS = ("transformers", "vllm", "remote")


@dataclass(frozen=True)
class GenRequest:
    """`image` is the encoded file (PNG/JPEG bytes), as stored in DomainBed-Reasoning."""

    id: str
    image: bytes
    prompt: str


@dataclass(frozen=True)
class SamplingSpec:
    """temperature 0 is greedy (evaluation); n > 1 with temperature > 0 gives K candidates (SARR).

    Sampled answers are drawn from seeds derived from (`seed`, `round`, the image id), by
    `request_seed`, the teacher's builder's rule: the same request gives the same answers
    on every run and in whichever process's share it falls.
    """

    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 512
    seed: int = 0
    round: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"sampling n={self.n}: ask for at least 1 sample per image")
        if self.temperature < 0:
            raise UserError(f"temperature {self.temperature}: must be 0 (greedy) or more")
        if self.n > 1 and self.temperature == 0:
            raise UserError(
                f"n={self.n} samples at temperature 0 would be {self.n} copies of the greedy answer: "
                "set a temperature above 0 (e.g. 1.0) or n=1"
            )
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens {self.max_new_tokens}: must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def request_seed(self, image_id: str) -> int:
        return request_seed(self.seed, image_id, self.round)


@dataclass(frozen=True)
class Generation:
    texts: tuple[str, ...]
    finish_reasons: tuple[str | None, ...]
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Generation:
        return cls((), (), error)


class GenerationEngine(Protocol):
    name: str

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool = True
    ) -> list[Generation]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ClosingEngine:
    """The context-manager half every engine shares: leaving the block calls `close()`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnDemand(ClosingEngine):
    """An engine opened by the first `get()` and closed with the block: a step whose answers are
    all on disk already (a resumed run) never loads a model."""

    def __init__(self, opener: Callable[[], GenerationEngine]) -> None:
        self.opener = opener
        self.engine: GenerationEngine | None = None

    def get(self) -> GenerationEngine:
        if self.engine is None:
            self.engine = self.opener()
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def decode_image(data: bytes) -> Image.Image:
    """The picture as training saw it: decoded, not converted (the processor converts)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(
            f"the image bytes are not a readable image ({type(err).__name__})"
        ) from None
    return image


def adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter's PEFT config; its presence is what makes a folder an adapter."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file() and (Path(adapter) / "config.json").is_file():
        raise UserError(
            f"{adapter} is a full checkpoint (config.json), not a LoRA adapter: pass it as the model, "
            "without an adapter"
        )
    if not path.is_file():
        raise UserError(
            f"adapter folder {adapter} has no adapter_config.json: pass the `adapter/` folder of a finished "
            "training run (runs/train/<DATASET>/<target>/<method>/adapter)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
