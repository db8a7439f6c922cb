"""WorkloadApiSvidSource against the dev SPIFFE agent running as a real process."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.procs import Service, start_service
from tokenferry.svid import (
    FileSvidSource,
    SvidUnavailable,
    WorkloadApiSvidSource,
    svid_source_from_options,
)

SANDBOX_ID = "spiffe://example.org/sandbox/alpha"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths must stay short (108 bytes); pytest's tmp_path can be too long.
    path = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(services: list[Service], tmp_path: Path, sock_dir: Path) -> Service:
    service = start_service(
        "spiffe",
        ["dev", "spiffe", "--socket", str(sock_dir / "a.sock"), "--spiffe-id", SANDBOX_ID],
        tmp_path,
    )
    services.append(service)
    return service


def issued(agent: Service) -> list[dict[str, Any]]:
    """The agent's "issued JWT-SVID" log records (one per FetchJWTSVID it answered)."""
    records = []
    for line in agent.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == "issued JWT-SVID":
            records.append(record)
    return records


def verify_with_bundles(token: str, bundles: dict[str, dict[str, Any]], audience: str) -> str:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(bundles["example.org"])[kid].key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=audience)
    return str(claims["sub"])


async def test_svids_are_reused_per_audience_until_half_life(agent: Service) -> None:
    now = [time.time()]
    source = WorkloadApiSvidSource(f"unix://{agent.ready['socket']}", clock=lambda: now[0])
    try:
        first = await source.fetch_jwt_svid("https://idp.example/realms/r1")
        again = await source.fetch_jwt_svid("https://idp.example/realms/r1")
        assert again == first
        assert len(issued(agent)) == 1
        assert first.spiffe_id == SANDBOX_ID
        assert first.token not in repr(first) and first.token not in repr(source)

        other = await source.fetch_jwt_svid("spiffe://example.org/gateway")
        assert other.token != first.token
        assert [r["audience"] for r in issued(agent)] == [
            ["https://idp.example/realms/r1"],
            ["spiffe://example.org/gateway"],
        ]

        # Concurrent callers for a new audience share one fetch.
        burst = await asyncio.gather(*(source.fetch_jwt_svid("burst") for _ in range(5)))
        assert len({svid.token for svid in burst}) == 1
        assert len(issued(agent)) == 3

        # Past half of the SVID's 300 s life the source asks the agent again.
        now[0] += 151
        renewed = await source.fetch_jwt_svid("https://idp.example/realms/r1")
        assert renewed.token != first.token
        assert len(issued(agent)) == 4
    finally:
        await source.close()


async def test_reuse_off_fetches_a_new_svid_every_time(agent: Service) -> None:
    source = svid_source_from_options(agent.ready["socket"], None, None, reuse_svids=False)
    try:
        first = await source.fetch_jwt_svid("idp")
        second = await source.fetch_jwt_svid("idp")
    finally:
        await source.close()
    assert first.token != second.token  # ES256 signatures are randomised
    assert len(issued(agent)) == 2


async def test_bundles_verify_the_svids(agent: Service) -> None:
    async with WorkloadApiSvidSource(agent.ready["socket"]) as source:
        svid = await source.fetch_jwt_svid("gateway")
        bundles = await source.fetch_jwt_bundles()
    assert list(bundles) == ["example.org"]
    assert bundles["example.org"]["keys"][0]["kid"] == agent.ready["kid"]
    assert verify_with_bundles(svid.token, bundles, "gateway") == SANDBOX_ID


async def test_default_socket_comes_from_the_environment(
    agent: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix:{agent.ready['socket']}")
    async with WorkloadApiSvidSource() as source:
        assert (await source.fetch_jwt_svid("x")).spiffe_id == SANDBOX_ID


async def test_agent_gone_is_svid_unavailable_until_it_is_back(
    agent: Service, services: list[Service], tmp_path: Path
) -> None:
    socket_path = agent.ready["socket"]
    source = WorkloadApiSvidSource(socket_path, reuse_svids=False)
    try:
        token = (await source.fetch_jwt_svid("idp")).token
        agent.stop()

        with pytest.raises(SvidUnavailable) as no_svid:
            await source.fetch_jwt_svid("idp")
        message = str(no_svid.value)
        assert "cannot fetch a JWT-SVID for audience 'idp'" in message
        assert socket_path in message and token not in message

        # The stopped agent removed its socket, which the next call reports as such.
        with pytest.raises(SvidUnavailable, match=r"socket .*a\.sock does not exist"):
            await source.fetch_jwt_bundles()

        # The same source works again as soon as an agent serves the socket again.
        restarted = start_service(
            "spiffe-restarted",
            ["dev", "spiffe", "--socket", socket_path, "--spiffe-id", SANDBOX_ID],
            tmp_path,
        )
        services.append(restarted)
        assert (await source.fetch_jwt_svid("idp")).spiffe_id == SANDBOX_ID
        assert len(issued(restarted)) == 1
    finally:
        await source.close()

    never_started = WorkloadApiSvidSource(socket_path + ".missing")
    with pytest.raises(SvidUnavailable, match=r"socket .*\.missing does not exist"):
        await never_started.fetch_jwt_svid("idp")
    await never_started.close()


async def test_spiffe_helper_files_from_the_agent(agent: Service, tmp_path: Path) -> None:
    """What spiffe-helper would write from this agent, read back by FileSvidSource."""
    async with WorkloadApiSvidSource(agent.ready["socket"]) as api:
        idp_svid = await api.fetch_jwt_svid("https://idp.example/realms/r1")
        gateway_svid = await api.fetch_jwt_svid("spiffe://example.org/gateway")
        bundles = await api.fetch_jwt_bundles()
    cert_dir = tmp_path / "svids"
    cert_dir.mkdir()
    (cert_dir / "idp.token").write_text(idp_svid.token)
    (cert_dir / "gateway.token").write_text(gateway_svid.token)
    bundle_file = cert_dir / "jwt_bundle.json"
    bundle_file.write_text(
        json.dumps(
            {
                td: base64.b64encode(json.dumps(jwks).encode()).decode()
                for td, jwks in bundles.items()
            }
        )
    )

    async with FileSvidSource(cert_dir, bundle_file) as files:
        chosen = await files.fetch_jwt_svid("spiffe://example.org/gateway")
        file_bundles = await files.fetch_jwt_bundles()
    assert chosen == gateway_svid
    assert file_bundles == bundles
    assert verify_with_bundles(chosen.token, file_bundles, "spiffe://example.org/gateway") == (
        SANDBOX_ID
    )
