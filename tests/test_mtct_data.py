"""DomainBed-Reasoning rows -> MTCT examples, and the one-line errors on unusable splits."""

from __future__ import annotations

import datasets
import pytest
import torch
from domainbed_reasoning.train.mtct.mtct_data import (
    SplitCounts,
    build_examples,
    check_split,
    class_names,
    image_sizes,
)
from domainbed_reasoning.train.mtct.mtct_trainer import (
    GroupShuffleSampler,
    TaskCollator,
    length_keys,
)
from PIL import Image

from domainbed_reasoning.chains.chain_format import format_chain
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.export import features

SPEC = get_spec("OfficeHome")
CLASSES = list(SPEC.classes)


def _png(colour: str) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


def _row(
    index: int, class_name: str, chain: str | None = "default", image: object = "default"
) -> dict:
    stages = {
        "summary": "s",
        "caption": "c",
        "reasoning": "r",
        "reflection": "f",
        "conclusion": class_name,
    }
    return {
        "id": f"OfficeHome/Art/{class_name}/{index}.png",
        "dataset": "OfficeHome",
        "domain": "Art",
        "label": SPEC.label_of(class_name),
        "class_name": class_name,
        "image": _png("red") if image == "default" else image,
        "chain": format_chain(stages) if chain == "default" else chain,
        **{key: value for key, value in stages.items()},
        "teacher": "t",
        "prompt_version": "v",
        "attempts": 1,
        "chain_status": "accepted" if chain else "exhausted",
        "round": 1 if chain else None,
        "temperature": 0.7 if chain else None,
    }


def _split(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=features(SPEC))


@pytest.fixture
def split() -> datasets.Dataset:
    return _split([_row(0, "Alarm_Clock"), _row(1, "TV"), _row(2, "Desk_Lamp")])


def test_mtct_gives_each_image_a_cls_and_a_reasoning_example_side_by_side(
    split: datasets.Dataset,
) -> None:
    examples = build_examples(split, "mtct", CLASSES)
    assert examples["task"] == ["cls", "reasoning"] * 3
    assert examples["id"] == [row_id for row_id in split["id"] for _ in range(2)]
    cls, reasoning = examples[0], examples[1]
    assert cls["completion"][0]["content"][0]["text"] == "alarm clock"
    assert reasoning["completion"][0]["content"][0]["text"] == split[0]["chain"]
    assert cls["prompt"][0]["content"][1]["text"] == load_prompt("classify").render(
        classes=class_list(CLASSES)
    )
    assert reasoning["prompt"][0]["content"][1]["text"] == load_prompt("reason").render(
        classes=class_list(CLASSES)
    )
    assert cls["prompt"][0]["content"][0]["type"] == "image"
    assert isinstance(examples.features["images"], datasets.List)
    assert cls["images"][0].size == (8, 8)
    assert image_sizes(examples) == [(8, 8)] * 6  # (height, width), read from the header


def test_image_size_is_read_from_bytes_and_from_a_path(tmp_path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (30, 10)).save(path)
    wide = _row(0, "TV", image={"bytes": None, "path": str(path)})
    tall = _row(1, "TV", image=Image.new("RGB", (10, 20)))
    assert image_sizes(build_examples(_split([wide, tall]), "cls", CLASSES)) == [(10, 30), (20, 10)]


@pytest.mark.parametrize(("method", "task"), [("cls", "cls"), ("reasoning", "reasoning")])
def test_single_path_methods_give_one_example_per_image(
    split: datasets.Dataset, method: str, task: str
) -> None:
    examples = build_examples(split, method, CLASSES)
    assert examples["task"] == [task] * 3
    assert examples["id"] == split["id"]
    answers = [row[0]["content"][0]["text"] for row in examples["completion"]]
    expected = ["alarm clock", "TV", "desk lamp"] if method == "cls" else split["chain"]
    assert answers == expected


def test_label_never_appears_in_a_prompt(split: datasets.Dataset) -> None:
    examples = build_examples(split, "mtct", CLASSES)
    assert len({row[0]["content"][1]["text"] for row in examples["prompt"]}) == 2


