"""The OpenAPI document is true: schemathesis drives the real app with it and checks every answer.

Positive and negative data for every documented operation, then the stateful
phase over the document's links (submit, then status, result, first image and
cancel). Any 5xx fails, and so does any answer whose status code, content type,
body or headers the document does not describe.

It runs on both databases (a few seconds each with a fixed seed and few examples):
PostgreSQL is the stricter (NUL bytes in text, types), SQLite the default. No worker
runs here, so submitted jobs stay queued and the synchronous route answers its
documented 504 after a short wait.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck
from playwright.sync_api import sync_playwright
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.generation.stateful.state_machine import APIStateMachine
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema
from werkzeug.serving import make_server

from api.app import create_app
from control.launcher import RedisServer
from shared.accounts.users import create_user
from shared.db import transaction
from shared.migrate import migrate_database
from shared.settings import Settings
from tests.conftest import empty_database


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Any 5xx fails, but the synchronous route's documented 504: no worker renders here."""
    if case.operation.label == "POST /v1/kolors" and response.status_code == 504:
        return True
    return not_a_server_error(ctx, response, case)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
]

CHECKS: list[CheckFunction] = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# A fixed seed and few examples: reproducible in CI and bounded in time on two cores.
HYPOTHESIS = hypothesis.settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def contract_app(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Flask, str]]:
    """The real app on a database and Redis, with a user rich enough for any request."""
    data_dir = tmp_path_factory.mktemp("contract")
    if request.param == "sqlite":
        database_url = f"sqlite:///{data_dir / 'farm.db'}"
        migrate_database(database_url)
    else:
        database_url = empty_database(request.getfixturevalue("postgres_database"))
    settings = Settings(
        data_dir=data_dir / "var",
        database_url=database_url,
        redis_url=redis_server.url,
        price_per_image=Decimal("1"),
        sync_timeout_s=0.05,
        max_queued_per_user=100_000,
    )
    app = create_app(settings)
    with transaction(app.extensions["kolors_farm"].sessions) as session:
        _, key = create_user(session, "contract", "contract", 10**12, admin=True)
    yield app, key
    app.extensions["kolors_farm"].engine.dispose()


@pytest.fixture(scope="module")
def api_schema(contract_app: tuple[Flask, str]) -> OpenApiSchema:
    """The document the app serves, loaded by schemathesis against the app itself."""
    app, key = contract_app
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    schema.config.update(headers={"x-api-key": key})
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=15,
        deterministic=True,
        allow_x00=True,
    )
    return schema


def operations(api_schema: OpenApiSchema) -> list[Any]:
    """Every operation of the document (an invalid one fails the test)."""
    found = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_matches_the_document(api_schema: OpenApiSchema, mode: GenerationMode) -> None:
    # One Hypothesis run per operation, as schemathesis' pytest plugin would parametrize
    # (its lazy fixture loader does not run under this pytest).
    checked = []
    for operation in operations(api_schema):

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @HYPOTHESIS
        def conforms(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            conforms()
        except hypothesis.errors.Unsatisfiable:
            # A string path segment has no wrong value that survives URL encoding.
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        checked.append(operation.label)
    assert "POST /v2/kolors" in checked and "GET /v2/requests" in checked


def test_links_chain_submission_to_status_result_image_and_cancel(
    api_schema: OpenApiSchema,
) -> None:
    answered: set[tuple[str, int]] = set()

    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def validate_response(
            self,
            response: Any,
            case: Any,
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            answered.add((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    assert issubclass(Machine, APIStateMachine)
    Machine.run(settings=hypothesis.settings(HYPOTHESIS, max_examples=20, stateful_step_count=5))
    # Random ids are unknown (404): a found request was reached through a link.
    followed = {label for label, status in answered if status in (200, 422)}
    assert {"GET /v2/requests/{job_id}/status", "POST /v2/requests/{job_id}/cancel"} <= followed


def test_document_states_the_servers_bounds_and_links(contract_app: tuple[Flask, str]) -> None:
    app, _ = contract_app
    document = app.test_client().get("/openapi.json").get_json()
    settings = app.extensions["kolors_farm"].settings
    submit = document["paths"]["/v2/kolors"]["post"]
    headers = {p["name"]: p["schema"] for p in submit["parameters"] if p["in"] == "header"}
    assert headers["X-Deadline-Seconds"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": settings.max_deadline_s,
    }
    assert headers["X-Retention-Seconds"]["minimum"] == settings.min_retention_s
    assert headers["X-Retention-Seconds"]["maximum"] == settings.max_retention_s
    links = submit["responses"]["202"]["links"]
    ids = {
        operation["operationId"]
        for path in document["paths"].values()
        for operation in path.values()
    }
    assert {link["operationId"] for link in links.values()} <= ids
    assert links["GetFirstImage"]["parameters"]["index"] == "0"
    for path in document["paths"].values():
        for operation in path.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and "content" in response and status not in ("422", "503"):
                    assert list(response["content"]) == ["application/problem+json"]
    assert set(document["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    assert document["externalDocs"]["url"] == "http://localhost/docs"


def test_document_is_valid_openapi_3_1(api_schema: OpenApiSchema) -> None:
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema; raises if invalid
    assert api_schema.raw_schema["openapi"] == "3.1.0"


def test_reference_page_and_its_assets_are_served_from_here(
    contract_app: tuple[Flask, str],
) -> None:
    client = contract_app[0].test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    html = page.get_data(as_text=True)
    assert "<script>" not in html and " on" not in html.split("<body>")[1].split(">")[0]
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/docs/assets/docs.js" in assets and "/docs/assets/swagger-ui-bundle.js" in assets
    expected = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        assert asset.startswith("/"), asset  # same origin: no CDN, no other host
        answer = client.get(asset)
        assert answer.status_code == 200, asset
        if asset != "/openapi.json":
            assert answer.mimetype == expected[Path(asset).suffix], asset
    init = client.get("/docs/assets/docs.js").get_data(as_text=True)
    assert "http" not in init and "validatorUrl: null" in init
    assert client.get("/docs/assets/index.html").status_code == 404  # only the listed files


@pytest.fixture(scope="module")
def served(contract_app: tuple[Flask, str]) -> Iterator[str]:
    """The contract app on a real HTTP port, for the browser."""
    server = make_server("127.0.0.1", 0, contract_app[0], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def test_reference_page_renders_the_document_offline_under_its_policy(served: str) -> None:
    """Swagger UI 5 renders the OpenAPI 3.1 document; nothing leaves this origin."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requested: list[str] = []
            problems: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on(
                "console",
                lambda message: (
                    problems.append(message.text)
                    if message.type == "error" or "Content Security Policy" in message.text
                    else None
                ),
            )
            page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
            page.goto(f"{served}/docs", wait_until="networkidle")
            page.wait_for_selector(".opblock-summary", timeout=30_000)
            text = page.inner_text("#swagger-ui")
            assert "Kolors render farm" in text and "/v2/kolors" in text
            assert "Unable to render this definition" not in text
            assert page.locator(".opblock").count() >= 15
        finally:
            browser.close()
    assert problems == [], problems
    assert requested and all(url.startswith(served + "/") for url in requested), requested
