"""``tokenferry provider …``: provider records at the gateway (SPEC §6, §7).

A provider is a named instance of a profile plus its stored credential values (write-only:
reads show names, expiry and revision, never values).

Credential values on the command line: ``KEY=VALUE``, ``KEY=@FILE`` (the file's content,
one trailing newline removed) or ``KEY=-`` (read from stdin), so that secrets need not
appear in ``ps`` or the shell history.

``--from-oidc-token`` stores this CLI's own login token (``tokenferry login``) as the
profile's subject credential, with the token's expiry; the refresh token stays here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenferry.cli.common import (
    add_command,
    add_gateway_options,
    format_time,
    gateway_url,
    info,
    output_format,
    print_fields,
    print_json,
    print_records,
    print_table,
    report_deleted,
    run_gateway,
    token_store,
    usage_error,
)
from tokenferry.cli.main import UserError

if TYPE_CHECKING:
    from gateway_client import CredentialInput, GatewayClient, ProviderRecord
    from tokenferry.profiles import Profile


class CredentialArgumentError(ValueError):
    """A ``--credential``/``--credential-expires-at`` argument is malformed (exit 2)."""


@dataclass(frozen=True)
class CredentialArgs:
    """The credential options of one command, parsed and with values read."""

    values: dict[str, str] = field(repr=False)
    expires_at: dict[str, datetime]
    # ``--credential KEY`` without a value: the target of ``--from-oidc-token``.
    target: str | None = None


def _read_value(key: str, source: str, read_stdin: Callable[[], str]) -> str:
    if source == "-":
        value = read_stdin()
        where = "stdin"
    elif source.startswith("@"):
        path = source[1:]
        if not path:
            raise CredentialArgumentError(f"--credential {key}=@: a file name must follow '@'")
        try:
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UserError(f"--credential {key}: cannot read {path!r}: {reason}") from None
        where = repr(path)
    else:
        return source
    # Files and here-strings end with a newline that is not part of the secret.
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        raise UserError(f"--credential {key}: {where} is empty")
    return value


def parse_expiry(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CredentialArgumentError(
            f"{what}: {text[:60]!r} is not an ISO 8601 date-time (e.g. 2026-12-31T23:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise CredentialArgumentError(
            f"{what}: {text[:60]!r} has no time zone (add 'Z' for UTC or an offset)"
        )
    return moment


def parse_credential_args(
    credentials: Sequence[str],
    expires: Sequence[str],
    *,
    from_oidc_token: bool,
    read_stdin: Callable[[], str] = lambda: sys.stdin.read(),
) -> CredentialArgs:
    """Check ``--credential``/``--credential-expires-at`` and read ``@file``/``-`` values."""
    values: dict[str, str] = {}
    target: str | None = None
    stdin_used = False
    for item in credentials:
        key, has_value, source = item.partition("=")
        if not key:
            raise CredentialArgumentError(f"--credential {item[:40]!r}: the KEY is missing")
        if key in values or key == target:
            raise CredentialArgumentError(f"--credential {key} is given more than once")
        if not has_value:
            if not from_oidc_token:
                raise CredentialArgumentError(
                    f"--credential {key}: expected KEY=VALUE, KEY=@FILE or KEY=- "
                    "(a bare KEY only names the target of --from-oidc-token)"
                )
            if target is not None:
                raise CredentialArgumentError(
                    f"--credential {target} and --credential {key}: --from-oidc-token "
                    "fills one credential; name only one"
                )
            target = key
            continue
        if not source:
            raise CredentialArgumentError(
                f"--credential {key}=: the value is empty (use KEY=@FILE or KEY=- to read it)"
            )
        if source == "-":
            if stdin_used:
                raise CredentialArgumentError(
                    f"--credential {key}=-: only one credential can be read from stdin"
                )
            stdin_used = True
        values[key] = _read_value(key, source, read_stdin)
    expires_at: dict[str, datetime] = {}
    for item in expires:
        key, has_value, text = item.partition("=")
        if not key or not has_value:
            raise CredentialArgumentError(
                f"--credential-expires-at {item[:60]!r}: expected KEY=ISO8601"
            )
        if key in expires_at:
            raise CredentialArgumentError(f"--credential-expires-at {key} is given more than once")
        if key == target:
            raise CredentialArgumentError(
                f"--credential-expires-at {key}: with --from-oidc-token the expiry is the "
                "token's own"
            )
        if key not in values:
            raise CredentialArgumentError(
                f"--credential-expires-at {key}: no --credential {key}=VALUE is given"
            )
        expires_at[key] = parse_expiry(text, f"--credential-expires-at {key}")
    if target is not None and target in values:
        raise CredentialArgumentError(
            f"--credential {target} is given both with a value and as the OIDC token's target"
        )
    return CredentialArgs(values=values, expires_at=expires_at, target=target)


def subject_credentials(profile: Profile) -> list[str]:
    """Names the profile's token_exchange credentials take their subject token from."""
    names = {
        c.token_grant.subject_token.credential
        for c in profile.credentials
        if c.token_grant is not None and c.token_grant.subject_token is not None
    }
    return sorted(names)


