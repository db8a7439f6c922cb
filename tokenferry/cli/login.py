"""``tokenferry login`` / ``tokenferry logout``: the CLI user's OIDC login (SPEC §7).

``login`` asks the gateway which issuer and client id to use (``GET /v1/auth/config``),
runs the OAuth 2.0 device authorization grant (RFC 8628) there, and stores the tokens in
``$XDG_CONFIG_HOME/tokenferry/credentials.json`` (mode 0600, directory 0700). Other
commands refresh the access token from the stored refresh token when needed.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tokenferry.cli.common import (
    add_gateway_options,
    format_time,
    gateway_url,
    info,
    output_format,
    print_fields,
    print_json,
    run_mapped,
    token_store,
)

if TYPE_CHECKING:
    from tokenferry.login import IssuedTokens, StoredLogin


def run_login(args: argparse.Namespace) -> int:
    gateway = gateway_url(args)

    async def main() -> StoredLogin:
        from gateway_client import GatewayClient
        from tokenferry.login import OidcClient, StoredLogin, poll_for_tokens

        async with GatewayClient(gateway) as client:
            auth = await client.auth_config()
        async with OidcClient() as oidc:
            endpoints = await oidc.discover(auth.issuer)
            device = await oidc.start_device_authorization(
                endpoints.device_authorization_endpoint, auth.client_id, args.scope
            )
            info(f"To log in, open {device.verification_uri} and enter the code {device.user_code}")
            if device.verification_uri_complete:
                info(f"(or open {device.verification_uri_complete})")
            info("Waiting for approval ...")
            sys.stderr.flush()

            async def attempt() -> IssuedTokens:
                return await oidc.device_token(
                    endpoints.token_endpoint, auth.client_id, device.device_code
                )

            issued = await poll_for_tokens(
                attempt, interval=device.interval, expires_in=device.expires_in
            )
        login = StoredLogin(
            gateway=gateway,
            issuer=auth.issuer,
            client_id=auth.client_id,
            token_endpoint=endpoints.token_endpoint,
            access_token=issued.access_token,
            refresh_token=issued.refresh_token,
            expires_at=issued.expires_at,
            subject=issued.subject,
        )
        token_store().save(login)
        return login

    login = run_mapped(gateway, main)
    who = f" as {login.subject}" if login.subject else ""
    info(f"logged in to {gateway}{who}; tokens stored in {token_store().path}")
    summary = {
        "gateway": login.gateway,
        "issuer": login.issuer,
        "subject": login.subject,
        "expires_at": format_time(login.expires_at),
        "refreshable": login.refresh_token is not None,
        "store": str(token_store().path),
    }
    if output_format(args) == "json":
        print_json(summary)
    else:
        print_fields(list(summary.items()))
    return 0


def run_logout(args: argparse.Namespace) -> int:
    from tokenferry.cli.main import UserError
    from tokenferry.login import LoginError

    gateway = gateway_url(args)
    try:
        removed = token_store().remove(gateway)
    except LoginError as exc:
        raise UserError(str(exc)) from None
    info(f"logged out of {gateway}" if removed else f"not logged in to {gateway}")
    return 0


def register(subparsers: Any) -> None:
    login: argparse.ArgumentParser = subparsers.add_parser(
        "login",
        help="log in with your identity provider (device authorization grant)",
        description=__doc__,
    )
    add_gateway_options(login)
    login.add_argument(
        "--scope",
        metavar="SCOPES",
        default=None,
        help="space-separated scopes to request (default: the identity provider's default)",
    )
    login.set_defaults(func=run_login, parser=login)

    logout: argparse.ArgumentParser = subparsers.add_parser(
        "logout", help="forget the stored login for a gateway"
    )
    add_gateway_options(logout, output=False)
    logout.set_defaults(func=run_logout, parser=logout)