def test_max_images_takes_a_seeded_subset_keeping_pairs(split: datasets.Dataset) -> None:
    first = build_examples(split, "mtct", CLASSES, max_images=2, seed=3)
    again = build_examples(split, "mtct", CLASSES, max_images=2, seed=3)
    assert len(first) == 4 and first["id"] == again["id"]
    assert first["id"][0] == first["id"][1] and first["id"][2] == first["id"][3]


def test_unknown_method_is_refused(split: datasets.Dataset) -> None:
    with pytest.raises(
        UserError, match="unknown method 'both': choose one of mtct, cls, reasoning"
    ):
        build_examples(split, "both", CLASSES)


def test_class_names_come_from_the_class_label(split: datasets.Dataset) -> None:
    assert class_names(split) == CLASSES
    with pytest.raises(UserError, match="`label` column is not a ClassLabel"):
        class_names(split.cast_column("label", datasets.Value("int64")))


def test_check_split_accepts_a_good_split(split: datasets.Dataset) -> None:
    check_split(split, "mtct")


def test_dataset_without_chains_is_refused_for_reasoning_but_fine_for_cls(
    split: datasets.Dataset,
) -> None:
    no_chains = split.remove_columns("chain")
    with pytest.raises(UserError, match="the train split has no chain column"):
        check_split(no_chains, "mtct")
    check_split(no_chains, "cls")


@pytest.mark.parametrize("chain", [None, "   "])
def test_an_image_without_a_chain_trains_the_class_name_path_only(chain: str | None) -> None:
    split = _split([_row(0, "TV"), _row(1, "Fan", chain=chain), _row(2, "Pen")])
    assert check_split(split, "mtct") == SplitCounts(images=3, with_chain=2)
    assert check_split(split, "cls") == SplitCounts(images=3, with_chain=2)
    examples = build_examples(split, "mtct", CLASSES)
    assert list(zip(examples["id"], examples["task"], strict=True)) == [
        ("OfficeHome/Art/TV/0.png", "cls"),
        ("OfficeHome/Art/TV/0.png", "reasoning"),
        ("OfficeHome/Art/Fan/1.png", "cls"),
        ("OfficeHome/Art/Pen/2.png", "cls"),
        ("OfficeHome/Art/Pen/2.png", "reasoning"),
    ]
    assert build_examples(split, "reasoning", CLASSES)["id"] == [
        "OfficeHome/Art/TV/0.png",
        "OfficeHome/Art/Pen/2.png",
    ]
    assert len(build_examples(split, "cls", CLASSES)) == 3


def test_a_train_split_without_any_chain_is_refused_for_the_reasoning_path() -> None:
    split = _split([_row(0, "TV", chain=None), _row(1, "Fan", chain=None)])
    for method in ("mtct", "reasoning", "rd-mldg"):
        with pytest.raises(
            UserError,
            match="no image of the train split has an accepted reasoning chain: build chains",
        ):
            check_split(split, method)
    assert check_split(split, "cls").images == 2
    assert check_split(split, "mtct", "validation") == SplitCounts(images=2, with_chain=0)


def test_missing_image_is_named(tmp_path) -> None:
    split = _split([_row(0, "TV", image={"bytes": None, "path": str(tmp_path / "gone.png")})])
    with pytest.raises(
        UserError, match="image OfficeHome/Art/TV/0.png in the train split is missing"
    ):
        check_split(split, "cls")


def test_image_stored_as_an_existing_path_is_accepted(tmp_path) -> None:
    path = tmp_path / "ok.png"
    _png("blue").save(path)
    check_split(_split([_row(0, "TV", image={"bytes": None, "path": str(path)})]), "mtct")


