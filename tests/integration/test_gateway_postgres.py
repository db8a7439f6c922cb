"""``tokenferry gateway --db postgresql://…``: real gateway processes on a real server.

Two gateway processes on one database are two replicas: what one writes the other
serves, concurrent updates through both each bump the revision exactly once, a restart
keeps everything, and neither the subject token nor the URL's password ever reaches the
database or the logs.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from gateway.crypto import new_key_text
from gateway_client import BearerAuth, GatewayClient
from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.postgres import PostgresCluster
from tests.support.procs import Service

UPDATES_PER_REPLICA = 4


async def test_two_gateway_replicas_on_one_postgresql_database(
    tmp_path: Path, services: list[Service], postgres_cluster: PostgresCluster
) -> None:
    db_name = postgres_cluster.create_database()
    # Trust authentication never asks for it, so the URL's password only has to stay
    # out of every log line and message.
    password = "url-password-" + uuid.uuid4().hex
    url = postgres_cluster.url(db_name, password=password)
    key_file = tmp_path / "gateway.key"
    key_file.write_text(new_key_text())
    stack = start_gateway_stack(
        tmp_path, services, database=url, extra_gateway_args=("--key-file", str(key_file))
    )
    subject_token = stack.user_token("alice")

    # API create and read on replica 1.
    async with stack.admin() as admin:
        await admin.create_profile(exchange_profile_yaml("orders-api", stack.token_endpoint))
        created = await admin.create_provider("orders", "orders-api", {"user_token": subject_token})
        assert created.revision == 1
        stored = created.credential("user_token")
        assert stored is not None and stored.has_value
        await admin.put_sandbox("a", sandbox_id("a"), ["orders"])
        assert (await admin.get_provider("orders")).revision == 1

    # Replica 2 on the same database serves what replica 1 wrote.
    second = stack.start_gateway(url, "gateway-replica-2")
    replica_2 = GatewayClient(str(second.ready["url"]), auth=BearerAuth(ADMIN_TOKEN))
    async with stack.admin() as replica_1, replica_2:
        seen = await replica_2.get_provider("orders")
        assert (seen.name, seen.profile, seen.revision) == ("orders", "orders-api", 1)
        assert [s.name for s in await replica_2.list_sandboxes()] == ["a"]

        # Concurrent updates through both replicas: none lost, each bumped once.
        updates = [
            client.update_provider("orders", credentials={"user_token": subject_token})
            for _ in range(UPDATES_PER_REPLICA)
            for client in (replica_1, replica_2)
        ]
        results = await asyncio.gather(*updates)
        expected_last = 1 + 2 * UPDATES_PER_REPLICA
        assert sorted(r.revision for r in results) == list(range(2, expected_last + 1))
        assert (await replica_1.get_provider("orders")).revision == expected_last
        assert (await replica_2.get_provider("orders")).revision == expected_last

    # The broker decrypts the stored subject token from PostgreSQL: leg 1 works.
    client, source = stack.supervisor("a")
    async with client:
        token = await client.intermediate_token("orders", "access_token")
        assert token.access_token
    await source.close()
    assert stack.intermediate_exchanges() == 1

    # Restart (both replicas gone, one back): the records are still there.
    first = stack.gateway
    second.stop()
    stack.restart_gateway()
    async with stack.admin() as admin:
        again = await admin.get_provider("orders")
        assert again.revision == expected_last
        restored = again.credential("user_token")
        assert restored is not None and restored.has_value
        assert [p.id for p in await admin.list_profiles()] == ["orders-api"]

    # The database holds the records, sealed: the dump has the provider but never the
    # subject token, and the stored bytes are ciphertext.
    dump = postgres_cluster.pg_dump(db_name)
    assert b"orders-api" in dump
    assert subject_token.encode() not in dump
    raw = postgres_cluster.psql(
        db_name, "SELECT encode(ciphertext, 'hex') FROM provider_credentials"
    ).strip()
    assert len(raw) > 2 * len(subject_token)
    assert subject_token.encode().hex() not in raw
    assert subject_token.encode() not in bytes.fromhex(raw)

    # The URL's password is never shown, while the redacted URL is logged.
    logs = "".join(s.log_text() for s in (first, second, stack.gateway))
    assert password not in logs
    assert f"postgres:***@127.0.0.1:{postgres_cluster.port}/{db_name}" in logs
