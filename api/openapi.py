"""The OpenAPI 3.1 document, generated from the views' `operation` metadata and their models.

Nothing here lists a route: the document walks the app's url_map and documents
every view carrying `api.spec.operation`, with the schemas of the pydantic models
the views answer and the one parameter schema (`shared.jobs.params.KolorsParams`).
Bounds that come from the operator's settings (deadline and retention headers)
are read from the app's settings, so the document states what this server enforces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final, Literal

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.exceptions import NotFound
from werkzeug.routing import Rule

from api.context import farm
from api.server import GUNICORN_DETAILS
from api.spec import PROBLEM_MEDIA_TYPE, Operation, Problem, ResponseHeader, operation_of
from api.views import external_url
from shared.settings import Settings

bp = Blueprint("openapi", __name__)

DOCUMENT_KEY: Final = "kolors_farm_openapi"
REF_TEMPLATE: Final = "#/components/schemas/{model}"
IGNORED_METHODS: Final = {"HEAD", "OPTIONS"}
SECURITY: Final[list[dict[str, list[str]]]] = [{"apiKey": []}, {"bearer": []}]

ERROR_DESCRIPTIONS: Final = {
    400: "Invalid parameters: `errors` names each field, query parameter or header and its "
    "rule (without `errors`: the request is not valid HTTP)",
    401: "Missing or invalid API key",
    403: "Forbidden (a tampered, re-targeted or expired link; a route for admins only)",
    404: "Unknown id (or another tenant's)",
    406: "Not enough credits",
    409: "Conflict with the current state",
    410: "The request's results passed their retention and were deleted",
    413: "Request body too large",
    414: GUNICORN_DETAILS[414],
    422: "The request FAILED (or was cancelled)",
    429: "Too many live requests for this user (see Retry-After)",
    431: GUNICORN_DETAILS[431],
    503: "A backing service is unavailable (see Retry-After)",
    504: "The render did not finish within the synchronous wait; it goes on",
}
# What the HTTP server answers before any route runs, so every operation may answer it.
SERVER_ERRORS: Final = {status: GUNICORN_DETAILS[status] for status in (400, 414, 431)}
RETRY_AFTER: Final = ResponseHeader(
    "Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}, required=True
)
REMAINING_CREDITS: Final = ResponseHeader(
    "The caller's spendable credits after this request (authenticated requests).",
    {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,3})?$"},
)

# Werkzeug converters and the JSON Schema of the values they match.
_CONVERTER_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "default": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    "string": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    "int": {"type": "integer", "minimum": 0},
    "path": {"type": "string", "minLength": 1},
}
_ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")

Mode = Literal["validation", "serialization"]


def _openapi_path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """The rule's path in OpenAPI's `{name}` form, with its path parameters."""
    parameters = []
    for match in _ARGUMENT.finditer(rule.rule):
        converter = match.group("converter") or "default"
        parameters.append(
            {
                "name": match.group("name"),
                "in": "path",
                "required": True,
                "schema": dict(_CONVERTER_SCHEMAS.get(converter, _CONVERTER_SCHEMAS["default"])),
            }
        )
    return _ARGUMENT.sub(lambda m: "{" + m.group("name") + "}", rule.rule), parameters


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter's schema without the `null` branch (absent is not null)."""
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        kept = [branch for branch in branches if branch != {"type": "null"}]
        if len(kept) == 1:
            rest = {key: value for key, value in schema.items() if key != "anyOf"}
            merged: dict[str, Any] = kept[0] | rest
            return merged
    return schema


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, ref_template=REF_TEMPLATE)
    required = set(schema.get("required", []))
    parameters = []
    for name, field_schema in schema.get("properties", {}).items():
        field = _not_null(dict(field_schema))
        if field.get("default", "") is None:
            del field["default"]  # absent, not null: a query string has no null
        description = field.pop("description", None)
        field.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": field,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _header(spec: ResponseHeader) -> dict[str, Any]:
    return {"description": spec.description, "required": spec.required, "schema": spec.schema}


