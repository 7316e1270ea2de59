"""The operators' commands: users, tenants, credits, API keys, webhook secrets, the audit.

Each runs one transaction on the configured database directly (no API needed),
through `operator_transaction`; the audit only reads, in one snapshot
(`operator_snapshot`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import click

from shared.settings import Settings

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from shared.accounts.users import KeyInfo
    from shared.jobs.audit import BooksAudit


@contextmanager
def operator_transaction() -> Iterator[Session]:
    """One transaction on the configured database, committed on exit; domain errors exit 1."""
    from shared.db import make_engine, make_session_factory, transaction
    from shared.errors import FarmError

    engine = make_engine(Settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    except FarmError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        engine.dispose()


@contextmanager
def operator_snapshot() -> Iterator[Session]:
    """A read-only transaction on the configured database that sees one snapshot.

    SQLite's read transactions do (and never take the write lock); on PostgreSQL it runs
    at REPEATABLE READ, so a farm that keeps working meanwhile cannot tear what it reads.
    """
    from sqlalchemy.engine import make_url

    from shared.db import make_engine, make_session_factory, read_only

    url = Settings().resolved_database_url
    snapshot = (
        {}
        if make_url(url).get_backend_name() == "sqlite"
        else {"isolation_level": "REPEATABLE READ"}
    )
    engine = make_engine(url, **snapshot)
    try:
        with read_only(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


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


@click.group()
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

    amount = _credits(credit_text)
    with operator_transaction() as session:
        user, key = create_user(session, name, tenant or name, amount, admin=admin)
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


@click.group()
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
    with operator_transaction() as session:
        setter(session, name, weight)


@click.group()
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

    millicredits = _credits(amount)
    if millicredits == 0:
        raise click.BadParameter("a grant must be positive")
    with operator_transaction() as session:
        user = find_user(session, name)
        balance = grant_credits(session, user.id, millicredits, note="granted by operator")
    click.echo(
        f"granted {format_credits(millicredits)} credits to {name!r}; "
        f"balance {format_credits(balance)}"
    )


@click.group()
def keys() -> None:
    """Manage API keys (a user may hold several)."""


@keys.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Issue one more API key for user NAME; prints it alone on the last line."""
    from shared.accounts.users import DISPLAY_PREFIX_LENGTH, create_key_for_user

    with operator_transaction() as session:
        key = create_key_for_user(session, name)
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

    with operator_transaction() as session:
        found = list_api_keys(session, name)
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

    with operator_transaction() as session:
        info, revoked = revoke_api_key(session, prefix)
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


@click.command("secret")
@click.argument("tenant")
def webhooks_secret(tenant: str) -> None:
    """Print TENANT's webhook signing secret alone on the last line (created if missing)."""
    from shared.webhooks.secrets import tenant_secret_by_name

    with operator_transaction() as session:
        secret = tenant_secret_by_name(session, tenant)
    click.echo(f"webhook signing secret of tenant {tenant!r} (verify with Standard Webhooks):")
    click.echo(secret)


@click.command("rotate")
@click.argument("tenant")
def webhooks_rotate(tenant: str) -> None:
    """Replace TENANT's secret; the old one keeps signing for 24 hours. Prints the new one last."""
    from shared.webhooks.secrets import rotate_secret

    with operator_transaction() as session:
        secret = rotate_secret(session, tenant)
    click.echo(
        f"rotated the webhook secret of tenant {tenant!r}; deliveries carry both signatures "
        "for 24 hours. The new secret:"
    )
    click.echo(secret)


@click.command("audit")
@click.option(
    "--require-terminal",
    is_flag=True,
    help="Count every queued or running job as a finding (for a farm whose load has drained).",
)
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Jobs (and users) read per page.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of tables.")
def audit(require_terminal: bool, batch_size: int, as_json: bool) -> None:
    """Audit the books: jobs, holds and settlements, balances, images and stored objects.

    Checks that every job has ended or is legitimately live (queued, or running under a
    lease), that each job held once, captured once per delivered image and released at
    most once, leaving nothing held once it ended; that no image index was recorded twice;
    that each user's balance equals its ledger and its grants less its captures (less what
    its live jobs hold); that every recorded image is in storage and every object under a
    finished job's prefix is recorded. Reads in pages, in one read-only snapshot; changes
    nothing. Exits 1 when anything is found.
    """
    import json

    from shared.jobs.audit import audit_books
    from shared.storage import make_storage

    storage = make_storage(Settings().resolved_storage_url)
    with operator_snapshot() as session:
        result = audit_books(
            session, storage, require_terminal=require_terminal, batch_size=batch_size
        )
    if as_json:
        click.echo(json.dumps(audit_json(result)))
    else:
        _print_audit(result)
    if not result.clean:
        raise SystemExit(1)


def audit_json(result: BooksAudit) -> dict[str, object]:
    """An audit as one JSON-ready document."""
    return {
        "clean": result.clean,
        "checked": {
            "jobs": result.jobs,
            "live_jobs": result.live_jobs,
            "users": result.users,
            "ledger_entries": result.ledger_entries,
            "images": result.images,
            "objects": result.objects,
        },
        "findings_by_rule": {str(rule): count for rule, count in sorted(result.by_rule.items())},
        "findings": [
            {"rule": str(f.rule), "job_id": f.job_id, "user": f.user, "detail": f.detail}
            for f in result.findings
        ],
    }


def _print_audit(result: BooksAudit) -> None:
    from rich.console import Console
    from rich.table import Table

    from shared.jobs.audit import RULE_TEXT

    console = Console()
    checked = Table(title="Books audit: what was checked")
    checked.add_column("jobs", justify="right")
    checked.add_column("of them live", justify="right")
    checked.add_column("users", justify="right")
    checked.add_column("ledger entries", justify="right")
    checked.add_column("images", justify="right")
    checked.add_column("stored objects", justify="right")
    checked.add_row(
        *(
            f"{value:,}"
            for value in (
                result.jobs,
                result.live_jobs,
                result.users,
                result.ledger_entries,
                result.images,
                result.objects,
            )
        )
    )
    console.print(checked)
    if result.clean:
        console.print("nothing found: every rule holds")
        return
    findings = Table(title=f"Findings ({result.total_findings:,})")
    for column in ("rule", "job", "user", "what was seen"):
        findings.add_column(column)
    for finding in result.findings:
        findings.add_row(
            str(finding.rule), finding.job_id or "", finding.user or "", finding.detail
        )
    console.print(findings)
    if len(result.findings) < result.total_findings:
        console.print(f"(the first {len(result.findings):,} shown)")
    rules = Table(title="Findings by rule")
    rules.add_column("rule")
    rules.add_column("broken by", justify="right")
    rules.add_column("the rule")
    for rule, count in sorted(result.by_rule.items()):
        rules.add_row(str(rule), f"{count:,}", RULE_TEXT[rule])
    console.print(rules)
