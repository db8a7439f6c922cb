"""Record the flow files of this directory from real sandbox traffic.

    .venv/bin/python tests/flows/record.py [--out DIR]

Starts the dev stack (SPIFFE agent, IdP, HTTPS dev upstream with its own test CA,
``tokenferry proxy``) and, where the sandbox's egress is, a recording mitmproxy chained
in front of ``tokenferry proxy`` (upstream mode). Real clients (curl, httpx, requests,
websockets) send their traffic to the recorder. What is recorded is therefore what a
sandbox sends (its own ``Authorization`` header included) and receives; the injected
token exists only between ``tokenferry proxy`` and the upstream and never reaches the
recorder. Each flow is still scrubbed (``tests.support.flows.scrub_flow``) and every file
checked for credential-looking values before it is written. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script from the repository root: make ``tests.support`` importable.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import requests  # noqa: E402
import websockets  # noqa: E402
from mitmproxy import http  # noqa: E402

from tests.support.flows import (  # noqa: E402
    RecordingProxy,
    credential_findings,
    read_flows,
    scrub_flow,
    write_flows,
)
from tests.support.stack import Stack, stopping  # noqa: E402

AUDIENCE = "orders"
SCOPE = "orders.read"
# What a sandbox might have lying around; it must never get past the proxy.
SANDBOX_AUTHORIZATION = "Bearer sandbox-held-value-not-a-credential"
DOWNLOAD_BYTES = 256 * 1024
# What tokenferry proxy writes over the injected header in flows it saves (addons/inject.py).
PROXY_REDACTED = "[redacted by tokenferry]"


@dataclass(frozen=True)
class Target:
    base_url: str  # the dev upstream, https://127.0.0.1:PORT
    proxy_url: str  # the recording proxy (the sandbox's proxy)
    ca_file: str  # the recording proxy's CA, which the sandbox trusts


def _curl(target: Target, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    command = [
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "20",
        "--proxy",
        target.proxy_url,
        "--cacert",
        target.ca_file,
        "-o",
        os.devnull,
        *args,
    ]
    subprocess.run(command, check=True, timeout=30, env=env)


def record_curl(target: Target) -> int:
    _curl(target, f"{target.base_url}/v1/items?status=open&limit=2")
    _curl(
        target,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        '{"item": "widget", "quantity": 3, "note": "from curl"}',
        f"{target.base_url}/v1/orders",
    )
    return 2


def _httpx_client(target: Target) -> httpx.Client:
    return httpx.Client(proxy=target.proxy_url, verify=target.ca_file, trust_env=False, timeout=20)


def record_httpx(target: Target) -> int:
    with _httpx_client(target) as client:
        client.get(f"{target.base_url}/v1/profile").raise_for_status()
        # The sandbox sends a credential of its own: the proxy must replace it.
        client.get(
            f"{target.base_url}/v1/me",
            headers={"Authorization": SANDBOX_AUTHORIZATION, "Accept": "application/json"},
        ).raise_for_status()
    return 2


def record_requests(target: Target) -> int:
    session = requests.Session()
    session.trust_env = False
    proxies = {"https": target.proxy_url}
    with session:
        session.put(
            f"{target.base_url}/v1/items/42",
            data=b"name=widget&colour=blue&quantity=7",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            proxies=proxies,
            verify=target.ca_file,
            timeout=20,
        ).raise_for_status()
        with session.get(
            f"{target.base_url}/bytes/{DOWNLOAD_BYTES}",
            proxies=proxies,
            verify=target.ca_file,
            timeout=20,
            stream=True,
        ) as response:
            response.raise_for_status()
            size = sum(len(chunk) for chunk in response.iter_content(65536))
            if size != DOWNLOAD_BYTES:
                raise RuntimeError(f"download: {size} bytes, expected {DOWNLOAD_BYTES}")
    return 2


def record_sse(target: Target) -> int:
    with (
        _httpx_client(target) as client,
        client.stream(
            "GET",
            f"{target.base_url}/events?n=4&interval=0.1",
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        response.raise_for_status()
        events = sum(1 for line in response.iter_lines() if line.startswith("data: "))
        if events != 4:
            raise RuntimeError(f"SSE: {events} events, expected 4")
    return 1


def record_websocket(target: Target) -> int:
    async def session() -> None:
        import ssl

        context = ssl.create_default_context(cafile=target.ca_file)
        uri = target.base_url.replace("https://", "wss://") + "/ws"
        async with websockets.connect(uri, proxy=target.proxy_url, ssl=context) as ws:
            for message in ("hello from the sandbox", b"\x00\x01binary\xff", '{"op": "ping"}'):
                await ws.send(message)
                echoed = await asyncio.wait_for(ws.recv(), 10)
                if echoed != message:
                    raise RuntimeError("WebSocket echo differs from what was sent")

    asyncio.run(session())
    return 1


SCENARIOS: dict[str, Callable[[Target], int]] = {
    "curl": record_curl,
    "httpx": record_httpx,
    "requests": record_requests,
    "sse": record_sse,
    "websocket": record_websocket,
}


def _check_flow(name: str, flow: http.HTTPFlow) -> None:
    if flow.error is not None or flow.response is None:
        raise RuntimeError(
            f"{name}: {flow.request.method} {flow.request.path} failed: {flow.error}"
        )
    if flow.response.status_code not in (200, 101):
        raise RuntimeError(
            f"{name}: {flow.request.method} {flow.request.path} answered "
            f"{flow.response.status_code} (was the token injected?)"
        )


def _check_proxy_side(path: Path, expected: int) -> None:
    """The proxy's saved flows carry the injected header redacted, and no token at all."""
    flows = read_flows(path)
    if len(flows) != expected:
        raise RuntimeError(f"proxy saved {len(flows)} flows, the recorder {expected}")
    for flow in flows:
        values = flow.request.headers.get_all("Authorization")
        if len(values) != 1 or values[0] != PROXY_REDACTED:
            raise RuntimeError(f"proxy-side flow {flow.request.path}: Authorization not redacted")
    findings = credential_findings(path.read_bytes())
    if findings:
        raise RuntimeError(f"proxy-side saved flows hold credential-looking values: {findings}")


