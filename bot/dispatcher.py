"""The dispatcher: hands the next fair job to each GPU worker the moment it is free.

One loop per worker, so the same code drives a single local worker or a pool. The loop only
picks and runs: it awaits ``execute(worker, job_id)``, which returns as soon as the GPU part is
done (saving and delivery continue in other tasks), so the GPU starts the next job at once.
A ``PoolWorker`` is asked ``ready()`` before each job: a worker that is restarting takes no job
until it is warm again, and a retired one's loop ends (``on_empty`` runs when none is left).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from bot.fairqueue import FairQueue
from bot.ports import Generator, PoolWorker

_log = logging.getLogger(__name__)

Execute = Callable[[Generator, str], Awaitable[None]]


class Dispatcher:
    """Feeds queued jobs to workers; ``wake()`` after every push."""

    def __init__(
        self,
        queue: FairQueue,
        workers: Sequence[Generator],
        execute: Execute,
        defer: Callable[[str], bool] | None = None,
        on_empty: Callable[[], None] | None = None,
    ) -> None:
        self._queue = queue
        self._on_empty = on_empty
        #: the job each worker is running, by worker name
        self.current: dict[str, str] = {}
        self._retired: set[str] = set()
        self._defer = defer
        self._workers = list(workers)
        self._execute = execute
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def workers(self) -> list[Generator]:
        return list(self._workers)

    @property
    def alive(self) -> int:
        """How many workers are not retired (they may be warming or restarting)."""
        return len(self._workers) - len(self._retired)

    def start(self) -> None:
        for worker in self._workers:
            task = asyncio.create_task(self._loop(worker), name=f"dispatch-{worker.name}")
            task.add_done_callback(self._loop_done)
            self._tasks.append(task)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def wake(self) -> None:
        self._wakeup.set()

    @staticmethod
    def _loop_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _log.error("dispatcher loop %s died", task.get_name(), exc_info=task.exception())

    async def _loop(self, worker: Generator) -> None:
        while True:
            if isinstance(worker, PoolWorker) and not await worker.ready():
                self._retired.add(worker.name)
                _log.warning("worker %s retired; %d worker(s) left", worker.name, self.alive)
                if self.alive == 0 and self._on_empty is not None:
                    self._on_empty()
                return
            job_id = self._queue.pop(self._defer)
            if job_id is None:
                self._wakeup.clear()
                if len(self._queue) == 0:
                    await self._wakeup.wait()
                continue
            self.current[worker.name] = job_id
            try:
                await self._execute(worker, job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("job %s crashed the dispatcher step; continuing", job_id)
            finally:
                self.current.pop(worker.name, None)
