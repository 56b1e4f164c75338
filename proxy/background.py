"""A coroutine that runs beside the serving until it is stopped: a subscription, a watcher, a retry loop."""

from __future__ import annotations

import asyncio


class Background:
    """`start()` runs `_run()` as a task of the running loop; `stop()` cancels it and waits until it has ended."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        raise NotImplementedError
