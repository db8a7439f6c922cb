"""JWT bundle files a broken spiffe-helper (or a careless operator) could leave behind:
each must be a ValueError saying what is wrong, never another exception."""

from __future__ import annotations

import base64

import pytest

from tokenferry.svid import parse_bundle_document

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (DEEP, "nested too deeply"),
        (b'{"keys": ' + DEEP + b"}", "nested too deeply"),
        (b'{"example.org": "' + base64.b64encode(DEEP) + b'"}', "does not decode to JSON"),
        (b"\xff\xfe{", "not JSON"),
        (b'{"keys": NaN}', ""),
        (b"[]", "not a JSON object"),
        (b"{}", "no bundles"),
    ],
)
def test_malformed_bundle_file_is_a_value_error(data: bytes, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_bundle_document(data, default_trust_domain="example.org")
    assert says in str(caught.value)
