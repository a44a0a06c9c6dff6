"""The manifest: layout validation, image probing, and the one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import read_manifest, scan_dataset, write_manifest
from domainbed_reasoning.errors import UserError

PACS = get_spec("PACS")


def _image(path: Path, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, fmt)
    return path


@pytest.fixture()
def pacs_dir(tmp_path: Path) -> Path:
    for domain in PACS.domains:
        _image(tmp_path / "PACS" / domain / "dog" / "a.jpg")
        _image(tmp_path / "PACS" / domain / "house" / "b.png", "PNG", (10, 30))
    return tmp_path


def test_manifest_rows_ids_labels_and_sizes(pacs_dir: Path) -> None:
    result = scan_dataset(PACS, pacs_dir)
    frame = result.frame
    assert frame.height == 8 and result.skipped == []
    row = frame.filter(pl.col("id") == "PACS/photo/house/b.png").row(0, named=True)
    assert row["label"] == PACS.classes.index("house") == 5
    assert (row["width"], row["height"]) == (10, 30)
    assert row["bytes"] == Path(row["path"]).stat().st_size
    assert result.counts() == {domain: 2 for domain in PACS.domains}


def test_truncated_unreadable_and_non_images_are_listed_not_dropped(pacs_dir: Path) -> None:
    good = pacs_dir / "PACS" / "photo" / "dog" / "a.jpg"
    whole = _image(pacs_dir / "whole.jpg", size=(256, 256))
    cut = good.with_name("cut.jpg")
    cut.write_bytes(whole.read_bytes()[:-40])
    (good.parent / "junk.jpg").write_bytes(b"not an image at all")
    (good.parent / "notes.txt").write_text("hello")
    result = scan_dataset(PACS, pacs_dir)
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert reasons["cut.jpg"].startswith("truncated JPEG")
    assert reasons["junk.jpg"].startswith("unreadable image")
    assert reasons["notes.txt"] == "not an image file"
    assert result.frame.height == 8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda root: None, "dataset folder"),
        (lambda root: (root / "PACS" / "photos").mkdir(parents=True), "unknown domain folder"),
        (lambda root: (root / "PACS" / "photo" / "doggo").mkdir(parents=True), "unknown class folder"),
    ],
)
def test_layout_errors_name_the_path_and_the_fix(tmp_path: Path, pacs_dir: Path, mutate, message) -> None:
    root = tmp_path / "empty" if message == "dataset folder" else pacs_dir
    mutate(root)
    with pytest.raises(UserError, match=message) as err:
        scan_dataset(PACS, root)
    assert "dbr download PACS" in str(err.value) and "\n" not in str(err.value)


def test_empty_and_missing_domains_are_errors(pacs_dir: Path) -> None:
    for path in (pacs_dir / "PACS" / "sketch").rglob("*.*"):
        path.unlink()
    with pytest.raises(UserError, match=r"sketch.*holds no readable image"):
        scan_dataset(PACS, pacs_dir)
    for path in sorted((pacs_dir / "PACS" / "sketch").rglob("*"), reverse=True):
        path.rmdir()
    (pacs_dir / "PACS" / "sketch").rmdir()
    with pytest.raises(UserError, match=r"sketch' is missing"):
        scan_dataset(PACS, pacs_dir)


def test_cli_writes_manifest_and_reports_errors_in_one_line(pacs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    cmd = [sys.executable, "-m", "domainbed_reasoning", "scan", "pacs", "--data-dir", str(pacs_dir)]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=True)
    assert "wrote" in done.stdout
    assert read_manifest(out).height == 8
    bad = subprocess.run(
        [sys.executable, "-m", "domainbed_reasoning", "scan", "NoSuchSet", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "unknown dataset 'NoSuchSet'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_write_manifest_is_atomic_and_readable(pacs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "manifest.parquet"
    write_manifest(scan_dataset(PACS, pacs_dir), out)
    assert [p.name for p in out.parent.iterdir()] == ["manifest.parquet"]
    with pytest.raises(UserError, match="dbr scan"):
        read_manifest(tmp_path / "nope.parquet")
