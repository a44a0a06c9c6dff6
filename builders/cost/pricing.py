"""What teacher tokens cost: OpenAI's list prices for the gpt-4o family, or the user's own.

Prices change, so each known one carries the date it took effect and is printed with it;
`--price-in` / `--price-out` replace it. A model without a known price (a local vLLM
teacher, a model newer than this table) gets no cost at all rather than a guessed one.
The Batch API bills half the online price, which is applied to the list prices here and
never to prices the user typed (they are taken as the prices of the mode being run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from domainbed_reasoning.errors import UserError

# How a build sends its requests, each billed at its own price: one at a time, or through the Batch API.
MODES = ("online", "batch")
PER_TOKENS = 1_000_000
BATCH_DISCOUNT = 0.5
PRICE_PAGE = "https://openai.com/api/pricing"


@dataclass(frozen=True)
class Price:
    """Dollars per million prompt (`input`) and completion (`output`) tokens, and where they come from."""

    input: float
    output: float
    source: str

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / PER_TOKENS

    def describe(self) -> str:
        return f"{price_text(self.input)} in / {price_text(self.output)} out per 1M tokens ({self.source})"


def price_text(amount: float) -> str:
    """Cents always, more digits only where a price has them: $2.50, $0.075."""
    return f"${amount:,.2f}" if round(amount, 2) == amount else f"${amount:g}"


GPT_4O = Price(2.50, 10.00, f"OpenAI list price since 2024-08-06, see {PRICE_PAGE}")
GPT_4O_MAY = Price(5.00, 15.00, f"OpenAI list price since 2024-05-13, see {PRICE_PAGE}")
GPT_4O_MINI = Price(0.15, 0.60, f"OpenAI list price since 2024-07-18, see {PRICE_PAGE}")
LIST_PRICES = {
    "gpt-4o": GPT_4O,
    "gpt-4o-2024-08-06": GPT_4O,
    "gpt-4o-2024-11-20": GPT_4O,
    "gpt-4o-2024-05-13": GPT_4O_MAY,
    "gpt-4o-mini": GPT_4O_MINI,
    "gpt-4o-mini-2024-07-18": GPT_4O_MINI,
}


def resolve_price(
    model: str, price_in: float | None, price_out: float | None, batch: bool
) -> Price | None:
    """The user's prices when given (both or neither), else the model's list price, else None."""
    if (price_in is None) != (price_out is None):
        raise UserError(
            "--price-in and --price-out go together: give both, in dollars per million tokens"
        )
    if price_in is not None and price_out is not None:
        if price_in < 0 or price_out < 0:
            raise UserError(f"--price-in {price_in} / --price-out {price_out}: must be 0 or more")
        return Price(price_in, price_out, "--price-in/--price-out")
    listed = LIST_PRICES.get(model)
    if listed is None or not batch:
        return listed
    return replace(
        listed,
        input=listed.input * BATCH_DISCOUNT,
        output=listed.output * BATCH_DISCOUNT,
        source=f"Batch API: half of the {listed.source}",
    )


def unknown_price_note(model: str) -> str:
    return (
        f"no price known for model {model!r}: pass --price-in and --price-out "
        "(dollars per million tokens) to see a cost"
    )