def choose_subject_credential(profile: Profile, requested: str | None) -> str:
    candidates = subject_credentials(profile)
    if not candidates:
        raise UserError(
            f"profile {profile.id!r} has no subject credential (no token_exchange credential "
            "names a subject_token.credential): --from-oidc-token has nothing to fill"
        )
    if requested is not None:
        if requested not in candidates:
            raise UserError(
                f"--credential {requested}: not a subject credential of profile "
                f"{profile.id!r} (candidates: {', '.join(candidates)})"
            )
        return requested
    if len(candidates) > 1:
        raise UserError(
            f"profile {profile.id!r} has several subject credentials "
            f"({', '.join(candidates)}): choose one with --credential KEY"
        )
    return candidates[0]


# --------------------------------------------------------------------------- output


def _credential_summary(record: ProviderRecord) -> str:
    return ", ".join(c.name + ("" if c.has_value else " (no value)") for c in record.credentials)


def show_provider(args: argparse.Namespace, record: ProviderRecord) -> None:
    if output_format(args) == "json":
        print_json(record)
        return
    print_fields(
        [
            ("name", record.name),
            ("profile", record.profile),
            ("owner", record.owner),
            ("revision", record.revision),
            ("created", format_time(record.created_at)),
            ("updated", format_time(record.updated_at)),
        ]
    )
    print_table(
        ("CREDENTIAL", "STORED", "EXPIRES"),
        [
            (c.name, "yes" if c.has_value else "no", format_time(c.expires_at))
            for c in record.credentials
        ],
    )


# --------------------------------------------------------------------------- commands


def _credential_args(args: argparse.Namespace) -> CredentialArgs:
    try:
        return parse_credential_args(
            args.credential or [],
            args.credential_expires_at or [],
            from_oidc_token=args.from_oidc_token,
        )
    except CredentialArgumentError as exc:
        usage_error(args, str(exc))


async def _oidc_credential(
    client: GatewayClient, gateway: str, profile_id: str, requested: str | None
) -> tuple[str, CredentialInput]:
    """The subject credential's name and this CLI's fresh login token with its expiry."""
    from gateway_client import CredentialInput
    from tokenferry.login import fresh_login
    from tokenferry.tokens import peek_jwt_claims

    profile = (await client.get_profile(profile_id)).profile()
    target = choose_subject_credential(profile, requested)
    # Only the access token leaves this machine; the refresh token stays in the store.
    login = await fresh_login(token_store(), gateway)
    claims = peek_jwt_claims(login.access_token) or {}
    exp = claims.get("exp")
    expiry = (
        float(exp)
        if isinstance(exp, int | float) and not isinstance(exp, bool)
        else login.expires_at
    )
    return target, CredentialInput(
        login.access_token,
        datetime.fromtimestamp(expiry, UTC) if expiry is not None else None,
    )


def _inputs(parsed: CredentialArgs) -> dict[str, CredentialInput | None]:
    from gateway_client import CredentialInput

    return {
        key: CredentialInput(value, parsed.expires_at.get(key))
        for key, value in parsed.values.items()
    }


def run_create(args: argparse.Namespace) -> int:
    if args.runtime_credentials:
        if args.from_oidc_token:
            usage_error(args, "--from-oidc-token cannot be combined with --runtime-credentials")
        if args.credential or args.credential_expires_at:
            usage_error(
                args,
                "--runtime-credentials stores no values: drop --credential and "
                "--credential-expires-at",
            )
    parsed = _credential_args(args)
    if not (parsed.values or args.from_oidc_token or args.runtime_credentials):
        usage_error(
            args,
            "give --credential KEY=VALUE, --from-oidc-token, or --runtime-credentials "
            "(a provider without stored values)",
        )
    gateway = gateway_url(args)

    async def call(client: GatewayClient) -> ProviderRecord:
        credentials = {k: v for k, v in _inputs(parsed).items() if v is not None}
        if args.from_oidc_token:
            target, value = await _oidc_credential(client, gateway, args.profile, parsed.target)
            credentials[target] = value
        return await client.create_provider(args.name, args.profile, credentials, owner=args.owner)

    record = run_gateway(args, call)
    info(f"provider {record.name!r} created (revision {record.revision})")
    show_provider(args, record)
    return 0


