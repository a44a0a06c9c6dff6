import pytest

from domainbed_reasoning.chains.lexicon import LEXICON_FILE, lexicon, normalise, texts
from domainbed_reasoning.chains.matching import ClassMatcher, MatchError, match_class, matcher_for
from domainbed_reasoning.chains.prompt_templates import humanise
from domainbed_reasoning.chains.rules import ReadBy, RejectReason
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
        ("glasses", "glasses"),
        ("a wine glass", "wine glass"),
        ("buses", "bus"),
        ("cacti", "cactus"),
        ("octopuses", "octopus"),
        ("houses", "house"),
        ("boxes", "box"),
        ("Knives", "knife"),
        ("people", "person"),
        ("cactus", "cactus"),
        ("It's a dog's toy", "its a dog toy"),
        ("**DOG**", "dog"),
        ("dog, not cat.", "dog not cat"),
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


# Ordinary ways a teacher states its answer; every class of every dataset must be reachable by
# each of them, so no rule (modifier heads, negation, verbs, media) swallows a class name.
PLAIN_CONCLUSIONS = (
    "The image shows a {}.",
    "Answer: {}",
    "This is a {}, drawn in pencil.",
    "A pencil sketch of a {}.",
    "The image most likely shows a {} with a red handle.",
    "It is not a zebra; it is a {}.",
)


@pytest.mark.parametrize("template", PLAIN_CONCLUSIONS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_no_class_is_unreachable(spec, template: str) -> None:
    matcher = ClassMatcher(spec.classes)
    missed = {
        name: matcher.read(template.format(humanise(name))).detail
        for name in spec.classes
        if matcher.read(template.format(humanise(name))).class_name != name
    }
    assert not missed


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
    # a careful reader's answers
    ("OfficeHome", "a computer mouse", "Mouse"),
    ("DomainNet", "a line drawing of a cat", "cat"),
    ("DomainNet", "The image best matches the category cat", "cat"),
    ("OfficeHome", "television", "TV"),
    ("DomainNet", "a TV", "television"),
    ("OfficeHome", "a bicycle", "Bike"),
    ("DomainNet", "Bike", "bicycle"),
    ("OfficeHome", "eyeglasses", "Glasses"),
    ("OfficeHome", "a pair of glasses", "Glasses"),
    ("DomainNet", "Glasses", "eyeglasses"),
    ("DomainNet", "buses", "bus"),
    ("DomainNet", "cacti", "cactus"),
    ("DomainNet", "octopuses", "octopus"),
    ("DomainNet", "two school buses", "school_bus"),
    ("DomainNet", "two wine glasses", "wine_glass"),
    ("DomainNet", "a pair of sunglasses", "eyeglasses"),
    ("PACS", "The image shows a person riding a horse. The answer is horse.", "horse"),
    ("PACS", "A horse and its rider; answer: person", "person"),
    ("PACS", "Final answer - guitar (the person only holds it)", "guitar"),
    ("DomainNet", "It is classified as a cat, though a dog appears too.", "cat"),
    ("PACS", "It is not a horse but a dog.", "dog"),
    ("PACS", "a dog rather than a horse", "dog"),
    ("PACS", "Neither a horse nor a giraffe: a dog.", "dog"),
    ("TerraIncognita", "No animal is visible; the frame is empty.", "empty"),
    ("TerraIncognita", "No animal", "empty"),
    ("TerraIncognita", "The frame is not empty, it shows a bobcat", "bobcat"),
    ("OfficeHome", "a pencil sketch of a bottle", "Bottle"),
    ("OfficeHome", "a bottle, drawn in pencil", "Bottle"),
    ("OfficeHome", "a frying pan", "Pan"),
    ("OfficeHome", "a ceiling fan", "Fan"),
    ("VLCS", "a police car", "car"),
    ("DomainNet", "I saw a cat", "cat"),
    ("DomainNet", "a crayon drawing of a house", "house"),
    ("PACS", "The image most likely shows a dog.", "dog"),
    ("PACS", "Elephant - the trunk and tusks are clear.", "elephant"),
    ("OfficeHome", "marker pen", "Marker"),
    ("OfficeHome", "a can of soda", "Soda"),
    ("PACS", "A house with no people", "house"),
    ("TerraIncognita", "There are no animals in the frame.", "empty"),
]


@pytest.mark.parametrize(("dataset", "text", "expected"), CASES)
def test_match_class(dataset: str, text: str, expected: str) -> None:
    assert match_class(text, get_spec(dataset).classes) == expected


