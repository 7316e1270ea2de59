"""Hosts for multi-host tests: Linux network namespaces on one bridge, each its own machine.

A `HostNetwork` is a bridge in the root namespace and, for each host, a network
namespace joined to it by a veth pair, with an address in a private /24 that no route of
this machine uses. A host's processes see only its own loopback, so a farm process that
tried 127.0.0.1 for another host's service would find nothing there: they reach each
other over the bridge, as across machines. The root namespace holds the bridge's first
address and plays the client.

Partitions are `iptables` rules inside a host's namespace (its packets dropped, not
refused, as when a cable or a switch goes); `Host.kill_all` is a host losing power.

Everything is named after the creating process's pid, so a run that was killed before it
cleaned up is cleaned up by the next one (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "kfh"  # kolors-farm host: namespaces kfh<pid>-<name>, bridge kfh<pid>b, veths kfh<pid>v<i>
LOCK_PATH = "/run/lock/kolors-farm-test-hosts.lock"
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no address or route of this machine overlaps."""
    taken: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unicast"):
            first = line.split()[1]
        if first == "default":
            continue
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(first, strict=False))  # type: ignore[arg-type]
    for third in range(200, 256):
        for second in range(64, 128):
            candidate = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
            if not any(candidate.overlaps(network) for network in taken):
                return candidate
    raise RuntimeError("no free private /24 for the test hosts")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(netns: str) -> list[int]:
    listed = _ip("netns", "pids", netns, check=False).stdout.split()
    return [int(pid) for pid in listed if pid.isdigit()]


def _remove_namespace(netns: str) -> None:
    for pid in _namespace_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", netns, check=False)


def remove_leftovers() -> None:
    """Delete the namespaces and bridges of runs whose process is gone."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _LEFTOVER.match(name)
        if match and not _alive(int(match.group(1))):
            _remove_namespace(name)
    for line in _ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        found = re.search(rf"\s({PREFIX}(\d+)b)[:@]", line)
        if found and not _alive(int(found.group(2))):
            _ip("link", "del", found.group(1), check=False)


@dataclass
class Host:
    """One machine of the test network: a namespace, its address and a folder of its own."""

    name: str
    netns: str
    address: str
    root: Path
    _rules: list[list[str]] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command on this host; its output."""
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=60, check=check
        )

    def _add_drop(self, chain: str, *match: str) -> None:
        self.run("iptables", "-I", chain, "1", *match, "-j", "DROP")
        self._rules.append([chain, *match])

    def cut_off(self) -> None:
        """Drop every packet to and from this host (its loopback still works)."""
        self._add_drop("INPUT", "!", "-i", "lo")
        self._add_drop("OUTPUT", "!", "-o", "lo")

    def cut_off_from(self, peer: Host, port: int | None = None) -> None:
        """Drop this host's packets to and from `peer` (only those of its `port` when given)."""
        if port is None:
            self._add_drop("OUTPUT", "-d", peer.address)
            self._add_drop("INPUT", "-s", peer.address)
            return
        self._add_drop("OUTPUT", "-d", peer.address, "-p", "tcp", "--dport", str(port))
        self._add_drop("INPUT", "-s", peer.address, "-p", "tcp", "--sport", str(port))

    def reconnect(self) -> None:
        """Take back every packet-dropping rule this host was given."""
        while self._rules:
            rule = self._rules.pop()
            self.run("iptables", "-D", rule[0], *rule[1:], "-j", "DROP", check=False)

    @contextlib.contextmanager
    def partitioned(self) -> Iterator[None]:
        """This host cut off for the block's duration."""
        self.cut_off()
        try:
            yield
        finally:
            self.reconnect()

    def pids(self) -> list[int]:
        """Every process running on this host."""
        return _namespace_pids(self.netns)

    def kill_all(self) -> None:
        """SIGKILL every process on this host, as when it loses power."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class HostNetwork:
    """A bridge and the hosts on it; `close` removes every namespace, link and process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}b"
        self.hosts: dict[str, Host] = {}
        # Test processes running side by side each pick a subnet: one at a time, so that
        # each sees the others' bridges (and their routes) before it picks.
        with Path(LOCK_PATH).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_leftovers()
            self.subnet = free_subnet()
            addresses = self.subnet.hosts()
            self.client_address = str(next(addresses))
            self._addresses = addresses
            _ip("link", "add", self.bridge, "type", "bridge")
            try:
                prefix = self.subnet.prefixlen
                _ip("addr", "add", f"{self.client_address}/{prefix}", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            except BaseException:
                self.close()
                raise

    def add_host(self, name: str) -> Host:
        """A new host on the bridge, with the next address and a folder under `root`."""
        netns = f"{self.tag}-{name}"
        veth = f"{self.tag}v{len(self.hosts)}"
        address = str(next(self._addresses))
        _ip("netns", "add", netns)
        host = Host(name, netns, address, self.root / name)
        self.hosts[name] = host
        host.root.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every host's processes, delete its namespace (and veth), then the bridge."""
        for host in self.hosts.values():
            _remove_namespace(host.netns)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)


def netns_available() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed (make test installs it)"
    return None
