"""The image part of a teacher request: a base64 data URL, encoded once per image.

Re-encoding costs CPU on the builder's only event loop and changes the pixels the
teacher sees, so a JPEG or PNG that already fits the caps travels as its original
bytes. Only oversized images (TerraIncognita camera traps are 2048 px and up) are
decoded, downscaled to the longest side the teacher needs and sent as JPEG.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import polars as pl
from PIL import Image, UnidentifiedImageError

from domainbed_reasoning.errors import UserError

MAGIC_MIME = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))


@dataclass(frozen=True)
class PayloadPolicy:
    """Caps under which an image is sent untouched; above them it is downscaled."""

    max_side: int = 1024
    max_bytes: int = 4 * 1024 * 1024
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.max_side < 16:
            raise UserError(f"--max-side {self.max_side}: must be at least 16 pixels")

    def within_caps(self) -> pl.Expr:
        """Sent as read, by the scan's `width`, `height` and `bytes`: cheap enough to encode on
        the event loop, where a hop to a worker thread would cost more than the encoding itself."""
        longest = pl.max_horizontal("width", "height")
        return (longest <= self.max_side) & (pl.col("bytes") <= self.max_bytes)


def sniff_mime(data: bytes) -> str | None:
    """The mime type of a format every OpenAI-compatible server accepts as is, else None."""
    for magic, mime in MAGIC_MIME:
        if data.startswith(magic):
            return mime
    return None


def to_data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def downscaled_jpeg(image: Image.Image, policy: PayloadPolicy) -> bytes:
    """Shrink to `max_side` (never enlarge) and re-encode as RGB JPEG."""
    side = policy.max_side
    image.draft("RGB", (side, side))
    rgb = image.convert("RGB")
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=policy.jpeg_quality)
    return buffer.getvalue()


class ImagePayload(NamedTuple):
    data_url: str
    downscaled: bool  # recorded with every candidate: the teacher saw fewer pixels than the file


def image_data_url(path: Path, policy: PayloadPolicy, scanned_fit: bool = False) -> ImagePayload:
    """Original bytes when they fit the caps, a downscaled JPEG otherwise.

    `scanned_fit`: this run's scan measured the file within the caps (`within_caps`), so a
    JPEG or PNG needs no decoding here; opening it with PIL only to learn its size again cost
    the builder about a millisecond of CPU per image.
    """
    try:
        data = Path(path).read_bytes()
        mime = sniff_mime(data)
        if scanned_fit and mime is not None:
            return ImagePayload(to_data_url(data, mime), downscaled=False)
        with Image.open(io.BytesIO(data)) as image:
            fits = (
                mime is not None
                and len(data) <= policy.max_bytes
                and max(image.size) <= policy.max_side
            )
            if fits:
                return ImagePayload(to_data_url(data, mime), downscaled=False)
            downscaled = max(image.size) > policy.max_side
            return ImagePayload(
                to_data_url(downscaled_jpeg(image, policy), "image/jpeg"), downscaled
            )
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise UserError(
            f"cannot read image {str(path)!r} ({type(err).__name__}): re-run `dbr scan` to list bad files"
            " and replace or remove it"
        ) from err
