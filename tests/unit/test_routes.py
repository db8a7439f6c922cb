from __future__ import annotations

import pytest

from proxy.routes import ProviderProfile, RouteTable, build_routes, strip_query
from tokenferry.profiles import AudienceOverride, Credential, Endpoint, Profile, TokenGrant

TOKEN_ENDPOINT = "https://idp.example.org/realms/r1/protocol/openid-connect/token"


def profile(
    pid: str,
    endpoints: tuple[Endpoint, ...],
    *,
    overrides: tuple[AudienceOverride, ...] = (),
    credentials: tuple[str, ...] = ("access_token",),
    audience: str | None = "orders",
    scopes: tuple[str, ...] = ("orders.read",),
) -> Profile:
    creds = tuple(
        Credential(
            name=name,
            token_grant=TokenGrant(
                grant_type="client_credentials",
                token_endpoint=TOKEN_ENDPOINT,
                audience=audience,
                scopes=scopes,
                audience_overrides=overrides,
            ),
        )
        for name in credentials
    )
    return Profile(id=pid, credentials=creds, endpoints=endpoints)


def table(*providers: tuple[str, Profile]) -> RouteTable:
    return build_routes(ProviderProfile(name, 3, p) for name, p in providers)


def test_exact_host_port_and_path_glob() -> None:
    t = table(("orders", profile("o", (Endpoint("api.example.org", 443, "/orders/**"),))))
    r = t.match("https", "API.Example.org", 443, "/orders/1?x=secret")
    assert r is not None and (r.provider, r.credential, r.revision) == ("orders", "access_token", 3)
    assert r.audience == "orders" and r.scopes == ("orders.read",)
    # "/x/**" covers the bare prefix, but not a sibling sharing the prefix text.
    assert t.match("https", "api.example.org", 443, "/orders") is not None
    assert t.match("https", "api.example.org", 443, "/ordersX") is None
    assert t.match("https", "api.example.org", 443, "/other") is None
    assert t.match("https", "api.example.org", 8443, "/orders/1") is None
    assert t.match("https", "api.example.org.", 443, "/orders/1") is not None
    assert t.match("https", "evil-api.example.org", 443, "/orders/1") is None


def test_single_star_does_not_cross_slash_double_star_does() -> None:
    t = table(
        (
            "p",
            profile(
                "p",
                (
                    Endpoint("a.example.org", 443, "/v1/*/items"),
                    Endpoint("b.example.org", 443, "/v1/**/items"),
                ),
            ),
        )
    )
    assert t.match("https", "a.example.org", 443, "/v1/x/items") is not None
    assert t.match("https", "a.example.org", 443, "/v1/x/y/items") is None
    assert t.match("https", "b.example.org", 443, "/v1/x/y/items") is not None


def test_host_wildcards_one_label_and_many() -> None:
    t = table(
        (
            "p",
            profile(
                "p",
                (Endpoint("*.svc.example.org", 8080, tls="none"), Endpoint("**.corp.org", 443)),
            ),
        )
    )
    assert t.match("http", "a.svc.example.org", 8080, "/") is not None
    assert t.match("http", "a.b.svc.example.org", 8080, "/") is None
    assert t.match("http", "svc.example.org", 8080, "/") is None
    assert t.match("https", "x.corp.org", 443, "/") is not None
    assert t.match("https", "x.y.z.corp.org", 443, "/") is not None
    assert t.match("https", "corp.org", 443, "/") is None
    assert t.match("https", "xcorp.org", 443, "/") is None