def test_group_sampler_keeps_an_images_rows_adjacent_and_reshuffles_per_epoch() -> None:
    keys = [f"img{i // 2}" for i in range(40)]
    sampler = GroupShuffleSampler(keys, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(40)) and len(sampler) == 40
    assert all(keys[first[i]] == keys[first[i + 1]] for i in range(0, 40, 2))
    assert first == list(GroupShuffleSampler(keys, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_task_collator_adds_the_task_and_hides_row_keys_from_trl() -> None:
    seen = []

    def base(rows: list[dict]) -> dict:
        seen.extend(rows)
        return {"attention_mask": torch.ones(len(rows), 3, dtype=torch.long)}

    batch = TaskCollator(base)(
        [{"task": "cls", "id": "a", "prompt": 1}, {"task": "reasoning", "id": "a", "prompt": 2}]
    )
    assert batch["task"].tolist() == [0, 1]
    assert seen == [{"prompt": 1}, {"prompt": 2}]


def test_length_grouping_sorts_images_within_a_megabatch_and_keeps_pairs() -> None:
    """Rows of similar length share micro-batches (less padding); an image's rows stay adjacent."""
    keys = [f"pair{i // 2}" for i in range(40)] + [f"single{i}" for i in range(4)]
    lengths = [(i // 2) * 37 % 101 for i in range(40)] + [5, 300, 7, 9]
    sampler = GroupShuffleSampler(keys, seed=4, lengths=lengths, megabatch=22)
    order = list(sampler)
    assert sorted(order) == list(range(44))
    units = [order[i : i + 2] for i in range(0, 44, 2)]
    for a, b in units:
        assert keys[a] == keys[b] or (keys[a].startswith("single") and keys[b].startswith("single"))
    longest = [max(lengths[i] for i in unit) for unit in units]
    assert longest[:11] == sorted(longest[:11], reverse=True)
    assert longest[11:] == sorted(longest[11:], reverse=True)
    assert set(order) == set(GroupShuffleSampler(keys, seed=4))  # the same rows, reordered


def test_length_grouping_leaves_class_names_in_their_shuffled_order() -> None:
    """Class-name answers differ by a few characters: grouped by exact length, each micro-batch
    would hold one class. Counted in steps, they keep the shuffle; chains still sort."""
    names = ["circle", "cross", "square", "star", "triangle", "Alarm_Clock", "The_Great_Wall_of_China"]
    answers = [names[i % len(names)] for i in range(70)]
    keys = [f"single{i}" for i in range(70)]
    lengths = length_keys(answers, [256] * 70)
    grouped = GroupShuffleSampler(keys, seed=3, lengths=lengths, megabatch=20)
    assert list(grouped) == list(GroupShuffleSampler(keys, seed=3))
    chains = ["x" * 2000, "x" * 300, "x" * 1200, "x" * 600]
    assert length_keys(chains, [0] * 4) == [15, 2, 9, 4]


def test_length_grouping_counts_each_image_s_tokens() -> None:
    """A tiling processor spends more on one image than on its chain: a 640x480 photo's class
    name is a longer row than a 227x227 image's chain, and the sampler ranks them so."""
    assert length_keys(["cat", "x" * 1200, "cat"], [3328, 256, 256]) == [104, 17, 8]


def test_pairs_share_a_batch_when_the_batch_is_even() -> None:
    keys = [f"img{i // 2}" for i in range(24)]
    order = list(GroupShuffleSampler(keys, seed=0))
    batches = [order[i : i + 4] for i in range(0, 24, 4)]
    for batch in batches:
        assert sorted(keys[i] for i in batch)[0::2] == sorted(keys[i] for i in batch)[1::2]


def test_images_with_one_row_are_paired_so_an_even_batch_never_splits_an_image() -> None:
    """Images without a chain have only the cls row: two of them make one unit of two rows."""
    keys = [f"pair{i // 2}" for i in range(20)] + [f"single{i}" for i in range(7)]
    sampler = GroupShuffleSampler(keys, seed=2)
    order = list(sampler)
    assert sorted(order) == list(range(27)) and len(sampler) == 27
    for start in range(0, 26, 2):
        a, b = keys[order[start]], keys[order[start + 1]]
        assert a == b or (a.startswith("single") and b.startswith("single"))
    assert keys[order[-1]].startswith("single")
    sampler.set_epoch(3)
    assert list(sampler) != order
