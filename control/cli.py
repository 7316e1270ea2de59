"""`kolors-farm`: run the farm, its pieces, and administer users and credits."""

from __future__ import annotations

import click

from control.commands import client, operators, processes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Kolors render farm: a Segmind-compatible Kolors API on your own GPUs.

    Configuration comes from KOLORS_FARM_* environment variables (see the README).
    """


@main.group()
def webhooks() -> None:
    """Webhooks: tenants' signing secrets and the delivery worker."""


# `--help` lists commands by name, so the order below is only the reading order.
for command in (
    processes.up,
    processes.api,
    processes.worker,
    processes.workers,
    processes.dispatcher,
    processes.migrate,
    processes.tiny_model,
    operators.users,
    operators.tenants,
    operators.credits,
    operators.keys,
    operators.audit,
    client.render,
    client.requests,
):
    main.add_command(command)
for command in (operators.webhooks_secret, operators.webhooks_rotate, processes.webhooks_worker):
    webhooks.add_command(command)
