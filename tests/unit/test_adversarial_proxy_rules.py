"""The proxy's misdirection rules against names a hostile sandbox can choose."""

from __future__ import annotations

import pytest

from proxy.supervisor import host_header_mismatch, server_name_mismatch


@pytest.mark.parametrize(
    ("sni", "dest", "mismatch"),
    [
        (None, "api.example.org", False),  # no SNI (IP literals) names nothing
        ("", "api.example.org", False),
        ("api.example.org", "api.example.org", False),
        ("API.Example.ORG.", "api.example.org", False),
        ("admin.example.org", "api.example.org", True),
        ("api.example.org.evil", "api.example.org", True),
        ("localhost", "127.0.0.1", True),
    ],
)
def test_server_name_mismatch(sni: str | None, dest: str, mismatch: bool) -> None:
    assert server_name_mismatch(sni, dest) is mismatch


@pytest.mark.parametrize(
    ("authority", "mismatch"),
    [
        ("api.example.org", False),
        ("api.example.org:443", False),
        ("evil.example:443", True),
        ("api.example.org:8443", True),
        ("api.example.org@evil.example", True),
        ("[::1]:443", True),
        ("", False),
    ],
)
def test_absolute_form_authority_is_checked_like_host(authority: str, mismatch: bool) -> None:
    assert host_header_mismatch(authority, "api.example.org", 443) is mismatch
