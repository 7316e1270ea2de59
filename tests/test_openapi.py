"""The OpenAPI document is true: schemathesis fuzzes the live API with it and finds nothing.

The API runs under gunicorn, as `kolors-farm up` serves it, and schemathesis' engine
(the one `schemathesis run` drives) runs all its phases on every documented operation:
the document's examples, coverage of each parameter's bounds, fuzzing with valid and
invalid data, and the stateful phase over the document's links (submit, then status,
result, first image and cancel). Every check runs: any 5xx, any answer whose status,
content type, body or headers the document does not describe, a valid request
refused, an invalid one accepted, a route that ignores its key.

What remains by design is listed in BY_DESIGN, each with why: rules a JSON Schema
cannot state (an opaque cursor's validity, `from` not after `to`, whether a webhook's
host may be called), the 422s of the contract, and that no worker runs here (so the
synchronous route answers its documented 504). Anything else fails the test.

It runs on both databases with a fixed seed and bounded examples: PostgreSQL is the
stricter (NUL bytes in text, types), SQLite the default.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from playwright.sync_api import sync_playwright
from schemathesis.core.result import Ok
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import ScenarioRecorder
from schemathesis.specs.openapi.schemas import OpenApiSchema
from werkzeug.serving import make_server

from api.app import create_app
from control.launcher import RedisServer
from shared.accounts.users import create_user
from shared.db import transaction
from shared.migrate import migrate_database
from shared.settings import Settings
from tests.conftest import empty_database
from tests.processes import FarmProcesses, farm_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
]

# A fixed seed and bounded examples: reproducible in CI, under a minute a database on two
# cores. A stream of a request that is still queued never ends: it is read for a second.
FUZZ_SEED = 20251203
FUZZ_CONFIG: dict[str, Any] = {
    "seed": FUZZ_SEED,
    "request-timeout": 30,
    "generation": {"max-examples": 20, "deterministic": True, "allow-x00": True},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": True},
    },
    "checks": {"enabled": True},
    "operations": [{"include-name": "GET /v2/requests/{job_id}/events", "request-timeout": 1}],
}


@dataclass(frozen=True)
class Finding:
    """One failed check of one request, with what the server answered."""

    operation: str
    check: str
    title: str
    status: int | None
    body: Any
    sample: str
    sent: dict[str, Any]  # the request's query and body, as generated

    @property
    def sent_query(self) -> dict[str, Any]:
        """The query parameters sent (none: empty)."""
        query: dict[str, Any] = self.sent.get("query") or {}
        return query

    @property
    def sent_body(self) -> dict[str, Any]:
        """The JSON or form fields sent (none, or not an object: empty)."""
        body = self.sent.get("body")
        return body if isinstance(body, dict) else {}

    def __str__(self) -> str:
        return f"{self.operation}: {self.check} ({self.title}), {self.status}\n{self.sample}"


def _field_rules(finding: Finding) -> set[tuple[str, str]]:
    errors = finding.body.get("errors") if isinstance(finding.body, dict) else None
    return {(error["field"], error["rule"]) for error in errors or []}


# Rules of a 400 a schema cannot state: schemathesis' valid data may break them.
UNSTATABLE_RULES = {
    ("cursor", "cursor"): "a cursor the route never handed out (cursors are opaque)",
    ("from", "from_not_after_to"): "one parameter's bound set by another's value",
    ("to", "max_days"): "one parameter's bound set by another's value",
    # A grant's amount is a string or a number; its description states these rules.
    ("credits", "decimal"): "a grant's amount: a decimal number",
    ("credits", "positive"): "a grant's amount: more than zero",
    ("credits", "maximum"): "a grant's amount: at most the grant limit",
    ("credits", "decimal_places"): "a grant's amount: at most three decimals",
}


def _webhook_rules_only(finding: Finding) -> bool:
    """Which strings are URLs this farm may call: syntax, then DNS and the address policy."""
    rules = _field_rules(finding)
    # Null, empty or "null" mean no webhook: refusing one of those is a finding.
    no_webhook = finding.sent_body.get("webhook") in (None, "", "null")
    return (
        bool(rules)
        and not no_webhook
        and all(f == "webhook" and r.startswith("url_") for f, r in rules)
    )


def _unstatable_rules_only(finding: Finding) -> bool:
    rules = _field_rules(finding)
    # An empty cursor is the first page: refusing it is a finding.
    empty_cursor_refused = finding.sent_query.get("cursor") == "" and ("cursor", "cursor") in rules
    return bool(rules) and rules <= set(UNSTATABLE_RULES) and not empty_cursor_refused


def _reused_idempotency_key(finding: Finding) -> bool:
    rules = {rule for _, rule in _field_rules(finding)}
    return finding.status == 422 and rules == {"idempotency_key_reused"}


def _failed_request(finding: Finding) -> bool:
    """A FAILED (cancelled) request is answered with 422, by the contract."""
    body = finding.body if isinstance(finding.body, dict) else {}
    return finding.status == 422 and (body.get("status") == "FAILED" or "request_id" in body)


SUBMIT = ("POST /v2/kolors", "POST /v1/kolors")
# (check, operations (empty: any), predicate, why): every finding the test lets pass.
BY_DESIGN: list[tuple[str, tuple[str, ...], Callable[[Finding], bool], str]] = [
    (
        "not_a_server_error",
        ("POST /v1/kolors",),
        lambda f: f.status == 504,
        "no worker renders here: the synchronous route answers its documented 504",
    ),
    (
        "positive_data_acceptance",
        SUBMIT,
        _reused_idempotency_key,
        "a reused Idempotency-Key with another request is a documented 422",
    ),
    (
        "positive_data_acceptance",
        (*SUBMIT, "GET /v2/requests/{job_id}", "GET /v2/requests/{job_id}/status"),
        _failed_request,
        "a FAILED or cancelled request is a documented 422 (Segmind's contract)",
    ),
    ("positive_data_acceptance", SUBMIT, _webhook_rules_only, "webhook URL policy"),
    ("positive_data_acceptance", (), _unstatable_rules_only, "rules a schema cannot state"),
    (
        "use_after_free",
        ("DELETE /v2/requests/{job_id}",),
        lambda f: True,
        "DELETE /v2/requests/{id} cancels; the request stays readable, as documented",
    ),
]


def by_design(finding: Finding) -> bool:
    """Whether BY_DESIGN lets this finding pass."""
    return any(
        check == finding.check
        and (not operations or finding.operation in operations)
        and test(finding)
        for check, operations, test, _why in BY_DESIGN
    )


@dataclass
class FuzzRun:
    """What one engine run found and which operations it answered, in which phases."""

    findings: list[Finding]
    errors: list[str]
    answered: set[tuple[str, str, int]]  # (phase, operation, status)


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _record(recorder: ScenarioRecorder, phase: str, run: FuzzRun) -> None:
    for case_id, interaction in recorder.interactions.items():
        if interaction.response is not None and case_id in recorder.cases:
            label = recorder.cases[case_id].value.operation.label
            run.answered.add((phase, label, interaction.response.status_code))
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status != Status.FAILURE or check.failure_info is None:
                continue
            answer = recorder.interactions.get(case_id)
            response = answer.response if answer is not None else None
            failure = check.failure_info.failure
            case = recorder.cases[case_id].value if case_id in recorder.cases else None
            sent = {"query": case.query, "body": case.body} if case is not None else {}
            run.findings.append(
                Finding(
                    operation=failure.operation or recorder.label,
                    check=check.name,
                    title=failure.title,
                    status=response.status_code if response is not None else None,
                    body=_json(response.content) if response is not None else None,
                    sample=check.failure_info.code_sample,
                    sent=sent,
                )
            )


def fuzz(schema: OpenApiSchema) -> FuzzRun:
    """Run every phase of schemathesis' engine against the schema's server."""
    run = FuzzRun(findings=[], errors=[], answered=set())
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(event.recorder, event.phase.value, run)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            run.errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            run.findings.extend(
                Finding(f.operation or "", "after_run", f.title, None, None, f.message, {})
                for f in event.failures
            )
    return run


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
def live_api(contract_app: tuple[Flask, str]) -> Iterator[str]:
    """The contract app's farm (same database, Redis and settings) under gunicorn."""
    settings: Settings = contract_app[0].extensions["kolors_farm"].settings
    env = farm_env(
        settings.data_dir,
        settings.resolved_database_url,
        settings.require_redis_url(),
        settings.data_dir / "no-model",
        price_per_image=str(settings.price_per_image),
        sync_timeout_s=str(settings.sync_timeout_s),
        max_queued_per_user=str(settings.max_queued_per_user),
    )
    processes = FarmProcesses(env=env, logs=settings.data_dir / "logs")
    try:
        yield processes.start_api()
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def api_schema(contract_app: tuple[Flask, str]) -> OpenApiSchema:
    """The document the app serves, loaded by schemathesis from the app itself."""
    return schemathesis.openapi.from_wsgi("/openapi.json", contract_app[0])


def operations(api_schema: OpenApiSchema) -> list[Any]:
    """Every operation of the document (an invalid one fails the test)."""
    found = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return found


def test_fuzzing_the_live_document_finds_nothing(
    live_api: str, contract_app: tuple[Flask, str], api_schema: OpenApiSchema
) -> None:
    config = schemathesis.Config.from_dict(
        FUZZ_CONFIG | {"headers": {"x-api-key": contract_app[1]}}
    )
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json", config=config)
    run = fuzz(schema)
    found = [finding for finding in run.findings if not by_design(finding)]
    assert found == [], "\n\n".join(str(finding) for finding in found)
    assert run.errors == []
    # Every operation was tested, and the stateful phase reached found requests through
    # the document's links (a random id is unknown: a 404).
    labels = {operation.label for operation in operations(api_schema)}
    assert {label for _, label, _ in run.answered} == labels
    followed = {
        label
        for phase, label, status in run.answered
        if phase == "stateful" and status in (200, 422)
    }
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
