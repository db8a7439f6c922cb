"""RemoteJwks against a real loopback key server: cache, rotation, rate limit, bad answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tokenferry.jwks import (
    IssuerDiscovery,
    JwksMalformed,
    JwksUnavailable,
    RemoteJwks,
)


def _jwk(kid: str) -> dict[str, Any]:
    return {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", "kid": kid}


@dataclass
class KeyServer:
    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=lambda: [_jwk("k1")])
    fetches: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0})
    # When set, /certs answers this raw body instead of the JWKS.
    raw_body: bytes | None = None
    status: int = 200
    claimed_issuer: str | None = None
    # Set by the JWKS handler on entry; it then waits for `release` before answering.
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event | None = None

    @property
    def jwks_url(self) -> str:
        return self.url + "/certs"


@pytest.fixture
async def server() -> AsyncIterator[KeyServer]:
    state = KeyServer()

    async def discovery(request: web.Request) -> web.Response:
        state.fetches["discovery"] += 1
        return web.json_response(
            {"issuer": state.claimed_issuer or state.url, "jwks_uri": state.jwks_url}
        )

    async def certs(request: web.Request) -> web.StreamResponse:
        state.fetches["jwks"] += 1
        state.entered.set()
        if state.release is not None:
            await state.release.wait()
        if state.raw_body is not None:
            return web.Response(body=state.raw_body, status=state.status)
        return web.json_response({"keys": state.keys}, status=state.status)

    app = web.Application()
    app.router.add_get("/realm/.well-known/openid-configuration", discovery)
    app.router.add_get("/realm/certs", certs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/realm"
    yield state
    await runner.cleanup()


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


async def test_fetches_once_and_serves_from_cache(server: KeyServer, clock: list[float]) -> None:
    jwks = RemoteJwks(server.jwks_url, clock=lambda: clock[0])
    try:
        assert (await jwks.key("k1")) == _jwk("k1")
        assert (await jwks.jwks()) == {"keys": [_jwk("k1")]}
        assert (await jwks.key("k1")) == _jwk("k1")
        assert server.fetches["jwks"] == 1
    finally:
        await jwks.close()


async def test_max_age_expires_the_cache(server: KeyServer, clock: list[float]) -> None:
    jwks = RemoteJwks(server.jwks_url, max_age=60, clock=lambda: clock[0])
    try:
        await jwks.key("k1")
        server.keys = [_jwk("k2")]
        clock[0] = 59
        assert (await jwks.key("k1")) == _jwk("k1")
        assert server.fetches["jwks"] == 1
        clock[0] = 60
        assert (await jwks.key("k1")) is None
        assert (await jwks.key("k2")) == _jwk("k2")
        assert server.fetches["jwks"] == 2
    finally:
        await jwks.close()


async def test_unknown_kid_refetches_at_most_once_per_interval(
    server: KeyServer, clock: list[float]
) -> None:
    jwks = RemoteJwks(server.jwks_url, min_refetch_interval=10, clock=lambda: clock[0])
    try:
        await jwks.key("k1")
        # Right after a fetch, unknown kids cannot make us ask the server again.
        for _ in range(5):
            assert (await jwks.key("garbage")) is None
        assert server.fetches["jwks"] == 1
        # A rotated-in key is found once the interval has passed.
        server.keys.append(_jwk("k2"))
        clock[0] = 10
        assert (await jwks.key("k2")) == _jwk("k2")
        assert server.fetches["jwks"] == 2
        assert (await jwks.key("garbage")) is None
        assert server.fetches["jwks"] == 2
        # An explicit refresh request is rate-limited the same way.
        await jwks.jwks(refresh=True)
        assert server.fetches["jwks"] == 2
        clock[0] = 20
        await jwks.jwks(refresh=True)
        assert server.fetches["jwks"] == 3
    finally:
        await jwks.close()


async def test_concurrent_misses_share_one_fetch(server: KeyServer, clock: list[float]) -> None:
    server.release = asyncio.Event()
    jwks = RemoteJwks(server.jwks_url, clock=lambda: clock[0])
    try:
        tasks = [asyncio.create_task(jwks.key("k1")) for _ in range(10)]
        await asyncio.wait_for(server.entered.wait(), timeout=10)
        server.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        assert results == [_jwk("k1")] * 10
        assert server.fetches["jwks"] == 1
    finally:
        await jwks.close()


async def test_issuer_discovery_is_fetched_once(server: KeyServer, clock: list[float]) -> None:
    jwks = RemoteJwks(IssuerDiscovery(server.url), min_refetch_interval=1, clock=lambda: clock[0])
    try:
        assert (await jwks.key("k1")) == _jwk("k1")
        server.keys.append(_jwk("k2"))
        clock[0] = 1
        assert (await jwks.key("k2")) == _jwk("k2")
        assert server.fetches == {"discovery": 1, "jwks": 2}
        assert (await jwks.discovery())["jwks_uri"] == server.jwks_url
    finally:
        await jwks.close()


async def test_discovery_naming_another_issuer_is_refused(server: KeyServer) -> None:
    server.claimed_issuer = "https://elsewhere.example"
    jwks = RemoteJwks(IssuerDiscovery(server.url))
    try:
        with pytest.raises(JwksMalformed, match="names issuer") as caught:
            await jwks.key("k1")
        assert (caught.value.document, caught.value.problem) == ("discovery", "wrong_issuer")
        assert server.fetches["jwks"] == 0
    finally:
        await jwks.close()
    # Without the check (the dev upstream), the same document is accepted.
    lenient = RemoteJwks(IssuerDiscovery(server.url, check_issuer=False))
    try:
        assert (await lenient.key("k1")) == _jwk("k1")
    finally:
        await lenient.close()


@pytest.mark.parametrize(
    ("body", "error", "problem_or_cause"),
    [
        (b"not json", JwksUnavailable, "JSONDecodeError"),
        (b'{"a": "\xc3("}', JwksUnavailable, "UnicodeDecodeError"),
        (b"[" * 100_000 + b"]" * 100_000, JwksUnavailable, "RecursionError"),
        (b"", JwksMalformed, "not_object"),
        (b"[1, 2]", JwksMalformed, "not_object"),
        (b'{"keys": {"kid": "k1"}}', JwksMalformed, "no_keys"),
        (b'{"nokeys": []}', JwksMalformed, "no_keys"),
    ],
)
async def test_malformed_answers_raise_clear_errors(
    server: KeyServer, body: bytes, error: type[Exception], problem_or_cause: str
) -> None:
    server.raw_body = body
    jwks = RemoteJwks(server.jwks_url)
    try:
        with pytest.raises(error) as caught:
            await jwks.key("k1")
    finally:
        await jwks.close()
    exc = caught.value
    if isinstance(exc, JwksUnavailable):
        assert exc.cause == problem_or_cause
        assert str(exc) == f"cannot fetch {server.jwks_url}: {problem_or_cause}"
    else:
        assert isinstance(exc, JwksMalformed)
        assert exc.problem == problem_or_cause
        assert exc.document == "jwks"
    # The answer's content never appears in the message.
    assert "kid" not in str(exc) and "not json" not in str(exc)


async def test_non_200_names_the_status(server: KeyServer) -> None:
    server.status = 500
    jwks = RemoteJwks(server.jwks_url)
    try:
        with pytest.raises(JwksUnavailable) as caught:
            await jwks.key("k1")
    finally:
        await jwks.close()
    assert caught.value.status == 500
    assert str(caught.value) == f"{server.jwks_url} answered HTTP 500"


async def test_answers_over_the_size_cap_are_refused(server: KeyServer) -> None:
    keys = [_jwk(f"k{i}") for i in range(200)]
    body = json.dumps({"keys": keys}).encode()
    server.raw_body = body
    capped = RemoteJwks(server.jwks_url, max_body_bytes=len(body) - 1)
    try:
        with pytest.raises(JwksUnavailable, match="larger than") as caught:
            await capped.key("k1")
        assert caught.value.status is None
    finally:
        await capped.close()
    exact = RemoteJwks(server.jwks_url, max_body_bytes=len(body))
    try:
        assert (await exact.key("k199")) == _jwk("k199")
    finally:
        await exact.close()


async def test_connection_failure_is_unavailable(server: KeyServer) -> None:
    # A port that was just bound and released: nothing listens there.
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    port = probe.addresses[0][1]
    await probe.cleanup()
    jwks = RemoteJwks(f"http://127.0.0.1:{port}/certs")
    try:
        with pytest.raises(JwksUnavailable, match="cannot fetch") as caught:
            await jwks.key("k1")
        assert caught.value.cause.startswith("Client")
    finally:
        await jwks.close()


async def test_failed_refresh_serves_stale_keys_only_when_asked(
    server: KeyServer, clock: list[float]
) -> None:
    stale_ok = RemoteJwks(
        server.jwks_url, max_age=60, serve_stale_on_error=True, clock=lambda: clock[0]
    )
    strict = RemoteJwks(server.jwks_url, max_age=60, clock=lambda: clock[0])
    try:
        await stale_ok.key("k1")
        await strict.key("k1")
        server.status = 503
        clock[0] = 60
        assert (await stale_ok.key("k1")) == _jwk("k1")
        with pytest.raises(JwksUnavailable, match="HTTP 503"):
            await strict.key("k1")
        # The server recovers: the next call fetches again (the failure was not cached).
        server.status = 200
        server.keys = [_jwk("k2")]
        assert (await stale_ok.key("k2")) == _jwk("k2")
    finally:
        await stale_ok.close()
        await strict.close()


async def test_shared_session_is_used_and_left_open(server: KeyServer) -> None:
    async with aiohttp.ClientSession() as session:
        jwks = RemoteJwks(server.jwks_url, session=lambda: session)
        assert (await jwks.key("k1")) == _jwk("k1")
        await jwks.close()
        assert not session.closed
