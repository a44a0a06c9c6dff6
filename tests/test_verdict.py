import pytest
from domainbed_reasoning.train.engines.base import Generation
from domainbed_reasoning.train.sarr.self_label import Supervised, merge_self_labels

from domainbed_reasoning.chains.chain_format import Chain
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.rules import RULES, ReadBy, RejectReason
from domainbed_reasoning.chains.verdict import Verdict, judge
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError

SUMMARY = "I will examine the subject's shape and parts, then compare them with the categories."
CAPTION = "A four-legged animal standing on grass, with a long snout and a curled tail."
REASONING = "The snout, floppy ears and collar are typical of a domestic dog."
REFLECTION = "A horse would be larger with a mane; a giraffe has a long neck."


def teacher(conclusion: str, **stages: str) -> str:
    """A realistic five-stage answer in the teacher's usual layout."""
    parts = {
        "SUMMARY": SUMMARY,
        "CAPTION": CAPTION,
        "REASONING": REASONING,
        "REFLECTION": REFLECTION,
    }
    parts |= {key.upper(): value for key, value in stages.items()}
    body = "\n\n".join(f"<{tag}>\n{text}\n</{tag}>" for tag, text in parts.items())
    return f"{body}\n\n<CONCLUSION>\n{conclusion}\n</CONCLUSION>"


def stage(tag: str, text: str) -> str:
    return f"<{tag}>{text}</{tag}>"


SUM, CAP = stage("SUMMARY", SUMMARY), stage("CAPTION", CAPTION)
REA, REF = stage("REASONING", REASONING), stage("REFLECTION", REFLECTION)
DOG = stage("CONCLUSION", "dog")
R = RejectReason

ACCEPTED = [
    ("PACS", "dog", teacher("dog"), "dog"),
    ("PACS", "dog", teacher("Dog."), "dog"),
    ("PACS", "dog", teacher("**dog**"), "dog"),
    ("PACS", "dog", teacher("The answer is: dog"), "dog"),
    ("PACS", "dog", "Sure! Let me look step by step.\n\n" + teacher("dog"), "dog"),
    ("PACS", "dog", "**" + teacher("dog") + "**\n```\n", "dog"),
    ("PACS", "dog", teacher("dog").lower(), "dog"),
    ("PACS", "dog", teacher("dog").replace("<", "< ").replace(">", " >"), "dog"),
    ("PACS", "dog", SUM + CAP + REA + REF + "<Conclusion>  dog  </conclusion>", "dog"),
    ("PACS", "guitar", teacher("The image shows a guitar"), "guitar"),
    ("PACS", "horse", teacher("horses"), "horse"),
    ("PACS", "person", teacher("A person."), "person"),
    ("PACS", "elephant", teacher("“Elephant”"), "elephant"),
    (
        "PACS",
        "house",
        teacher("house", caption="A sketch of a roof,\na chimney, two windows."),
        "house",
    ),
    ("VLCS", "car", teacher("car"), "car"),
    ("VLCS", "chair", teacher("Chairs"), "chair"),
    ("VLCS", "person", teacher("people"), "person"),
    ("OfficeHome", "Alarm_Clock", teacher("alarm clock."), "Alarm_Clock"),
    ("OfficeHome", "Alarm_Clock", teacher("Alarm Clock"), "Alarm_Clock"),
    ("OfficeHome", "Desk_Lamp", teacher("desk lamp"), "Desk_Lamp"),
    ("OfficeHome", "Lamp_Shade", teacher("Lamp_Shade"), "Lamp_Shade"),
    ("OfficeHome", "Pencil", teacher("pencil"), "Pencil"),
    ("OfficeHome", "TV", teacher("TV"), "TV"),
    ("OfficeHome", "Postit_Notes", teacher("post-it notes"), "Postit_Notes"),
    ("OfficeHome", "Batteries", teacher("battery"), "Batteries"),
    ("TerraIncognita", "empty", teacher("empty"), "empty"),
    ("TerraIncognita", "empty", teacher("The frame is empty."), "empty"),
    ("TerraIncognita", "raccoon", teacher("raccoon"), "raccoon"),
    ("SynthDG", "triangle", teacher("triangle"), "triangle"),
    ("DomainNet", "The_Eiffel_Tower", teacher("the Eiffel Tower"), "The_Eiffel_Tower"),
    ("DomainNet", "hot_dog", teacher("hot dog"), "hot_dog"),
    ("TerraIncognita", "dog", teacher("It is a dog, not a cat"), "dog"),
    ("OfficeHome", "Mouse", teacher("a computer mouse"), "Mouse"),
    ("DomainNet", "cat", teacher("a line drawing of a cat"), "cat"),
    ("DomainNet", "cat", teacher("The image best matches the category cat."), "cat"),
    ("OfficeHome", "TV", teacher("a television"), "TV"),
    ("OfficeHome", "Bike", teacher("bicycle"), "Bike"),
    ("OfficeHome", "Glasses", teacher("eyeglasses"), "Glasses"),
    ("DomainNet", "bus", teacher("buses"), "bus"),
    ("DomainNet", "cactus", teacher("cacti"), "cactus"),
    ("DomainNet", "octopus", teacher("octopuses"), "octopus"),
    ("PACS", "horse", teacher("A person riding a horse. The answer is horse."), "horse"),
]


