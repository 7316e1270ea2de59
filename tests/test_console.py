"""The web console in a real browser (Debian's Chromium driven by Playwright) on a real farm.

One farm for the module: a CPU worker on the tiny checkpoint, the dispatcher and the API
under gunicorn. SQLite is enough here: the console is a client of the HTTP API and
nothing it does depends on the database, whose behaviour under the same routes is
covered on both databases by the API tests (tests/test_admin.py among them).

With KOLORS_FARM_SCREENSHOTS=DIR set, each page is also photographed into DIR (the
README's screenshots come from `KOLORS_FARM_SCREENSHOTS=docs/screenshots`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from api.console import CONTENT_SECURITY_POLICY
from shared.jobs.params import SCHEDULERS, KolorsParams
from tests.farms import FarmFactory, RunningFarm
from tests.processes import wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WORKER = "console-cpu0"
SCREENSHOTS = os.environ.get("KOLORS_FARM_SCREENSHOTS")
XSS = '<script>window.__pwned=1</script> a fox <img src=x onerror="window.__pwned=1">'
PAGES = ("/console/", "/console/render", "/console/gallery", "/console/usage", "/console/operator")
TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class Accounts:
    """The keys the tests sign in with."""

    painter: str  # renders and cancels (tenant "studio")
    viewer: str  # owns the gallery's requests (tenant "viewers")
    root: str  # an operator


@pytest.fixture(scope="module")
def farm(module_farms: FarmFactory) -> RunningFarm:
    return module_farms.start(
        "console",
        workers=[WORKER],
        # Every step is reported, so the page shows steps moving.
        settings={"progress_interval_s": "0"},
    )


@pytest.fixture(scope="module")
def accounts(farm: RunningFarm) -> Accounts:
    root = farm.processes.cli("users", "create", "root", "--tenant", "ops", "--admin")
    return Accounts(
        painter=farm.processes.create_user("painter", "100", tenant="studio"),
        viewer=farm.processes.create_user("viewer", "50", tenant="viewers"),
        root=root.strip().splitlines()[-1],
    )


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Missing Chromium fails the module: CI installs it (.ci/run); a skip would hide that.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage); fails if the page broke its CSP or threw."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    yield page
    cookies = context.cookies()
    context.close()
    assert problems == [], problems
    assert cookies == [], "the console must set no cookie"


def shot(page: Page, name: str) -> None:
    """Photograph the page when screenshots are asked for."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def sign_in(page: Page, farm: RunningFarm, key: str) -> None:
    page.goto(f"{farm.url}/console/")
    page.fill("#api-key", key)
    page.click("#signin-submit")
    page.wait_for_url(f"{farm.url}/console/render")
    expect(page.locator("#who-credits")).not_to_have_text("…")