class _Schemas:
    """The component schemas the document references, generated together by pydantic."""

    def __init__(self) -> None:
        self.models: dict[tuple[type[BaseModel], Mode], None] = {}

    def ref(self, model: type[BaseModel], mode: Mode) -> dict[str, str]:
        """A placeholder reference, resolved to the component's name by `resolve`."""
        self.models[(model, mode)] = None
        return {"$ref": f"model:{mode}:{model.__module__}.{model.__qualname__}"}

    def build(self) -> tuple[dict[str, str], dict[str, Any]]:
        """The placeholder-to-reference map and the components' schemas."""
        keys = list(self.models)
        refs, top = models_json_schema(keys, ref_template=REF_TEMPLATE)
        placeholders = {
            f"model:{mode}:{model.__module__}.{model.__qualname__}": refs[(model, mode)]["$ref"]
            for model, mode in keys
        }
        return placeholders, top.get("$defs", {})


def _resolve(node: Any, placeholders: dict[str, str]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"} and node["$ref"] in placeholders:
            return {"$ref": placeholders[node["$ref"]]}
        return {key: _resolve(value, placeholders) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, placeholders) for value in node]
    return node


def _content(schemas: _Schemas, media_types: dict[str, type[BaseModel] | None]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for media_type, model in media_types.items():
        if model is not None:
            content[media_type] = {"schema": schemas.ref(model, "serialization")}
        elif media_type.startswith("image/"):
            content[media_type] = {"schema": {"type": "string", "contentMediaType": media_type}}
        else:
            content[media_type] = {}
    return content


def _responses(spec: Operation, schemas: _Schemas) -> dict[str, Any]:
    extra_headers = {"x-remaining-credits": REMAINING_CREDITS} if spec.secured else {}
    media_types = dict(spec.response_media_types or {})
    if not media_types and spec.response is not None:
        media_types = {"application/json": spec.response}
    success: dict[str, Any] = {
        "description": spec.response_description
        or (spec.response.__doc__ or "OK").strip().splitlines()[0]
        if spec.response
        else spec.response_description or spec.summary
    }
    if media_types:
        success["content"] = _content(schemas, media_types)
    headers = {**extra_headers, **spec.response_headers}
    if headers:
        success["headers"] = {name: _header(value) for name, value in headers.items()}
    if spec.links:
        success["links"] = {name: dict(link) for name, link in spec.links.items()}
    responses: dict[str, Any] = {str(spec.status): success}
    for status, alternative in spec.alternatives.items():
        answer: dict[str, Any] = {"description": alternative.description}
        if alternative.model is not None or alternative.media_types:
            answer["content"] = _content(
                schemas, dict.fromkeys(alternative.media_types, alternative.model)
            )
        alternative_headers = {**extra_headers, **alternative.headers}
        if alternative_headers:
            answer["headers"] = {
                name: _header(value) for name, value in alternative_headers.items()
            }
        responses[str(status)] = answer
    for status in spec.errors:
        error_headers = {} if status == 401 else dict(extra_headers)
        if status in (429, 503):
            error_headers["Retry-After"] = RETRY_AFTER
        problem: dict[str, Any] = {
            "description": ERROR_DESCRIPTIONS.get(status, "Error"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schemas.ref(Problem, "serialization")}},
        }
        if error_headers:
            problem["headers"] = {name: _header(value) for name, value in error_headers.items()}
        responses[str(status)] = problem
    for status, description in SERVER_ERRORS.items():
        responses.setdefault(
            str(status),
            {
                "description": description,
                "content": {PROBLEM_MEDIA_TYPE: {"schema": schemas.ref(Problem, "serialization")}},
            },
        )
    return responses


