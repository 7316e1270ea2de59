"""`kolors-farm`: run the farm, its pieces, and administer users and credits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from shared.logs import configure_logging
from shared.settings import Settings

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from shared.accounts.users import KeyInfo

T = TypeVar("T")


def _settings() -> Settings:
    return Settings()


def _credits(value: str) -> int:
    from shared.accounts.pricing import credits_to_millicredits

    try:
        amount = credits_to_millicredits(Decimal(value))
    except (InvalidOperation, ValueError) as exc:
        raise click.BadParameter(
            f"{value!r} is not an amount of credits with at most three decimals"
        ) from exc
    if amount < 0:
        raise click.BadParameter("credits cannot be negative")
    return amount


def _exec_module(module: str, *args: str) -> None:
    # This package imports neither the HTTP views nor the worker (torch): hand the process over.
    argv = [sys.executable, "-m", module, *args]
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, no shell


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Kolors render farm: a Segmind-compatible Kolors API on your own GPUs.

    Configuration comes from KOLORS_FARM_* environment variables (see the README).
    """


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="API bind address.")
@click.option("--port", default=8000, show_default=True, type=int, help="API port.")
@click.option(
    "--workers",
    "cpu_workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="CPU workers to start when no CUDA device is visible.",
)
def up(host: str, port: int, cpu_workers: int) -> None:
    """Run the whole farm on this machine in the foreground (Ctrl-C stops it).

    Applies migrations, starts a private Redis when KOLORS_FARM_REDIS_URL is unset,
    one worker per visible CUDA device (else --workers CPU workers), and the API.
    """
    from control.launcher import run_farm

    configure_logging()
    sys.exit(run_farm(_settings(), host=host, port=port, cpu_workers=cpu_workers))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="gunicorn worker processes.",
)
@click.option(
    "--threads",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Threads per process (each synchronous request holds one while it waits).",
)
def api(host: str, port: int, processes: int, threads: int) -> None:
    """Serve the HTTP API (gunicorn, threaded workers)."""
    _exec_module(
        "api",
        "--host",
        host,
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    )


@main.command()
@click.option(
    "--devices",
    default=None,
    help="Comma-separated CUDA device indices to serve (default: every visible device).",
)
@click.option(
    "--cpu-workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="CPU workers to start when no CUDA device is visible.",
)
def workers(devices: str | None, cpu_workers: int) -> None:
    """Run one render worker per device, each pinned to its GPU, restarted with backoff if it dies.

    Each worker sees only its own device (CUDA_VISIBLE_DEVICES) and is named gpuN@host.
    """
    import socket

    from control.workers import run_workers, select_devices, visible_cuda_devices, worker_plan

    configure_logging()
    visible = visible_cuda_devices()
    try:
        chosen = select_devices(visible, devices)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from exc
    plan = worker_plan(chosen, cpu_workers, socket.gethostname())
    sys.exit(run_workers(plan, dict(os.environ)))


@main.command()
def dispatcher() -> None:
    """Release queued jobs to the workers in fair-share order and recover lost work.

    Run one or more (one is active at a time; the others stand by).
    """
    from control.dispatcher import run_dispatcher

    configure_logging()
    sys.exit(run_dispatcher(_settings()))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--device", default=None, help="cuda:N, cpu or auto (default: KOLORS_FARM_DEVICE, else auto)."
)
@click.option("--name", default=None, help="Celery node name (default: <device>@<host>).")
def worker(device: str | None, name: str | None) -> None:
    """Run one render worker (one process per device); exits non-zero if the model fails to load."""
    args = ["worker"]
    if device:
        args += ["--device", device]
    if name:
        args += ["--name", name]
    _exec_module("worker", *args)


@main.command()
def migrate() -> None:
    """Apply database migrations."""
    from shared.migrate import migrate_database

    configure_logging()
    settings = _settings()
    migrate_database(settings.resolved_database_url)
    click.echo("database is up to date")


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def tiny_model(directory: Path) -> None:
    """Write a tiny random-weight Kolors checkpoint (its images are noise) to DIRECTORY."""
    _exec_module("worker", "tiny-model", str(directory))


@main.group()
def users() -> None:
    """Manage users."""


