"""The farm's HTTP client: what `kolors-farm render` and `kolors-farm requests` run.

It needs no database, Redis or model: only the farm's URL and an API key, so it works
against a remote farm. The key is sent in the `x-api-key` header and never printed.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

DEFAULT_URL: Final = "http://127.0.0.1:8000"

# Exit codes of the client commands (documented in `kolors-farm render --help` and the README).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the request ended FAILED (cancelled included)
EXIT_USAGE: Final = 2  # the command line is wrong; nothing was sent
EXIT_API: Final = 3  # the farm refused the request, answered an error, or could not be reached

# Connecting fails fast; an answer may take a while on a busy farm.
TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
POLL_INTERVAL_S: Final = 0.5
EXTENSIONS: Final = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
TERMINAL: Final = ("COMPLETED", "FAILED")
# While following a render: statuses worth polling again (None: no answer at all), and for how long.
TRANSIENT: Final = (None, 502, 503, 504)
OUTAGE_PATIENCE_S: Final = 60.0
# The event stream sends a keep-alive every 15 s of silence: a read waits longer than that.
STREAM_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0, read=60.0)
# Times a cut stream is resumed (Last-Event-ID) before polling takes over.
STREAM_RESUMES: Final = 3


@dataclass
class ApiError(Exception):
    """The farm answered an error, or could not be reached; `message` says which, for people."""

    message: str
    status: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def document(self) -> dict[str, Any]:
        """The error as the JSON document `--json` prints."""
        return {"error": self.message, "http_status": self.status, "errors": self.errors}


def _api_error(response: httpx.Response) -> ApiError:
    """An ApiError from an error response, with the problem document's field errors."""
    status = response.status_code
    if status == 401:
        return ApiError(
            "the API key was refused (HTTP 401): check KOLORS_FARM_API_KEY or --api-key",
            status,
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError(f"the farm answered HTTP {status} without a JSON error", status)
    detail = str(body.get("detail") or body.get("error") or body.get("title") or "no detail")
    errors = [item for item in body.get("errors") or [] if isinstance(item, dict)]
    lines = [f"the farm refused the request (HTTP {status} {body.get('title', '')}): {detail}"]
    lines += [
        f"  {item.get('field')}: {item.get('message')} (rule: {item.get('rule')})"
        for item in errors
    ]
    if status in (429, 503) and response.headers.get("Retry-After"):
        lines.append(f"  retry after {response.headers['Retry-After']} s")
    return ApiError("\n".join(lines), status, errors)


class FarmClient:
    """A thin client of the farm's HTTP API, raising ApiError for anything but an answer."""

    def __init__(self, url: str, api_key: str, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"x-api-key": api_key, "Accept": "application/json"},
            timeout=TIMEOUT,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(
        self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(f"the farm at {self.url} did not answer in time ({exc})") from exc
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the farm at {self.url} ({type(exc).__name__}: {exc}); "
                "is it running? Set KOLORS_FARM_URL or --url"
            ) from exc
        if response.status_code not in ok:
            raise _api_error(response)
        return response

    def _json(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        response = self._call(method, path, ok, **kw)
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(f"the farm answered {path} with something that is not JSON") from exc

    def events(
        self, request_id: str, last_event_id: str | None = None
    ) -> Generator[tuple[str, str | None, dict[str, Any]], None, None]:
        """GET /v2/requests/{id}/events: (event, id, data) until the last; ApiError if refused."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        path = f"/v2/requests/{request_id}/events"
        try:
            stream = self._http.stream("GET", path, headers=headers, timeout=STREAM_TIMEOUT)
            with stream as response:
                if response.status_code != 200:
                    response.read()
                    raise _api_error(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise ApiError("the farm serves no event stream", response.status_code)
                yield from server_sent_events(response.iter_lines())
        except httpx.TimeoutException as exc:
            raise ApiError(f"the farm's event stream went quiet ({exc})") from exc
        except httpx.TransportError as exc:
            raise ApiError(f"the event stream was cut ({type(exc).__name__}: {exc})") from exc

    def submit(self, params: dict[str, Any]) -> dict[str, Any]:
        """POST /v2/kolors: queue a render; its request id and URLs."""
        body: dict[str, Any] = self._json("POST", "/v2/kolors", (200, 202), json=params)
        return body

    def status(self, request_id: str) -> dict[str, Any]:
        """GET /v2/requests/{id}/status (a FAILED request is an answer, not an error)."""
        body: dict[str, Any] = self._json("GET", f"/v2/requests/{request_id}/status", (200, 422))
        return body

    def result(self, request_id: str) -> dict[str, Any]:
        """GET /v2/requests/{id}: outputs, seeds, parameters (FAILED ones too)."""
        body: dict[str, Any] = self._json("GET", f"/v2/requests/{request_id}", (200, 422))
        return body

    def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        """One image's bytes and media type, fetched with the key from the farm itself."""
        response = self._call("GET", f"/v2/requests/{request_id}/images/{index}")
        return response.content, response.headers.get("content-type", "").split(";")[0]

    def cancel(self, request_id: str) -> dict[str, Any]:
        """POST /v2/requests/{id}/cancel (harmless when it already ended)."""
        body: dict[str, Any] = self._json("POST", f"/v2/requests/{request_id}/cancel", (200, 422))
        return body

    def list_requests(
        self, status: str | None, limit: int | None, cursor: str | None
    ) -> dict[str, Any]:
        """GET /v2/requests: a page of the tenant's requests, newest first."""
        query = {
            name: value
            for name, value in (("status", status), ("limit", limit), ("cursor", cursor))
            if value is not None
        }
        body: dict[str, Any] = self._json("GET", "/v2/requests", params=query)
        return body


@dataclass
class Outcome:
    """How a render ended, and where its images were written."""

    request_id: str
    status: str
    files: list[Path]
    seeds: list[int]
    error: str | None = None
    cancelled: bool = False

    def document(self) -> dict[str, Any]:
        """The JSON document `render --json` prints."""
        return {
            "request_id": self.request_id,
            "status": self.status,
            "cancelled": self.cancelled,
            "error": self.error,
            "files": [str(path) for path in self.files],
            "seeds": self.seeds,
        }


class Interrupts:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt only inside `armed()` blocks; elsewhere it waits.

    It then lands in a network call, a sleep or the question, never half-way through
    printing or writing a file; one that arrives in between is raised by the next block.
    """

    def __init__(self) -> None:
        self.pending = False
        self._armed = False

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            raise KeyboardInterrupt
        self.pending = True

    @contextmanager
    def armed(self) -> Iterator[None]:
        """A block that a Ctrl-C (now, or one waiting) interrupts."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT here while the block runs (the main thread only can)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def ask_to_cancel(
    request_id: str,
    stdin: TextIO,
    err: TextIO,
    armed: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> bool:
    """Ask whether to cancel; y/yes cancels, any other line keeps waiting.

    No answer at all (stdin at its end, as for a script run with </dev/null, or a second
    Ctrl-C) cancels: nobody is left to wait for the render, and it would spend credits.
    """
    err.write(f"\nCancel request {request_id}? [y/N] ")
    err.flush()
    try:
        with armed():
            line = stdin.readline()
    except (KeyboardInterrupt, OSError, ValueError):
        line = ""
    if not line:
        err.write("\nno answer; cancelling\n")
        return True
    return line.strip().lower() in ("y", "yes")


def server_sent_events(lines: Iterable[str]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """Parse Server-Sent Events whose data is JSON: (event, id, data); comments skipped."""
    event: str = "message"
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event, event_id, json.loads("\n".join(data))
            event, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value


def _describe(body: dict[str, Any]) -> tuple[str, int | None, int]:
    """A status body as the progress line's text, total and completed units."""
    progress = body.get("progress") or {}
    steps = max(1, int(progress.get("steps") or 1))
    images = max(1, int(progress.get("images") or 1))
    done = int(progress.get("images_done") or 0)
    step = int(progress.get("step") or 0)
    eta = body.get("eta_seconds")
    eta_text = f"ETA {eta:.0f} s" if isinstance(eta, int | float) else "ETA unknown"
    if body.get("status") == "QUEUED":
        position = body.get("queue_position")
        where = f"position {position}" if position is not None else "position unknown"
        return f"queued, {where}, {eta_text}", None, 0
    current = min(done + 1, images)
    text = f"step {step}/{steps}, image {current}/{images}, {eta_text}"
    return text, steps * images, min(steps * images, done * steps + step)


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Progress]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
    with progress:
        yield progress


class Renderer:
    """Submit one render, follow it with a live progress display, save its images."""

    def __init__(
        self,
        client: FarmClient,
        console: Console,
        *,
        show_progress: bool,
        ask: Callable[[str], bool],
        interrupts: Interrupts | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.console = console
        self.show_progress = show_progress
        self.ask = ask
        self.interrupts = interrupts or Interrupts()
        self.sleep = sleep
        self.last_event_id: str | None = None  # where a cut event stream resumes
        self.streamed = False  # whether the render was followed on its event stream

    def run(self, params: dict[str, Any], out_dir: Path) -> Outcome:
        """Render `params` and write the images to `out_dir`; the outcome."""
        submitted = self.client.submit(params)
        request_id = str(submitted["request_id"])
        # On stderr even with --json: a script interrupted later still knows what it started.
        self.console.print(f"request {request_id} queued", markup=False, highlight=False)
        final = self._follow(request_id)
        with self.interrupts.armed():
            return self._collect(request_id, final, out_dir)

    def _follow(self, request_id: str) -> dict[str, Any]:
        """Poll the status until the request ends; Ctrl-C offers to cancel it."""
        cancelling = False
        with _progress(self.console, self.show_progress) as progress:
            task = progress.add_task(f"request {request_id}", total=None)
            while True:
                try:
                    final = self._stream(request_id, progress, task, cancelling)
                    if final is not None:
                        return final
                    return self._poll(request_id, progress, task, cancelling)
                except KeyboardInterrupt:
                    if cancelling:
                        raise  # a Ctrl-C while a cancel settles leaves at once
                    progress.stop()
                    if not self.ask(request_id):
                        self.console.print(
                            f"request {request_id} goes on", markup=False, highlight=False
                        )
                        progress.start()
                        continue
                    answer = self.client.cancel(request_id)
                    cancelling = True
                    self.console.print(
                        f"cancelling request {request_id} ({answer.get('detail') or 'cancelled'})",
                        markup=False,
                        highlight=False,
                    )
                    progress.start()

    def _stream(
        self, request_id: str, progress: Progress, task: TaskID, cancelling: bool
    ) -> dict[str, Any] | None:
        """Follow the request's event stream to its final event; None: poll instead.

        A cut stream resumes after its last event a few times; a farm without streams,
        or one that keeps cutting them, is polled (which rides out outages).
        """
        body: dict[str, Any] = {}
        for _ in range(STREAM_RESUMES):
            events = self.client.events(request_id, self.last_event_id)
            try:
                while True:
                    with self.interrupts.armed():
                        item = next(events, None)
                    if item is None:
                        break  # closed before its final event: resume
                    self.streamed = True
                    event, event_id, data = item
                    self.last_event_id = event_id or self.last_event_id
                    if event == "completed":
                        progress.update(task, description=_state(data), total=1, completed=1)
                        return data
                    if event == "status":
                        body = data
                    elif event == "progress":
                        body = body | {"status": "PROCESSING", "progress": data}
                    else:
                        continue
                    text, total, completed = _describe(body)
                    if cancelling:
                        text = f"cancelling: {text}"
                    progress.update(task, description=text, total=total, completed=completed)
            except ApiError as exc:
                if exc.status is not None:
                    return None  # an answer, not a cut: polling reports it
            finally:
                events.close()
        return None

    def _poll(
        self, request_id: str, progress: Progress, task: TaskID, cancelling: bool
    ) -> dict[str, Any]:
        failing_since: float | None = None
        while True:
            try:
                with self.interrupts.armed():
                    body = self.client.status(request_id)
                failing_since = None
            except ApiError as exc:
                # A farm restarting or briefly overloaded must not end the wait: the request
                # goes on there. Anything else, or an outage that lasts, is reported.
                if failing_since is None:
                    failing_since = time.monotonic()
                    if exc.status in TRANSIENT:
                        self.console.print(
                            f"{exc.message}; retrying for up to {OUTAGE_PATIENCE_S:.0f} s",
                            markup=False,
                            highlight=False,
                        )
                if exc.status not in TRANSIENT or (
                    time.monotonic() - failing_since > OUTAGE_PATIENCE_S
                ):
                    raise
                progress.update(task, description=f"waiting for the farm: {exc.message}")
                with self.interrupts.armed():
                    self.sleep(POLL_INTERVAL_S * 4)
                continue
            if body.get("status") in TERMINAL:
                progress.update(task, description=_state(body), total=1, completed=1)
                return body
            text, total, completed = _describe(body)
            if cancelling:
                text = f"cancelling: {text}"
            progress.update(task, description=text, total=total, completed=completed)
            with self.interrupts.armed():
                self.sleep(POLL_INTERVAL_S)

    def _collect(self, request_id: str, final: dict[str, Any], out_dir: Path) -> Outcome:
        """Fetch the result and write every delivered image (a cancelled job may have some)."""
        result = self.client.result(request_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        seeds: list[int] = []
        for output in result.get("outputs") or []:
            index, seed = int(output["index"]), int(output["seed"])
            data, content_type = self.client.image(request_id, index)
            extension = EXTENSIONS.get(content_type, "bin")
            path = out_dir / f"{request_id}-{seed}.{extension}"
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(data)
            partial.replace(path)  # a file of that name is always a whole image
            files.append(path)
            seeds.append(seed)
        return Outcome(
            request_id=request_id,
            status=str(final.get("status")),
            files=files,
            seeds=seeds,
            error=final.get("error"),
            cancelled=bool(final.get("cancelled")),
        )


def render_command(
    url: str,
    api_key: str,
    params: dict[str, Any],
    out_dir: Path,
    as_json: bool,
    stdin: TextIO | None = None,
) -> int:
    """`kolors-farm render`: the exit code (EXIT_OK, EXIT_FAILED or EXIT_API)."""
    stdin = stdin or sys.stdin
    console = Console(stderr=True)
    client = FarmClient(url, api_key)
    interrupts = Interrupts()
    renderer = Renderer(
        client,
        console,
        show_progress=not as_json,
        ask=lambda request_id: ask_to_cancel(request_id, stdin, sys.stderr, interrupts.armed),
        interrupts=interrupts,
    )
    try:
        with interrupts.installed():
            outcome = renderer.run(params, out_dir)
    except ApiError as exc:
        return _report_error(exc, as_json)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_FAILED
    finally:
        client.close()
    if as_json:
        print(json.dumps(outcome.document()))
    else:
        for path in outcome.files:
            print(path)
        if outcome.status != "COMPLETED":
            what = "was cancelled" if outcome.cancelled else "failed"
            console.print(
                f"request {outcome.request_id} {what}: {outcome.error or 'no reason given'}",
                markup=False,
                highlight=False,
            )
    return EXIT_OK if outcome.status == "COMPLETED" else EXIT_FAILED


def _report_error(exc: ApiError, as_json: bool) -> int:
    sys.stderr.write(f"Error: {exc.message}\n")
    if as_json:
        print(json.dumps(exc.document()))
    return EXIT_API


def _call(as_json: bool, work: Callable[[], int]) -> int:
    try:
        return work()
    except ApiError as exc:
        return _report_error(exc, as_json)


def _short(text: Any, width: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _state(body: dict[str, Any]) -> str:
    status = str(body.get("status"))
    return f"{status} (cancelled)" if body.get("cancelled") else status


def list_command(
    url: str,
    api_key: str,
    status: str | None,
    limit: int | None,
    cursor: str | None,
    as_json: bool,
) -> int:
    """`kolors-farm requests list`: a page of requests, newest first."""

    def work() -> int:
        client = FarmClient(url, api_key)
        try:
            page = client.list_requests(status, limit, cursor)
        finally:
            client.close()
        if as_json:
            print(json.dumps(page))
            return EXIT_OK
        table = Table()
        table.add_column("id", no_wrap=True, min_width=32)  # never cut: people paste it
        table.add_column("status", no_wrap=True)
        table.add_column("created", no_wrap=True)
        table.add_column("prompt", overflow="ellipsis", no_wrap=True)
        table.add_column("images", no_wrap=True, justify="right")
        for item in page.get("requests") or []:
            table.add_row(
                str(item.get("request_id")),
                _state(item),
                str(item.get("created_at") or "")[:19].replace("T", " "),
                _short(item.get("prompt"), 40),
                f"{item.get('images_done', 0)}/{item.get('number_of_images', '?')}",
            )
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # piped into a file or a program: no cut columns
        console.print(table)
        if page.get("next_cursor"):
            print(f"more: --cursor {page['next_cursor']}")
        return EXIT_OK

    return _call(as_json, work)


def show_command(url: str, api_key: str, request_id: str, as_json: bool) -> int:
    """`kolors-farm requests show`: the status, and the result once it ended."""

    def work() -> int:
        client = FarmClient(url, api_key)
        try:
            body = client.status(request_id)
            if body.get("status") in TERMINAL:
                try:
                    body = body | client.result(request_id)
                except ApiError as exc:
                    if exc.status != 410:
                        raise
                    body["results"] = "expired"
        finally:
            client.close()
        if as_json:
            print(json.dumps(body))
            return EXIT_OK
        _print_request(body)
        return EXIT_OK

    return _call(as_json, work)


def _print_request(body: dict[str, Any]) -> None:
    lines = [f"request   {body.get('request_id')}", f"status    {_state(body)}"]
    if body.get("error"):
        lines.append(f"error     {body['error']}")
    for name in ("created_at", "started_at", "finished_at"):
        if body.get(name):
            lines.append(f"{name.split('_')[0]:<9} {body[name]}")
    if body.get("status") not in TERMINAL:
        text, _, _ = _describe(body)
        lines.append(f"progress  {text}")
    progress = body.get("progress") or {}
    lines.append(f"images    {progress.get('images_done', 0)}/{progress.get('images', '?')}")
    parameters = body.get("parameters")
    if isinstance(parameters, dict):
        lines.append(f"prompt    {_short(parameters.get('prompt'), 200)}")
        rest = {k: v for k, v in parameters.items() if k not in ("prompt", "negative_prompt")}
        lines.append("params    " + ", ".join(f"{k}={v}" for k, v in rest.items()))
    if body.get("seeds"):
        lines.append("seeds     " + ", ".join(str(seed) for seed in body["seeds"]))
    for link in body.get("output") or []:
        lines.append(f"output    {link}")
    if body.get("results") == "expired":
        lines.append("output    expired (past the retention)")
    print("\n".join(lines))


def cancel_command(url: str, api_key: str, request_id: str, as_json: bool) -> int:
    """`kolors-farm requests cancel`: cancel one request (harmless when it already ended)."""

    def work() -> int:
        client = FarmClient(url, api_key)
        try:
            body = client.cancel(request_id)
        finally:
            client.close()
        if as_json:
            print(json.dumps(body))
        else:
            detail = body.get("detail") or "cancelled"
            print(f"request {request_id}: {_state(body)}; {detail}")
        return EXIT_OK

    return _call(as_json, work)
