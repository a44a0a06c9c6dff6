"""The registry is the label contract: class order and DomainNet's 345 folder names."""

from __future__ import annotations

import pytest

from domainbed_reasoning.data.registry import REGISTRY, get_spec
from domainbed_reasoning.errors import UserError


def test_domainnet_has_345_unique_folder_names() -> None:
    classes = get_spec("DomainNet").classes
    assert len(classes) == 345
    assert len(set(classes)) == 345
    for name in (
        "aircraft_carrier",
        "The_Eiffel_Tower",
        "The_Great_Wall_of_China",
        "The_Mona_Lisa",
        "t-shirt",
        "teddy-bear",
        "paint_can",
        "zigzag",
        "cell_phone",
        "flip_flops",
    ):
        assert name in classes
    assert all(name == name.strip() and " " not in name for name in classes)


def test_classes_and_domains_are_sorted_like_image_folder() -> None:
    for spec in REGISTRY.values():
        assert list(spec.classes) == sorted(spec.classes), spec.name
        assert list(spec.domains) == sorted(spec.domains), spec.name


def test_class_counts_match_domainbed() -> None:
    counts = {name: len(spec.classes) for name, spec in REGISTRY.items()}
    assert counts["PACS"] == 7 and counts["VLCS"] == 5 and counts["OfficeHome"] == 65
    assert counts["TerraIncognita"] == 10 and counts["DomainNet"] == 345


def test_get_spec_is_case_insensitive() -> None:
    assert get_spec("pacs").name == "PACS"
    assert get_spec("officehome").dirname == "office_home"


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown dataset 'MNIST': choose one of PACS, VLCS"):
        get_spec("MNIST")


def test_label_of_is_the_sorted_index() -> None:
    spec = get_spec("PACS")
    assert spec.label_of("dog") == 0 and spec.label_of("person") == 6