@users.command("create")
@click.argument("name")
@click.option("--tenant", default=None, help="Tenant (team) name; defaults to the user's name.")
@click.option(
    "--credits",
    "credit_text",
    default="0",
    show_default=True,
    help="Initial credits (up to three decimals).",
)
@click.option(
    "--admin", is_flag=True, help="An operator: sees the whole farm and may grant credits."
)
def users_create(name: str, tenant: str | None, credit_text: str, admin: bool) -> None:
    """Create a user; prints its new API key alone on the last line."""
    from shared.accounts.pricing import format_credits
    from shared.accounts.users import create_user
    from shared.db import make_engine, make_session_factory, transaction
    from shared.errors import FarmError

    amount = _credits(credit_text)
    engine = make_engine(_settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            user, key = create_user(session, name, tenant or name, amount, admin=admin)
    except FarmError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        engine.dispose()
    click.echo(
        f"created {'admin' if admin else 'user'} {user.name!r} (tenant {tenant or name!r}) with "
        f"{format_credits(amount)} credits; its API key (shown once):"
    )
    click.echo(key)


@users.command("weight")
@click.argument("name")
@click.argument("weight", type=click.IntRange(1, 10_000))
def users_weight(name: str, weight: int) -> None:
    """Set user NAME's fair-share WEIGHT (1 to 10000, default 1) among its tenant's users."""
    from shared.accounts.users import set_user_weight

    _set_weight(set_user_weight, name, weight)
    click.echo(f"user {name!r} now has fair-share weight {weight}")


@main.group()
def tenants() -> None:
    """Manage tenants (teams)."""


@tenants.command("weight")
@click.argument("name")
@click.argument("weight", type=click.IntRange(1, 10_000))
def tenants_weight(name: str, weight: int) -> None:
    """Set tenant NAME's fair-share WEIGHT (1 to 10000, default 1) among tenants."""
    from shared.accounts.users import set_tenant_weight

    _set_weight(set_tenant_weight, name, weight)
    click.echo(f"tenant {name!r} now has fair-share weight {weight}")


def _set_weight(setter: Callable[[Session, str, int], None], name: str, weight: int) -> None:
    from shared.db import make_engine, make_session_factory, transaction
    from shared.errors import FarmError

    engine = make_engine(_settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            setter(session, name, weight)
    except FarmError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        engine.dispose()


@main.group()
def credits() -> None:
    """Manage credits."""


@credits.command("grant")
@click.argument("name")
@click.argument("amount")
def credits_grant(name: str, amount: str) -> None:
    """Add AMOUNT credits to user NAME (a ledger entry)."""
    from shared.accounts.ledger import grant_credits
    from shared.accounts.pricing import format_credits
    from shared.accounts.users import find_user
    from shared.db import make_engine, make_session_factory, transaction
    from shared.errors import FarmError

    millicredits = _credits(amount)
    if millicredits == 0:
        raise click.BadParameter("a grant must be positive")
    engine = make_engine(_settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            user = find_user(session, name)
            balance = grant_credits(session, user.id, millicredits, note="granted by operator")
    except FarmError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        engine.dispose()
    click.echo(
        f"granted {format_credits(millicredits)} credits to {name!r}; "
        f"balance {format_credits(balance)}"
    )


@main.group()
def keys() -> None:
    """Manage API keys (a user may hold several)."""


@keys.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Issue one more API key for user NAME; prints it alone on the last line."""
    from shared.accounts.users import DISPLAY_PREFIX_LENGTH, create_key_for_user

    key = _with_session(lambda session: create_key_for_user(session, name))
    click.echo(
        f"created an API key for {name!r} (prefix {key[:DISPLAY_PREFIX_LENGTH]}); "
        "the key (shown once):"
    )
    click.echo(key)


@keys.command("list")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def keys_list(name: str, as_json: bool) -> None:
    """List user NAME's keys: prefix, created, last used, revoked (never the key itself)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from shared.accounts.users import list_api_keys

    found = _with_session(lambda session: list_api_keys(session, name))
    if as_json:
        click.echo(json.dumps({"user": name, "keys": [_key_json(info) for info in found]}))
        return

    def shown(value: datetime | None, missing: str) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else missing

    table = Table(title=f"API keys of {name} (times in UTC)")
    for column in ("prefix", "created", "last used", "revoked"):
        table.add_column(column, no_wrap=True)
    for info in found:
        table.add_row(
            info.prefix,
            shown(info.created_at, ""),
            shown(info.last_used_at, "never"),
            shown(info.revoked_at, "no"),
        )
    Console().print(table)


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the API key shown as PREFIX by `keys list` (refused if several keys share it).

    The key is refused from its next request on. Revoking a key that is already revoked
    changes nothing, says so and exits 0.
    """
    from shared.accounts.users import revoke_api_key

    info, revoked = _with_session(lambda session: revoke_api_key(session, prefix))
    if revoked:
        click.echo(f"revoked API key {info.prefix} of {info.user!r}")
    else:
        click.echo(f"API key {info.prefix} of {info.user!r} was already revoked; nothing changed")


def _key_json(info: KeyInfo) -> dict[str, str | None]:
    def stamp(value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value else None

    return {
        "prefix": info.prefix,
        "user": info.user,
        "created_at": stamp(info.created_at),
        "last_used_at": stamp(info.last_used_at),
        "revoked_at": stamp(info.revoked_at),
    }


def _with_session(work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction on the configured database; domain errors exit 1."""
    from shared.db import make_engine, make_session_factory, transaction
    from shared.errors import FarmError

    engine = make_engine(_settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            return work(session)
    except FarmError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        engine.dispose()


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


@main.command(epilog=_CLIENT_EXIT_CODES)
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


@main.group(epilog=_CLIENT_EXIT_CODES)
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


@main.group()
def webhooks() -> None:
    """Webhooks: tenants' signing secrets and the delivery worker."""


@webhooks.command("secret")
@click.argument("tenant")
def webhooks_secret(tenant: str) -> None:
    """Print TENANT's webhook signing secret alone on the last line (created if missing)."""
    from shared.webhooks.secrets import tenant_secret_by_name

    secret = _with_session(lambda session: tenant_secret_by_name(session, tenant))
    click.echo(f"webhook signing secret of tenant {tenant!r} (verify with Standard Webhooks):")
    click.echo(secret)


@webhooks.command("rotate")
@click.argument("tenant")
def webhooks_rotate(tenant: str) -> None:
    """Replace TENANT's secret; the old one keeps signing for 24 hours. Prints the new one last."""
    from shared.webhooks.secrets import rotate_secret

    secret = _with_session(lambda session: rotate_secret(session, tenant))
    click.echo(
        f"rotated the webhook secret of tenant {tenant!r}; deliveries carry both signatures "
        "for 24 hours. The new secret:"
    )
    click.echo(secret)


@webhooks.command("worker")
@click.option("--name", default=None, help="Celery node name (default: webhooks-<pid>@<host>).")
def webhooks_worker(name: str | None) -> None:
    """Deliver webhooks (their own queue, no GPU) and sweep the outbox for due deliveries."""
    from control.deliveries import run_delivery_worker

    configure_logging()
    sys.exit(run_delivery_worker(_settings(), name))
