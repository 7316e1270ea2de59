"""The parameter schema: Segmind's names, defaults and ranges, and clear rejections."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import InvalidParams
from shared.jobs.params import SCHEDULERS, KolorsParams, image_seed, parse_params


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidParams) as caught:
        parse_params(data)
    return {p.field: p.rule for p in caught.value.problems}


def test_defaults_match_segmind() -> None:
    params = parse_params({"prompt": "a cat"})
    assert params.model_dump() == {
        "prompt": "a cat",
        "negative_prompt": "",
        "cfg": 6.0,
        "seed": 441234134,
        "steps": 25,
        "width": 1024,
        "height": 1024,
        "scheduler": "EulerDiscreteScheduler",
        "output_format": "webp",
        "output_quality": 80,
        "number_of_images": 1,
        "base64": False,
        # Farm extensions (Replicate's names), not rendering inputs.
        "webhook": None,
        "webhook_events_filter": ["completed"],
    }


def test_form_strings_are_parsed_as_numbers() -> None:
    params = parse_params(
        {
            "prompt": "狐狸 in snow",
            "steps": "30",
            "cfg": "6.5",
            "width": "768",
            "height": "1536",
            "seed": "-1",
            "number_of_images": "3",
        }
    )
    assert (params.steps, params.cfg, params.width, params.height) == (30, 6.5, 768, 1536)
    assert params.seed == -1
    assert params.number_of_images == 3


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("steps", 0, "greater_than_equal"),
        ("steps", 51, "less_than_equal"),
        ("steps", "2.5", "int_parsing"),
        ("steps", True, "value_error"),
        ("cfg", -0.1, "greater_than_equal"),
        ("cfg", 20.5, "less_than_equal"),
        ("cfg", "nan", "finite_number"),
        ("seed", -2, "greater_than_equal"),
        ("seed", 2**32, "less_than_equal"),
        ("width", 504, "greater_than_equal"),
        ("width", 2056, "less_than_equal"),
        ("height", 1001, "multiple_of"),
        ("output_quality", 101, "less_than_equal"),
        ("number_of_images", 11, "less_than_equal"),
        ("number_of_images", 0, "greater_than_equal"),
        ("scheduler", "FlowMatchEulerDiscreteScheduler", "literal_error"),
        ("output_format", "gif", "literal_error"),
        ("guidance_scale", 5, "extra_forbidden"),
    ],
)
def test_out_of_range_values_name_field_and_rule(field: str, value: Any, rule: str) -> None:
    assert problems({"prompt": "a cat", field: value}) == {field: rule}


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_blank_prompt_is_rejected(prompt: str) -> None:
    assert "prompt" in problems({"prompt": prompt})


def test_missing_prompt_is_rejected() -> None:
    assert problems({"steps": 10}) == {"prompt": "missing"}


def test_unknown_scheduler_message_lists_the_supported_ones() -> None:
    with pytest.raises(InvalidParams) as caught:
        parse_params({"prompt": "x", "scheduler": "Nope"})
    assert "EulerDiscreteScheduler" in caught.value.message
    assert caught.value.message.startswith("scheduler:")


def test_jpg_is_an_alias_of_jpeg() -> None:
    assert parse_params({"prompt": "x", "output_format": "jpg"}).output_format == "jpeg"


def test_boundaries_are_inclusive() -> None:
    params = parse_params(
        {
            "prompt": "x",
            "steps": 50,
            "cfg": 20,
            "seed": 2**32 - 1,
            "width": 2048,
            "height": 512,
            "output_quality": 0,
            "number_of_images": 10,
        }
    )
    assert (params.steps, params.width, params.height) == (50, 2048, 512)


def test_image_seeds_wrap_modulo_2_32() -> None:
    assert image_seed(2**32 - 1, 0) == 2**32 - 1
    assert image_seed(2**32 - 1, 2) == 1


def test_every_scheduler_literal_is_listed() -> None:
    schema = KolorsParams.model_json_schema()
    assert tuple(schema["properties"]["scheduler"]["enum"]) == SCHEDULERS
