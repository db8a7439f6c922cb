"""Gateway configuration: command-line flags, each with a ``TOKENFERRY_GATEWAY_*`` variable.

A flag given on the command line wins over its environment variable. Values are checked
once, here, into a frozen ``GatewayConfig``; everything that is wrong is reported with the
flag *and* the variable name, so the operator knows which of the two to fix.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.trust import normalize_endpoint
from tokenferry.service import parse_listen
from tokenferry.svid_verify import parse_spiffe_id

ENV_PREFIX = "TOKENFERRY_GATEWAY_"
DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9465"
DEFAULT_DB = "tokenferry-gateway.db"
DEFAULT_CLI_CLIENT_ID = "tokenferry-cli"
LOG_LEVELS = ("debug", "info", "warning", "error")
SWITCH_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(ValueError):
    """A flag or environment variable has an unusable value."""


@dataclass(frozen=True)
class Option:
    flag: str
    dest: str
    help: str
    metavar: str | None = None
    repeat: bool = False
    # A switch: no value on the command line; true/false in its variable.
    switch: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


# The single list of options: argparse, the environment fallback and docs/gateway.md all
# follow it.
OPTIONS: tuple[Option, ...] = (
    Option("--listen", "listen", f"HOST:PORT of the API (default {DEFAULT_LISTEN})", "HOST:PORT"),
    Option(
        "--db",
        "db",
        f"SQLite path or sqlite:/// URL, or a postgresql:// URL (default {DEFAULT_DB})",
        "PATH|URL",
    ),
    Option("--spiffe-socket", "spiffe_socket", "SPIFFE Workload API socket", "PATH"),
    Option("--svid-dir", "svid_dir", "directory of JWT-SVID files (with --bundle-file)", "DIR"),
    Option("--bundle-file", "bundle_file", "JWKS file with the trust domain's JWT bundle", "FILE"),
    Option("--oidc-issuer", "oidc_issuer", "issuer URL of user tokens (required)", "URL"),
    Option("--oidc-audience", "oidc_audience", "audience user tokens must carry (required)", "AUD"),
    Option(
        "--dev-admin-token",
        "dev_admin_token",
        "development mode: accept this static token as an admin user",
        "TOKEN",
    ),
    Option("--key-file", "key_file", "file with the AES-256-GCM key(s) for stored values", "FILE"),
    Option(
        "--admin-listen",
        "admin_listen",
        f"HOST:PORT of /healthz and /metrics (default {DEFAULT_ADMIN_LISTEN})",
        "HOST:PORT",
    ),
    Option(
        "--trust-domain",
        "trust_domain",
        "trust domain allowed for supervisors (repeatable; default: the gateway's own)",
        "TD",
        repeat=True,
    ),
    Option(
        "--supervisor-audience",
        "supervisor_audience",
        "audience supervisor SVIDs must carry (default: the gateway's SPIFFE ID)",
        "AUD",
    ),
    Option(
        "--cli-client-id",
        "cli_client_id",
        f"OAuth client id the CLI logs in with (default {DEFAULT_CLI_CLIENT_ID})",
        "ID",
    ),
    Option(
        "--trusted-token-endpoint",
        "trusted_token_endpoints",
        "token endpoint profiles may use (repeatable; default: the --oidc-issuer's, "
        "from its discovery document)",
        "URL",
        repeat=True,
    ),
    Option(
        "--trusted-svid-audience",
        "trusted_svid_audiences",
        "extra jwt_svid_audience profiles may name (repeatable)",
        "AUD",
        repeat=True,
    ),
    Option(
        "--admin-subject",
        "admin_subjects",
        "OIDC subject (sub) of an admin user (repeatable)",
        "SUB",
        repeat=True,
    ),
    Option(
        "--profiles-admin-only",
        "profiles_admin_only",
        "only admins may register profiles (env: true|false)",
        switch=True,
    ),
    Option("--log-level", "log_level", "debug|info|warning|error (default info)", "LEVEL"),
)


@dataclass(frozen=True)
class GatewayConfig:
    listen_host: str
    listen_port: int
    admin_host: str
    admin_port: int
    db: str
    spiffe_socket: str | None
    svid_dir: str | None
    bundle_file: str | None
    oidc_issuer: str
    oidc_audience: str
    dev_admin_token: str | None = field(repr=False)
    key_file: str | None
    key_env: str | None = field(repr=False)
    trust_domains: tuple[str, ...]
    supervisor_audience: str | None
    cli_client_id: str
    log_level: str
    trusted_token_endpoints: tuple[str, ...] = ()
    trusted_svid_audiences: tuple[str, ...] = ()
    admin_subjects: tuple[str, ...] = ()
    profiles_admin_only: bool = False

    @property
    def dev_mode(self) -> bool:
        return self.dev_admin_token is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                action="store_const",
                const="true",
                default=None,
                help=f"{option.help} [env {option.env}]",
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.dest,
            metavar=option.metavar,
            action="append" if option.repeat else "store",
            default=None,
            help=f"{option.help} [env {option.env}]",
        )


def parse_hostport(value: str, where: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _where(option: Option, from_env: bool) -> str:
    return f"environment variable {option.env}" if from_env else option.flag


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    env = os.environ if environ is None else environ
    values: dict[str, str | list[str] | None] = {}
    origin: dict[str, bool] = {}
    for option in OPTIONS:
        given = getattr(args, option.dest, None)
        if given is not None:
            values[option.dest] = given
            origin[option.dest] = False
            continue
        raw = env.get(option.env)
        if raw is not None and raw != "":
            # Commas and/or white space separate the items of a repeatable option.
            values[option.dest] = (
                [v for v in re.split(r"[,\s]+", raw) if v] if option.repeat else raw
            )
            origin[option.dest] = True
        else:
            values[option.dest] = None
            origin[option.dest] = False
    by_dest = {o.dest: o for o in OPTIONS}

    def text(dest: str) -> str | None:
        value = values[dest]
        assert not isinstance(value, list)
        return value

    def where(dest: str) -> str:
        return _where(by_dest[dest], origin[dest])

    listen_host, listen_port = parse_hostport(text("listen") or DEFAULT_LISTEN, where("listen"))
    admin_host, admin_port = parse_hostport(
        text("admin_listen") or DEFAULT_ADMIN_LISTEN, where("admin_listen")
    )
    issuer = text("oidc_issuer")
    if not issuer:
        raise ConfigError("--oidc-issuer (or TOKENFERRY_GATEWAY_OIDC_ISSUER) is required")
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where('oidc_issuer')}: {issuer!r} is not an http(s) URL")
    audience = text("oidc_audience")
    if not audience:
        raise ConfigError("--oidc-audience (or TOKENFERRY_GATEWAY_OIDC_AUDIENCE) is required")
    socket, svid_dir, bundle_file = text("spiffe_socket"), text("svid_dir"), text("bundle_file")
    if not socket and not (svid_dir and bundle_file):
        if env.get("SPIFFE_ENDPOINT_SOCKET") and not (svid_dir or bundle_file):
            socket = env["SPIFFE_ENDPOINT_SOCKET"]
        else:
            raise ConfigError(
                "the gateway needs its SPIFFE identity: pass --spiffe-socket PATH "
                "(or SPIFFE_ENDPOINT_SOCKET), or --svid-dir DIR with --bundle-file FILE"
            )
    if socket and (svid_dir or bundle_file):
        raise ConfigError(
            "--spiffe-socket cannot be combined with --svid-dir/--bundle-file; choose one source"
        )
    trust_domains_raw = values["trust_domain"] or []
    assert isinstance(trust_domains_raw, list)
    trust_domains: list[str] = []
    for td in trust_domains_raw:
        td = td.strip().removeprefix("spiffe://").rstrip("/")
        try:
            parse_spiffe_id(f"spiffe://{td}/x")
        except ValueError as exc:
            raise ConfigError(
                f"{where('trust_domain')}: {td!r} is not a trust domain: {exc}"
            ) from None
        trust_domains.append(td)
    log_level = (text("log_level") or "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{where('log_level')}: {log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )

    def items(dest: str) -> list[str]:
        value = values[dest] or []
        assert isinstance(value, list)
        return [v.strip() for v in value]

    trusted_endpoints: list[str] = []
    for url in items("trusted_token_endpoints"):
        if normalize_endpoint(url) is None:
            raise ConfigError(
                f"{where('trusted_token_endpoints')}: {url!r} is not an http(s) URL "
                "(without user info or fragment)"
            )
        trusted_endpoints.append(url)
    svid_audiences = items("trusted_svid_audiences")
    admin_subjects = items("admin_subjects")
    for dest, found in (
        ("trusted_svid_audiences", svid_audiences),
        ("admin_subjects", admin_subjects),
    ):
        if any(not v for v in found):
            raise ConfigError(f"{where(dest)}: an empty value is not allowed")
    admin_only_raw = (text("profiles_admin_only") or "false").strip().lower()
    if admin_only_raw not in SWITCH_VALUES:
        raise ConfigError(
            f"{where('profiles_admin_only')}: {admin_only_raw!r} is not one of "
            + ", ".join(SWITCH_VALUES)
        )
    dev_token = text("dev_admin_token")
    if dev_token is not None and len(dev_token) < 8:
        raise ConfigError(f"{where('dev_admin_token')}: must be at least 8 characters")
    return GatewayConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        admin_host=admin_host,
        admin_port=admin_port,
        db=text("db") or DEFAULT_DB,
        spiffe_socket=socket,
        svid_dir=svid_dir,
        bundle_file=bundle_file,
        oidc_issuer=issuer,
        oidc_audience=audience,
        dev_admin_token=dev_token,
        key_file=text("key_file"),
        key_env=env.get("TOKENFERRY_GATEWAY_KEY") or None,
        trust_domains=tuple(dict.fromkeys(trust_domains)),
        supervisor_audience=text("supervisor_audience"),
        cli_client_id=text("cli_client_id") or DEFAULT_CLI_CLIENT_ID,
        log_level=log_level,
        trusted_token_endpoints=tuple(dict.fromkeys(trusted_endpoints)),
        trusted_svid_audiences=tuple(dict.fromkeys(svid_audiences)),
        admin_subjects=tuple(dict.fromkeys(admin_subjects)),
        profiles_admin_only=SWITCH_VALUES[admin_only_raw],
    )
