"""A running tokenferry stack for integration tests: dev SPIFFE agent, dev IdP, dev
upstreams (HTTPS with their own test CA), a header-capturing server and the proxy.

Every service is a real subprocess bound to port 0 (see ``tests.support.procs``). The
capture server runs in the test process: it records the raw header lines of every
request it receives, so tests can see exactly what the proxy forwarded (duplicates
included) and collect the injected tokens to search the logs for them.

Typical use (module-scoped, one stack for the tests of a module)::

    stack = Stack.start(root, upstreams={"orders": ("orders", ["orders.read"])})
    stack.write_profile({"id": "orders-api", ...})
    stack.write_providers([{"name": "orders", "profile": "orders-api"}])
    proxy = stack.start_proxy()
    ...
    stack.stop()
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import Service, start_service

SPIFFE_ID = "spiffe://example.org/sandbox/test"

# Token-shaped strings (JWTs) as the IdP issues them.
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback test service
        return json.loads(response.read())


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


# --- capture server ---------------------------------------------------------------------------


@dataclass
class Captured:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class CaptureServer:
    """Threaded HTTP(S) server answering 200 with a small JSON body, recording requests."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.requests: list[Captured] = []
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with lock:
                    owner.requests.append(
                        Captured(self.command, self.path, list(self.headers.items()))
                    )
                body = b'{"captured": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def tokens(self) -> set[str]:
        found: set[str] = set()
        for request in self.requests:
            for _, value in request.headers:
                found.update(JWT_RE.findall(value))
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    root: Path
    agent: Service
    idp: Service
    upstreams: dict[str, Service]
    tls_dir: Path
    services: list[Service] = field(default_factory=list)
    captures: list[CaptureServer] = field(default_factory=list)
    idp_args: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        root: Path,
        *,
        upstreams: dict[str, tuple[str, Sequence[str]]],
        token_ttl: int | None = None,
        plain_upstreams: Sequence[str] = (),
    ) -> Stack:
        """Agent + IdP + one HTTPS dev upstream per ``name -> (audience, scopes)``
        (names in ``plain_upstreams`` are plain HTTP)."""
        logs = root / "logs"
        started: list[Service] = []
        try:
            agent = start_service(
                "agent",
                [
                    "dev",
                    "spiffe",
                    "--socket",
                    str(root / "agent.sock"),
                    "--spiffe-id",
                    SPIFFE_ID,
                    "--jwks-listen",
                    "127.0.0.1:0",
                ],
                logs,
            )
            started.append(agent)
            idp_args = [
                "dev",
                "idp",
                "--spiffe-jwks",
                agent.ready["jwks_url"],
                "--trust-domain",
                "example.org",
            ]
            if token_ttl is not None:
                idp_args += ["--token-ttl", str(token_ttl)]
            idp = start_service("idp", [*idp_args, "--listen", "127.0.0.1:0"], logs)
            started.append(idp)
            tls_dir = root / "upstream-tls"
            # The first HTTPS upstream creates the shared test CA; start it alone, then
            # the others in parallel (start-up is mostly interpreter import time).
            names = list(upstreams)
            first_tls = next((n for n in names if n not in plain_upstreams), None)
            order = ([first_tls] if first_tls else []) + [n for n in names if n != first_tls]

            def launch(name: str) -> Service:
                audience, scopes = upstreams[name]
                args = [
                    "dev",
                    "upstream",
                    "--listen",
                    "127.0.0.1:0",
                    "--issuer",
                    idp.ready["issuer"],
                    "--audience",
                    audience,
                ]
                for scope in scopes:
                    args += ["--scope", scope]
                if name not in plain_upstreams:
                    args += ["--tls-self-signed", str(tls_dir)]
                return start_service(f"upstream-{name}", args, logs)

            ups: dict[str, Service] = {}
            if order:
                ups[order[0]] = launch(order[0])
                started.append(ups[order[0]])
            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = {name: pool.submit(launch, name) for name in order[1:]}
                errors: list[BaseException] = []
                for name, future in futures.items():
                    try:
                        ups[name] = future.result()
                        started.append(ups[name])
                    except BaseException as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
        stack = cls(root, agent, idp, ups, tls_dir, services=started, idp_args=idp_args)
        return stack

    # -- pieces ------------------------------------------------------------------------------

    @property
    def upstream_ca(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def token_endpoint(self) -> str:
        return str(self.idp.ready["token_endpoint"])

    def upstream_port(self, name: str) -> int:
        return port_of(self.upstreams[name].ready["url"])

    def upstream_url(self, name: str) -> str:
        return str(self.upstreams[name].ready["url"]).rstrip("/")

    def capture(self, *, tls: bool = False) -> CaptureServer:
        server = CaptureServer(
            (self.tls_dir / "server.pem", self.tls_dir / "server-key.pem") if tls else None
        )
        self.captures.append(server)
        return server

    def write_profile(self, profile: dict[str, Any]) -> None:
        directory = self.root / "profiles"
        directory.mkdir(exist_ok=True)
        (directory / f"{profile['id']}.yaml").write_text(yaml.safe_dump(profile))

    def write_providers(self, providers: list[dict[str, Any]], name: str = "providers") -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"providers": providers}))
        return path

    def start_proxy(
        self,
        *,
        name: str = "proxy",
        providers: Path | None = None,
        extra: Sequence[str] = (),
    ) -> Service:
        proxy = start_service(
            name,
            [
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--confdir",
                str(self.root / "confdir"),
                "--upstream-ca",
                str(self.upstream_ca),
                "--spiffe-socket",
                str(self.root / "agent.sock"),
                "--profiles",
                str(self.root / "profiles"),
                "--providers",
                str(providers or self.root / "providers.yaml"),
                "--sandbox",
                "test-sandbox",
                *extra,
            ],
            self.root / "logs",
        )
        self.services.append(proxy)
        return proxy

    def restart_idp(self) -> Service:
        """Start the IdP again on the port it had (the token endpoint is in profiles)."""
        port = port_of(self.idp.ready["url"])
        self.idp.stop()
        self.idp = start_service(
            "idp-again", [*self.idp_args, "--listen", f"127.0.0.1:{port}"], self.root / "logs"
        )
        self.services.append(self.idp)
        return self.idp

    # -- observations ------------------------------------------------------------------------

    def idp_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = _json(f"{self.idp.ready['issuer']}/dev/stats")
        return result

    def idp_token_requests(self, grant: str = "client_credentials") -> int:
        return sum(self.idp_stats().get("by_grant", {}).get(grant, {}).values())

    def upstream_stats(self, name: str) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.upstream_ca))
        url = f"{self.upstream_url(name)}/dev/stats"
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def log_text(self) -> str:
        """Logs of every process of this stack (stopped ones included)."""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted((self.root / "logs").glob("*.log"))
        )

    def tokens_seen(self) -> set[str]:
        found: set[str] = set()
        for capture in self.captures:
            found |= capture.tokens()
        return found

    def stop(self) -> None:
        for capture in self.captures:
            capture.stop()
        for service in reversed(self.services):
            service.stop()


def metrics(proxy: Service) -> dict[str, float]:
    """The proxy's Prometheus samples as ``{'name{labels}': value}``."""
    return prometheus(f"{proxy.ready['admin_url']}/metrics")


def prometheus(url: str) -> dict[str, float]:
    """The Prometheus samples served at ``url`` as ``{'name{labels}': value}``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def curl(proxy: Service, url: str, *args: str, cacert: Path | str | None = None) -> tuple[int, str]:
    """curl through the proxy trusting the proxy CA; returns (status, body)."""
    command = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--proxy",
        str(proxy.ready["proxy_url"]),
        "--cacert",
        str(cacert or proxy.ready["ca_file"]),
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        *args,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


@contextlib.contextmanager
def stopping(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.stop()
