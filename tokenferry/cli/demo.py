"""``tokenferry demo [--serve]``: the whole system on this machine (SPEC §7).

Registration only; the orchestration lives in ``tokenferry.dev.demo`` and is imported when
the command runs (it pulls in httpx and rich, which other commands do not need).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the whole system on this machine and show it working",
        description="Start dev SPIFFE agents, the dev IdP, the gateway (SQLite), two "
        "protected HTTPS services and the proxy in a temporary directory; register a "
        "profile, providers and a sandbox through the gateway API; send requests through "
        "the proxy as a sandbox would and print the claims of each injected token (never "
        "the token) and the proxy's cache behaviour. See docs/demo.md.",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep everything running afterwards and print curl lines to try; "
        "Ctrl-C or SIGTERM stops it",
    )
    parser.add_argument(
        "--keep-dir",
        action="store_true",
        help="keep the temporary directory (logs, generated profiles, database) on exit",
    )
    parser.add_argument(
        "--user",
        default="alice",
        metavar="NAME",
        help="the dev user on whose behalf the sandbox calls (default alice)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenferry.dev.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(serve=args.serve, keep_dir=args.keep_dir, user=args.user))