REJECTS = [
    ("OfficeHome", "Real World", RejectReason.NO_CLASS, "'Real World' names none of the classes"),
    ("PACS", "a zebra", RejectReason.NO_CLASS, "names none"),
    ("PACS", "", RejectReason.NO_CLASS, "names none"),
    ("PACS", "a person riding a horse", RejectReason.AMBIGUOUS, "names horse, person"),
    (
        "OfficeHome",
        "a desk lamp with a lamp shade",
        RejectReason.AMBIGUOUS,
        "names Desk_Lamp, Lamp_Shade",
    ),
    ("OfficeHome", "pen or pencil", RejectReason.AMBIGUOUS, "names Pen, Pencil"),
    ("OfficeHome", "pen/pencil", RejectReason.AMBIGUOUS, "names Pen, Pencil"),
    ("DomainNet", "a cat and a dog", RejectReason.AMBIGUOUS, "names cat, dog"),
    ("PACS", "Answer: a person and a horse", RejectReason.AMBIGUOUS, "names horse, person"),
    # negations and hedges
    ("PACS", "It is not a dog.", RejectReason.NEGATED, "'dog' is denied by 'not'"),
    ("PACS", "There is no dog here", RejectReason.NEGATED, "denied by 'no'"),
    ("PACS", "It isn't a dog or a horse", RejectReason.NEGATED, "denied by 'isnt'"),
    ("PACS", "The answer is not dog", RejectReason.NEGATED, "'dog' is denied by 'not'"),
    ("TerraIncognita", "The frame is not empty", RejectReason.NEGATED, "'empty' is denied"),
    (
        "PACS",
        "I cannot tell whether this is a dog.",
        RejectReason.UNCERTAIN,
        "hedges ('cannot tell')",
    ),
    ("PACS", "Maybe a dog", RejectReason.UNCERTAIN, "hedges ('maybe')"),
    ("PACS", "Dog?", RejectReason.UNCERTAIN, "hedges ('?')"),
    ("PACS", "It could be a dog or a horse", RejectReason.UNCERTAIN, "'could be'"),
    ("PACS", "either a dog or a horse", RejectReason.UNCERTAIN, "'either'"),
    # a class word modifying another noun
    ("DomainNet", "a fish tank", RejectReason.MODIFIER, "'fish' modifies 'tank'"),
    ("DomainNet", "a bird cage", RejectReason.MODIFIER, "'bird' modifies 'cage'"),
    ("DomainNet", "a key chain", RejectReason.MODIFIER, "'key' modifies 'chain'"),
    ("OfficeHome", "an oven mitt", RejectReason.MODIFIER, "'oven' modifies 'mitt'"),
    ("OfficeHome", "a table lamp", RejectReason.MODIFIER, "'table' modifies 'lamp'"),
    ("OfficeHome", "a wine glass", RejectReason.NO_CLASS, "names none"),
    (
        "OfficeHome",
        "two wine glasses",
        RejectReason.MODIFIER,
        "'glasses' is part of 'wine glasses'",
    ),
    ("PACS", "a hot dog", RejectReason.MODIFIER, "'dog' is part of 'hot dog'"),
    ("PACS", "a house plant", RejectReason.MODIFIER, "'house' is part of 'house plant'"),
    ("DomainNet", "It matches the picture", RejectReason.NO_CLASS, "'matches' is a verb"),
    # a class word before a lost full stop stays a noun: no verb reading picks the other class
    ("PACS", "**Horse** The rider is a person", RejectReason.AMBIGUOUS, "names horse, person"),
    ("OfficeHome", "a mouse pad", RejectReason.MODIFIER, "'mouse' modifies 'pad'"),
]


@pytest.mark.parametrize(("dataset", "text", "reason", "detail"), REJECTS)
def test_match_class_rejects(dataset: str, text: str, reason: RejectReason, detail: str) -> None:
    with pytest.raises(MatchError) as err:
        match_class(text, get_spec(dataset).classes)
    assert err.value.reason is reason
    assert detail in err.value.detail


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("dog", ReadBy.EXACT),
        ("a puppy", ReadBy.EXACT),
        ("The answer is dog.", ReadBy.ANSWER_PHRASE),
        ("A dog sits on the grass.", ReadBy.ONE_CLASS),
        ("It is not a dog.", RejectReason.NEGATED),
    ],
)
def test_every_reading_names_the_rule_that_decided(text: str, rule: ReadBy | RejectReason) -> None:
    assert ClassMatcher(get_spec("PACS").classes).read(text).rule is rule


def test_synonyms_read_as_the_one_class_of_their_group() -> None:
    office = ClassMatcher(get_spec("OfficeHome").classes)
    assert office.synonyms["television"] == "TV"
    assert office.synonyms["sofa"] == "Couch"
    # DomainNet names both telephone and cell_phone: each keeps its own synonyms.
    domainnet = ClassMatcher(get_spec("DomainNet").classes)
    assert (domainnet.match("a phone"), domainnet.match("a smartphone")) == (
        "telephone",
        "cell_phone",
    )
    # A group naming two classes of one dataset is not used: no synonym may pick between them.
    assert "sofa" not in ClassMatcher(["couch", "settee"]).synonyms


def test_a_synonym_never_shadows_a_class() -> None:
    matcher = ClassMatcher(["bike", "bicycle", "tv"])
    assert (matcher.match("bike"), matcher.match("bicycle")) == ("bike", "bicycle")
    assert matcher.match("television") == "tv"


def test_lexicon_refuses_an_entry_yaml_read_as_not_text() -> None:
    with pytest.raises(ValueError, match=f"{LEXICON_FILE}: negation_cues .* quote them"):
        texts({"negation_cues": ["not", False]}, "negation_cues")
    assert ("no",) in lexicon().negation_cues["no"]


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
    """Readings are remembered by their text, rejections included."""
    matcher = ClassMatcher(["Alarm_Clock", "dog", "hot_dog"])
    for _ in range(2):
        assert matcher.match("Alarm clock.") == "Alarm_Clock"
        assert matcher.match("a hot dog") == "hot_dog"
        with pytest.raises(MatchError, match="ambiguous: 'a dog or an alarm clock' names"):
            matcher.match("a dog or an alarm clock")
    assert matcher.read("a hot dog") is matcher.read("a hot dog")
