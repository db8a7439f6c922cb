"""``tokenferry dev …``: the development stand-ins of SPEC §8, each runnable on its own."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# name -> module exposing ``DESCRIPTION``, ``configure_parser(parser)`` and ``run(args) -> int``.
DEV_COMMANDS: dict[str, str] = {
    "spiffe": "tokenferry.dev.spiffe_agent",
    "idp": "tokenferry.dev.idp",
    "upstream": "tokenferry.dev.upstream",
}


def register(subparsers: Any) -> None:
    dev = subparsers.add_parser("dev", help="development stand-ins: SPIFFE agent, IdP, upstream")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="STAND_IN", required=True)
    for name, module_name in DEV_COMMANDS.items():
        module = importlib.import_module(module_name)
        parser: argparse.ArgumentParser = dev_sub.add_parser(
            name, help=module.DESCRIPTION, description=module.DESCRIPTION
        )
        module.configure_parser(parser)
        parser.set_defaults(func=module.run)
