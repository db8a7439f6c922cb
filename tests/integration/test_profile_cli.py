"""``tokenferry profile lint`` run as a real subprocess, the way users run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.procs import tokenferry_command

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "profiles").glob("*.yaml"))


def lint(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        tokenferry_command("profile", "lint", *(str(a) for a in args)),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


def test_examples_lint_clean() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "client-credentials.yaml",
        "orders-token-exchange.yaml",
        "openshell-github.yaml",
    }
    result = lint(*EXAMPLES)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stdout
    assert f"{len(EXAMPLES)} files checked: {len(EXAMPLES)} valid, 0 invalid (0 errors" in (
        result.stdout
    )
    # The OpenShell profile loads, with its ignored keys reported as warnings.
    assert (
        "warning: " + str(REPO / "examples/profiles/openshell-github.yaml") + ": binaries: "
        "OpenShell key 'binaries' is accepted but tokenferry does not act on it"
    ) in result.stdout


THREE_MISTAKES = """\
id: orders-api
credentials:
  - name: user_token
  - name: access_token
    token_grant:
      grant_tpye: token_exchange
      token_endpoint: http://idp.example.org/token
      subject_token: {credential: user_token}
endpoints:
  - {host: api.example.org, port: 70000}
"""


def test_three_mistakes_are_all_reported(tmp_path: Path) -> None:
    profile = tmp_path / "orders.yaml"
    profile.write_text(THREE_MISTAKES)
    result = lint(profile, cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {profile}: credentials[1].token_grant.grant_tpye: unknown key 'grant_tpye'; "
        "did you mean 'grant_type'?",
        f"error: {profile}: credentials[1].token_grant.token_endpoint: must use https:// "
        "(http:// is allowed only for loopback hosts and Kubernetes service names such as "
        "name.ns.svc), got 'http://idp.example.org/token'",
        f"error: {profile}: endpoints[0].port: must be between 1 and 65535, got 70000",
    ]
    assert "1 file checked: 0 valid, 1 invalid (3 errors, 0 warnings)" in result.stdout


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    profile = tmp_path / "broken.yaml"
    profile.write_text("id: orders\ncredentials:\n  - name: a\n    token_grant: {grant_type: x\n")
    result = lint(profile, cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {profile}: line 5, column 1: invalid YAML: ")


def test_missing_file_is_an_error_for_that_file_only(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = lint(EXAMPLES[0], missing, cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: {missing}: no such file" in result.stdout
    assert f"ok: {EXAMPLES[0]}: profile " in result.stdout
    assert "2 files checked: 1 valid, 1 invalid (1 error, " in result.stdout


def test_json_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "BAD", "endpoints": [{"host": "a.example.org"}]}))
    result = lint("--output", "json", EXAMPLES[0], bad, cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["valid"] is False
    assert document["errors"] == 1
    files = {f["file"]: f for f in document["files"]}
    assert files[str(EXAMPLES[0])]["valid"] is True
    assert files[str(EXAMPLES[0])]["profile_id"] == "inventory-api"
    assert files[str(bad)]["valid"] is False
    assert files[str(bad)]["problems"] == [
        {
            "severity": "error",
            "source": str(bad),
            "path": "id",
            "message": "must match [a-z0-9][a-z0-9-]{0,62} (lower-case letters, digits, '-'), "
            "got 'BAD'",
        }
    ]


def test_no_files_is_a_usage_error() -> None:
    result = lint()
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert_no_traceback(result)


def test_a_directory_means_its_profile_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("id: orders\n")
    (tmp_path / "b.json").write_text('{"id": "orders"}')
    (tmp_path / ".a.yaml.swp.yaml").write_text("not: [valid")
    (tmp_path / "notes.txt").write_text("ignored")
    result = lint(tmp_path, cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert (
        f"error: {tmp_path / 'b.json'}: id: duplicate profile id 'orders' "
        f"(also in {tmp_path / 'a.yaml'})"
    ) in result.stdout
    assert "2 files checked: 1 valid, 1 invalid (1 error, " in result.stdout
