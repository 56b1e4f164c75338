from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import Upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()
