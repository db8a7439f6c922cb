"""Gateway URLs an operator can mistype: a LoginError naming the URL, never a ValueError."""

from __future__ import annotations

import pytest

from tokenferry.login import LoginError, normalise_gateway


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://[zz]:80",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:abc",
        "http://127.0.0.1:-1",
        "ftp://gateway.example",
        "gateway.example",
        "",
    ],
)
def test_malformed_gateway_url_is_a_login_error(url: str) -> None:
    with pytest.raises(LoginError) as caught:
        normalise_gateway(url)
    assert f"gateway URL {url!r}" in str(caught.value)


def test_well_formed_gateway_urls_are_normalised() -> None:
    assert normalise_gateway("http://[::1]:8080/") == "http://[::1]:8080"
    assert normalise_gateway("HTTPS://GW.Example/api/") == "https://gw.example/api"


def test_profile_source_is_shown_with_invisible_characters_escaped() -> None:
    from tokenferry.cli.profile import visible_source

    text = "id: x\r\n# note \u202egnp.live\u202c\r\ndescription: \u200bfine\ttab\rover\U000e0041\n"
    shown, escaped = visible_source(text)
    assert shown == (
        "id: x\n# note \\u202egnp.live\\u202c\ndescription: \\u200bfine\ttab\\u000dover"
        "\\U000e0041\n"
    )
    assert escaped == 5
    assert visible_source("id: plain\n") == ("id: plain\n", 0)