def record(out: Path, work: Path) -> list[Path]:
    written: list[Path] = []
    with stopping(Stack.start(work, upstreams={"orders": (AUDIENCE, [SCOPE])})) as stack:
        stack.write_profile(
            {
                "id": "orders-api",
                "display_name": "Orders API (dev upstream)",
                "credentials": [
                    {
                        "name": "access_token",
                        "token_grant": {
                            "grant_type": "client_credentials",
                            "token_endpoint": stack.token_endpoint,
                            "audience": AUDIENCE,
                            "scopes": [SCOPE],
                        },
                    }
                ],
                "endpoints": [
                    {"host": "127.0.0.1", "port": stack.upstream_port("orders"), "tls": "terminate"}
                ],
            }
        )
        stack.write_providers([{"name": "orders", "profile": "orders-api"}])
        # tokenferry proxy saves its side too: a check of its own redaction, not committed.
        proxy_side = work / "proxy-side.mitm"
        proxy = stack.start_proxy(extra=["--set", f"save_stream_file={proxy_side}"])
        recorder = RecordingProxy(
            work / "recorder-confdir", str(proxy.ready["proxy_url"]), Path(proxy.ready["ca_file"])
        ).start()
        try:
            target = Target(stack.upstream_url("orders"), recorder.proxy_url, str(recorder.ca_file))
            for name, scenario in SCENARIOS.items():
                expected = scenario(target)
                flows = recorder.collector.take(expected, timeout=30)
                for flow in flows:
                    _check_flow(name, flow)
                    scrub_flow(flow)
                staged = work / f"{name}.mitm"
                write_flows(staged, flows)
                findings = credential_findings(staged.read_bytes())
                if findings:
                    raise RuntimeError(f"{name}: credential-looking values remain: {findings}")
                written.append(staged)
        finally:
            recorder.stop()
    _check_proxy_side(proxy_side, sum(len(read_flows(path)) for path in written))
    # Only replace the committed files once every scenario recorded cleanly.
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for staged in written:
        target_file = out / staged.name
        target_file.write_bytes(staged.read_bytes())
        results.append(target_file)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output directory"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenferry-record-") as work:
        for path in record(args.out, Path(work)):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
