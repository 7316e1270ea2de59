"""Prices in millicredits: linear in pixels and steps, per image, rounded up."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import Final

MILLICREDITS_PER_CREDIT: Final = 1000
REFERENCE_PIXELS: Final = 1024 * 1024
REFERENCE_STEPS: Final = 25

Credits = str  # a decimal string, e.g. "9.5", as `format_credits` writes it
CREDITS_PATTERN: Final = r"^[0-9]+(\.[0-9]{1,3})?$"  # what `format_credits` writes


def price_per_image(width: int, height: int, steps: int, reference_price: Decimal) -> int:
    """Millicredits for one image; `reference_price` credits buy a 1024x1024, 25-step image."""
    exact = (
        reference_price
        * MILLICREDITS_PER_CREDIT
        * width
        * height
        * steps
        / (REFERENCE_PIXELS * REFERENCE_STEPS)
    )
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def credits_to_millicredits(credits: Decimal) -> int:
    """Convert a credit amount to millicredits; more than three decimals is an error."""
    scaled = credits * MILLICREDITS_PER_CREDIT
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{credits} has more than three decimals")
    return int(scaled)


def format_credits(millicredits: int) -> str:
    """Render millicredits as a decimal credit string, e.g. 1500 -> '1.5'."""
    value = Decimal(millicredits) / MILLICREDITS_PER_CREDIT
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"
