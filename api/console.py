"""The web console: server-rendered page shells whose scripts call the JSON API.

The pages hold no user data: each page's script signs in with the API key kept in
the tab's sessionStorage and sends it as the `x-api-key` header on fetch(). The
API authenticates only by that header (no cookies, no CORS), which a browser never
attaches on its own, so a cross-site form or image cannot act for a signed-in user:
there is no ambient credential to ride, hence no CSRF token either.

Every asset is served from this package (no CDN). The Content-Security-Policy
allows scripts, styles and connections to this origin only, and images from this
origin plus `blob:` and `data:`: the console fetches each image with the key and
shows it as a blob, so presigned S3 links (another origin) never need to be allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from flask import Blueprint, Response, redirect, render_template, url_for
from werkzeug.wrappers import Response as BaseResponse

from shared.jobs.params import KolorsParams, params_json_schema

bp = Blueprint(
    "console",
    __name__,
    template_folder="templates",
    static_folder="static/console",
    static_url_path="/console/static",
)

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Parameters of the synchronous route only; the console renders asynchronously.
_NOT_IN_FORM: Final = frozenset({"base64", "webhook", "webhook_events_filter"})
_TEXTAREAS: Final = frozenset({"prompt", "negative_prompt"})


@bp.after_request
def security_headers(response: Response) -> Response:
    """Every console page and asset: a strict CSP, no sniffing, no referrer, no framing."""
    response.headers.update(SECURITY_HEADERS)
    return response


@dataclass(frozen=True)
class FormField:
    """One render parameter as a form control, read from the API's own schema."""

    name: str
    label: str
    kind: str  # "textarea", "select" or "number"
    value_type: str  # the JSON type the API expects: "string", "integer" or "number"
    required: bool
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    step: str | None = None
    max_length: int | None = None
    options: tuple[str, ...] = ()

    @property
    def hint(self) -> str:
        """The schema's description, with the range when the description does not give it."""
        if self.minimum is None or self.maximum is None:
            return self.description
        low, high = _number(self.minimum), _number(self.maximum)
        if low in self.description and high in self.description:
            return self.description
        return f"{self.description} ({low} to {high})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def form_fields() -> list[FormField]:
    """The render form's controls, in the schema's order, with its defaults and ranges."""
    schema = params_json_schema()
    required = set(schema.get("required", ()))
    fields = []
    for name, spec in schema["properties"].items():
        if name in _NOT_IN_FORM:
            continue
        value_type = spec.get("type", "string")
        kind = "textarea" if name in _TEXTAREAS else "select" if "enum" in spec else "number"
        step = None
        if kind == "number":
            multiple = spec.get("multipleOf")
            step = str(multiple) if multiple else ("1" if value_type == "integer" else "any")
        fields.append(
            FormField(
                name=name,
                label=spec.get("title", name),
                kind=kind,
                value_type=value_type,
                required=name in required,
                default=spec.get("default"),
                description=spec.get("description", ""),
                minimum=spec.get("minimum"),
                maximum=spec.get("maximum"),
                step=step,
                max_length=spec.get("maxLength"),
                options=tuple(spec.get("enum", ())),
            )
        )
    return fields


def _page(template: str, **context: Any) -> str:
    return render_template(f"console/{template}", **context)


@bp.get("/")
def root() -> BaseResponse:
    """The farm's front door is the console."""
    return redirect(url_for("console.sign_in"))


@bp.get("/console/")
def sign_in() -> str:
    """Sign in with an API key (kept in this tab's sessionStorage only)."""
    return _page("signin.html", page="signin")


@bp.get("/console/render")
def render_form() -> str:
    """The render form, built from the API's parameter schema."""
    return _page("render.html", page="render", fields=form_fields(), model=KolorsParams.__name__)


@bp.get("/console/requests/<job_id>")
def request_page(job_id: str) -> str:
    """One request: live progress, then its images with seeds and downloads."""
    return _page("request.html", page="request", job_id=job_id)


@bp.get("/console/gallery")
def gallery() -> str:
    """The tenant's requests, newest first, in pages."""
    return _page("gallery.html", page="gallery")


@bp.get("/console/usage")
def usage() -> str:
    """The balance and the daily usage table."""
    return _page("usage.html", page="usage")


@bp.get("/console/operator")
def operator() -> str:
    """Workers, tenants' queues, users and grants (operators only; the API enforces it)."""
    return _page("operator.html", page="operator")
