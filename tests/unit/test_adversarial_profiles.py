"""Profiles a careless or hostile author could hand to ``profile lint``, the gateway or the
proxy: each must be a ProfileError naming the problem, never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenferry.profiles import ProfileError, load_profile_file, load_profile_text

DEEP = [
    "[" * 3_000 + "]" * 3_000,
    "id: x\ncategory: " + "[" * 3_000 + "]" * 3_000,
    "{a: " * 3_000 + "1" + "}" * 3_000,
    '{"a": ' * 3_000 + "1" + "}" * 3_000,
    "- " * 3_000 + "x",
]


@pytest.mark.parametrize("text", DEEP, ids=["yaml-flow", "yaml-value", "yaml-map", "json", "block"])
def test_deeply_nested_text_is_a_profile_error(text: str) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile_text(text, "deep.yaml")
    assert str(caught.value).startswith("deep.yaml: ")


def test_deeply_nested_file_is_a_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP[0])
    with pytest.raises(ProfileError) as caught:
        load_profile_file(path)
    assert "nested too deeply" in str(caught.value)
    assert str(path) in str(caught.value)
