from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Service

# The throwaway PostgreSQL server fixtures (postgres_cluster, postgres_url).
pytest_plugins = ("tests.support.postgres",)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Services appended here are stopped when the test ends."""
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()
