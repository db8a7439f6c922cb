"""The addons' decisions on synthetic flows (no network): header replacement, fail
closed, Host check, redaction, eviction, passthrough. The integration tests repeat the
important ones with real processes and clients."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

from mitmproxy import http
from mitmproxy import log as mitmproxy_log
from mitmproxy.addons import save
from mitmproxy.test import taddons, tflow

from addons.audit import DECISION_KEY, Audit, decision_logger
from addons.inject import REDACTED, Inject
from addons.passthrough import Passthrough
from proxy.config import ProviderConfig, SupervisorConfig
from proxy.grants import GrantError, GrantResult, cache_key
from proxy.routes import Route
from proxy.supervisor import Supervisor, host_header_mismatch
from tokenferry.profiles import Credential, Endpoint, Profile, TokenGrant
from tokenferry.tokens import CachedToken, CacheKey, CacheOutcome

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


class FakeBroker:
    """``cached`` answers only when ``hit`` (a fresh cached token); ``obtain`` always."""

    def __init__(self, *, fail: str | None = None, hit: bool = False) -> None:
        self.fail = fail
        self.hit = hit
        self.calls: list[Route] = []
        self.evicted: list[tuple[CacheKey, str]] = []

    def cached(self, route: Route) -> GrantResult | None:
        if not self.hit:
            return None
        token = CachedToken(value=TOKEN, obtained_at=0.0, lifetime=300.0)
        return GrantResult(token, CacheOutcome.HIT, 0.0, cache_key(route))

    async def obtain(self, route: Route) -> GrantResult:
        self.calls.append(route)
        if self.fail:
            raise GrantError(route.provider, route.credential, self.fail)
        token = CachedToken(value=TOKEN, obtained_at=0.0, lifetime=300.0)
        return GrantResult(token, CacheOutcome.MISS, 0.01, cache_key(route))

    def evict_token(self, key: CacheKey, value: str) -> bool:
        self.evicted.append((key, value))
        return True


async def requestheaders(addon: Inject, f: http.HTTPFlow) -> None:
    """Run the hook as mitmproxy's addon manager does: await what it returns, if anything."""
    pending = addon.requestheaders(f)
    if pending is not None:
        await pending


def supervisor(broker: FakeBroker | None = None, *, header: str = "Authorization") -> Supervisor:
    grant = TokenGrant("client_credentials", "https://idp.example.org/realms/r/token")
    profile = Profile(
        id="orders-api",
        credentials=(
            Credential(
                name="access_token",
                auth_style="bearer" if header == "Authorization" else "header",
                header_name=header,
                token_grant=grant,
            ),
        ),
        endpoints=(
            Endpoint("api.example.org", 443, tls="terminate"),
            Endpoint("plain.example.org", 80, tls="none"),
        ),
    )
    sup = Supervisor()
    sup.apply(SupervisorConfig("sb", (ProviderConfig("orders", 2, profile),)))
    sup.broker = broker  # type: ignore[assignment]
    return sup


