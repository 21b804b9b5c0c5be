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


@pytest.fixture(scope="session")
def js_env():
    """The npm packages of tests/js (official client and server) installed once per session into the tests'
    cache folder, or the :class:`tests.jsdeps.JsSetupError` saying why not (tests that need them then fail
    with that message; tests that do not are not held up)."""
    from .jsdeps import JsSetupError, install_js_packages

    try:
        return install_js_packages()
    except JsSetupError as error:
        return error