def run_update(args: argparse.Namespace) -> int:
    parsed = _credential_args(args)
    removed = list(dict.fromkeys(args.remove_credential or []))
    for key in removed:
        if key in parsed.values or key == parsed.target:
            usage_error(args, f"--remove-credential {key}: also given with --credential")
    if not (parsed.values or args.from_oidc_token or removed or args.profile):
        usage_error(
            args,
            "nothing to change: give --credential, --from-oidc-token, --remove-credential "
            "or --profile",
        )
    gateway = gateway_url(args)

    async def call(client: GatewayClient) -> ProviderRecord:
        credentials = _inputs(parsed)
        for key in removed:
            credentials[key] = None
        if args.from_oidc_token:
            profile_id = args.profile or (await client.get_provider(args.name)).profile
            target, value = await _oidc_credential(client, gateway, profile_id, parsed.target)
            credentials[target] = value
        return await client.update_provider(
            args.name, credentials=credentials, profile=args.profile
        )

    record = run_gateway(args, call)
    info(f"provider {record.name!r} updated (revision {record.revision})")
    show_provider(args, record)
    return 0


def run_list(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> list[ProviderRecord]:
        return await client.list_providers()

    print_records(
        args,
        "providers",
        run_gateway(args, call),
        ("NAME", "PROFILE", "OWNER", "REVISION", "CREDENTIALS", "UPDATED"),
        lambda r: (
            r.name,
            r.profile,
            r.owner,
            r.revision,
            _credential_summary(r),
            format_time(r.updated_at),
        ),
    )
    return 0


def run_get(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> ProviderRecord:
        return await client.get_provider(args.name)

    show_provider(args, run_gateway(args, call))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> None:
        await client.delete_provider(args.name)

    run_gateway(args, call)
    report_deleted(args, "provider", "name", args.name)
    return 0


# --------------------------------------------------------------------------- parser


def _add_credential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--credential",
        action="append",
        metavar="KEY=VALUE",
        help="store a credential value (repeatable); KEY=@FILE reads the value from a "
        "file, KEY=- from stdin; with --from-oidc-token a bare KEY names its target",
    )
    parser.add_argument(
        "--credential-expires-at",
        action="append",
        metavar="KEY=ISO8601",
        help="expiry of a credential given with --credential (e.g. 2026-12-31T23:00:00Z); "
        "a JWT value's own exp is used when this is absent",
    )
    parser.add_argument(
        "--from-oidc-token",
        action="store_true",
        help="store your login token (tokenferry login) and its expiry as the profile's "
        "subject credential; refreshed first if it expires within 30 s",
    )


def register(subparsers: Any) -> None:
    group: argparse.ArgumentParser = subparsers.add_parser(
        "provider",
        help="providers at the gateway: create, update, list, get, delete",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_gateway_options(group)
    sub = group.add_subparsers(dest="provider_command", metavar="COMMAND", required=True)

    create = add_command(
        sub,
        "create",
        run_create,
        help="create a provider from a registered profile",
        description="Create a provider: a named instance of a profile with stored credentials.",
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--profile", required=True, metavar="ID", help="the profile's id")
    _add_credential_options(create)
    create.add_argument(
        "--runtime-credentials",
        action="store_true",
        help="create the provider with no stored values",
    )
    create.add_argument(
        "--owner", metavar="SUB", help="owner's user id (admins only; default: you)"
    )

    update = add_command(
        sub,
        "update",
        run_update,
        help="set or remove credentials, or switch the profile (bumps the revision)",
        description="Change a provider. Credentials not named keep their stored values.",
    )
    update.add_argument("name", metavar="NAME")
    update.add_argument("--profile", metavar="ID", help="switch to this profile")
    _add_credential_options(update)
    update.add_argument(
        "--remove-credential",
        action="append",
        metavar="KEY",
        help="delete a stored credential value (repeatable)",
    )

    add_command(sub, "list", run_list, help="list providers")
    get = add_command(sub, "get", run_get, help="show one provider (never credential values)")
    get.add_argument("name", metavar="NAME")
    delete = add_command(sub, "delete", run_delete, help="delete a provider")
    delete.add_argument("name", metavar="NAME")