def credits_of(farm: RunningFarm, key: str) -> Decimal:
    response = httpx.get(f"{farm.url}/v1/get-user-credits", headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    return Decimal(response.json()["credits"])


def not_pwned(page: Page) -> None:
    """The prompt's markup never ran and never became elements."""
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator("script:not([src])").count() == 0


def submit(farm: RunningFarm, key: str, **params: Any) -> str:
    body = {"width": 512, "height": 512, "steps": 1, **params}
    response = httpx.post(f"{farm.url}/v2/kolors", json=body, headers={"x-api-key": key})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def finished(farm: RunningFarm, key: str, request_id: str) -> None:
    def done() -> bool:
        status = httpx.get(
            f"{farm.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}
        ).json()["status"]
        return status not in ("QUEUED", "PROCESSING")

    wait_for(done, 60, f"request {request_id} to finish", interval_s=0.1)


def test_pages_have_a_strict_policy_no_inline_code_and_no_cookie(farm: RunningFarm) -> None:
    root = httpx.get(f"{farm.url}/")
    assert root.status_code == 302 and root.headers["location"].endswith("/console/")
    # Assets come only from the console's own route, which sends its headers.
    assert httpx.get(f"{farm.url}/static/console/console.js").status_code == 404
    assets = ("/console/static/console.js", "/console/static/console.css")
    for path in (*PAGES, "/console/requests/abc", *assets):
        response = httpx.get(f"{farm.url}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "img-src 'self' data: blob:" in CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "set-cookie" not in response.headers, path
        if path in assets:
            continue
        html = response.text
        # Every script is a file of ours; no inline script, handler or style the CSP would block.
        assert re.search(r"<script(?![^>]*\ssrc=)", html) is None, path
        assert re.search(r"\son[a-z]+=", html) is None, path
        assert re.search(r"<style|\sstyle=", html) is None, path
        assert re.search(r"(src|href)=\"(https?:)?//", html) is None, path  # no CDN


def test_the_policy_blocks_injected_code_and_reports_it(
    farm: RunningFarm, browser: Browser
) -> None:
    # Were the escaping ever to fail, the policy is the second wall; and the reports it
    # makes are what the `page` fixture listens for.
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{farm.url}/console/")
    with page.expect_console_message(lambda message: "script-src" in message.text) as script:
        page.evaluate(
            """() => {
                const script = document.createElement("script");
                script.textContent = "window.__pwned = 1";
                document.body.append(script);
            }"""
        )
    with page.expect_console_message(lambda message: "img-src" in message.text) as image:
        page.evaluate(
            """() => {
                const image = document.createElement("img");
                image.src = "https://example.com/beacon.png";
                document.body.append(image);
            }"""
        )
    assert page.evaluate("typeof window.__pwned") == "undefined"
    context.close()
    assert "Content Security Policy" in script.value.text
    assert "Content Security Policy" in image.value.text


def test_sign_in_refuses_a_bad_key_and_sign_out_forgets_the_key(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    page.goto(f"{farm.url}/")
    page.wait_for_url(f"{farm.url}/console/")
    page.fill("#api-key", "kf_not-a-real-key")
    page.click("#signin-submit")
    expect(page.locator("#signin-error")).to_have_text("That API key was refused")
    shot(page, "sign-in")
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, farm, accounts.painter)
    assert accounts.painter not in page.url
    assert page.evaluate("Object.values(sessionStorage)") == [accounts.painter]
    expect(page.locator("#who-user")).to_contain_text("painter")
    expect(page.locator("#nav-operator")).to_be_hidden()

    page.click("#sign-out")
    page.wait_for_url(f"{farm.url}/console/")
    assert page.evaluate("sessionStorage.length") == 0
    # Signed out, a console page sends the visitor back to sign in.
    page.goto(f"{farm.url}/console/gallery")
    page.wait_for_url(f"{farm.url}/console/")


def test_the_form_is_the_api_schema_and_shows_server_errors_by_their_field(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    sign_in(page, farm, accounts.painter)
    schema = KolorsParams.model_json_schema()["properties"]
    options = page.locator("#param-scheduler option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    assert options == list(SCHEDULERS)
    expect(page.locator("#param-scheduler")).to_have_value(schema["scheduler"]["default"])
    for name in ("steps", "width", "height", "cfg", "seed", "output_quality", "number_of_images"):
        control = page.locator(f"#param-{name}")
        assert Decimal(control.get_attribute("min") or "nan") == schema[name]["minimum"]
        assert Decimal(control.get_attribute("max") or "nan") == schema[name]["maximum"]
        assert Decimal(control.input_value()) == Decimal(str(schema[name]["default"]))
    assert page.locator("#param-width").get_attribute("step") == "8"
    assert page.locator("#param-base64").count() == 0  # the synchronous route's flag only

    before = credits_of(farm, accounts.painter)
    page.fill("#param-prompt", "a fox")
    page.fill("#param-width", "513")
    page.fill("#param-steps", "51")
    page.click("#render-submit")
    expect(page.locator("#error-width")).to_contain_text("multiple of 8")
    expect(page.locator("#error-steps")).to_contain_text("50")
    expect(page.locator("#error-prompt")).to_be_hidden()
    assert page.locator("#param-width").get_attribute("aria-invalid") == "true"
    shot(page, "render-form-errors")
    assert page.url == f"{farm.url}/console/render"
    assert credits_of(farm, accounts.painter) == before  # nothing was held: no request made


def test_a_render_shows_progress_to_the_end_then_its_images_and_the_prompt_as_text(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    sign_in(page, farm, accounts.painter)
    page.fill("#param-prompt", XSS)
    page.fill("#param-width", "512")
    page.fill("#param-height", "512")
    page.fill("#param-steps", "4")
    page.fill("#param-seed", "1234")
    page.fill("#param-number_of_images", "2")
    page.select_option("#param-output_format", "png")
    shot(page, "render-form")
    page.click("#render-submit")
    page.wait_for_url(re.compile(r".*/console/requests/[^/]+$"))
    expect(page.locator("#status")).to_have_text("COMPLETED")
    expect(page.locator("#images-done")).to_have_text("2 of 2")
    assert page.locator("#progress-bar").evaluate("bar => bar.value") == 1
    expect(page.locator("#prompt")).to_have_text(XSS)
    expect(page.locator("#cancel")).to_be_hidden()
    assert page.evaluate("document.body.dataset.updates") == "stream"  # not polling

    images = page.locator("img.result")
    expect(images).to_have_count(2)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.result')]"
        ".every(image => image.complete && image.naturalWidth > 0)"
    )
    assert images.evaluate_all("images => images.map(i => i.naturalWidth)") == [512, 512]
    expect(page.locator(".seed")).to_have_text(["Seed 1234", "Seed 1235"])
    downloads = page.locator("figcaption a[download]")
    expect(downloads).to_have_count(2)
    assert all((downloads.nth(i).get_attribute("href") or "").startswith("blob:") for i in range(2))
    assert (downloads.nth(0).get_attribute("download") or "").endswith("-0-seed1234.png")
    not_pwned(page)
    shot(page, "result")


def test_live_progress_and_cancel_from_the_gallery_and_the_request_page(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    sign_in(page, farm, accounts.painter)
    # Slow enough to be watched and cancelled: 10 images of 50 steps at 1024x1024 take a minute
    # or more on the tiny checkpoint; the cancel stops it at its next step.
    page.fill("#param-prompt", "a lighthouse at dusk, long exposure")
    for name, value in (("width", "1024"), ("height", "1024"), ("steps", "50")):
        page.fill(f"#param-{name}", value)
    page.fill("#param-number_of_images", "10")
    page.click("#render-submit")
    page.wait_for_url(re.compile(r".*/console/requests/[^/]+$"))
    slow_id = page.url.rsplit("/", 1)[-1]
    page.wait_for_function(
        "() => document.getElementById('status').textContent === 'PROCESSING'"
        " && /^[1-9][0-9]* of 50$/.test(document.getElementById('step').textContent)"
    )
    expect(page.locator("#images-done")).to_contain_text("of 10")
    expect(page.locator("#cancel")).to_be_visible()
    shot(page, "progress")

    # A second request waits behind it: the gallery shows it queued and cancels it.
    queued_id = submit(farm, accounts.painter, prompt="a queued fox")
    page.goto(f"{farm.url}/console/requests/{queued_id}")
    expect(page.locator("#status")).to_have_text("QUEUED")
    expect(page.locator("#queue-position")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#step")).to_have_text("waiting")

    page.goto(f"{farm.url}/console/gallery")
    queued_card = page.locator(f'article[data-request-id="{queued_id}"]')
    expect(queued_card.locator(".badge")).to_have_text("QUEUED")
    expect(page.locator(f'article[data-request-id="{slow_id}"] .badge')).to_have_text("PROCESSING")
    queued_card.locator("button[data-cancel]").click()
    expect(queued_card.locator(".badge")).to_have_text("CANCELLED")
    expect(queued_card.locator("button[data-cancel]")).to_have_count(0)

    # The running one is cancelled from its page: it stops at its next step.
    page.goto(f"{farm.url}/console/requests/{slow_id}")
    expect(page.locator("#status")).to_have_text("PROCESSING")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("CANCELLED")
    expect(page.locator("#request-error")).to_be_visible()
    done = int(page.locator("#images-done").inner_text().split(" of ")[0])
    assert done < 10
    status = httpx.get(
        f"{farm.url}/v2/requests/{slow_id}/status", headers={"x-api-key": accounts.painter}
    ).json()
    assert status["status"] == "FAILED" and status["cancelled"] is True
    assert status["progress"]["images_done"] == done


def test_the_gallery_pages_through_requests_and_shows_prompts_as_text(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    first = submit(farm, accounts.viewer, prompt="一只可爱的熊猫", seed=7)
    second = submit(farm, accounts.viewer, prompt="a red fox in the snow", seed=8)
    newest = submit(farm, accounts.viewer, prompt=XSS, seed=9)
    for request_id in (first, second, newest):
        finished(farm, accounts.viewer, request_id)

    sign_in(page, farm, accounts.viewer)
    page.goto(f"{farm.url}/console/gallery")
    cards = page.locator("article.request-card")
    expect(cards).to_have_count(3)
    expect(cards.locator(".prompt")).to_have_text([XSS, "a red fox in the snow", "一只可爱的熊猫"])
    page.wait_for_function(
        "() => [...document.querySelectorAll('.thumb img')]"
        ".filter(image => image.complete && image.naturalWidth > 0).length === 3"
    )
    not_pwned(page)
    shot(page, "gallery")

    page.goto(f"{farm.url}/console/gallery?limit=2")
    expect(cards).to_have_count(2)
    assert cards.evaluate_all("cards => cards.map(c => c.dataset.requestId)") == [newest, second]
    expect(page.locator("#newer")).to_be_disabled()
    page.click("#older")
    expect(cards).to_have_count(1)
    assert cards.first.get_attribute("data-request-id") == first
    expect(page.locator("#older")).to_be_disabled()
    page.click("#newer")
    expect(cards).to_have_count(2)
    assert cards.first.get_attribute("data-request-id") == newest
    not_pwned(page)


def test_usage_shows_the_balance_and_the_days(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    submit(farm, accounts.viewer, prompt="a small render for the books")
    sign_in(page, farm, accounts.viewer)
    page.goto(f"{farm.url}/console/usage")
    expect(page.locator("#balance")).not_to_have_text("…")
    assert Decimal(page.locator("#balance").inner_text()) == credits_of(farm, accounts.viewer)
    rows = page.locator("#usage-rows tr")
    expect(rows.first).to_contain_text("viewer")
    granted = rows.first.locator("td").nth(2).inner_text()
    assert Decimal(granted) == Decimal(50)  # the initial credits, granted today
    shot(page, "usage")


def test_the_operator_view_shows_the_worker_and_grants_change_a_balance(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    sign_in(page, farm, accounts.viewer)
    page.goto(f"{farm.url}/console/operator")
    expect(page.locator("#operator-denied")).to_be_visible()
    expect(page.locator("#operator")).to_be_hidden()

    page.click("#sign-out")
    sign_in(page, farm, accounts.root)
    expect(page.locator("#nav-operator")).to_be_visible()
    page.click("#nav-operator")
    worker = page.locator(f'tr[data-worker="{WORKER}"]')
    expect(worker.locator("td").nth(1)).to_have_text("cpu")
    expect(worker.locator("td").nth(3)).to_have_text("warm")
    expect(page.locator("#dispatcher")).not_to_have_text(re.compile("^(\u2013|none active)$"))
    expect(page.locator('tr[data-tenant="studio"]')).to_be_visible()
    viewer_row = page.locator('tr[data-user="viewer"]')
    expect(viewer_row).to_be_visible()

    before = credits_of(farm, accounts.viewer)
    page.fill("#grant-user", "viewer")
    page.fill("#grant-credits", "1.0005")
    page.click("#grant-submit")
    expect(page.locator("#grant-error")).to_contain_text("credits")
    assert credits_of(farm, accounts.viewer) == before

    page.fill("#grant-credits", "12.5")
    page.fill("#grant-note", "for the demo")
    page.click("#grant-submit")
    after = before + Decimal("12.5")
    expect(page.locator("#grant-done")).to_have_text(f"viewer now has {after} credits")
    expect(viewer_row.locator("[data-credits]")).to_have_text(str(after))
    assert credits_of(farm, accounts.viewer) == after
    shot(page, "operator")


def test_a_cross_site_form_cannot_act_for_a_signed_in_user(
    farm: RunningFarm, accounts: Accounts, page: Page
) -> None:
    sign_in(page, farm, accounts.painter)
    before = credits_of(farm, accounts.painter)
    # Another site's page in the same browser posts to the farm: no header, no cookie.
    page.goto("about:blank")
    page.set_content(
        f'<form method="post" action="{farm.url}/v2/kolors">'
        '<input name="prompt" value="forged"></form>'
    )
    with page.expect_navigation() as navigation:
        page.evaluate("document.forms[0].submit()")
    response = navigation.value
    assert response is not None and response.status == 401
    assert credits_of(farm, accounts.painter) == before
    # Nor can a state-changing call without the header, from anywhere.
    assert httpx.post(f"{farm.url}/v2/kolors", data={"prompt": "forged"}).status_code == 401
    assert httpx.post(f"{farm.url}/v2/requests/x/cancel").status_code == 401
    assert (
        httpx.post(f"{farm.url}/v1/admin/users/painter/credits", json={"credits": "1"}).status_code
        == 401
    )
