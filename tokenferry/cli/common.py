"""What every gateway-facing command shares: options, authentication, output, errors.

- ``--gateway URL`` (or ``TOKENFERRY_GATEWAY``; else the gateway of the last
  ``tokenferry login``; else ``http://127.0.0.1:8443``, the gateway's default listener).
- ``--output table|json``: tables (rich) for people; JSON on stdout for scripts. Human
  messages (what was done, warnings) always go to stderr, so stdout stays parsable.
- The bearer token: ``TOKENFERRY_TOKEN`` when set (e.g. the gateway's dev admin token;
  an environment variable rather than a flag, because command lines are visible to every
  user in ``ps``), else the stored login, refreshed when it expires within 30 s.
- Errors: every gateway error code becomes one line saying what went wrong and what to
  do, exit 1; usage errors exit 2 (argparse).

Heavy modules (aiohttp through ``gateway_client``, rich) are imported inside functions:
every CLI start imports every command group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from tokenferry.cli.main import UserError

if TYPE_CHECKING:
    from gateway_client import GatewayClient
    from tokenferry.login import TokenStore

ENV_GATEWAY = "TOKENFERRY_GATEWAY"
ENV_TOKEN = "TOKENFERRY_TOKEN"
DEFAULT_GATEWAY = "http://127.0.0.1:8443"
OUTPUT_FORMATS = ("table", "json")


# --------------------------------------------------------------------------- options


def add_gateway_options(parser: argparse.ArgumentParser, *, output: bool = True) -> None:
    """``--gateway`` and ``--output``, accepted on the group and on each command.

    ``argparse.SUPPRESS`` defaults: an option given on the group (``provider --output
    json list``) is not overwritten by the command parser's unset default.
    """
    parser.add_argument(
        "--gateway",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"gateway URL (default: ${ENV_GATEWAY}, else the gateway of the last "
        f"'tokenferry login', else {DEFAULT_GATEWAY})",
    )
    if output:
        add_output_option(parser)


def add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        choices=OUTPUT_FORMATS,
        default=argparse.SUPPRESS,
        help="table (default, for people) or json (parsable, on stdout)",
    )


def add_command(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], **kwargs: Any
) -> argparse.ArgumentParser:
    """A gateway-facing command: ``--gateway``/``--output`` and its function."""
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    add_gateway_options(parser)
    # The parser itself, so run functions can report usage errors (exit 2) after parsing.
    parser.set_defaults(func=func, parser=parser)
    return parser


def output_format(args: argparse.Namespace) -> str:
    value = getattr(args, "output", None)
    return value if value in OUTPUT_FORMATS else "table"


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit 2 with argparse's usage line, as for any other bad argument."""
    parser = getattr(args, "parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def token_store() -> TokenStore:
    from tokenferry.login import TokenStore

    return TokenStore()


def gateway_url(args: argparse.Namespace) -> str:
    """The gateway to talk to, normalised (scheme://host[:port][/path])."""
    from tokenferry.login import LoginError, normalise_gateway

    given = getattr(args, "gateway", None) or os.environ.get(ENV_GATEWAY) or None
    if given is None:
        try:
            given = token_store().default_gateway()
        except LoginError:
            given = None
    try:
        return normalise_gateway(given or DEFAULT_GATEWAY)
    except LoginError as exc:
        raise UserError(f"{exc} (from --gateway or {ENV_GATEWAY})") from None


def info(message: str) -> None:
    """A human message: stderr, so that stdout carries only the requested output."""
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------- calls


async def bearer_token(gateway: str) -> str:
    """``TOKENFERRY_TOKEN``, or the stored login's access token (refreshed if needed)."""
    from tokenferry.login import fresh_login

    direct = os.environ.get(ENV_TOKEN)
    if direct:
        return direct
    return (await fresh_login(token_store(), gateway)).access_token


def run_gateway[T](args: argparse.Namespace, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """Run ``call`` with an authenticated client of the selected gateway; map errors."""
    gateway = gateway_url(args)

    async def main() -> T:
        from gateway_client import BearerAuth, GatewayClient

        async def token() -> str:
            return await bearer_token(gateway)

        async with GatewayClient(gateway, auth=BearerAuth(token)) as client:
            return await call(client)

    return run_mapped(gateway, main)


def run_mapped[T](gateway: str, main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(main())`` with every expected failure turned into a ``UserError``."""
    from gateway_client import GatewayClientError
    from tokenferry.login import LoginError
    from tokenferry.profiles import ProfileError

    try:
        return asyncio.run(_call(main))
    except GatewayClientError as exc:
        raise UserError(describe_gateway_error(exc, gateway)) from None
    except LoginError as exc:
        raise UserError(str(exc)) from None
    except ProfileError as exc:
        raise UserError(f"the gateway returned an unusable profile: {exc}") from None


async def _call[T](main: Callable[[], Awaitable[T]]) -> T:
    return await main()


def describe_gateway_error(exc: Exception, gateway: str) -> str:
    """One line per failure users must tell apart: what happened and what to do."""
    from gateway_client import (
        Conflict,
        FailedPrecondition,
        Forbidden,
        GatewayError,
        GatewayProtocolError,
        GatewayUnreachable,
        InvalidRequest,
        NotFound,
        Unauthenticated,
    )

    if isinstance(exc, GatewayUnreachable):
        return f"{exc}; is it running? set --gateway or {ENV_GATEWAY}"
    if not isinstance(exc, GatewayError):
        return f"gateway request failed: {exc}"
    detail = exc.detail
    if isinstance(exc, Unauthenticated):
        hint = (
            f"the token in {ENV_TOKEN} was refused"
            if os.environ.get(ENV_TOKEN)
            else "not logged in or token expired: run tokenferry login"
        )
        return f"{hint} (gateway {gateway}: {detail})"
    if isinstance(exc, Forbidden):
        return f"forbidden: {detail}"
    if isinstance(exc, NotFound):
        return f"not found: {detail}"
    if isinstance(exc, Conflict):
        return f"already exists: {detail}"
    if isinstance(exc, FailedPrecondition):
        return f"not possible now: {detail}"
    if isinstance(exc, InvalidRequest):
        message = f"invalid request: {detail}"
        field = exc.field
        if field and field not in detail:
            message += f" (field {field!r})"
        return message
    if isinstance(exc, GatewayProtocolError):
        return f"unexpected answer from the gateway at {gateway}: {detail}"
    return f"the gateway at {gateway} failed: {detail} ({exc.code}, HTTP {exc.status})"


# --------------------------------------------------------------------------- output


def to_json(value: Any) -> Any:
    """Records (dataclasses), datetimes, tuples -> JSON-able values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value) if f.repr}
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def format_time(value: datetime | float | None) -> str | None:
    if value is None:
        return None
    moment = (
        datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else value
    ).astimezone(UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def print_json(document: Any) -> None:
    json.dump(to_json(document), sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for row in rows:
        table.add_row(*("-" if cell is None or cell == "" else str(cell) for cell in row))
    # Not a terminal: wide enough that nothing is cut or wrapped in a pipe or a file.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    console.print(table)


def print_records[R](
    args: argparse.Namespace,
    key: str,
    records: Sequence[R],
    columns: Sequence[str],
    row: Callable[[R], Sequence[object]],
) -> None:
    """A list command's output: ``{key: [records]}`` as JSON, else a table of one ``row``
    per record (and ``no <key>`` on stderr when there is none)."""
    if output_format(args) == "json":
        print_json({key: records})
        return
    print_table(columns, [row(record) for record in records])
    if not records:
        info(f"no {key}")


def report_deleted(args: argparse.Namespace, kind: str, key: str, name: str) -> None:
    """A delete command's output: a message on stderr; ``{key: name, "deleted": true}``
    on stdout with ``--output json``."""
    info(f"{kind} {name!r} deleted")
    if output_format(args) == "json":
        print_json({key: name, "deleted": True})


def print_fields(pairs: Sequence[tuple[str, object]], *, title: str | None = None) -> None:
    print_table(("FIELD", "VALUE"), [(k, v) for k, v in pairs], title=title)
