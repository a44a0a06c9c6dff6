"""SynthDG: byte-identical re-runs, DomainBed layout, truthful sidecar, visibly distinct domains."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.synth import (
    SHAPE_COLOURS,
    SPEC,
    generate,
    pixel_sha256,
    read_sidecar,
    render,
    sidecar_path,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.png")
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("synth")
    generate(data_dir, images_per_class=8, seed=7, size=48)
    return data_dir


def test_same_seed_same_bytes_and_other_seed_differs(synth_dir: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", images_per_class=8, seed=7, size=48)
    other = generate(tmp_path / "other", images_per_class=8, seed=8, size=48)
    reference = _hashes(synth_dir / "SynthDG")
    assert len(reference) == 4 * 5 * 8
    assert _hashes(again) == reference
    assert sidecar_path(tmp_path / "again").read_bytes() == sidecar_path(synth_dir).read_bytes()
    different = {k for k, v in _hashes(other).items() if reference[k] != v}
    assert len(different) == len(reference)


def test_an_image_does_not_depend_on_how_many_are_drawn(synth_dir: Path, tmp_path: Path) -> None:
    small = generate(tmp_path / "small", images_per_class=3, seed=7, size=48)
    reference = _hashes(synth_dir / "SynthDG")
    assert {k: reference[k] for k in _hashes(small)} == _hashes(small)


def test_layout_is_domainbed_and_scannable(synth_dir: Path) -> None:
    root = synth_dir / "SynthDG"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(SPEC.domains)
    for domain in SPEC.domains:
        assert sorted(p.name for p in (root / domain).iterdir()) == list(SPEC.classes)
    assert (root / "sketch" / "star" / "sketch_star_00007.png").is_file()
    with Image.open(root / "photo" / "circle" / "photo_circle_00000.png") as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (48, 48))
    result = scan_dataset(get_spec("SynthDG"), synth_dir)
    assert result.frame.height == 160 and result.skipped == []


def test_sidecar_has_one_truthful_row_per_file(synth_dir: Path) -> None:
    root = synth_dir / "SynthDG"
    sidecar = read_sidecar(synth_dir)
    files = _hashes(root)
    assert sidecar.height == len(files)
    assert dict(zip(sidecar["relpath"], sidecar["sha256"])) == files
    assert sidecar["sha256"].n_unique() == sidecar.height
    for row in sidecar.sample(10, seed=0).iter_rows(named=True):
        assert row["relpath"].split("/")[:2] == [row["domain"], row["class_name"]]
        with Image.open(root / row["relpath"]) as image:
            assert pixel_sha256(image) == row["pixel_sha256"]
        radius = row["size"] / 2
        assert radius <= row["x"] <= 48 - radius and radius <= row["y"] <= 48 - radius
        assert 0 <= row["rotation"] < 360
    assert set(sidecar.filter(pl.col("domain") == "sketch")["background"]) == {"plain white paper"}
    assert sidecar.filter(pl.col("domain") == "photo")["background"].str.contains("gradient").all()


def test_the_recorded_colour_and_centre_are_what_was_drawn() -> None:
    """Cartoon fills are flat, so the pixel at the recorded centre is exactly the named colour."""
    for index, class_name in enumerate(SPEC.classes):
        attrs, image = render(seed=3, domain="cartoon", class_name=class_name, index=index, size=64)
        assert image.getpixel((attrs.x, attrs.y)) == SHAPE_COLOURS[attrs.colour]
        assert image.getpixel((1, 1)) != SHAPE_COLOURS[attrs.colour]


def _features(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path), dtype=np.float32)
    grey = pixels.mean(axis=2)
    return np.array(
        [
            (grey > 235).mean(),
            np.abs(np.diff(grey, axis=1)).mean(),
            pixels.std(axis=2).mean(),
            len(np.unique(pixels.reshape(-1, 3), axis=0)) / grey.size,
        ]
    )


def test_domains_differ_visibly(synth_dir: Path) -> None:
    """A nearest-centroid rule on four plain pixel statistics tells the styles apart."""
    root = synth_dir / "SynthDG"
    feats = {
        d: np.stack([_features(p) for p in sorted((root / d).rglob("*.png"))]) for d in SPEC.domains
    }
    scale = np.concatenate(list(feats.values())).std(axis=0)
    centroids = {d: f.mean(axis=0) / scale for d, f in feats.items()}
    hits = total = 0
    for domain, rows in feats.items():
        for row in rows / scale:
            guess = min(centroids, key=lambda d: np.linalg.norm(row - centroids[d]))
            hits += guess == domain
            total += 1
    assert hits / total >= 0.95
    assert feats["sketch"][:, 0].mean() > 0.8 > feats["cartoon"][:, 0].max()
    assert feats["painting"][:, 1].mean() > 1.5 * feats["cartoon"][:, 1].mean()


def test_rerun_is_idempotent_and_a_smaller_rerun_drops_stale_files(tmp_path: Path) -> None:
    root = generate(tmp_path, images_per_class=4, seed=1, size=32)
    stamp = (root / "photo" / "star" / "photo_star_00000.png").stat().st_mtime_ns
    generate(tmp_path, images_per_class=4, seed=1, size=32)
    assert (root / "photo" / "star" / "photo_star_00000.png").stat().st_mtime_ns == stamp
    generate(tmp_path, images_per_class=2, seed=1, size=32)
    assert len(_hashes(root)) == read_sidecar(tmp_path).height == 40
    assert not (root / "photo" / "star" / "photo_star_00003.png").exists()
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images_per_class": 0}, "--images-per-class must be at least 1, got 0"),
        ({"seed": -1}, "--seed must be a non-negative integer, got -1"),
        ({"size": 8}, "--size must be between 32 and 1024 pixels, got 8"),
    ],
)
def test_bad_arguments_name_the_option(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"images_per_class": 1, "seed": 0, "size": 64} | kwargs
    with pytest.raises(UserError, match=message):
        generate(tmp_path, **args)


def test_data_dir_that_is_a_file_and_missing_sidecar(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file: pass a folder"):
        generate(tmp_path / "file", images_per_class=1)
    with pytest.raises(UserError, match=r"no SynthDG sidecar at .*: run `dbr synth --data-dir"):
        read_sidecar(tmp_path)
    generate(tmp_path, images_per_class=1, size=32)
    read_sidecar(tmp_path).drop("pixel_sha256", "image_size").write_parquet(sidecar_path(tmp_path))
    with pytest.raises(
        UserError, match=r"sidecar .* lacks image_size, pixel_sha256: re-run `dbr synth"
    ):
        read_sidecar(tmp_path)


def test_cli_writes_dataset_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "domainbed_reasoning", "synth", "--data-dir", str(tmp_path)]
    done = subprocess.run(
        [*cmd, "--images-per-class", "1", "--size", "32"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert read_sidecar(tmp_path).height == 20
    bad = subprocess.run(
        [*cmd, "--images-per-class", "0"], check=False, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --images-per-class must be at least 1, got 0"
