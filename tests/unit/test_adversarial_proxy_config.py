"""Providers files a careless operator could hand ``tokenferry proxy``: each must be a
ConfigError naming the file and the problem, never another exception (a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_file_config


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"[" * 3_000 + b"]" * 3_000, "nested too deeply"),
        (b"providers:\n  - name: \xff\xfe\n", "not UTF-8"),
        (b"providers: [", "not valid YAML/JSON"),
        (b"providers: 5", "providers"),
    ],
    ids=["deep", "not-utf8", "truncated", "wrong-type"],
)
def test_malformed_providers_file_is_a_config_error(
    tmp_path: Path, content: bytes, says: str
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    providers = tmp_path / "providers.yaml"
    providers.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_file_config(profiles, providers)
    assert str(caught.value).startswith(f"{providers}: ")
    assert says in str(caught.value)
