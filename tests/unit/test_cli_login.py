"""Token store, device-flow polling and refresh decisions of ``tokenferry login``."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tokenferry.login import (
    IssuedTokens,
    LoginError,
    StoredLogin,
    TokenError,
    TokenStore,
    _Unavailable,
    config_dir,
    fresh_login,
    normalise_gateway,
    parse_issued_tokens,
    poll_for_tokens,
)


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def _login(**changes: object) -> StoredLogin:
    values: dict[str, object] = {
        "gateway": "http://127.0.0.1:8443",
        "issuer": "http://127.0.0.1:9000/realms/dev",
        "client_id": "tokenferry-cli",
        "token_endpoint": "http://127.0.0.1:9000/realms/dev/protocol/openid-connect/token",
        "access_token": "access-token-value",
        "refresh_token": None,
        "expires_at": None,
        "subject": "alice",
    }
    values.update(changes)
    return StoredLogin(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- store


def test_config_dir_follows_xdg_and_ignores_relative_values(tmp_path: Path) -> None:
    assert config_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "tokenferry"
    # The XDG spec: a relative path is invalid and must be ignored.
    assert config_dir({"XDG_CONFIG_HOME": "relative"}) == Path.home() / ".config" / "tokenferry"
    assert config_dir({}) == Path.home() / ".config" / "tokenferry"


def test_store_file_is_0600_and_directory_0700_even_with_an_open_umask(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cfg" / "tokenferry")
    old = os.umask(0)
    try:
        store.save(_login(refresh_token="refresh-token-value"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    # No temporary file is left behind by the atomic rename.
    assert sorted(p.name for p in store.directory.iterdir()) == ["credentials.json"]
    loaded = store.get("http://127.0.0.1:8443/")
    assert loaded == _login(refresh_token="refresh-token-value")
    assert store.default_gateway() == "http://127.0.0.1:8443"


def test_store_keeps_one_login_per_gateway_and_removes(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(_login())
    store.save(_login(gateway="https://gw.example.org", access_token="other"))
    assert set(store.logins()) == {"http://127.0.0.1:8443", "https://gw.example.org"}
    assert store.default_gateway() == "https://gw.example.org"
    assert store.remove("https://GW.example.org/") is True
    assert store.default_gateway() is None
    assert store.remove("https://gw.example.org") is False
    assert set(store.logins()) == {"http://127.0.0.1:8443"}


def test_corrupt_store_is_a_clear_error_without_its_content(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.path.write_text('{"logins": {"x": "secret-token-abc"')
    with pytest.raises(LoginError) as info:
        store.get("http://127.0.0.1:8443")
    assert "not valid JSON" in str(info.value)
    assert "secret-token-abc" not in str(info.value)


def test_repr_hides_tokens() -> None:
    login = _login(refresh_token="refresh-token-value")
    assert "access-token-value" not in repr(login)
    assert "refresh-token-value" not in repr(login)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8443/", "http://127.0.0.1:8443"),
        ("HTTPS://GW.Example.org/api/", "https://gw.example.org/api"),
    ],
)
def test_normalise_gateway(url: str, expected: str) -> None:
    assert normalise_gateway(url) == expected


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8443", "ftp://x", "http://", "http://u:p@h", "http://h/?q=1"]
)
def test_normalise_gateway_rejects(url: str) -> None:
    with pytest.raises(LoginError):
        normalise_gateway(url)


# --------------------------------------------------------------------------- responses


def test_parse_issued_tokens_takes_expiry_from_the_jwt() -> None:
    token = _jwt({"sub": "u-1", "preferred_username": "alice", "exp": 2_000_000_000})
    body = json.dumps(
        {"access_token": token, "token_type": "Bearer", "expires_in": 60, "refresh_token": "r-1"}
    ).encode()
    issued = parse_issued_tokens(body, now=1_000.0)
    assert issued.expires_at == 2_000_000_000.0
    assert issued.subject == "alice"
    assert issued.refresh_token == "r-1"


def test_parse_issued_tokens_opaque_token_uses_expires_in() -> None:
    body = json.dumps({"access_token": "opaque", "expires_in": 60}).encode()
    issued = parse_issued_tokens(body, now=1_000.0)
    assert issued.expires_at == 1_060.0
    assert issued.refresh_token is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"access_token": "has space"}',
        b'{"access_token": "ok", "refresh_token": "line\\nbreak"}',
        b'{"access_token": "ok", "refresh_token": 7}',
    ],
)
def test_parse_issued_tokens_rejects(body: bytes) -> None:
    with pytest.raises(LoginError):
        parse_issued_tokens(body, now=0.0)


# --------------------------------------------------------------------------- polling


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


ISSUED = IssuedTokens("access", "refresh", 100.0, "alice")


def _answers(*answers: Exception | IssuedTokens) -> Callable[[], Awaitable[IssuedTokens]]:
    queue = list(answers)

    async def attempt() -> IssuedTokens:
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return attempt


async def test_poll_waits_the_interval_and_keeps_polling_while_pending() -> None:
    clock = FakeClock()
    pending = TokenError(400, "authorization_pending", None)
    issued = await poll_for_tokens(
        _answers(pending, pending, ISSUED),
        interval=2,
        expires_in=60,
        sleep=clock.sleep,
        clock=clock,
    )
    assert issued is ISSUED
    assert clock.sleeps == [2, 2, 2]


async def test_slow_down_adds_five_seconds_for_every_later_poll() -> None:
    clock = FakeClock()
    issued = await poll_for_tokens(
        _answers(
            TokenError(400, "slow_down", None),
            TokenError(400, "authorization_pending", None),
            TokenError(400, "slow_down", None),
            ISSUED,
        ),
        interval=1,
        expires_in=600,
        sleep=clock.sleep,
        clock=clock,
    )
    assert issued is ISSUED
    assert clock.sleeps == [1, 6, 6, 11]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("expired_token", "expired before it was approved"),
        ("access_denied", "was denied"),
        ("invalid_client", "refused the login: invalid_client: nope"),
    ],
)
async def test_final_errors_stop_polling(error: str, message: str) -> None:
    clock = FakeClock()
    with pytest.raises(LoginError, match=message):
        await poll_for_tokens(
            _answers(TokenError(400, error, "nope"), ISSUED),
            interval=1,
            expires_in=60,
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock.sleeps == [1]


async def test_polling_stops_when_the_device_code_expires() -> None:
    clock = FakeClock()
    pending = TokenError(400, "authorization_pending", None)
    with pytest.raises(LoginError, match="expired before it was approved"):
        await poll_for_tokens(
            _answers(*([pending] * 20)), interval=5, expires_in=12, sleep=clock.sleep, clock=clock
        )
    assert clock.sleeps == [5, 5, 5]


async def test_unreachable_token_endpoint_backs_off_then_gives_up() -> None:
    clock = FakeClock()
    down = _Unavailable("cannot reach http://idp: timed out")
    with pytest.raises(LoginError, match="timed out"):
        await poll_for_tokens(
            _answers(down, down, down), interval=1, expires_in=600, sleep=clock.sleep, clock=clock
        )
    assert clock.sleeps == [1, 6, 11]


# --------------------------------------------------------------------------- refresh decisions


async def test_fresh_login_returns_a_valid_token_without_contacting_the_idp(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path)
    # The token endpoint is a closed port: any refresh attempt would fail the test.
    store.save(_login(expires_at=1_000.0, refresh_token="r", token_endpoint="http://127.0.0.1:9/t"))
    login = await fresh_login(store, "http://127.0.0.1:8443", now=lambda: 900.0)
    assert login.access_token == "access-token-value"


async def test_fresh_login_without_refresh_token_uses_a_still_valid_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(_login(expires_at=1_000.0))
    login = await fresh_login(store, "http://127.0.0.1:8443", now=lambda: 990.0)
    assert login.access_token == "access-token-value"
    with pytest.raises(LoginError, match="has expired: run tokenferry login"):
        await fresh_login(store, "http://127.0.0.1:8443", now=lambda: 1_000.0)


async def test_fresh_login_refresh_failure_says_what_to_do(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(_login(expires_at=1_000.0, refresh_token="r", token_endpoint="http://127.0.0.1:9/t"))
    with pytest.raises(LoginError, match="refreshing the login failed: cannot reach"):
        await fresh_login(store, "http://127.0.0.1:8443", now=lambda: 990.0)


async def test_fresh_login_not_logged_in(tmp_path: Path) -> None:
    with pytest.raises(
        LoginError, match=re.escape("not logged in to http://127.0.0.1:8443: run tokenferry")
    ):
        await fresh_login(TokenStore(tmp_path), "http://127.0.0.1:8443/")