def _operation(
    spec: Operation, rule: Rule, schemas: _Schemas, settings: Settings, operation_id: str
) -> tuple[str, dict[str, Any]]:
    path, parameters = _openapi_path(rule)
    if spec.query is not None:
        parameters += _query_parameters(spec.query)
    for header in spec.headers:
        parameters.append(
            {
                "name": header.name,
                "in": "header",
                "required": False,
                "description": header.description,
                "schema": header.schema(settings),
            }
        )
    document: dict[str, Any] = {"operationId": operation_id, "summary": spec.summary}
    if spec.description:
        document["description"] = spec.description
    if spec.tags:
        document["tags"] = list(spec.tags)
    if parameters:
        document["parameters"] = parameters
    if spec.body is not None:
        body = schemas.ref(spec.body, "validation")
        document["requestBody"] = {
            "required": True,
            "content": {media_type: {"schema": body} for media_type in spec.body_media_types},
        }
    document["responses"] = _responses(spec, schemas)
    document["security"] = SECURITY if spec.secured else []
    return path, document


def build_openapi(app: Flask, settings: Settings) -> dict[str, Any]:
    """The whole OpenAPI document of `app`: every view carrying `operation` metadata."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    tags: list[str] = []
    for rule in app.url_map.iter_rules():
        spec = operation_of(app.view_functions[rule.endpoint])
        if spec is None:
            continue
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            # One view may serve several routes (DELETE and POST .../cancel): the first
            # keeps the given id, the others get their method (or path) appended.
            base_id = spec.operation_id or rule.endpoint.replace(".", "_")
            operation_id = base_id
            if operation_id in used_ids:
                operation_id = f"{base_id}{method.capitalize()}"
            if operation_id in used_ids:
                operation_id = base_id + "_" + re.sub(r"\W+", "_", rule.rule).strip("_")
            used_ids.add(operation_id)
            path, document = _operation(spec, rule, schemas, settings, operation_id)
            paths.setdefault(path, {})[method.lower()] = document
            tags.extend(tag for tag in spec.tags if tag not in tags)
    placeholders, components = schemas.build()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Kolors render farm",
            "version": "2",
            "description": (
                "Segmind-compatible Kolors text-to-image API. Errors are RFC 9457 problem "
                "documents (`application/problem+json`) that also carry Segmind's `error` "
                "string. Credits are decimal strings. An interactive reference of this "
                "document is served at [/docs](/docs)."
            ),
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": _resolve(paths, placeholders),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The API key as a bearer token",
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The current app's document, built once (routes and settings are fixed at start)."""
    document: dict[str, Any] | None = current_app.extensions.get(DOCUMENT_KEY)
    if document is None:
        document = build_openapi(current_app, farm().settings)
        current_app.extensions[DOCUMENT_KEY] = document
    return document


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """Serve the OpenAPI document."""
    # The reference's URL is absolute (the 3.1 schema wants a URI): this host's, per request.
    document = openapi_document() | {
        "externalDocs": {
            "description": "Interactive API reference",
            "url": external_url("openapi.docs_page"),
        }
    }
    return jsonify(document)


# ------------------------------------------------------------------ interactive reference

STATIC_DIR: Final = Path(__file__).parent / "static" / "docs"
DOCS_ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
# No inline script or style, no other origin: the page's own init script loads the UI.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def swagger_ui_dir() -> Path:
    """The installed Swagger UI 5 assets (Swagger UI 4 cannot render OpenAPI 3.1)."""
    import openapi_ui_bundles.swagger_ui

    return Path(openapi_ui_bundles.swagger_ui.static_path)


def _strict(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/docs")
def docs_page() -> Response:
    """The interactive API reference (Swagger UI over /openapi.json), served offline."""
    response = send_from_directory(STATIC_DIR, "docs.html", mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return _strict(response)


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    """One asset of the reference page: Swagger UI's files and the page's init script."""
    if name == "docs.js":
        return _strict(send_from_directory(STATIC_DIR, name, mimetype="text/javascript"))
    if name not in DOCS_ASSETS:
        raise NotFound()
    response = send_from_directory(swagger_ui_dir(), name, mimetype=DOCS_ASSETS[name])
    return _strict(response)
