"""``tokenferry proxy``: run the supervisor; ``tokenferry proxy ca``: print its CA."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenferry.cli.main import UserError

DEFAULT_CONFDIR = "~/.mitmproxy"


def _address(text: str) -> Any:
    from proxy.config import Address

    try:
        return Address.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _poll_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0 and at most 86400 seconds")
    return value


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "proxy",
        help="run the supervisor proxy (mitmproxy with tokenferry's addons)",
        description="Forward proxy that injects short-lived tokens into requests bound "
        "for protected endpoints (SPEC §5). See docs/supervisor.md.",
    )
    parser.add_argument(
        "--listen",
        type=_address,
        default=_address("127.0.0.1:8080"),
        metavar="HOST:PORT",
        help="proxy listen address (default 127.0.0.1:8080; port 0 = any free port)",
    )
    parser.add_argument(
        "--admin-listen",
        type=_address,
        default=_address("127.0.0.1:9464"),
        metavar="HOST:PORT",
        help="admin listener for /healthz and /metrics (default 127.0.0.1:9464)",
    )
    parser.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        metavar="DIR",
        help=f"mitmproxy confdir holding the proxy CA (default {DEFAULT_CONFDIR})",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="extra CA certificate (PEM) to trust for upstreams and token endpoints",
    )
    parser.add_argument(
        "--spiffe-socket",
        metavar="PATH",
        help="SPIFFE Workload API socket (default $SPIFFE_ENDPOINT_SOCKET)",
    )
    parser.add_argument("--svid-dir", metavar="DIR", help="JWT-SVID files (spiffe-helper)")
    parser.add_argument("--bundle-file", metavar="FILE", help="JWT bundle (JWKS) file")
    parser.add_argument(
        "--no-svid-reuse",
        action="store_true",
        help="fetch a fresh JWT-SVID for every token request (IdPs rejecting replays)",
    )
    parser.add_argument(
        "--deny-unmatched",
        action="store_true",
        help="refuse (403) requests whose destination matches no provider endpoint",
    )
    parser.add_argument("--sandbox", metavar="NAME", help="sandbox name for log lines")
    parser.add_argument(
        "--gateway",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="gateway mode: configuration and token_exchange from this gateway "
        "(default $TOKENFERRY_GATEWAY unless --profiles/--providers are given)",
    )
    parser.add_argument(
        "--config-poll-interval",
        type=_poll_interval,
        default=None,
        metavar="SECONDS",
        help="gateway mode: re-read the configuration this often (default 15)",
    )
    parser.add_argument(
        "--profiles", metavar="DIR", help="local-files mode: directory of provider profiles"
    )
    parser.add_argument("--providers", metavar="FILE", help="local-files mode: providers file")
    parser.add_argument(
        "--set",
        dest="mitm_options",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a mitmproxy option (repeatable), e.g. save_stream_file=flows.mitm",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    parser.set_defaults(func=run_proxy)

    sub = parser.add_subparsers(dest="proxy_command", metavar="SUBCOMMAND")
    ca = sub.add_parser("ca", help="print the proxy CA certificate path (or PEM)")
    ca.add_argument("--confdir", default=DEFAULT_CONFDIR, metavar="DIR")
    ca.add_argument("--pem", action="store_true", help="print the PEM instead of the path")
    ca.set_defaults(func=run_ca)


def run_ca(args: argparse.Namespace) -> int:
    from mitmproxy import certs

    from proxy.runner import CA_CERT_FILE

    confdir = Path(args.confdir).expanduser()
    try:
        # Creates the CA on first use, exactly as the proxy itself would.
        certs.CertStore.from_store(str(confdir), "mitmproxy", 2048)
    except OSError as exc:
        raise UserError(f"--confdir {confdir}: cannot create the CA ({exc.strerror})") from None
    path = confdir / CA_CERT_FILE
    print(path.read_text() if args.pem else str(path), end="" if args.pem else "\n")
    return 0


def _gateway_url(args: argparse.Namespace) -> str | None:
    """Gateway mode when ``--gateway`` is given, or ``$TOKENFERRY_GATEWAY`` without files."""
    flag: str | None = getattr(args, "gateway", None)
    if flag is not None:
        if args.profiles or args.providers:
            raise UserError(
                "--gateway cannot be combined with --profiles/--providers: the configuration "
                "comes either from the gateway or from local files"
            )
        url = flag
    elif args.profiles or args.providers:
        return None
    else:
        url = os.environ.get("TOKENFERRY_GATEWAY", "")
        if not url:
            return None
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--gateway {url!r}: expected an http(s) URL such as https://gw:8443")
    return url


def run_proxy(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, FileConfigSource
    from proxy.gateway_config import DEFAULT_POLL_INTERVAL
    from proxy.grants import IdentityOptions
    from proxy.runner import (
        GatewayMode,
        ProxySettings,
        StartupError,
        serve,
        serve_gateway,
        token_endpoint_ssl_context,
    )
    from tokenferry.service import configure_logging

    gateway_url = _gateway_url(args)
    if gateway_url is None and (not args.profiles or not args.providers):
        raise UserError(
            "either --gateway URL (gateway mode), or --profiles DIR and --providers FILE "
            "are required (local-files mode)"
        )
    if gateway_url is None and args.config_poll_interval is not None:
        raise UserError("--config-poll-interval applies to gateway mode (--gateway URL) only")
    configure_logging(args.log_level)
    if args.log_level != "debug":
        # mitmproxy's per-connection chatter is debug material for us.
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    upstream_ca = Path(args.upstream_ca) if args.upstream_ca else None
    if upstream_ca is not None and not upstream_ca.is_file():
        raise UserError(f"--upstream-ca {upstream_ca}: no such file")
    try:
        ssl_context = token_endpoint_ssl_context(upstream_ca)
    except (OSError, ValueError) as exc:
        raise UserError(f"--upstream-ca {upstream_ca}: not a usable CA file ({exc})") from None
    settings = ProxySettings(
        listen=args.listen,
        admin_listen=args.admin_listen,
        confdir=Path(args.confdir).expanduser(),
        identity=IdentityOptions(
            spiffe_socket=args.spiffe_socket,
            svid_dir=args.svid_dir,
            bundle_file=args.bundle_file,
            reuse_svids=not args.no_svid_reuse,
            ssl_context=ssl_context,
        ),
        deny_unmatched=args.deny_unmatched,
        sandbox=args.sandbox,
        upstream_ca=upstream_ca,
        mitm_options=tuple(args.mitm_options),
    )

    async def main() -> int:
        if gateway_url is not None:
            mode = GatewayMode(gateway_url, args.config_poll_interval or DEFAULT_POLL_INTERVAL)
            return await serve_gateway(settings, mode)
        source = FileConfigSource(Path(args.profiles), Path(args.providers))
        try:
            initial = await source.load()
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        return await serve(settings, source, initial)

    try:
        return asyncio.run(main())
    except StartupError as exc:
        raise UserError(str(exc)) from None
