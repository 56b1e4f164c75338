from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.faultproxy import FaultProxy
from tests.helpers import Upstream
from tests.redis_server import RedisServer


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
