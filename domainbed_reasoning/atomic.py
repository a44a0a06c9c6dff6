"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every stage writes through these helpers (temporary file in the same folder,
fsync, `os.replace`), which is what makes a `kill -9` at any moment safe.
`read_json` reads back the JSON records they wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from domainbed_reasoning.errors import UserError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it into place only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_with(target: Path, writer: Callable[[Path], object]) -> Path:
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text(target: Path, text: str) -> Path:
    return write_with(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(target: Path, data: object) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(target: Path, frame: pl.DataFrame) -> Path:
    return write_with(target, lambda tmp: frame.write_parquet(tmp))


def read_json(path: Path, fix: str = "delete the run folder and run again") -> dict[str, Any]:
    """A run's JSON record, {} where there is none yet; a damaged one stops with `fix`."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: {fix}") from None