def flow(
    host: str = "api.example.org",
    port: int = 443,
    scheme: str = "https",
    path: str = "/v1/x?token=q",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.host = host
    f.request.port = port
    f.request.scheme = scheme
    f.request.path = path
    f.request.headers = http.Headers(headers or [(b"Host", host.encode())])
    f.client_conn.sni = host  # tflow's default "address" would name another host
    return f


async def test_injection_replaces_every_same_named_header() -> None:
    broker = FakeBroker()
    f = flow(
        headers=[
            (b"Host", b"api.example.org"),
            (b"authorization", b"Bearer sandbox"),
            (b"AUTHORIZATION", b"Basic eA=="),
        ]
    )
    await requestheaders(Inject(supervisor(broker)), f)
    assert f.response is None
    assert f.request.headers.get_all("Authorization") == [f"Bearer {TOKEN}"]
    assert f.request.stream is True
    assert f.metadata[DECISION_KEY]["outcome"] == "injected"
    assert f.metadata[DECISION_KEY]["path"] == "/v1/x"
    assert TOKEN not in json.dumps(f.metadata)


async def test_cached_token_is_injected_without_awaiting() -> None:
    broker = FakeBroker(hit=True)
    f = flow(
        headers=[
            (b"Host", b"api.example.org"),
            (b"authorization", b"Bearer sandbox"),
            (b"Accept", b"*/*"),
            (b"AUTHORIZATION", b"Basic eA=="),
        ]
    )
    assert Inject(supervisor(broker)).requestheaders(f) is None  # nothing to await
    assert broker.calls == []
    assert f.request.headers.fields == (
        (b"Host", b"api.example.org"),
        (b"Accept", b"*/*"),
        (b"Authorization", f"Bearer {TOKEN}".encode()),
    )
    assert f.request.stream is True
    assert f.metadata[DECISION_KEY]["outcome"] == "injected"
    assert f.metadata[DECISION_KEY]["cache"] == "hit"


async def test_header_style_sets_raw_value() -> None:
    f = flow(headers=[(b"Host", b"api.example.org"), (b"x-api-key", b"mine")])
    await requestheaders(Inject(supervisor(FakeBroker(), header="X-Api-Key")), f)
    assert f.request.headers.get_all("X-Api-Key") == [TOKEN]


async def test_grant_failure_is_closed_with_json_502() -> None:
    f = flow()
    await requestheaders(Inject(supervisor(FakeBroker(fail="token endpoint unavailable"))), f)
    assert f.response is not None and f.response.status_code == 502
    assert f.response.headers["Content-Type"] == "application/json"
    assert json.loads(f.response.get_text() or "") == {
        "error": "credential_unavailable",
        "provider": "orders",
        "credential": "access_token",
        "detail": "token endpoint unavailable",
    }
    assert "Authorization" not in f.request.headers


async def test_host_header_naming_another_host_gets_421() -> None:
    broker = FakeBroker()
    f = flow(headers=[(b"Host", b"evil.example.org")])
    await requestheaders(Inject(supervisor(broker)), f)
    assert f.response is not None and f.response.status_code == 421
    assert broker.calls == []


async def test_scheme_must_fit_tls_mode() -> None:
    broker = FakeBroker()
    f = flow(scheme="http", headers=[(b"Host", b"api.example.org:443")])
    await requestheaders(Inject(supervisor(broker)), f)
    assert broker.calls == [] and f.response is None
    assert f.metadata[DECISION_KEY]["outcome"] == "not_injected"
    g = flow(
        host="plain.example.org", port=80, scheme="http", headers=[(b"Host", b"plain.example.org")]
    )
    await requestheaders(Inject(supervisor(broker)), g)
    assert g.request.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_unmatched_request_is_untouched() -> None:
    f = flow(host="other.org", headers=[(b"Host", b"other.org"), (b"Authorization", b"mine")])
    await requestheaders(Inject(supervisor(FakeBroker())), f)
    assert f.request.headers.get_all("Authorization") == ["mine"]
    assert DECISION_KEY not in f.metadata


async def test_response_redacts_header_and_401_evicts() -> None:
    broker = FakeBroker()
    addon = Inject(supervisor(broker))
    f = flow()
    await requestheaders(addon, f)
    f.response = http.Response.make(401)
    addon.responseheaders(f)
    assert f.response.stream is True
    assert f.request.headers["Authorization"] == REDACTED
    assert [v for _, v in broker.evicted] == [TOKEN]
    assert f.metadata[DECISION_KEY]["evicted"] is True
    # A 200 evicts nothing.
    g = flow()
    await requestheaders(addon, g)
    g.response = http.Response.make(200)
    addon.responseheaders(g)
    assert len(broker.evicted) == 1


def test_redaction_keeps_the_field_position_and_spelling() -> None:
    addon = Inject(supervisor(FakeBroker(hit=True)))
    f = flow(headers=[(b"Host", b"api.example.org"), (b"Accept", b"*/*")])
    assert addon.requestheaders(f) is None
    # A later addon added its own copy in another spelling: neither may be saved.
    f.request.headers.fields = (
        (b"Host", b"api.example.org"),
        (b"Authorization", f"Bearer {TOKEN}".encode()),
        (b"Accept", b"*/*"),
        (b"AUTHORIZATION", b"Bearer other"),
    )
    f.response = http.Response.make(200)
    addon.responseheaders(f)
    assert list(f.request.headers.fields) == [
        (b"Host", b"api.example.org"),
        (b"Authorization", REDACTED.encode()),
        (b"Accept", b"*/*"),
    ]
    # Nothing to redact when the header is gone: the fields stay as they are.
    g = flow(headers=[(b"Host", b"api.example.org")])
    assert addon.requestheaders(g) is None
    g.request.headers.fields = ((b"Host", b"api.example.org"),)
    addon.error(g)
    assert list(g.request.headers.fields) == [(b"Host", b"api.example.org")]


async def test_error_hook_redacts_too() -> None:
    addon = Inject(supervisor(FakeBroker()))
    f = flow()
    await requestheaders(addon, f)
    addon.error(f)
    assert f.request.headers["Authorization"] == REDACTED


def test_passthrough_intercepts_only_terminate_targets() -> None:
    addon = Passthrough(supervisor(FakeBroker()))

    def hello(address: tuple[str, int] | None) -> Any:
        return SimpleNamespace(
            context=SimpleNamespace(server=SimpleNamespace(address=address)),
            ignore_connection=False,
        )

    for address, ignored in (
        (("api.example.org", 443), False),
        (("API.example.org", 443), False),
        (("api.example.org", 8443), True),
        (("plain.example.org", 80), True),
        (("elsewhere.org", 443), True),
        (None, True),
    ):
        data = hello(address)
        addon.tls_clienthello(data)
        assert data.ignore_connection is ignored, address


def test_deny_mode_refuses_unmatched_with_403() -> None:
    addon = Passthrough(supervisor(FakeBroker()))
    addon.deny_unmatched = True
    f = flow(host="elsewhere.org")
    addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403
    assert json.loads(f.response.get_text() or "")["error"] == "destination_not_allowed"
    g = flow()
    addon.requestheaders(g)
    assert g.response is None


def test_audit_logs_one_line_without_secrets(caplog: Any) -> None:
    sup = supervisor(FakeBroker())
    f = flow()
    f.metadata[DECISION_KEY] = {
        "provider": "orders",
        "credential": "access_token",
        "outcome": "injected",
    }
    audit = Audit(sup)
    with caplog.at_level("INFO", logger="tokenferry.decision"):
        audit.requestheaders(f)
        audit.requestheaders(f)  # logged once per request
    records = [r for r in caplog.records if r.name == "tokenferry.decision"]
    assert len(records) == 1
    assert records[0].__dict__["sandbox"] == "sb"


def test_decision_lines_skip_the_add_log_hook_only() -> None:
    # Turning each decision line into an add_log event walked the whole addon chain per
    # request; every other record still becomes one.
    with taddons.context() as tctx:  # type: ignore[no-untyped-call]
        tctx.master.addons.add(Audit(supervisor(FakeBroker())))
        legacy = [
            h for h in logging.getLogger().handlers if isinstance(h, mitmproxy_log.LegacyLogEvents)
        ]
        assert legacy

        def record(name: str) -> logging.LogRecord:
            return logging.LogRecord(name, logging.INFO, __file__, 1, "decision", (), None)

        for handler in legacy:
            assert not handler.filter(record(decision_logger.name))
            assert handler.filter(record("tokenferry.proxy"))
            assert handler.filter(record("mitmproxy.proxy.server"))


def test_host_header_mismatch_rules() -> None:
    assert not host_header_mismatch(None, "api.example.org", 443)
    assert not host_header_mismatch("API.example.org", "api.example.org", 443)
    assert not host_header_mismatch("api.example.org:443", "api.example.org", 443)
    assert host_header_mismatch("api.example.org:444", "api.example.org", 443)
    assert host_header_mismatch("evil.org", "api.example.org", 443)
    assert not host_header_mismatch("[::1]:8080", "::1", 8080)
    assert host_header_mismatch("[::1]:8081", "::1", 8080)
    # The spellings answered without parsing still refuse near misses.
    assert not host_header_mismatch("api.example.org", "api.example.org", 8443)
    assert not host_header_mismatch("api.example.org:8443", "api.example.org", 8443)
    assert host_header_mismatch("api.example.org:443", "api.example.org", 8443)
    assert host_header_mismatch("api.example.org.evil.org", "api.example.org", 443)
    assert host_header_mismatch("api.example.org:443:443", "api.example.org", 443)


class ExplodingBroker(FakeBroker):
    async def obtain(self, route: Route) -> GrantResult:
        raise RuntimeError("bug")


class ExplodingCacheBroker(FakeBroker):
    def cached(self, route: Route) -> GrantResult | None:
        raise RuntimeError("bug")


async def test_unexpected_error_on_the_synchronous_path_fails_closed() -> None:
    f = flow(headers=[(b"Host", b"api.example.org"), (b"Authorization", b"Bearer sandbox")])
    assert Inject(supervisor(ExplodingCacheBroker())).requestheaders(f) is None
    assert f.response is not None and f.response.status_code == 502
    assert json.loads(f.response.get_text() or "")["detail"] == "internal error in the proxy"


async def test_unexpected_error_fails_closed() -> None:
    f = flow(headers=[(b"Host", b"api.example.org"), (b"Authorization", b"Bearer sandbox")])
    await requestheaders(Inject(supervisor(ExplodingBroker())), f)
    assert f.response is not None and f.response.status_code == 502
    assert json.loads(f.response.get_text() or "")["detail"] == "internal error in the proxy"


def test_websocket_messages_are_not_retained() -> None:
    f = tflow.twebsocketflow()
    assert f.websocket is not None and len(f.websocket.messages) > 1
    last = f.websocket.messages[-1]
    with taddons.context(save.Save()):  # type: ignore[no-untyped-call]
        Inject(supervisor(FakeBroker())).websocket_message(f)
    assert f.websocket.messages == [last]


def test_unconfigured_gateway_mode_answers_every_request_502() -> None:
    sup = Supervisor()
    sup.unconfigured = "no configuration from the gateway at http://gw yet: unreachable"
    addon = Passthrough(sup)
    connect = flow(host="anything.example", path="/")
    addon.http_connect(connect)
    plain = flow(host="plain.example.org", port=80, scheme="http")
    addon.requestheaders(plain)
    for f in (connect, plain):
        assert f.response is not None and f.response.status_code == 502
        body = json.loads(f.response.get_text() or "")
        assert body["error"] == "configuration_unavailable"
        assert body["detail"] == sup.unconfigured
        assert f.metadata[DECISION_KEY]["outcome"] == "unconfigured"
    assert plain.metadata[DECISION_KEY]["path"] == "/v1/x"  # never the query string
    assert sup.health() == (
        503,
        {"status": "waiting_for_configuration", "detail": sup.unconfigured},
    )


def test_first_configuration_ends_the_unconfigured_state() -> None:
    sup = supervisor(FakeBroker())
    assert sup.unconfigured is None
    sup.unconfigured = "waiting"
    sup.apply(SupervisorConfig("sb", ()))
    assert sup.unconfigured is None
    f = flow(host="elsewhere.org")
    Passthrough(sup).http_connect(f)
    assert f.response is None
    assert sup.health() == (200, {"status": "ok", "routes": 0, "sandbox": "sb", "providers": {}})
