"""The Kolors request schema: Segmind's names, defaults and ranges, in one place.

The API validates with it, the worker reads it, and the OpenAPI document is
generated from it, so the three can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from shared.errors import FieldProblem, InvalidParams, field_problems
from shared.webhooks.urls import WebhookRefused, check_url_syntax

MAX_SEED: Final = 2**32 - 1
RANDOM_SEED: Final = -1

# Every scheduler here is exercised on the real KolorsPipeline by tests/test_schedulers.py.
SchedulerName = Literal[
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
]
SCHEDULERS: Final = get_args(SchedulerName)

OUTPUT_FORMATS: Final = ("webp", "jpeg", "png")
CONTENT_TYPES: Final = {"webp": "image/webp", "jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS: Final = {"webp": "webp", "jpeg": "jpg", "png": "png"}

WebhookEvent = Literal["start", "completed"]
# Fields that shape the answer or its notifications, not the image.
NOT_RENDERING_INPUTS: Final = frozenset({"base64", "webhook", "webhook_events_filter"})


def _default_events() -> list[WebhookEvent]:
    return ["completed"]


Dimension = Annotated[int, Field(ge=512, le=2048, multiple_of=8)]


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image `index` of a request whose base seed is `base_seed` (mod 2^32)."""
    return (base_seed + index) % (MAX_SEED + 1)


class KolorsParams(BaseModel):
    """Parameters of one Kolors request, exactly as Segmind names them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        min_length=1, max_length=10_000, description="What to draw; Chinese or English."
    )
    negative_prompt: str = Field(default="", max_length=10_000, description="What to avoid.")
    cfg: float = Field(default=6.0, ge=0, le=20, allow_inf_nan=False, description="Guidance scale.")
    seed: int = Field(
        default=441234134,
        ge=RANDOM_SEED,
        le=MAX_SEED,
        description="0 to 2^32-1; -1 picks a random seed. Image i uses seed + i (mod 2^32).",
    )
    steps: int = Field(default=25, ge=1, le=50, description="Diffusion steps.")
    width: Dimension = Field(default=1024, description="512 to 2048, a multiple of 8.")
    height: Dimension = Field(default=1024, description="512 to 2048, a multiple of 8.")
    scheduler: SchedulerName = Field(
        default="EulerDiscreteScheduler", description="A diffusers scheduler class name."
    )
    output_format: Literal["webp", "jpeg", "png"] = Field(
        default="webp", description="webp, jpeg (jpg accepted) or png."
    )
    output_quality: int = Field(default=80, ge=0, le=100, description="Encoder quality, 0 to 100.")
    number_of_images: int = Field(default=1, ge=1, le=10, description="1 to 10 images.")
    base64: bool = Field(
        default=False,
        description="POST /v1/kolors only: answer JSON with every image in base64.",
    )
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="Farm extension (Replicate's name): an http(s) URL to POST the request's "
        "events to, signed per Standard Webhooks. Hosts that resolve to loopback, private, "
        "link-local or metadata addresses are refused unless the operator allows them. "
        "No webhook: null, empty, or `null` (how form data spells null).",
    )
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=_default_events,
        min_length=1,
        max_length=2,
        description='Which events to send: "start", "completed" (default ["completed"]); '
        "form data may repeat the field or separate names with commas.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator(
        "cfg",
        "seed",
        "steps",
        "width",
        "height",
        "output_quality",
        "number_of_images",
        mode="before",
    )
    @classmethod
    def _no_bool_numbers(cls, value: Any) -> Any:
        # JSON true is not 1 steps; pydantic's lax mode would take it.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook_is_http(cls, value: str | None) -> str | None:
        # Form data has no null: an empty field, or the word, is how it says "no webhook"
        # (the same as JSON null). Neither can be an http(s) URL, so nothing is lost.
        if value is None or value in ("", "null"):
            return None
        try:
            return check_url_syntax(value)
        except WebhookRefused as exc:
            raise PydanticCustomError(exc.rule, exc.message) from None

    @field_validator("webhook_events_filter", mode="before")
    @classmethod
    def _events_from_text(cls, value: Any) -> Any:
        # Form data carries one string: "start,completed".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_events_filter")
    @classmethod
    def _events_once(cls, value: list[str]) -> list[str]:
        return [event for event in ("start", "completed") if event in value]

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, value: Any) -> Any:
        # Segmind accepts "jpg"; it names the same encoder, so this is an alias, not a fix.
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    def render_fields(self) -> dict[str, Any]:
        """The parameters a job stores: rendering inputs (no response flags, no webhook)."""
        return self.model_dump(exclude=set(NOT_RENDERING_INPUTS))


def parse_params(data: Mapping[str, Any]) -> KolorsParams:
    """Validate raw form or JSON fields; raise InvalidParams naming each bad field and rule."""
    try:
        return KolorsParams.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidParams(field_problems(exc, KolorsParams, "body", explain=_choices)) from None


def _choices(problem: FieldProblem) -> FieldProblem:
    """A choice outside the list names the list (pydantic quotes every member's repr)."""
    if problem.rule != "literal_error":
        return problem
    allowed = ", ".join(_allowed(problem.field))
    return FieldProblem(problem.field, problem.rule, f"must be one of: {allowed}")


def _allowed(field: str) -> tuple[str, ...]:
    if field == "scheduler":
        return SCHEDULERS
    if field == "output_format":
        return (*OUTPUT_FORMATS, "jpg")
    if field.startswith("webhook_events_filter"):
        return ("start", "completed")
    return ()


def params_json_schema() -> dict[str, Any]:
    """The request body's JSON Schema (for the OpenAPI document)."""
    return KolorsParams.model_json_schema()
