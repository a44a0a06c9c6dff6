import pytest

from domainbed_reasoning.chains.chain_format import (
    STAGES,
    Chain,
    ChainFormatError,
    RejectReason,
    format_chain,
    parse_chain,
)

STAGE_TEXT = {
    "summary": "I will look at the overall shape.",
    "caption": "A four-legged animal with a long neck.",
    "reasoning": "The long neck and spotted coat indicate a giraffe.",
    "reflection": "A horse has a short neck, so it is not a horse.",
    "conclusion": "giraffe",
}


def test_format_chain_is_canonical_one_stage_per_line() -> None:
    text = format_chain(STAGE_TEXT)
    assert text.splitlines() == [
        f"<{stage}>{STAGE_TEXT[stage.lower()]}</{stage}>" for stage in STAGES
    ]


def test_format_chain_accepts_upper_case_keys_and_strips_bodies() -> None:
    upper = {key.upper(): f"  {value}\n" for key, value in STAGE_TEXT.items()}
    assert format_chain(upper) == format_chain(STAGE_TEXT)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            {k: v for k, v in STAGE_TEXT.items() if k != "caption"},
            "missing: CAPTION; unknown: none",
        ),
        (STAGE_TEXT | {"answer": "x"}, "missing: none; unknown: ANSWER"),
    ],
)
def test_format_chain_rejects_wrong_stage_sets(stages: dict[str, str], message: str) -> None:
    with pytest.raises(ChainFormatError, match=message) as err:
        format_chain(stages)
    assert err.value.reason is RejectReason.MISSING_STAGE


def test_parse_round_trips_format() -> None:
    chain = parse_chain(format_chain(STAGE_TEXT))
    assert chain == Chain(**STAGE_TEXT)
    assert chain.as_dict() == STAGE_TEXT
    assert parse_chain(chain.text) == chain


def test_parse_is_lenient_on_surface() -> None:
    text = (
        "Sure! Here is my analysis.\n\n"
        "< summary >\n  I will look at the overall shape.\n</Summary>\n"
        "<CAPTION>A four-legged animal with a long neck.</ CAPTION>\n"
        "<reasoning>The long neck and spotted coat indicate a giraffe.</reasoning>"
        "<Reflection>A horse has a short neck, so it is not a horse.</REFLECTION>\n"
        "**<CONCLUSION>giraffe</CONCLUSION>**\n```\n"
    )
    assert parse_chain(text) == Chain(**STAGE_TEXT)


@pytest.mark.parametrize(
    "tail", ["\nHope this helps.", " Actually, a horse.", "\n\n<p>note</p>", "**Giraffe**", "\n1"]
)
def test_any_word_after_the_conclusion_is_trailing_text(tail: str) -> None:
    """A chain that goes on after </CONCLUSION> may take its answer back: malformed, not cut."""
    with pytest.raises(ChainFormatError, match="follows </CONCLUSION>") as err:
        parse_chain(format_chain(STAGE_TEXT) + tail)
    assert err.value.reason is RejectReason.TRAILING_TEXT


def test_parse_keeps_multiline_bodies() -> None:
    text = format_chain(STAGE_TEXT | {"reasoning": "Step 1: neck.\nStep 2: coat."})
    assert parse_chain(text).reasoning == "Step 1: neck.\nStep 2: coat."


def _tags(*stages: str, body: str = "x") -> str:
    return "".join(f"<{stage}>{body}</{stage}>" for stage in stages)


@pytest.mark.parametrize(
    ("text", "reason", "detail"),
    [
        ("", RejectReason.EMPTY_RESPONSE, "empty"),
        ("  \n\t", RejectReason.EMPTY_RESPONSE, "empty"),
        ("It is a giraffe.", RejectReason.NO_CONCLUSION, "no <CONCLUSION>"),
        (_tags(*STAGES[:4]), RejectReason.NO_CONCLUSION, "no <CONCLUSION>"),
        (
            _tags(*STAGES[:4]) + "<CONCLUSION>giraffe",
            RejectReason.NO_CONCLUSION,
            "the end of the text",
        ),
        (
            _tags(*STAGES[:4]) + "<CONCLUSION>giraffe</SUMMARY>",
            RejectReason.NO_CONCLUSION,
            "before </SUMMARY>",
        ),
        (
            _tags("SUMMARY", "REASONING", "REFLECTION", "CONCLUSION"),
            RejectReason.MISSING_STAGE,
            "missing CAPTION",
        ),
        (
            _tags("CAPTION", "SUMMARY", *STAGES[2:]),
            RejectReason.ORDER,
            "CAPTION > SUMMARY > REASONING",
        ),
        (
            _tags(*STAGES[:2], *STAGES),
            RejectReason.DUPLICATE_STAGE,
            "SUMMARY, CAPTION appear more than once",
        ),
        (_tags(*STAGES, "CONCLUSION"), RejectReason.DUPLICATE_STAGE, "CONCLUSION appears"),
        (
            "<SUMMARY>x" + _tags(*STAGES[1:]),
            RejectReason.UNCLOSED_TAG,
            "<SUMMARY> is not closed before <CAPTION>",
        ),
        ("</SUMMARY>" + _tags(*STAGES), RejectReason.UNCLOSED_TAG, "</SUMMARY> closes a tag"),
        (
            _tags(*STAGES[:2]) + "<REASONING> </REASONING>" + _tags(*STAGES[3:]),
            RejectReason.EMPTY_STAGE,
            "REASONING",
        ),
        (
            _tags(*STAGES[:4]) + "<CONCLUSION>\n</CONCLUSION>",
            RejectReason.EMPTY_STAGE,
            "CONCLUSION is empty",
        ),
    ],
)
def test_parse_rejects_malformed_chains(text: str, reason: RejectReason, detail: str) -> None:
    with pytest.raises(ChainFormatError) as err:
        parse_chain(text)
    assert err.value.reason is reason
    assert detail in err.value.detail
    assert str(err.value).startswith(f"{reason.value}: ")


def test_reject_reasons_are_the_documented_set() -> None:
    assert {reason.value for reason in RejectReason} == {
        "empty_response", "missing_stage", "order", "empty_stage", "duplicate_stage", "no_conclusion",
        "unclosed_tag", "trailing_text", "uncertain", "negated", "modifier", "no_class", "ambiguous",
        "wrong_class", "truncated", "request_error",
    }  # fmt: skip