def test_tls_mode_decides_scheme() -> None:
    t = table(
        (
            "p",
            profile(
                "p",
                (
                    Endpoint("secure.example.org", 443, tls="terminate"),
                    Endpoint("plain.example.org", 80, tls="none"),
                    Endpoint("skipped.example.org", 443, tls="skip"),
                ),
            ),
        )
    )
    assert t.match("https", "secure.example.org", 443, "/") is not None
    assert t.match("http", "secure.example.org", 443, "/") is None
    assert t.match("http", "plain.example.org", 80, "/") is not None
    assert t.match("https", "plain.example.org", 80, "/") is None
    assert t.match("https", "skipped.example.org", 443, "/") is None
    assert t.match("http", "skipped.example.org", 443, "/") is None
    assert t.lookup("skipped.example.org", 443, "/") is not None


def test_skip_route_that_is_most_specific_wins_over_terminate() -> None:
    t = table(
        (
            "p",
            profile(
                "p",
                (
                    Endpoint("api.example.org", 443),
                    Endpoint("api.example.org", 443, "/public/**", tls="skip"),
                ),
            ),
        )
    )
    assert t.match("https", "api.example.org", 443, "/private") is not None
    assert t.match("https", "api.example.org", 443, "/public/x") is None


def test_specificity_order() -> None:
    t = table(
        ("aardvark", profile("z", (Endpoint("**.example.org", 443),))),
        ("alpha", profile("a", (Endpoint("*.example.org", 443),))),
        ("beta", profile("b", (Endpoint("api.example.org", 443),))),
        ("gamma", profile("g", (Endpoint("*.example.org", 443, "/v1/**"),))),
        ("delta", profile("d", (Endpoint("*.example.org", 443, "/v1/orders/**"),))),
    )

    def winner(host: str, path: str) -> str | None:
        r = t.match("https", host, 443, path)
        return r.provider if r else None

    # A path pattern beats none, even with a wildcard host.
    assert winner("api.example.org", "/v1/x") == "gamma"
    # More literal characters win among path patterns.
    assert winner("api.example.org", "/v1/orders/7") == "delta"
    # Without a path pattern: the exact host beats wildcards.
    assert winner("api.example.org", "/other") == "beta"
    # "**" weighs more than "*": the one-label wildcard wins although "aardvark"
    # would win a name tie-break.
    assert winner("www.example.org", "/other") == "alpha"
    assert winner("a.b.example.org", "/other") == "aardvark"


def test_ties_broken_by_provider_then_credential() -> None:
    same = (Endpoint("api.example.org", 443),)
    t = table(
        ("b-provider", profile("b", same)),
        ("a-provider", profile("a", same, credentials=("zz", "aa"))),
    )
    r = t.match("https", "api.example.org", 443, "/")
    assert r is not None and (r.provider, r.credential) == ("a-provider", "aa")


def test_audience_override_is_its_own_more_specific_route() -> None:
    p = profile(
        "o",
        (Endpoint("api.example.org", 443, "/v2/**"),),
        overrides=(
            AudienceOverride("api.example.org", 443, "/v2/**", "reports", ("reports.read",)),
            AudienceOverride("reports.example.org", 443, None, "reports2", ()),
        ),
    )
    t = table(("orders", p))
    r = t.match("https", "api.example.org", 443, "/v2/x")
    assert (
        r is not None
        and r.override
        and (r.audience, r.scopes)
        == (
            "reports",
            ("reports.read",),
        )
    )
    # An override not covered by any endpoint is a route of its own (HTTPS),
    # inheriting the grant's scopes when it names none.
    r2 = t.match("https", "reports.example.org", 443, "/anything")
    assert r2 is not None and (r2.audience, r2.scopes) == ("reports2", ("orders.read",))
    assert t.match("http", "reports.example.org", 443, "/") is None


def test_credentials_without_grant_make_no_routes_but_count_as_endpoints() -> None:
    p = Profile(
        id="static",
        credentials=(Credential(name="api_key"),),
        endpoints=(Endpoint("static.example.org", 443),),
    )
    t = table(("s", p))
    assert len(t) == 0
    assert t.match("https", "static.example.org", 443, "/") is None
    assert not t.terminates("static.example.org", 443)
    assert t.any_endpoint("static.example.org", 443)
    assert t.any_endpoint("static.example.org", 443, "/x")
    assert not t.any_endpoint("static.example.org", 444)


