"""The ``tokenferry`` console script: one argparse tree, one module per command group.

Exit codes: 0 success, 1 the operation failed (invalid input, refused request),
2 usage error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes ``register(subparsers)``; a registered command sets ``func``
# on its parser, returning the process exit code.
COMMAND_GROUPS: tuple[str, ...] = (
    "tokenferry.cli.dev",
    "tokenferry.cli.profile",
    "tokenferry.cli.proxy",
    "tokenferry.cli.gateway",
    "tokenferry.cli.provider",
    "tokenferry.cli.sandbox",
    "tokenferry.cli.login",
)


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenferry",
        description="Short-lived, user-and-agent-scoped OAuth tokens for sandbox egress.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_GROUPS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result
