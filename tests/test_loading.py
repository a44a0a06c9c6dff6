"""Leave-one-domain-out splits over the exported folder, as the training stage loads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import polars as pl
import pytest
from PIL import Image

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.export import export
from domainbed_reasoning.hub.loading import load_domains, load_lodo


@pytest.fixture
def folder(chain_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    chains_root, data_dir = chain_runs
    export(chains_root, data_dir, tmp_path / "domainbed-reasoning", ["SynthDG", "OfficeHome"])
    return tmp_path / "domainbed-reasoning"


def _ids(ds: datasets.Dataset) -> set[str]:
    return set(ds["id"])


def test_lodo_holds_out_the_target_and_splits_each_training_domain(
    folder: Path, tmp_path: Path
) -> None:
    splits = load_lodo(folder, "SynthDG", "sketch", cache_dir=tmp_path / "cache")
    domains = load_domains(folder, "SynthDG", cache_dir=tmp_path / "cache")

    assert list(splits) == ["train", "validation", "test"]
    assert _ids(splits["test"]) == _ids(domains["sketch"])
    assert _ids(splits["train"]).isdisjoint(_ids(splits["validation"]))
    assert _ids(splits["train"]) | _ids(splits["validation"]) == set().union(
        *(_ids(domains[name]) for name in ("cartoon", "painting", "photo"))
    )
    for name in ("cartoon", "painting", "photo"):  # 10 rows each, chainless ones included: 20% held out
        assert sum(row.startswith(f"SynthDG/{name}/") for row in splits["validation"]["id"]) == 2
    assert "sketch" not in set(splits["train"]["domain"]) | set(splits["validation"]["domain"])
    row = splits["train"][0]
    assert isinstance(row["image"], Image.Image)
    assert any(chain.startswith("<SUMMARY>") for chain in splits["train"]["chain"] if chain)
    assert splits["train"].features["label"].names == list(get_spec("SynthDG").classes)


def test_test_is_every_image_of_the_held_out_domain(folder: Path, tmp_path: Path) -> None:
    """DomainBed's protocol: the images the teacher got wrong are scored too, and validation is
    20% of every image of each training domain, not of those with a chain."""
    splits = load_lodo(folder, "SynthDG", "photo", cache_dir=tmp_path / "cache")

    assert splits["test"].num_rows == 10 and set(splits["test"]["domain"]) == {"photo"}
    assert "exhausted" in splits["test"]["chain_status"]
    assert splits["train"].num_rows + splits["validation"].num_rows == 30
    assert splits["validation"].num_rows == 6
    assert {"accepted", "exhausted", "pending"} == set(splits["train"]["chain_status"]) | set(
        splits["validation"]["chain_status"]
    )


def test_split_is_seeded(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_lodo(folder, "SynthDG", "photo", seed=0, cache_dir=cache)
    again = load_lodo(folder, "SynthDG", "photo", seed=0, cache_dir=cache)
    other = load_lodo(folder, "SynthDG", "photo", seed=1, cache_dir=cache)

    assert first["validation"]["id"] == again["validation"]["id"]
    assert _ids(first["validation"]) != _ids(other["validation"])
    half = load_lodo(folder, "SynthDG", "photo", holdout_fraction=0.5, cache_dir=cache)
    assert half["validation"].num_rows == 3 * 5 and half["train"].num_rows == 3 * 5


def test_target_by_domain_or_split_name(folder: Path, tmp_path: Path) -> None:
    by_domain = load_lodo(folder, "officehome", "Real World", cache_dir=tmp_path / "cache")
    by_split = load_lodo(folder, "OfficeHome", "Real_World", cache_dir=tmp_path / "cache")

    assert set(by_domain["test"]["domain"]) == {"Real World"}
    assert by_domain["test"]["id"] == by_split["test"]["id"]
    assert by_domain["train"].num_rows + by_domain["validation"].num_rows == 3 * 6


def test_errors_name_the_thing_and_the_fix(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(
        UserError,
        match=r"SynthDG has no domain 'clipart' in .*: choose one of cartoon, painting, photo, sketch",
    ):
        load_lodo(folder, "SynthDG", "clipart", cache_dir=cache)
    with pytest.raises(
        UserError,
        match=r"holdout_fraction must be between 0 and 1 \(DomainBed uses 0\.2\), got 1\.0",
    ):
        load_lodo(folder, "SynthDG", "photo", holdout_fraction=1.0, cache_dir=cache)
    with pytest.raises(
        UserError,
        match=r"has no PACS config \(it has OfficeHome, SynthDG\): export it with `dbr export PACS`",
    ):
        load_lodo(folder, "PACS", "photo", cache_dir=cache)
    with pytest.raises(
        UserError, match=r"no DomainBed-Reasoning at '.*missing': pass the export folder"
    ):
        load_lodo(tmp_path / "missing", "PACS", "photo", cache_dir=cache)
    with pytest.raises(UserError, match=r"unknown dataset 'Imagenet'"):
        load_lodo(folder, "Imagenet", "photo", cache_dir=cache)


def test_too_small_exports_are_refused(tmp_path: Path, make_chain_run) -> None:
    chains_root, data_dir, out = tmp_path / "chains", tmp_path / "data", tmp_path / "out"
    make_chain_run(chains_root, data_dir, "OfficeHome", images_per_class=1, classes=1)
    export(chains_root, data_dir, out, ["OfficeHome"])
    with pytest.raises(
        UserError, match=r"domain 'Art' has 1 row\(s\): too few to hold out a validation part"
    ):
        load_lodo(out, "OfficeHome", "Product", cache_dir=tmp_path / "cache")

    folder = artefacts.chains_dir(chains_root, get_spec("OfficeHome"))
    for table in (artefacts.chains_path(folder), artefacts.manifest_path(folder)):
        pl.read_parquet(table).filter(pl.col("domain") == "Art").write_parquet(table)
    export(chains_root, data_dir, out, ["OfficeHome"])
    with pytest.raises(
        UserError, match=r"holds only the domain 'Art': leave-one-domain-out needs two"
    ):
        load_lodo(out, "OfficeHome", "Art", cache_dir=tmp_path / "cache2")


def _rewrite_chains(shard: Path, text: str, keep_mtime: bool) -> None:
    stat = shard.stat()
    pl.read_parquet(shard).with_columns(pl.lit(text).alias("chain")).write_parquet(shard)
    if keep_mtime:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_copied_folder_never_serves_the_original_rows(folder: Path, tmp_path: Path) -> None:
    """The cache lives in the folder, so a copy carries it along: the copy must not use it."""
    original = load_domains(folder, "SynthDG")["sketch"]
    copy = tmp_path / "copy" / "domainbed-reasoning"
    shutil.copytree(folder, copy)  # copy2 keeps every mtime, and copies .cache/ too
    _rewrite_chains(next((copy / "SynthDG").glob("sketch-*.parquet")), "rewritten", keep_mtime=True)

    assert set(load_domains(copy, "SynthDG")["sketch"]["chain"]) == {"rewritten"}
    assert "rewritten" not in set(original["chain"])
    assert "rewritten" not in set(load_domains(folder, "SynthDG")["sketch"]["chain"])


def test_a_rewritten_shard_is_read_again(folder: Path) -> None:
    load_domains(folder, "SynthDG")
    _rewrite_chains(next((folder / "SynthDG").glob("sketch-*.parquet")), "again", keep_mtime=False)
    assert set(load_domains(folder, "SynthDG")["sketch"]["chain"]) == {"again"}
