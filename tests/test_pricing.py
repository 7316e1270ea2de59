"""Prices: linear in pixels and steps, per image, rounded up to 0.001 credit."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.accounts.pricing import credits_to_millicredits, format_credits, price_per_image

ONE = Decimal("1")


def test_reference_image_costs_one_credit() -> None:
    assert price_per_image(1024, 1024, 25, ONE) == 1000


@pytest.mark.parametrize(
    ("width", "height", "steps", "expected"),
    [
        (512, 512, 25, 250),
        (2048, 2048, 50, 8000),
        (1024, 1024, 50, 2000),
        (512, 512, 1, 10),
        (520, 512, 1, 11),  # 10.15625 rounds up
    ],
)
def test_price_scales_with_pixels_and_steps(
    width: int, height: int, steps: int, expected: int
) -> None:
    assert price_per_image(width, height, steps, ONE) == expected


def test_reference_price_is_configurable() -> None:
    assert price_per_image(1024, 1024, 25, Decimal("0.25")) == 250


def test_credit_formatting_round_trips() -> None:
    for millicredits in (0, 1, 10, 999, 1000, 1500, 123456):
        assert credits_to_millicredits(Decimal(format_credits(millicredits))) == millicredits
    assert format_credits(1500) == "1.5"
    assert format_credits(0) == "0"


def test_more_than_three_decimals_is_refused() -> None:
    with pytest.raises(ValueError, match="three decimals"):
        credits_to_millicredits(Decimal("0.0001"))
