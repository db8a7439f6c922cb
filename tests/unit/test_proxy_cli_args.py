"""``tokenferry proxy`` argument checks that happen before anything starts: the choice
between gateway mode and local files, and the poll interval."""

from __future__ import annotations

import pytest

from tokenferry.cli.main import main


def error_of(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["proxy", *args])
    return code, capsys.readouterr().err


def test_gateway_and_local_files_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = error_of(capsys, "--gateway", "http://gw:8443", "--profiles", "p")
    assert code == 1
    assert "--gateway cannot be combined with --profiles/--providers" in err


def test_a_mode_is_required(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENFERRY_GATEWAY", raising=False)
    code, err = error_of(capsys)
    assert code == 1
    assert "either --gateway URL (gateway mode), or --profiles DIR and --providers FILE" in err
    assert "--providers FILE are required" in err


def test_gateway_url_must_be_http(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = error_of(capsys, "--gateway", "gw:8443")
    assert code == 1
    assert "--gateway 'gw:8443': expected an http(s) URL" in err


def test_environment_gateway_is_checked_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENFERRY_GATEWAY", "ftp://gw")
    code, err = error_of(capsys)
    assert code == 1 and "'ftp://gw': expected an http(s) URL" in err


def test_poll_interval_only_in_gateway_mode(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENFERRY_GATEWAY", raising=False)
    code, err = error_of(
        capsys, "--profiles", "p", "--providers", "f", "--config-poll-interval", "3"
    )
    assert code == 1 and "--config-poll-interval applies to gateway mode" in err


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_poll_interval_is_a_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["proxy", "--gateway", "http://gw", "--config-poll-interval", value])
    assert exited.value.code == 2
    assert "--config-poll-interval" in capsys.readouterr().err
