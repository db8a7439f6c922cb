"""``tokenferry profile import``: how the gateway's own validation problems are shown."""

from __future__ import annotations

from gateway_client import InvalidRequest
from tokenferry.cli.profile import _server_problems


def test_gateway_problems_become_problem_lines() -> None:
    exc = InvalidRequest(
        "invalid_request",
        "invalid profile: id: bad",
        400,
        {
            "field": "id",
            "problems": [
                {
                    "source": "profile",
                    "path": "id",
                    "message": "'X' is not valid",
                    "severity": "error",
                },
                {"path": "binaries", "message": "ignored", "severity": "warning"},
                "not a problem object",
            ],
        },
    )
    problems = _server_problems(exc)
    assert [str(p) for p in problems] == [
        "gateway: id: 'X' is not valid",
        "gateway: binaries: ignored",
    ]
    assert [p.severity for p in problems] == ["error", "warning"]


def test_no_problem_list_means_no_problem_lines() -> None:
    assert _server_problems(InvalidRequest("invalid_request", "bad", 400)) == []
