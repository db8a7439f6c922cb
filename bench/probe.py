"""Check, before measuring, that each configuration does what its name says.

``probe`` sends one GET through a proxy (CONNECT, then TLS) and reports the status, the
body and who issued the certificate the client saw: the bench CA means the connection
was tunnelled untouched (passthrough), anything else means the proxy intercepted TLS.
The bench upstream's body says whether the request carried a bearer token.
``upstream_stats`` reads the upstream's per-port counters directly (no proxy).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID


class ProbeError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProbeResult:
    status: int
    body: dict[str, Any]
    issuer: str

    @property
    def bearer(self) -> bool:
        return bool(self.body.get("bearer"))


def _read_connect_reply(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ProbeError("proxy closed the connection during CONNECT")
        data += chunk
        if len(data) > 65536:
            raise ProbeError("proxy sent an oversized CONNECT reply")
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    try:
        return int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ProbeError(f"unexpected CONNECT reply {status_line!r}") from None


def probe(
    proxy_url: str, host: str, port: int, path: str = "/", timeout: float = 15.0
) -> ProbeResult:
    try:
        return _probe(proxy_url, host, port, path, timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise ProbeError(f"request through {proxy_url} to {host}:{port} failed: {exc!r}") from None


def _probe(proxy_url: str, host: str, port: int, path: str, timeout: float) -> ProbeResult:
    proxy = urlsplit(proxy_url)
    with socket.create_connection(
        (proxy.hostname or "127.0.0.1", proxy.port or 80), timeout
    ) as raw:
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        status = _read_connect_reply(raw)
        if status != 200:
            raise ProbeError(f"proxy answered CONNECT {host}:{port} with {status}")
        # No verification here on purpose: the point is to *see* which certificate arrives.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            if der is None:
                raise ProbeError("no server certificate")
            cert = x509.load_der_x509_certificate(der)
            names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
            issuer = str(names[0].value) if names else cert.issuer.rfc4514_string()
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            response = http.client.HTTPResponse(tls)
            response.begin()
            raw_body = response.read()
    try:
        body = json.loads(raw_body)
    except ValueError:
        body = {"raw": raw_body[:500].decode(errors="replace")}
    if not isinstance(body, dict):
        body = {"raw": body}
    return ProbeResult(status=response.status, body=body, issuer=issuer)


def upstream_stats(port: int, ca_file: Path) -> dict[int, dict[str, int]]:
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", "/_stats")
        response = connection.getresponse()
        data = json.loads(response.read())
        return {int(key): {k: int(v) for k, v in value.items()} for key, value in data.items()}
    except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
        raise ProbeError(f"cannot read the upstream's counters: {exc!r}") from None
    finally:
        connection.close()
