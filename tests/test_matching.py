
import pytest

from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.matching import (
    ClassMatcher,
    MatchError,
    match_class,
    matcher_for,
    normalise,
)
from domainbed_reasoning.chains.prompt_templates import humanise
from domainbed_reasoning.data.registry import SPECS, get_spec
from domainbed_reasoning.errors import UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Alarm_Clock", "alarm clock"),
        ("  The “Alarm-Clock”. ", "alarm clock"),
        ("An elephant!", "elephant"),
        ("the the dog", "dog"),
        ("horses", "horse"),
        ("Batteries", "battery"),
        ("glasses", "glass"),
        ("boxes", "box"),
        ("Knives", "knife"),
        ("people", "person"),
        ("cactus", "cactus"),
        ("It's a dog's toy", "its a dog toy"),
        ("**DOG**", "dog"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_every_class_matches_itself_and_its_humanised_plural_forms(spec) -> None:
    matcher = ClassMatcher(spec.classes)
    for name in spec.classes:
        assert matcher.match(name) == name
        assert matcher.match(humanise(name)) == name
        assert matcher.match(f"The answer is: {humanise(name).upper()}.") == name


CASES = [
    ("PACS", "dog", "dog"),
    ("PACS", "The answer is: dog", "dog"),
    ("PACS", "Dog.", "dog"),
    ("PACS", "**dog**", "dog"),
    ("PACS", "The image shows a guitar", "guitar"),
    ("PACS", "horses", "horse"),
    ("PACS", "Two people", "person"),
    ("PACS", "It is a dog, not a cat", "dog"),
    ("VLCS", "A car parked on the street.", "car"),
    ("VLCS", "birds", "bird"),
    ("OfficeHome", "alarm clock.", "Alarm_Clock"),
    ("OfficeHome", "Alarm Clock", "Alarm_Clock"),
    ("OfficeHome", "alarmclock", "Alarm_Clock"),
    ("OfficeHome", "desk lamp", "Desk_Lamp"),
    ("OfficeHome", "a lamp shade", "Lamp_Shade"),
    ("OfficeHome", "pencil", "Pencil"),
    ("OfficeHome", "pens", "Pen"),
    ("OfficeHome", "a mouse", "Mouse"),
    ("OfficeHome", "a TV", "TV"),
    ("OfficeHome", "tooth brush", "ToothBrush"),
    ("OfficeHome", "flip-flops", "Flipflops"),
    ("OfficeHome", "Post-it notes", "Postit_Notes"),
    ("OfficeHome", "battery", "Batteries"),
    ("OfficeHome", "a knife", "Knives"),
    ("OfficeHome", "‘trash can’", "Trash_Can"),
    ("TerraIncognita", "empty", "empty"),
    ("TerraIncognita", "The frame is empty.", "empty"),
    ("TerraIncognita", "raccoons", "raccoon"),
    ("SynthDG", "a five-pointed star", "star"),
    ("DomainNet", "The Eiffel Tower", "The_Eiffel_Tower"),
    ("DomainNet", "eiffel tower", "The_Eiffel_Tower"),
    ("DomainNet", "T-shirt", "t-shirt"),
    ("DomainNet", "tshirt", "t-shirt"),
    ("DomainNet", "teddy bear", "teddy-bear"),
    ("DomainNet", "hot dog", "hot_dog"),
    ("DomainNet", "It looks like a hot dog.", "hot_dog"),
    ("DomainNet", "The picture shows a red fire truck", "firetruck"),
    ("DomainNet", "an open paint can", "paint_can"),
    ("OfficeHome", "This is a desk lamp", "Desk_Lamp"),
    ("OfficeHome", "some post-it notes on a wall", "Postit_Notes"),
    ("DomainNet", "a house plant", "house_plant"),
    ("DomainNet", "baseball bat", "baseball_bat"),
    ("DomainNet", "fire truck", "firetruck"),
    ("DomainNet", "see-saw", "see_saw"),
    ("DomainNet", "potatoes", "potato"),
    ("DomainNet", "matches", "matches"),
    ("DomainNet", "mice", "mouse"),
]


@pytest.mark.parametrize(("dataset", "text", "expected"), CASES)
def test_match_class(dataset: str, text: str, expected: str) -> None:
    assert match_class(text, get_spec(dataset).classes) == expected


REJECTS = [
    ("OfficeHome", "Real World", RejectReason.NO_CLASS, "'Real World' names none of the classes"),
    ("PACS", "a zebra", RejectReason.NO_CLASS, "names none"),
    ("PACS", "", RejectReason.NO_CLASS, "names none"),
    ("OfficeHome", "computer mouse", RejectReason.AMBIGUOUS, "names Computer, Mouse"),
    ("TerraIncognita", "It is a dog, not a cat", RejectReason.AMBIGUOUS, "names cat, dog"),
    ("PACS", "a person riding a horse", RejectReason.AMBIGUOUS, "names horse, person"),
    (
        "OfficeHome",
        "a desk lamp with a lamp shade",
        RejectReason.AMBIGUOUS,
        "names Desk_Lamp, Lamp_Shade",
    ),
    ("OfficeHome", "pen or pencil", RejectReason.AMBIGUOUS, "names Pen, Pencil"),
    ("DomainNet", "a cat and a dog", RejectReason.AMBIGUOUS, "names cat, dog"),
]


@pytest.mark.parametrize(("dataset", "text", "reason", "detail"), REJECTS)
def test_match_class_rejects(dataset: str, text: str, reason: RejectReason, detail: str) -> None:
    with pytest.raises(MatchError) as err:
        match_class(text, get_spec(dataset).classes)
    assert err.value.reason is reason
    assert detail in err.value.detail


def test_indistinguishable_classes_are_a_user_error() -> None:
    with pytest.raises(
        UserError, match="classes 'Desk_Lamp' and 'desk-lamps' read the same once normalised"
    ):
        ClassMatcher(["Desk_Lamp", "desk-lamps"])


def test_class_without_letters_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"class name '__' has no letters or digits"):
        ClassMatcher(["dog", "__"])


def test_matcher_is_cached_per_class_list() -> None:
    classes = get_spec("PACS").classes
    assert matcher_for(classes) is matcher_for(tuple(classes))


def test_a_conclusion_seen_before_gets_the_same_answer() -> None:
    """Successful matches are remembered by their text; rejections are decided afresh each time."""
    matcher = ClassMatcher(["Alarm_Clock", "dog", "hot_dog"])
    for _ in range(2):
        assert matcher.match("Alarm clock.") == "Alarm_Clock"
        assert matcher.match("a hot dog") == "hot_dog"
        with pytest.raises(MatchError, match="ambiguous: 'a dog or an alarm clock' names"):
            matcher.match("a dog or an alarm clock")