def test_terminates_for_passthrough() -> None:
    t = table(
        (
            "p",
            profile(
                "p",
                (
                    Endpoint("api.example.org", 443, "/only/**"),
                    Endpoint("*.plain.org", 80, tls="none"),
                    Endpoint("skip.example.org", 443, tls="skip"),
                ),
            ),
        )
    )
    assert t.terminates("API.example.org", 443)  # path is unknown at CONNECT time
    assert not t.terminates("api.example.org", 8443)
    assert not t.terminates("x.plain.org", 80)
    assert not t.terminates("skip.example.org", 443)
    assert not t.terminates("other.org", 443)


def test_any_endpoint_for_deny_mode_honours_paths() -> None:
    t = table(("p", profile("p", (Endpoint("api.example.org", 443, "/v1/**"),))))
    assert t.any_endpoint("api.example.org", 443)
    assert t.any_endpoint("api.example.org", 443, "/v1/a?q=1")
    assert not t.any_endpoint("api.example.org", 443, "/v2")
    assert not t.any_endpoint("other.example.org", 443)


def test_header_value_styles() -> None:
    p = Profile(
        id="h",
        credentials=(
            Credential(
                name="key",
                auth_style="header",
                header_name="X-Api-Key",
                token_grant=TokenGrant("client_credentials", TOKEN_ENDPOINT),
            ),
        ),
        endpoints=(Endpoint("api.example.org", 443),),
    )
    r = table(("h", p)).match("https", "api.example.org", 443, "/")
    assert r is not None
    assert (r.header_name, r.header_value("tok")) == ("X-Api-Key", "tok")
    r2 = table(("o", profile("o", (Endpoint("api.example.org", 443),)))).match(
        "https", "api.example.org", 443, "/"
    )
    assert r2 is not None and r2.header_value("tok") == "Bearer tok"


def test_only_wildcard_routes_are_scanned() -> None:
    # Many exact hosts must not be visited for a lookup of another host.
    eps = tuple(Endpoint(f"h{i}.example.org", 443) for i in range(500))
    t = table(("p", profile("p", eps)))
    assert next(iter(t._routes.candidates("h7.example.org", 443))).target.host == "h7.example.org"
    assert len(list(t._routes.candidates("h7.example.org", 443))) == 1
    assert list(t._routes.candidates("nothing.org", 443)) == []


@pytest.mark.parametrize(
    ("raw", "path"),
    [("/a?b=c", "/a"), ("/a#frag", "/a"), ("?x", "/"), ("/a/b", "/a/b")],
)
def test_strip_query(raw: str, path: str) -> None:
    assert strip_query(raw) == path


def test_token_exchange_routes_carry_the_subject_tokens_expiry() -> None:
    from tokenferry.profiles import ACCESS_TOKEN_TYPE, SubjectTokenSource

    grant = TokenGrant(
        "token_exchange",
        "https://idp.example.org/realms/r/protocol/openid-connect/token",
        audience="orders",
        subject_token=SubjectTokenSource("provider_credential", "user_token", ACCESS_TOKEN_TYPE),
        audience_overrides=(AudienceOverride("reports.example.org", 443, None, "reports", ()),),
    )
    profile = Profile(
        id="orders-api",
        credentials=(Credential("user_token"), Credential("access_token", token_grant=grant)),
        endpoints=(Endpoint("api.example.org"),),
    )
    expiring = ProviderProfile("orders", 4, profile, (("user_token", 1_900_000_000.0),))
    table = build_routes([expiring])
    assert len(table) == 2
    assert {r.subject_expires_at for r in table.routes} == {1_900_000_000.0}
    # Without a known expiry (local files, or none stored) there is no cap.
    assert {
        r.subject_expires_at for r in build_routes([ProviderProfile("o", 1, profile)]).routes
    } == {None}
