"""The HTTP client's commands: render on a running farm and follow your tenant's requests.

Their work is `control.client`'s; these parse the options and set the exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

_CLIENT_EXIT_CODES = """\b
Exit codes: 0 done; 1 the request failed or was cancelled; 2 usage error (nothing sent);
3 the farm refused the request, answered an error or could not be reached.
"""


def _farm_options(command: Callable[..., None]) -> Callable[..., None]:
    """--url and --api-key, read from KOLORS_FARM_URL and KOLORS_FARM_API_KEY by default."""
    from control.client import DEFAULT_URL

    command = click.option(
        "--api-key",
        envvar="KOLORS_FARM_API_KEY",
        show_envvar=True,
        default=None,
        help="The API key (prefer the environment: options show up in process lists).",
    )(command)
    return click.option(
        "--url",
        envvar="KOLORS_FARM_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="The farm's base URL.",
    )(command)


def _require_key(api_key: str | None) -> str:
    if not api_key:
        raise click.UsageError("no API key: set KOLORS_FARM_API_KEY or pass --api-key")
    return api_key


def _size(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    width, sep, height = value.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(width), int(height)


@click.command(epilog=_CLIENT_EXIT_CODES)
@click.argument("prompt")
@click.option("-n", "--number", "number_of_images", type=int, help="Images (number_of_images).")
@click.option("--size", callback=_size, help="WIDTHxHEIGHT, e.g. 1024x1024.")
@click.option("--steps", type=int, help="Diffusion steps.")
@click.option("--scheduler", help="A diffusers scheduler class name.")
@click.option("--seed", type=int, help="Seed of the first image (-1: random).")
@click.option("--negative", "negative_prompt", help="Negative prompt.")
@click.option("--cfg", type=float, help="Guidance scale.")
@click.option("--format", "output_format", help="png, jpeg or webp.")
@click.option("--quality", "output_quality", type=int, help="Quality for jpeg and webp.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write the images ({request_id}-{seed}.{ext}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, no progress.")
@_farm_options
def render(
    prompt: str,
    number_of_images: int | None,
    size: tuple[int, int] | None,
    steps: int | None,
    scheduler: str | None,
    seed: int | None,
    negative_prompt: str | None,
    cfg: float | None,
    output_format: str | None,
    output_quality: int | None,
    out_dir: Path,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Render PROMPT on the farm, following its progress, and save the images to --out.

    Options left out take the farm's defaults; the farm checks every value and names the
    field and the rule it broke. Ctrl-C while waiting asks whether to cancel the request
    (with no answer possible, e.g. stdin at its end, it cancels).
    """
    from control.client import render_command

    params: dict[str, object] = {"prompt": prompt}
    if size is not None:
        params["width"], params["height"] = size
    chosen = {
        "number_of_images": number_of_images,
        "steps": steps,
        "scheduler": scheduler,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "cfg": cfg,
        "output_format": output_format,
        "output_quality": output_quality,
    }
    params |= {name: value for name, value in chosen.items() if value is not None}
    sys.exit(render_command(url, _require_key(api_key), params, out_dir, as_json))


@click.group(epilog=_CLIENT_EXIT_CODES)
def requests() -> None:
    """Your tenant's render requests on the farm (over HTTP, with an API key)."""


@requests.command("list", epilog=_CLIENT_EXIT_CODES)
@click.option(
    "--status",
    type=click.Choice(["QUEUED", "PROCESSING", "COMPLETED", "FAILED"], case_sensitive=False),
    help="Only requests in this state (FAILED includes cancelled).",
)
@click.option("--limit", type=int, help="Requests per page (1 to 100, default 20).")
@click.option("--cursor", help="The next page, as the previous one printed it.")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON.")
@_farm_options
def requests_list(
    status: str | None,
    limit: int | None,
    cursor: str | None,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """List requests, newest first: id, status, created, prompt, images."""
    from control.client import list_command

    chosen = status.upper() if status else None
    sys.exit(list_command(url, _require_key(api_key), chosen, limit, cursor, as_json))


@requests.command("show", epilog=_CLIENT_EXIT_CODES)
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON.")
@_farm_options
def requests_show(request_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    """Show one request: status, progress, parameters, seeds and image links."""
    from control.client import show_command

    sys.exit(show_command(url, _require_key(api_key), request_id, as_json))


@requests.command("cancel", epilog=_CLIENT_EXIT_CODES)
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_farm_options
def requests_cancel(request_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    """Cancel one request (a running render stops at its next step)."""
    from control.client import cancel_command

    sys.exit(cancel_command(url, _require_key(api_key), request_id, as_json))
