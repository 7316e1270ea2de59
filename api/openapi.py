"""The OpenAPI 3.1 document, generated from the one parameter schema."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from shared.params import params_json_schema

bp = Blueprint("openapi", __name__)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _responses(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    descriptions = {
        400: "Invalid parameters (the error names the field and the rule)",
        401: "Missing or invalid API key",
        403: "The link was tampered with, re-targeted or has expired",
        404: "Unknown request id (or another tenant's)",
        406: "Not enough credits",
        413: "Request body too large",
        410: "The request's results passed their retention and were deleted",
        422: "The request FAILED (or was cancelled)",
        429: "Too many live requests for this user (see Retry-After)",
        503: "A backing service is unavailable",
        504: "The render did not finish within the synchronous wait",
    }
    responses = {"200": ok} if "description" in ok else ok
    for code in codes:
        responses[str(code)] = {
            "description": descriptions[code],
            "content": {"application/json": {"schema": _ERROR}},
        }
    return responses


def build_openapi() -> dict[str, Any]:
    """The whole OpenAPI document."""
    params = params_json_schema()
    body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/KolorsParams"}},
            "application/x-www-form-urlencoded": {
                "schema": {"$ref": "#/components/schemas/KolorsParams"}
            },
        },
    }
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    deadline = {
        "name": "X-Deadline-Seconds",
        "in": "header",
        "required": False,
        "description": "Cancel the job if it has not finished this many seconds after submission",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    }
    retention = {
        "name": "X-Retention-Seconds",
        "in": "header",
        "required": False,
        "description": "Keep the results this long from submission (within the farm's bounds)",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    }
    status_body = {
        "description": "The job's status",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Kolors render farm",
            "version": "1",
            "description": "Segmind-compatible Kolors text-to-image API.",
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "KolorsParams": params,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "field": {"type": "string"},
                                    "rule": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "Submitted": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"const": "QUEUED"},
                        "status_url": {"type": "string", "format": "uri"},
                        "response_url": {"type": "string", "format": "uri"},
                        "poll_url": {"type": "string", "format": "uri"},
                    },
                },
                "Status": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"enum": ["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]},
                        "error": {"type": "string"},
                        "cancelled": {"type": "boolean"},
                        "queue_position": {
                            "type": "integer",
                            "description": "Jobs the dispatcher will start before this one",
                        },
                        "eta_seconds": {
                            "type": ["number", "null"],
                            "description": "Estimated seconds until done, from measured speed",
                        },
                        "progress": {
                            "type": "object",
                            "properties": {
                                "step": {"type": "integer"},
                                "steps": {"type": "integer"},
                                "images_done": {"type": "integer"},
                                "images": {"type": "integer"},
                            },
                        },
                    },
                },
                "Result": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"enum": ["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]},
                        "output": {"type": "array", "items": {"type": "string", "format": "uri"}},
                        "output_expires_at": {"type": "string", "format": "date-time"},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "url": {"type": "string", "format": "uri"},
                                    "expires_at": {"type": "string", "format": "date-time"},
                                    "index": {"type": "integer"},
                                    "seed": {"type": "integer"},
                                    "generation": {
                                        "type": ["object", "null"],
                                        "description": "The record embedded in the image",
                                    },
                                },
                            },
                        },
                        "results_expire_at": {"type": ["string", "null"], "format": "date-time"},
                        "seeds": {"type": "array", "items": {"type": "integer"}},
                        "metrics": {"type": "object"},
                        "parameters": {"type": "object"},
                    },
                },
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": {
            "/v1/kolors": {
                "post": {
                    "summary": "Render and wait; answers the first image (JSON with base64=true)",
                    "parameters": [deadline, retention],
                    "requestBody": body,
                    "responses": _responses(
                        {
                            "description": "The image bytes",
                            "content": {"image/webp": {}, "image/jpeg": {}, "image/png": {}},
                        },
                        400,
                        401,
                        406,
                        413,
                        422,
                        429,
                        503,
                        504,
                    ),
                }
            },
            "/v2/kolors": {
                "post": {
                    "summary": "Queue a render",
                    "parameters": [deadline, retention],
                    "requestBody": body,
                    "responses": _responses(
                        {
                            "202": {
                                "description": "Queued",
                                "content": {
                                    "application/json": {
                                        "schema": {"$ref": "#/components/schemas/Submitted"}
                                    }
                                },
                            }
                        },
                        400,
                        401,
                        406,
                        413,
                        429,
                        503,
                    ),
                }
            },
            "/v2/requests/{job_id}/status": {
                "get": {
                    "summary": "A request's status, progress and queue position",
                    "parameters": [job_id],
                    "responses": _responses(status_body, 401, 404, 422),
                }
            },
            "/v2/requests/{job_id}": {
                "get": {
                    "summary": "A request's result",
                    "parameters": [job_id],
                    "responses": _responses(
                        {
                            "description": "The result",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Result"}
                                }
                            },
                        },
                        401,
                        404,
                        410,
                        422,
                    ),
                },
                "delete": {
                    "summary": "Cancel a request",
                    "parameters": [job_id],
                    "responses": _responses(status_body, 401, 404),
                },
            },
            "/v2/requests/{job_id}/images/{index}": {
                "get": {
                    "summary": "One image of a request",
                    "parameters": [
                        job_id,
                        {
                            "name": "index",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": _responses({"description": "The image bytes"}, 401, 404, 410),
                }
            },
            "/v2/results/{token}": {
                "get": {
                    "summary": "One image through a signed, expiring link (no API key)",
                    "security": [],
                    "parameters": [
                        {
                            "name": "token",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": _responses({"description": "The image bytes"}, 403, 404, 410),
                }
            },
            "/v1/get-user-credits": {
                "get": {
                    "summary": "The caller's credits",
                    "responses": _responses(
                        {
                            "description": "Credits",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"credits": {"type": "string"}},
                                    }
                                }
                            },
                        },
                        401,
                    ),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "Alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (database and Redis)",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
        },
    }


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """Serve the OpenAPI document."""
    return jsonify(build_openapi())
