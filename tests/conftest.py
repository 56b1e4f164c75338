from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import uvloop

from benchmarks.faultproxy import FaultProxy
from tests.helpers import Upstream
from tests.redis_server import RedisServer


def pytest_sessionstart(session: pytest.Session) -> None:
    """tests/compiled: refuse to run when the compiled build is not what gets imported (a plain run would pass
    unnoticed in its place)."""
    if os.environ.get("FAILGATE_EXPECT_COMPILED") == "1":
        import proxy.app

        if not str(proxy.app.__file__).endswith(".so"):
            raise pytest.UsageError(f"FAILGATE_EXPECT_COMPILED=1 but proxy.app is {proxy.app.__file__}")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Async tests run on uvloop, like the proxy does in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def fault_proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    fp = await FaultProxy(redis_server.port).start()
    yield fp
    await fp.stop()
