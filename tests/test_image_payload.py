"""The image part of a request: original bytes when they fit, a downscaled JPEG when not."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.transport.image_payload import (
    ImagePayload,
    PayloadPolicy,
    image_data_url,
)
from PIL import Image

from domainbed_reasoning.errors import UserError


def _save(path: Path, size: tuple[int, int], fmt: str) -> bytes:
    Image.new("RGB", size, (200, 30, 60)).save(path, format=fmt)
    return path.read_bytes()


def _decode(sent: ImagePayload, downscaled: bool) -> tuple[str, bytes]:
    """The mime type and bytes the teacher receives; the payload says whether they were re-encoded."""
    assert sent.downscaled is downscaled
    header, payload = sent.data_url.split(",", 1)
    assert header.endswith(";base64")
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(payload)


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_small_jpeg_and_png_travel_as_their_original_bytes(
    tmp_path: Path, fmt: str, mime: str
) -> None:
    original = _save(tmp_path / "small.img", (60, 40), fmt)
    sent_mime, sent = _decode(
        image_data_url(tmp_path / "small.img", PayloadPolicy(max_side=64)), downscaled=False
    )
    assert (sent_mime, sent) == (mime, original)


def test_a_file_the_scan_measured_within_the_caps_is_sent_without_decoding(tmp_path: Path) -> None:
    """The scan's verdict is trusted for JPEG and PNG; any other format is still re-encoded."""
    original = _save(tmp_path / "small.png", (60, 40), "PNG")
    scanned = image_data_url(tmp_path / "small.png", PayloadPolicy(max_side=64), scanned_fit=True)
    assert _decode(scanned, downscaled=False) == ("image/png", original)
    _save(tmp_path / "old.bmp", (30, 20), "BMP")
    mime, _ = _decode(
        image_data_url(tmp_path / "old.bmp", PayloadPolicy(), scanned_fit=True), False
    )
    assert mime == "image/jpeg"


def test_an_image_over_max_side_is_downscaled_to_it_as_jpeg(tmp_path: Path) -> None:
    _save(tmp_path / "camera_trap.jpg", (400, 300), "JPEG")
    mime, sent = _decode(
        image_data_url(tmp_path / "camera_trap.jpg", PayloadPolicy(max_side=64)), downscaled=True
    )
    with Image.open(io.BytesIO(sent)) as image:
        assert (mime, image.format, image.size) == ("image/jpeg", "JPEG", (64, 48))


def test_an_image_over_the_byte_cap_is_reencoded_even_when_small_in_pixels(tmp_path: Path) -> None:
    original = _save(tmp_path / "big.png", (60, 40), "PNG")
    mime, sent = _decode(
        image_data_url(tmp_path / "big.png", PayloadPolicy(max_side=64, max_bytes=10)),
        downscaled=False,
    )
    assert mime == "image/jpeg" and sent != original
    with Image.open(io.BytesIO(sent)) as image:
        assert image.size == (60, 40)


def test_a_format_servers_may_refuse_is_sent_as_jpeg(tmp_path: Path) -> None:
    _save(tmp_path / "old.bmp", (30, 20), "BMP")
    mime, sent = _decode(image_data_url(tmp_path / "old.bmp", PayloadPolicy()), downscaled=False)
    assert mime == "image/jpeg" and sent.startswith(b"\xff\xd8\xff")


def test_an_unreadable_image_is_a_one_line_user_error(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg.*re-run `dbr scan`"):
        image_data_url(tmp_path / "broken.jpg", PayloadPolicy())


def test_a_tiny_max_side_is_refused() -> None:
    with pytest.raises(UserError, match=r"--max-side 4: must be at least 16 pixels"):
        PayloadPolicy(max_side=4)


def test_only_images_over_a_cap_leave_the_event_loop(tmp_path: Path) -> None:
    """The scan's width, height and bytes decide, so no file is opened to plan the work."""
    policy = PayloadPolicy(max_side=512, max_bytes=10_000)
    scanned = pl.DataFrame(
        {"width": [512, 513, 100], "height": [300, 300, 100], "bytes": [10_000, 10, 10_001]}
    )
    assert scanned.select(policy.within_caps())["width"].to_list() == [True, False, False]
