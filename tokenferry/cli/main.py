"""The ``tokenferry`` console script: one argparse tree, one module per command group.

Exit codes: 0 success, 1 the operation failed (invalid input, refused request),
2 usage error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

# command -> (module exposing ``register(subparsers)``, one-line help). A registered
# command sets ``func`` on its parser, returning the process exit code. Only the module
# of the command being run is imported: the proxy's pulls in all of mitmproxy, and every
# CLI start would otherwise pay for it.
COMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("tokenferry.cli.proxy", "run the supervisor proxy; print its CA"),
    "gateway": ("tokenferry.cli.gateway", "run the gateway service"),
    "profile": ("tokenferry.cli.profile", "lint, import, list and show provider profiles"),
    "provider": ("tokenferry.cli.provider", "create, update, list, get and delete providers"),
    "sandbox": ("tokenferry.cli.sandbox", "register sandboxes, attach and detach providers"),
    "login": ("tokenferry.cli.login", "log in with the device authorization grant"),
    "logout": ("tokenferry.cli.login", "forget the stored login"),
    "demo": ("tokenferry.cli.demo", "run the whole system on this machine and show it working"),
    "dev": ("tokenferry.cli.dev", "development stand-ins: SPIFFE agent, IdP, upstream"),
}

# Global options, also accepted after the command group. SUPPRESS as default, so a
# command's own unset default never overwrites a value given here (and vice versa).
_GLOBAL_OPTIONS_WITH_VALUES = frozenset({"--gateway", "--output", "-o"})


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback, exit 1."""


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser tree, or (``commands`` given) only those commands' modules loaded.

    Commands not loaded still appear, with their help line, so ``--help`` and argparse's
    "invalid choice" message list every command.
    """
    parser = argparse.ArgumentParser(
        prog="tokenferry",
        description="Short-lived, user-and-agent-scoped OAuth tokens for sandbox egress.",
    )
    parser.add_argument(
        "--gateway",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="gateway URL for gateway-facing commands (default: $TOKENFERRY_GATEWAY)",
    )
    parser.add_argument(
        "--output",
        "-o",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="output format of gateway-facing commands (default: table)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = COMMANDS.keys() if commands is None else commands
    modules = dict.fromkeys(COMMANDS[name][0] for name in COMMANDS if name in wanted)
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def selected_command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``, skipping global options and their values."""
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token in _GLOBAL_OPTIONS_WITH_VALUES:
            skip_value = True
        elif not token.startswith("-"):
            return token
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = selected_command(arguments)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(arguments)
    if not hasattr(args, "func"):
        # A command whose module was not loaded: cannot happen for a known command.
        parser.error(f"unknown command {args.command!r}")
    try:
        result: int = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result