@pytest.mark.parametrize(("dataset", "label", "text", "predicted"), ACCEPTED)
def test_accepted(dataset: str, label: str, text: str, predicted: str) -> None:
    verdict = judge(text, ClassMatcher(get_spec(dataset).classes), label, finish_reason="stop")
    assert verdict.accepted, verdict.detail
    assert (verdict.reason, verdict.predicted) == (None, predicted)
    assert verdict.chain is not None and all(verdict.chain.as_dict().values())


# (dataset, label, answer, finish_reason, reason, detail)
REJECTED = [
    ("PACS", "dog", None, None, R.EMPTY_RESPONSE, "empty"),
    ("PACS", "dog", "", "stop", R.EMPTY_RESPONSE, "empty"),
    ("PACS", "dog", "   \n", "stop", R.EMPTY_RESPONSE, "empty"),
    ("PACS", "dog", teacher("dog")[:200], "length", R.TRUNCATED, "finish_reason 'length'"),
    ("PACS", "dog", teacher("dog"), "length", R.TRUNCATED, "token limit"),
    ("PACS", "dog", "The image shows a dog.", "stop", R.NO_CONCLUSION, "no <CONCLUSION>"),
    ("PACS", "dog", SUM + CAP + REA + REF, "stop", R.NO_CONCLUSION, "no <CONCLUSION>"),
    (
        "PACS",
        "dog",
        SUM + CAP + REA + REF + "<CONCLUSION>dog",
        "stop",
        R.NO_CONCLUSION,
        "not closed",
    ),
    ("PACS", "dog", SUM + CAP + REA + REF + "Conclusion: dog", "stop", R.NO_CONCLUSION, "no <CONC"),
    ("PACS", "dog", SUM + REA + REF + DOG, None, R.MISSING_STAGE, "missing CAPTION"),
    ("PACS", "dog", SUM + CAP + REA + DOG, None, R.MISSING_STAGE, "missing REFLECTION"),
    ("PACS", "dog", CAP + SUM + REA + REF + DOG, None, R.ORDER, "CAPTION > SUMMARY"),
    ("PACS", "dog", SUM + CAP + DOG + REA + REF, None, R.ORDER, "CONCLUSION > REASONING"),
    ("PACS", "dog", teacher("dog", reasoning="  "), None, R.EMPTY_STAGE, "REASONING is empty"),
    ("PACS", "dog", teacher(""), None, R.EMPTY_STAGE, "CONCLUSION is empty"),
    ("PACS", "dog", SUM + CAP + CAP + REA + REF + DOG, None, R.DUPLICATE_STAGE, "CAPTION appears"),
    ("PACS", "dog", teacher("dog") + DOG, None, R.DUPLICATE_STAGE, "CONCLUSION appears"),
    (
        "PACS",
        "dog",
        "<SUMMARY>plan" + CAP + REA + REF + DOG,
        None,
        R.UNCLOSED_TAG,
        "<SUMMARY> is not",
    ),
    (
        "PACS",
        "dog",
        SUM + CAP + "<REASONING>x<REASONING>" + REF + DOG,
        None,
        R.UNCLOSED_TAG,
        "<REASONING>",
    ),
    ("PACS", "dog", teacher("a zebra"), "stop", R.NO_CLASS, "names none"),
    ("OfficeHome", "Mug", teacher("Real World"), "stop", R.NO_CLASS, "'Real World' names none"),
    ("PACS", "dog", teacher("I cannot determine the category."), "stop", R.UNCERTAIN, "hedges"),
    ("PACS", "dog", teacher("dog or horse"), "stop", R.AMBIGUOUS, "names dog, horse"),
    ("TerraIncognita", "dog", teacher("a dog and a cat"), "stop", R.AMBIGUOUS, "cat, dog"),
    ("PACS", "dog", teacher("dog") + "\nHope it helps!", "stop", R.TRAILING_TEXT, "'Hope it h"),
    (
        "PACS",
        "dog",
        teacher("dog") + "\nOn second thought, a horse.",
        "stop",
        R.TRAILING_TEXT,
        "follows </CONCLUSION>",
    ),
    ("PACS", "dog", teacher("It is not a dog."), "stop", R.NEGATED, "'dog' is denied by 'not'"),
    (
        "PACS",
        "dog",
        teacher("I cannot tell whether this is a dog."),
        "stop",
        R.UNCERTAIN,
        "hedges",
    ),
    ("DomainNet", "fish", teacher("a fish tank"), "stop", R.MODIFIER, "'fish' modifies 'tank'"),
    ("DomainNet", "bird", teacher("a bird cage"), "stop", R.MODIFIER, "'bird' modifies 'cage'"),
    ("DomainNet", "key", teacher("a key chain"), "stop", R.MODIFIER, "'key' modifies 'chain'"),
    ("OfficeHome", "Oven", teacher("an oven mitt"), "stop", R.MODIFIER, "'oven' modifies 'mitt'"),
    ("OfficeHome", "Glasses", teacher("a wine glass"), "stop", R.NO_CLASS, "names none"),
    ("OfficeHome", "Table", teacher("a table lamp"), "stop", R.MODIFIER, "'table' modifies"),
    (
        "OfficeHome",
        "Desk_Lamp",
        teacher("desk lamp, lamp shade"),
        "stop",
        R.AMBIGUOUS,
        "Desk_Lamp, L",
    ),
    ("PACS", "dog", teacher("horse"), "stop", R.WRONG_CLASS, "concluded 'horse', label is 'dog'"),
    (
        "OfficeHome",
        "Pencil",
        teacher("pen"),
        "stop",
        R.WRONG_CLASS,
        "concluded 'Pen', label is 'Pe",
    ),
    ("VLCS", "bird", teacher("The image shows a dog."), "stop", R.WRONG_CLASS, "concluded 'dog'"),
    ("TerraIncognita", "bobcat", teacher("empty"), "stop", R.WRONG_CLASS, "concluded 'empty'"),
]


