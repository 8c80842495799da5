import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack import Stack  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: the long soak; runs only with COUNTERSIGN_SOAK=1")


@pytest.fixture
def make_stack(tmp_path):
    """Factory: make_stack(filter_config=None, filter_token=None) -> started Stack."""
    stacks = []

    def make(**kwargs):
        s = Stack(tmp_path, **kwargs)
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.stop()


@pytest.fixture
def stack(make_stack):
    return make_stack()


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
