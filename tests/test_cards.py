"""The generated cards, for fixed inputs, stay byte for byte what they were: the dataset card
(YAML front matter for `load_dataset`, the tables, the verbatim prompt) and the model card of
each kind of run. The expected files are committed; a change to a card's text is a change to
them, made on purpose."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict
from domainbed_reasoning.train.config import build_config
from domainbed_reasoning.train.mtct.mtct_data import SplitCounts
from domainbed_reasoning.train.stages.stage import Prepared, TrainRequest, model_card

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.hub.card import ExportedDataset, ExportedSplit, card_text

GOLDEN = Path(__file__).parent / "golden"
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["dog", "elephant"]),
        "chain": datasets.Value("string"),
    }
)


def exported_datasets() -> list[ExportedDataset]:
    office = get_spec("OfficeHome")
    pacs = get_spec("PACS")
    office_build = {
        "acceptance": [
            {
                "domain": "Real World",
                "images": 1200,
                "accepted": 1100,
                "exhausted": 60,
                "pending": 40,
                "answered": 1160,
            },
            {"domain": "Art", "images": 900, "accepted": 850, "exhausted": 50},
        ],
        "teachers": ["gpt-4o-2024-08-06", "Qwen/Qwen2-VL-72B-Instruct"],
        "prompt_versions": ["v1"],
        "builder": {"rounds": 3, "candidates per round": 4},
        "prompt": {"version": "v1", "text": "Look at the image.\nName the class.\n\n"},
        "example": {
            "id": "OfficeHome/Art/Alarm_Clock/00001.jpg",
            "domain": "Art",
            "class_name": "Alarm_Clock",
            "chain": "<SUMMARY>s</SUMMARY> <CONCLUSION>Alarm_Clock</CONCLUSION>\n",
        },
    }
    pacs_build = {
        "acceptance": [
            {
                "domain": "photo",
                "images": 10,
                "accepted": 7,
                "exhausted": 1,
                "pending": 2,
                "answered": 0,
            },
        ],
        "teachers": ["gpt-4o"],
        "prompt_versions": ["v0", "v1"],
        "builder": {},
        "prompt": None,
    }
    return [
        ExportedDataset(
            office,
            (
                ExportedSplit("Art", "Art", 900, 123_456, 100_000),
                ExportedSplit("Real World", "Real_World", 1200, 234_567, 200_000),
            ),
            FEATURES,
            office_build,
        ),
        ExportedDataset(
            pacs, (ExportedSplit("photo", "photo", 10, 999, 800),), FEATURES, pacs_build
        ),
    ]


def prepared_run(tmp_path: Path) -> Prepared:
    examples = Dataset.from_dict({"id": ["a", "a", "b"]})
    return Prepared(
        spec=get_spec("PACS"),
        run_dir=tmp_path,
        processor=None,
        splits=DatasetDict(),
        counts={"train": SplitCounts(images=1234, with_chain=1000)},
        train_examples=examples,
        eval_examples=examples,
    )


def check(text: str, name: str) -> None:
    assert text == (GOLDEN / name).read_text(encoding="utf-8")


def test_the_dataset_card_is_unchanged() -> None:
    # handed over in another order: the card lists the datasets in registry order
    check(card_text(exported_datasets(), "PACS"), "dataset_card.md")


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"method": "mtct"}, "model_card_lora.md"),
        (
            {"method": "cls", "train_vision": False, "lora_rank": 16},
            "model_card_lora_language_only.md",
        ),
        ({"method": "reasoning", "finetune": "full"}, "model_card_full.md"),
    ],
)
def test_the_model_card_is_unchanged(settings: dict, name: str, tmp_path: Path) -> None:
    request = TrainRequest(
        "PACS",
        "USER/domainbed-reasoning",
        "sketch",
        "Qwen/Qwen2-VL-2B-Instruct",
        tmp_path,
        build_config(settings),
    )
    check(model_card(request, prepared_run(tmp_path)), name)


@pytest.mark.parametrize("sarr_round", [0, 2])
def test_a_sarr_rounds_model_card_is_unchanged(sarr_round: int, tmp_path: Path) -> None:
    config = build_config({"method": "rd-mldg", "sarr_rounds": 2})
    request = TrainRequest(
        "PACS", "USER/domainbed-reasoning", "sketch", "Qwen/Qwen2-VL-2B-Instruct", tmp_path, config
    )
    card = model_card(request, prepared_run(tmp_path), sarr_round=sarr_round)
    check(card, f"model_card_sarr_round{sarr_round}.md")