@pytest.mark.parametrize(("dataset", "label", "text", "finish", "reason", "detail"), REJECTED)
def test_rejected(
    dataset: str, label: str, text: str | None, finish: str | None, reason: R, detail: str
) -> None:
    verdict = judge(text, ClassMatcher(get_spec(dataset).classes), label, finish_reason=finish)
    assert not verdict.accepted
    assert verdict.reason is reason
    assert detail in verdict.detail


def test_wrong_class_keeps_the_chain_and_prediction_for_audit() -> None:
    verdict = judge(teacher("horse"), ClassMatcher(get_spec("PACS").classes), "dog")
    assert verdict.predicted == "horse"
    assert verdict.chain is not None and verdict.chain.conclusion == "horse"
    assert (verdict.rule, verdict.read_by) == (RejectReason.WRONG_CLASS, ReadBy.EXACT)


@pytest.mark.parametrize(
    ("conclusion", "rule"),
    [
        ("dog", ReadBy.EXACT),
        ("The answer is dog.", ReadBy.ANSWER_PHRASE),
        ("A dog on the grass, not a horse.", ReadBy.ONE_CLASS),
        ("It is not a dog.", RejectReason.NEGATED),
    ],
)
def test_a_verdict_names_the_rule_that_decided(
    conclusion: str, rule: ReadBy | RejectReason
) -> None:
    verdict = judge(teacher(conclusion), ClassMatcher(get_spec("PACS").classes), "dog")
    assert verdict.rule is rule


def test_every_rule_has_a_line_for_the_report() -> None:
    assert set(RULES) == set(RejectReason) | set(ReadBy)
    assert all(RULES.values())


def test_label_outside_the_class_list_is_a_user_error() -> None:
    with pytest.raises(UserError, match="label 'cat' is not one of the dataset's classes"):
        judge(teacher("dog"), ClassMatcher(get_spec("PACS").classes), "cat")


def test_rejected_records_failures_judge_never_sees() -> None:
    verdict = Verdict.rejected(RejectReason.REQUEST_ERROR, "connection refused after 3 retries")
    assert verdict == Verdict(
        False, RejectReason.REQUEST_ERROR, None, None, "connection refused after 3 retries"
    )


def test_table_covers_every_reason_judge_can_give() -> None:
    assert {row[4] for row in REJECTED} == set(RejectReason) - {RejectReason.REQUEST_ERROR}
    assert len(ACCEPTED) + len(REJECTED) >= 40


def test_accepted_chain_is_canonical() -> None:
    verdict = judge("noise " + teacher(" dog "), ClassMatcher(get_spec("PACS").classes), "dog")
    assert verdict.chain == Chain(SUMMARY, CAPTION, REASONING, REFLECTION, "dog")
    assert verdict.chain.text.startswith(f"<SUMMARY>{SUMMARY}</SUMMARY>\n<CAPTION>")


def test_sarr_self_labels_are_judged_by_the_same_rules() -> None:
    """A student chain is kept or refused exactly as a teacher chain would be, with the same rule."""
    answers = (
        teacher("dog") + "\nActually, a horse.",
        teacher("It is not a dog."),
        teacher("a hot dog"),
        teacher("The answer is dog, not horse."),
    )
    frame = merge_self_labels(
        [Supervised("PACS/photo/dog/1.jpg", "dog", "teacher chain")],
        [Generation(answers, ("stop",) * len(answers))],
        ClassMatcher(get_spec("PACS").classes),
    )
    expected = [judge(text, ClassMatcher(get_spec("PACS").classes), "dog") for text in answers]
    assert frame["reasons"].to_list() == [["trailing_text", "negated", "modifier", "accepted"]]
    assert [verdict.rule for verdict in expected[:3]] == frame["reasons"][0].to_list()[:3]
    assert frame["chain"].to_list() == [expected[3].chain.text]
