from __future__ import annotations

import pytest

from events import EventStore


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "lobby.db"


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    """The same behaviour suite runs against an in-memory and a file log."""
    path = ":memory:" if request.param == "memory" else tmp_path / "lobby.db"
    with EventStore(path) as store:
        yield store
