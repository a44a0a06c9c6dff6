"""`dbr export`: chains + images -> Hub-layout Parquet that `load_dataset` really reads, plus its card."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.prompt_templates import load_prompt
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.card import render_card
from domainbed_reasoning.hub.export import export

SYNTH = get_spec("SynthDG")
OFFICE = get_spec("OfficeHome")


def _front_matter(card: Path) -> dict:
    _, header, _ = card.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        path.relative_to(folder).as_posix(): (
            path.stat().st_ino,
            path.stat().st_mtime_ns,
            path.read_bytes(),
        )
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def exported(chain_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    chains_root, data_dir = chain_runs
    export(chains_root, data_dir, tmp_path / "domainbed-reasoning", ["SynthDG", "OfficeHome"])
    return tmp_path / "domainbed-reasoning"


def test_load_dataset_reads_the_local_folder_from_the_current_directory(
    exported: Path, chain_runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    chains_root, data_dir = chain_runs
    monkeypatch.chdir(exported.parent)
    ds = datasets.load_dataset(
        "domainbed-reasoning", "SynthDG", cache_dir=str(exported.parent / "cache")
    )

    assert sorted(ds) == sorted(SYNTH.domains)
    assert {split: ds[split].num_rows for split in ds} == {domain: 10 for domain in SYNTH.domains}
    features = ds["photo"].features
    assert features["label"].names == list(SYNTH.classes)
    assert isinstance(features["image"], datasets.Image)
    assert set(features) == {
        "id", "dataset", "domain", "label", "class_name", "image", "chain", "summary", "caption",
        "reasoning", "reflection", "conclusion", "teacher", "prompt_version", "attempts",
        "chain_status", "round", "temperature",
    }  # fmt: skip

    chains = pl.read_parquet(artefacts.chains_path(artefacts.chains_dir(chains_root, SYNTH)))
    row = ds["sketch"].filter(lambda r: r["id"] == "SynthDG/sketch/star/sketch_star_00001.png")[0]
    source = data_dir / "SynthDG" / "sketch" / "star" / "sketch_star_00001.png"
    expected = chains.filter(pl.col("id") == row["id"]).row(0, named=True)
    assert row["label"] == SYNTH.classes.index("star") and row["class_name"] == "star"
    assert row["domain"] == "sketch" and row["dataset"] == "SynthDG"
    assert {key: row[key] for key in ("chain", "conclusion", "teacher", "attempts", "round")} == {
        key: expected[key] for key in ("chain", "conclusion", "teacher", "attempts", "round")
    }
    assert row["chain_status"] == "accepted" and row["temperature"] == pytest.approx(0.9)
    assert row["chain"].startswith("<SUMMARY>") and row["chain"].endswith("</CONCLUSION>")
    assert isinstance(row["image"], Image.Image)
    assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(source)))
    assert not list(exported.rglob("*.py")), "the folder must load without any code"


def test_loading_the_folder_runs_no_code_of_this_project(exported: Path) -> None:
    script = (
        "import sys, datasets\n"
        "ds = datasets.load_dataset('domainbed-reasoning', 'SynthDG', cache_dir='cache')\n"
        "row = ds['cartoon'][0]\n"
        "assert type(row['image']).__module__.startswith('PIL') and '<CONCLUSION>' in row['chain']\n"
        "assert not [m for m in sys.modules if m.startswith(('domainbed_reasoning', 'builders', 'train'))]\n"
        "print(sorted(ds), ds['cartoon'].num_rows)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=exported.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['cartoon', 'painting', 'photo', 'sketch'] 10"


def test_every_image_is_a_row_and_says_why_it_has_no_chain(exported: Path) -> None:
    """DomainBed-Reasoning is a strict superset of DomainBed: images without an accepted chain are
    rows too, with null chain fields, and `chain_status`/`attempts` tell what the teacher did."""
    ds = datasets.load_dataset(str(exported), "SynthDG", cache_dir=str(exported.parent / "cache"))
    rows = {row["id"]: row for split in ds.values() for row in split.remove_columns("image")}

    assert len(rows) == 40, "every image of the manifest"
    pending = rows["SynthDG/cartoon/circle/cartoon_circle_00001.png"]
    assert pending["chain_status"] == "pending" and pending["attempts"] == 0, (
        "a transport failure is not a teacher answer"
    )
    assert pending["chain"] is None and pending["teacher"] is None and pending["round"] is None
    exhausted = rows["SynthDG/photo/circle/photo_circle_00001.png"]
    assert exhausted["chain_status"] == "exhausted" and exhausted["attempts"] == 6
    assert all(exhausted[field] is None for field in ("chain", "summary", "conclusion", "round", "temperature"))
    assert exhausted["teacher"] == "tiny-teacher", "the teacher that tried is named"
    first_round = rows["SynthDG/photo/star/photo_star_00000.png"]
    assert (first_round["chain_status"], first_round["attempts"], first_round["round"]) == ("accepted", 2, 1)
    assert first_round["temperature"] == pytest.approx(0.7)
    statuses = [row["chain_status"] for row in rows.values()]
    assert statuses.count("accepted") == 36 and statuses.count("exhausted") == 3
    assert sum(row["chain"] is not None for row in rows.values()) == 36


def test_images_are_embedded_as_the_original_file_bytes(
    exported: Path, chain_runs: tuple[Path, Path]
) -> None:
    _, data_dir = chain_runs
    table = pq.read_table(
        next((exported / "SynthDG").glob("painting-*.parquet")), columns=["id", "image"]
    )
    for record_id, image in zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True):
        source = data_dir / record_id
        assert image["bytes"] == source.read_bytes()
        assert image["path"] == source.name, "no local absolute path leaks into the published files"
    assert Image.open(io.BytesIO(image["bytes"])).format == "PNG"


def test_domain_with_a_space_gets_a_split_safe_name(exported: Path) -> None:
    ds = datasets.load_dataset(
        str(exported), "OfficeHome", cache_dir=str(exported.parent / "cache")
    )

    assert sorted(ds) == ["Art", "Clipart", "Product", "Real_World"]
    assert set(ds["Real_World"]["domain"]) == {"Real World"}
    assert ds["Real_World"].features["label"].names == list(OFFICE.classes)
    assert sorted(set(ds["Art"]["class_name"])) == list(OFFICE.classes[:3])
    assert "Real World -> `Real_World`" in (exported / "README.md").read_text()


def test_card_yaml_names_every_config_and_split_that_exists(exported: Path) -> None:
    meta = _front_matter(exported / "README.md")

    configs = {config["config_name"]: config for config in meta["configs"]}
    assert list(configs) == ["OfficeHome", "SynthDG"], "registry order"
    assert [name for name, config in configs.items() if config.get("default")] == ["SynthDG"], (
        "the default is the first dataset exported, not the first in registry order"
    )
    for name, config in configs.items():
        splits = {entry["split"]: entry["path"] for entry in config["data_files"]}
        on_disk = {path.name.split("-")[0] for path in (exported / name).glob("*.parquet")}
        assert set(splits) == on_disk
        assert all(list(exported.glob(pattern)) for pattern in splits.values())
    infos = {info["config_name"]: info for info in meta["dataset_info"]}
    assert {split["name"]: split["num_examples"] for split in infos["SynthDG"]["splits"]} == {
        domain: 10 for domain in SYNTH.domains
    }
    label = next(feature for feature in infos["SynthDG"]["features"] if feature["name"] == "label")
    assert list(label["dtype"]["class_label"]["names"].values()) == list(SYNTH.classes)
    assert meta["license"] == "other" and "image-classification" in meta["task_categories"]


def test_exporting_another_dataset_beside_keeps_what_an_unnamed_load_returns(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """OfficeHome comes before SynthDG in the registry: exported second, it must not become the
    config `load_dataset(folder)` loads without a name."""
    chains_root, data_dir = chain_runs
    folder = tmp_path / "domainbed-reasoning"
    export(chains_root, data_dir, folder, ["SynthDG"])
    before = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache-before"))

    export(chains_root, data_dir, folder, ["OfficeHome"])
    after = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache-after"))

    assert sorted(before) == sorted(after) == sorted(SYNTH.domains)
    assert set(after["photo"]["dataset"]) == {"SynthDG"}
    meta = _front_matter(folder / "README.md")
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["SynthDG"]
    assert "loads **SynthDG**, the default" in (folder / "README.md").read_text()


def test_card_body_reports_how_the_data_was_built(exported: Path) -> None:
    body = (exported / "README.md").read_text().split("---\n", 2)[2]
    prompt = load_prompt("teacher")

    # cartoon's chainless image was never answered (pending): acceptance is over answered images
    assert "| SynthDG | cartoon (`cartoon`) | 10 | 9 | 0 | 1 | 9 | 100.0% |" in body
    assert "| SynthDG | photo (`photo`) | 10 | 9 | 1 | 0 | 10 | 90.0% |" in body
    assert "| **SynthDG** | all | 40 | 36 | 3 | 1 | 39 | 92.3% |" in body
    assert "| OfficeHome | Real World (`Real_World`) | 6 | 5 | 1 | 0 | 6 | 83.3% |" in body
    assert "`tiny-teacher`" in body and f"`{prompt.version}`" in body
    assert prompt.text.strip() in body, "the full teacher prompt is in the card"
    assert (
        "Candidates sampled per request: 2" in body
        and "Requests per image at most (rounds): 3" in body
    )
    assert "<REFLECTION>No other class fits the outline as well.</REFLECTION>" in body
    assert (
        "arXiv:2602.23777" in body
        and "gulrajani2021search" in body
        and "venkateswara2017deep" in body
    )
    assert (
        "## Known limitations" in body
        and 'load_dataset("USER/domainbed-reasoning", "OfficeHome")' in body
    )


def test_card_says_when_the_prompt_text_is_not_in_this_checkout(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    chains_root, data_dir = chain_runs
    chains_file = artefacts.chains_path(artefacts.chains_dir(chains_root, SYNTH))
    pl.read_parquet(chains_file).with_columns(
        pl.lit("old-version").alias("prompt_version")
    ).write_parquet(chains_file)

    export(chains_root, data_dir, tmp_path / "out", ["SynthDG"])

    body = (tmp_path / "out" / "README.md").read_text()
    assert "`old-version`" in body and "was not in the toolkit checkout" in body
    assert load_prompt("teacher").text.strip() not in body


def test_reexport_of_one_dataset_swaps_its_files_and_leaves_the_other_untouched(
    exported: Path, chain_runs: tuple[Path, Path]
) -> None:
    chains_root, data_dir = chain_runs
    office_before = _snapshot(exported / "OfficeHome")
    image_bytes = max(path.stat().st_size for path in (data_dir / "SynthDG").rglob("*.png"))

    export(chains_root, data_dir, exported, ["SynthDG"], max_shard_bytes=3 * image_bytes)

    assert _snapshot(exported / "OfficeHome") == office_before
    photo = sorted(path.name for path in (exported / "SynthDG").glob("photo-*.parquet"))
    assert len(photo) == 4 and photo[-1] == "photo-00003-of-00004.parquet"  # 10 images, 3 a shard
    assert not (exported / "SynthDG" / "photo-00000-of-00001.parquet").exists()
    assert [path.name for path in exported.iterdir() if path.name.startswith(".")] == []
    meta = _front_matter(exported / "README.md")
    assert [config["config_name"] for config in meta["configs"]] == ["OfficeHome", "SynthDG"]
    ds = datasets.load_dataset(str(exported), "SynthDG", cache_dir=str(exported.parent / "cache2"))
    assert ds["photo"].num_rows == 10 and len(set(ds["photo"]["id"])) == 10


def test_missing_image_is_a_one_line_error_and_keeps_the_previous_export(
    exported: Path, chain_runs: tuple[Path, Path]
) -> None:
    chains_root, data_dir = chain_runs
    before = _snapshot(exported)
    (data_dir / "SynthDG" / "photo" / "star" / "photo_star_00000.png").unlink()

    with pytest.raises(
        UserError,
        match=r"1 image\(s\) of SynthDG are gone since the chains were built, e\.g\. .*"
        r"photo_star_00000\.png: restore them \(`dbr download SynthDG",
    ):
        export(chains_root, data_dir, exported, ["OfficeHome", "SynthDG"])

    assert _snapshot(exported) == before, (
        "a failed export writes nothing, not even the datasets that were fine"
    )


def test_no_accepted_chains_is_a_one_line_error(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    chains_root, data_dir = chain_runs
    chains_file = artefacts.chains_path(artefacts.chains_dir(chains_root, SYNTH))
    pl.read_parquet(chains_file).clear().write_parquet(chains_file)

    with pytest.raises(
        UserError,
        match=r"chains\.parquet holds no accepted chains: build them first \(`dbr build-chains SynthDG",
    ):
        export(chains_root, data_dir, tmp_path / "out", ["SynthDG"])
    assert not (tmp_path / "out").exists()


def test_stats_without_the_exhausted_list_is_a_one_line_error(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    chains_root, data_dir = chain_runs
    stats = artefacts.stats_path(artefacts.chains_dir(chains_root, SYNTH))
    stats.write_text('{"run": {}}')

    with pytest.raises(
        UserError, match=r"stats\.json does not list the exhausted images: run `dbr build-chains SynthDG"
    ):
        export(chains_root, data_dir, tmp_path / "out", ["SynthDG"])


def test_chains_folder_without_chains_is_a_one_line_error(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    chains_root, data_dir = chain_runs
    artefacts.chains_path(artefacts.chains_dir(chains_root, SYNTH)).unlink()

    with pytest.raises(UserError, match=r"chains\.parquet does not exist: build them first"):
        export(chains_root, data_dir, tmp_path / "out", ["SynthDG"])


def test_dataset_not_in_the_registry_is_a_one_line_error(
    chain_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    chains_root, data_dir = chain_runs
    with pytest.raises(UserError, match=r"unknown dataset 'Imagenet': choose one of PACS, "):
        export(chains_root, data_dir, tmp_path / "out", ["Imagenet"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop("caption"), r"lacks column\(s\) caption: build them first"),
        (
            lambda f: pl.concat([f, f.head(1)]),
            r"has several chains for 'SynthDG/cartoon/circle/cartoon_circle_00000\.png'",
        ),
        (
            lambda f: f.with_columns(pl.lit("hexagon").alias("class_name")),
            r"has class_name 'hexagon', which SynthDG does not have",
        ),
        (
            lambda f: f.with_columns(pl.lit("oil").alias("domain")),
            r"has domain 'oil', which SynthDG does not have",
        ),
        (
            lambda f: f.with_columns(pl.lit("SynthDG/photo/star/elsewhere.png").alias("id")).head(1),
            r"has a chain for 'SynthDG/photo/star/elsewhere\.png', which its manifest does not list",
        ),
    ],
    ids=["missing-column", "duplicate-id", "unknown-class", "unknown-domain", "not-in-manifest"],
)
def test_malformed_chains_are_one_line_errors(
    chain_runs: tuple[Path, Path], tmp_path: Path, mutate, message: str
) -> None:
    chains_root, data_dir = chain_runs
    chains_file = artefacts.chains_path(artefacts.chains_dir(chains_root, SYNTH))
    mutate(pl.read_parquet(chains_file)).write_parquet(chains_file)

    with pytest.raises(UserError, match=message):
        export(chains_root, data_dir, tmp_path / "out", ["SynthDG"])


def test_bad_arguments_are_one_line_errors(chain_runs: tuple[Path, Path], tmp_path: Path) -> None:
    chains_root, data_dir = chain_runs
    with pytest.raises(
        UserError, match=r"the shard size limit \(--max-shard-mb\) must be positive, got 0 bytes"
    ):
        export(chains_root, data_dir, tmp_path / "out", ["SynthDG"], max_shard_bytes=0)
    with pytest.raises(
        UserError, match=r"no dataset to export: name at least one, e\.g\. `dbr export PACS`"
    ):
        export(chains_root, data_dir, tmp_path / "out", [])
    with pytest.raises(
        UserError, match=r"holds no exported dataset: run `dbr export DATASET --out"
    ):
        render_card(tmp_path)


def test_cli_export_writes_the_folder(chain_runs: tuple[Path, Path], tmp_path: Path) -> None:
    chains_root, data_dir = chain_runs
    out = tmp_path / "cli-out"
    args = [
        "export",
        "SynthDG",
        "--chains-dir",
        str(chains_root),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]

    result = CliRunner().invoke(app, [*args, "--no-progress"])

    assert result.exit_code == 0, result.output
    assert "exported" in result.output and (out / "README.md").is_file()
    assert len(list((out / "SynthDG").glob("*.parquet"))) == 4


def test_cli_error_is_one_red_line_and_exit_2(tmp_path: Path) -> None:
    dbr = Path(sys.executable).with_name("dbr")
    result = subprocess.run(
        [
            str(dbr),
            "export",
            "SynthDG",
            "--chains-dir",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "manifest.parquet does not exist: build them first" in result.stderr


def test_a_dataset_exported_by_an_older_version_keeps_its_place_in_the_card(exported: Path) -> None:
    """Its build.json predates the status counts and the stored example: the card says so
    instead of inventing numbers, and rendering the other datasets still works."""
    facts = artefacts.build_facts_path(exported / "OfficeHome")
    build = json.loads(facts.read_text())
    build["acceptance"] = [{"domain": row["domain"], "images": 6, "accepted": 5} for row in build["acceptance"]]
    del build["example"]
    facts.write_text(json.dumps(build))

    body = render_card(exported)

    assert "| OfficeHome | Art (`Art`) | 6 | 5 | - | - | - | - |" in body
    assert "**OfficeHome**: re-export it to show an example here." in body
    assert "| **SynthDG** | all | 40 | 36 | 3 | 1 | 39 | 92.3% |" in body
