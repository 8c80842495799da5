import itertools
import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack import Postgres, Stack  # noqa: E402

# COUNTERSIGN_E2E_DB=postgres runs the standard stacks on PostgreSQL instead
# of the service's default SQLite file.
E2E_DB = os.environ.get("COUNTERSIGN_E2E_DB", "sqlite")
assert E2E_DB in ("sqlite", "postgres"), f"COUNTERSIGN_E2E_DB={E2E_DB!r}: sqlite or postgres"


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: the long soak; runs only with COUNTERSIGN_SOAK=1")


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the whole run, started on first use."""
    pg = Postgres().start()
    yield pg
    pg.stop()


_db_numbers = itertools.count(1)


@pytest.fixture
def pg_database(postgres, request):
    """Factory: a fresh, empty database in the session's cluster -> its URL."""
    def make():
        name = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
        return postgres.create_database(f"t{next(_db_numbers)}_{name}")
    return make


@pytest.fixture
def make_stack(tmp_path, request):
    """Factory: make_stack(filter_config=None, filter_token=DEFAULT_FILTER_TOKEN, ...) -> started Stack."""
    stacks = []

    def make(**kwargs):
        if E2E_DB == "postgres" and "database" not in kwargs:
            kwargs["database"] = request.getfixturevalue("pg_database")()
        s = Stack(tmp_path, **kwargs)
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.stop()


@pytest.fixture
def stack(make_stack):
    return make_stack()


@contextmanager
def module_stack(tmp_path_factory, request, name: str, filter_config: dict, **kwargs):
    """One stack for a whole module (on PostgreSQL when the run asks for it),
    stopped at the end; tests tell their requests apart by x-request-id.
    `kwargs` go to `Stack`."""
    if E2E_DB == "postgres":
        kwargs["database"] = request.getfixturevalue("postgres").create_database(
            "t_" + re.sub(r"[^a-z0-9_]+", "_", name))
    s = Stack(tmp_path_factory.mktemp(name), filter_config=filter_config, **kwargs)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def emptied(stack):
    """`stack` with the model's request log emptied."""
    httpx.post(stack.backend.url + "/_demo/reset").raise_for_status()
    return stack


@pytest.fixture
def background():
    """Runs blocking calls (a held request) in a thread; joined at teardown."""
    pool = ThreadPoolExecutor(max_workers=8)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def chat(model="demo-echo", text="hello there", stream=False, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    if stream:
        body["stream"] = True
    return body


def post(url, path="/v1/chat/completions", json=None, timeout=60, **kw) -> httpx.Response:
    return httpx.post(url + path, json=json, timeout=timeout, **kw)


def send_later(pool, url, body, path="/v1/chat/completions", **kw) -> Future:
    return pool.submit(post, url, path, body, **kw)
