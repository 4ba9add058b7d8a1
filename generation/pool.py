"""A pool of local workers, one thread per device in ``DEVICE`` (``cuda:0,cuda:1``; ``cpu,cpu`` in tests).

Each ``Worker`` owns its own pipeline on its own device. They load one after another (diffusers'
loading patches torch globally while it builds a model: two at once in one process break each
other); one whose model cannot load is left out with one log line and the others go on. ``start_workers`` is the one
place ``python -m bot`` builds its workers from: local threads, or Ray actors with ``WORKERS=ray``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType

from bot.config import Settings, WorkerBackend
from bot.errors import ConfigError, first_line
from bot.ports import Generator
from generation.worker import PipelineFactory, Worker

_log = logging.getLogger(__name__)


def worker_names(devices: Sequence[str]) -> list[str]:
    """One unique name per device entry: ``cuda:0``, ``cuda:1``; repeats get a suffix (``cpu``, ``cpu-2``)."""
    names: list[str] = []
    for device in devices:
        name, n = device, 1
        while name in names:
            n += 1
            name = f"{device}-{n}"
        names.append(name)
    return names


class LocalPool:
    """Local workers, one per entry of ``settings.devices``; an async context manager.

    ``workers`` holds the ones that loaded. When none did, ``start`` raises the first error.
    ``pipeline_factories`` replace the model loader, worker ``i`` taking entry ``i % len`` (tests).
    """

    def __init__(self, settings: Settings, *, pipeline_factories: Sequence[PipelineFactory] = ()) -> None:
        self.settings = settings
        self._factories = list(pipeline_factories)
        self.workers: list[Worker] = []
        self.retired: list[str] = []

    async def start(self) -> None:
        devices = self.settings.devices or [self.settings.device.value]
        candidates = [
            Worker(
                self.settings.model_copy(update={"devices": [device]}),
                name=name,
                pipeline_factory=self._factories[i % len(self._factories)] if self._factories else None,
            )
            for i, (device, name) in enumerate(zip(devices, worker_names(devices), strict=True))
        ]
        errors: list[BaseException] = []
        for worker in candidates:
            try:
                await worker.start()
            except Exception as exc:
                _log.error("worker %s retired: its model did not load: %s", worker.name, first_line(exc))
                self.retired.append(worker.name)
                errors.append(exc)
            else:
                self.workers.append(worker)
        if not self.workers:
            raise errors[0]

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()

    async def __aenter__(self) -> LocalPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_workers(settings: Settings, stack: contextlib.AsyncExitStack) -> list[Generator]:
    """Start the workers ``WORKERS`` asks for, closed with ``stack``; raises ``ConfigError`` for a bad setup."""
    if settings.workers is WorkerBackend.RAY:
        try:
            from generation.ray_worker import RayPool
        except ImportError as exc:
            if exc.name != "ray":
                raise
            raise ConfigError(
                "WORKERS=ray needs Ray: pip install 'brushbot[ray]' (or: pip install -e '.[ray]')"
            ) from None
        pool = await stack.enter_async_context(RayPool(settings))
        return list(pool.workers)
    local = await stack.enter_async_context(LocalPool(settings))
    return list(local.workers)
