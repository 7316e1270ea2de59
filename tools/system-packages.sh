#!/usr/bin/env bash
# Install the Debian packages the test suite drives, when missing: Chromium for the browser
# tests (Playwright uses the distribution's build; nothing is downloaded at test time),
# docker-compose, whose parser checks deploy/compose.yaml, and for the multi-host tests
# iproute2 (network namespaces), iptables (partitions) and faketime (a host's wrong clock).
# Run by `make test`.
set -euo pipefail

# command that must exist -> the Debian package that provides it
declare -A NEEDED=(
    [/usr/bin/chromium]=chromium
    [docker-compose]=docker-compose
    [ip]=iproute2
    [iptables]=iptables
    [faketime]=faketime
)

missing=()
for command in "${!NEEDED[@]}"; do
    if ! command -v "$command" >/dev/null 2>&1; then
        missing+=("${NEEDED[$command]}")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "installing Debian packages the tests need: ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "cannot install ${missing[*]}: not root and no password-less sudo." >&2
        echo "install them yourself: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install ${missing[*]}: no apt-get on this machine; install them yourself." >&2
    exit 1
fi
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
