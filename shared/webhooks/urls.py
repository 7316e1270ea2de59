"""The webhook URL guard: only http(s), and no host that resolves to an internal address.

Checked at submission (a 400 naming `webhook`) and again at every delivery, which
then connects to the very address it checked, so a name that changes its answer
between the two (DNS rebinding) cannot reach inside the farm's network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from shared.errors import InvalidParams
from shared.settings import Settings

MAX_URL_LENGTH: Final = 2048
# Addresses no webhook may reach unless the operator allows their network: cloud
# metadata services (also covered by link-local and private ranges, named for clarity).
METADATA_ADDRESSES: Final = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(settings: Settings) -> list[Network]:
    """Networks exempt from the guard (`KOLORS_FARM_WEBHOOK_ALLOW_NETS`, CIDRs)."""
    return [
        ipaddress.ip_network(part.strip(), strict=False)
        for part in settings.webhook_allow_nets.split(",")
        if part.strip()
    ]


class WebhookRefused(ValueError):
    """A webhook URL the farm will not call, with the rule it broke."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message

    def as_invalid_params(self, field: str = "webhook") -> InvalidParams:
        """The same refusal as a 400 naming the request field."""
        return InvalidParams.single(field, self.rule, self.message)


def check_url_syntax(url: str) -> str:
    """The URL itself, if it is an absolute http(s) URL with a host and no credentials."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused("url_too_long", f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookRefused("url_invalid", "is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookRefused("url_scheme", "must be an http or https URL")
    if not parts.hostname:
        raise WebhookRefused("url_host", "must name a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("url_credentials", "must not carry credentials (they would be logged)")
    if port == 0 or any(c in url for c in "\r\n\t "):
        raise WebhookRefused("url_invalid", "is not a valid URL")
    return url


def is_forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a webhook must not reach `address` (before the operator's allow-list)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None and is_forbidden_address(mapped):
            return True
    return (
        address in METADATA_ADDRESSES
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


@dataclass(frozen=True)
class Target:
    """Where a webhook goes: the checked address to connect to, and the URL's own parts."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    @property
    def connect_url(self) -> str:
        """The URL with its host replaced by the checked address (no second DNS lookup)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if ":" in self.address else self.address
        path = parts.path or "/"
        return urlunsplit((self.scheme, f"{host}:{self.port}", path, parts.query, ""))

    @property
    def host_header(self) -> str:
        """The Host header the receiver expects."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def resolve_target(url: str, allow: Sequence[Network]) -> Target:
    """Resolve the URL's host and check every address; WebhookRefused if any is forbidden.

    Every address is checked (not just the first) so a name that resolves to a
    public and a private address cannot slip through by the order of answers.
    """
    check_url_syntax(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise WebhookRefused("url_unresolvable", f"its host {host!r} does not resolve") from None
    addresses = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]
        address = ipaddress.ip_address(raw)
        allowed = any(address in network for network in allow)
        if not allowed and is_forbidden_address(address):
            raise WebhookRefused(
                "url_forbidden_address",
                f"its host resolves to {address}, a loopback, private, link-local, multicast, "
                "reserved or metadata address (the operator may allow a network with "
                "KOLORS_FARM_WEBHOOK_ALLOW_NETS)",
            )
        addresses.append(str(address))
    if not addresses:
        raise WebhookRefused("url_unresolvable", f"its host {host!r} does not resolve")
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0])


def check_webhook(url: str | None, settings: Settings) -> None:
    """At submission: InvalidParams (400, field `webhook`) unless the farm may call `url`."""
    if url is None:
        return
    try:
        resolve_target(url, allowed_networks(settings))
    except WebhookRefused as exc:
        raise exc.as_invalid_params() from None
