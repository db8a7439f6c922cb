"""``tokenferry gateway``: run the gateway service (SPEC §6)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config import ConfigError, add_arguments, config_from_args


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the gateway: provider records, user subject tokens, the token broker",
        description=(
            "Run the tokenferry gateway. Every flag can also be set with the environment "
            "variable named in its help; a flag on the command line wins. The encryption "
            "key may also come from TOKENFERRY_GATEWAY_KEY."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenferry.cli.main import UserError

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    # Imported late: the service pulls in aiohttp, prometheus and the SPIFFE client,
    # which other commands do not need.
    from gateway.app import StartupError
    from gateway.app import run as run_gateway

    try:
        return run_gateway(config)
    except StartupError as exc:
        raise UserError(str(exc)) from None
