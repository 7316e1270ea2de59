"""`python -m api`: serve the HTTP API (what `kolors-farm api` runs)."""

from __future__ import annotations

import argparse

from api.server import serve
from shared.logs import configure_logging
from shared.settings import Settings


def main(argv: list[str] | None = None) -> None:
    """Parse the serving options and run gunicorn until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="kolors-farm api", description="Serve the HTTP API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args(argv)
    configure_logging()
    serve(Settings(), args.host, args.port, args.processes, args.threads)


main()
