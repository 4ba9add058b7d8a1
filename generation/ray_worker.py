"""GPU workers on a Ray cluster (``WORKERS=ray``).

* ``GpuWorker`` — the Ray actor (``ray::GpuWorker`` in process lists and the dashboard): one per
  GPU, a local ``Worker`` thread inside owns the warm pipeline; images come back PNG-encoded.
* ``RayWorker`` — its stand-in in the front end, a ``bot.ports.PoolWorker`` the dispatcher drives:
  it streams progress (a long poll), forwards cancel, kills a silent actor, and turns a dead
  actor into ``WorkerLostError`` so the job runs again elsewhere.
* ``RayPool``  — joins or starts the cluster and creates the actors; an async context manager.

Ray actor calls run at most once here (``max_task_retries=0``) and may fail after the work was
done; the service keys credits and delivery by job id, so a rerun never charges or posts twice.
``max_restarts=-1`` restarts a dead actor; ``RayWorker.ready`` then reloads its model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from bot.config import Device, Settings
from bot.domain import DrawRequest, ModelProfile
from bot.errors import BotError, ConfigError, GenerationError, WorkerLostError, first_line
from bot.ports import Rendered, StepCallback, WorkerState
from generation.images import encode_png
from generation.presets import resolve_profile
from generation.worker import PipelineFactory, Worker

_log = logging.getLogger(__name__)

_FAILED_MESSAGE = "The image generator failed on this request."
#: seconds between attempts to reach an actor that is restarting
RETRY_SECONDS = 0.5
#: seconds a front end waits for its own local Ray to shut down (it can hang after signals)
SHUTDOWN_SECONDS = 10.0


@dataclass(slots=True)
class _Draw:
    """A job in progress on the actor, by the key its front end gave it."""

    cancel: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total: int = 0


class GpuWorker:
    """The Ray actor: an async actor whose ``Worker`` thread owns the pipeline on this GPU.

    The constructor loads nothing (a restart must not fail in it); ``load`` loads and warms up,
    and raises what loading raised. ``pipeline_factory`` replaces the model loader (tests).
    """

    def __init__(
        self, settings: Settings, name: str, pipeline_factory: PipelineFactory | None = None
    ) -> None:
        self._settings = settings
        self._name = name
        self._factory = pipeline_factory
        self._worker: Worker | None = None
        #: a load call may arrive twice (a retry after a restart): one loads, the other waits
        self._loading = asyncio.Lock()
        self._draws: dict[str, _Draw] = {}
        #: keys of jobs that ended lately: a progress call for one answers "over" at once
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def load(self) -> dict[str, Any]:
        """Load and warm up the model (once per process); where this worker runs."""
        async with self._loading:
            if self._worker is None:
                worker = Worker(self._settings, name=self._name, pipeline_factory=self._factory)
                await worker.start()
                self._worker = worker
        return {
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "device": self._worker.device,
            "profile": self._worker.profile,
        }

    async def draw(self, key: str, request: DrawRequest, seeds: tuple[int, ...]) -> Rendered:
        """Run one job; the images come back as PNG bytes, encoded off the GPU thread."""
        if self._worker is None:
            # restarted since the front end last saw it (killed while idle): it must load first
            raise WorkerLostError("the worker restarted and has not loaded its model yet")
        state = self._draws.setdefault(key, _Draw())
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> None:
            state.step, state.total = step, total
            state.changed.set()

        try:
            rendered = await self._worker.generate(request, seeds, on_step=on_step, cancel=state.cancel)
            started = time.perf_counter()
            images = await loop.run_in_executor(None, lambda: [encode_png(i) for i in rendered.images])
            timings = {**rendered.timings, "encode": time.perf_counter() - started}
            return Rendered(images=images, seeds=rendered.seeds, seconds=rendered.seconds, timings=timings)
        finally:
            del self._draws[key]
            self._ended[key] = None
            while len(self._ended) > 64:
                self._ended.popitem(last=False)
            state.changed.set()

    async def progress(self, key: str, seen: int, wait: float) -> tuple[int, int]:
        """(step, total) of a job once it passes step ``seen``, or after ``wait`` seconds (a long poll).

        ``total`` is -1 once the job is over (the draw call itself tells how it ended).
        """
        if key in self._ended:
            return seen, -1
        # a poll may come before its job: it waits on the same record the job will use
        state = self._draws.setdefault(key, _Draw())
        if state.step <= seen:
            state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.changed.wait(), wait)
        return (seen, -1) if key in self._ended else (state.step, state.total)

    async def cancel(self, key: str) -> None:
        """Stop a job between two denoising steps."""
        state = self._draws.get(key)
        if state is not None:
            state.cancel.set()

    async def pid(self) -> int:
        return os.getpid()


class RayWorker:
    """A ``bot.ports.PoolWorker`` in the front end for one ``GpuWorker`` actor."""

    def __init__(
        self,
        handle: Any,
        *,
        name: str,
        profile: ModelProfile,
        timeout: float,
        progress_wait: float = 0.5,
    ) -> None:
        self.name = name
        self.profile = profile
        self.pid: int | None = None
        #: the Ray GPU ids the actor holds (empty on CPU)
        self.gpus: list[str] = []
        self._handle = handle
        self._timeout = timeout
        self._wait = progress_wait
        self._state = WorkerState.WARMING

    @property
    def state(self) -> WorkerState:
        return self._state

    async def ready(self) -> bool:
        """Wait until the actor is up with its model loaded; False once it is retired."""
        if self._state in (WorkerState.IDLE, WorkerState.DRAWING):
            return True
        if self._state is WorkerState.RETIRED:
            return False
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                info = await self._handle.load.remote()
            except RayTaskError as err:
                cause = err.cause if isinstance(err.cause, BaseException) else err
                return self._retire(f"its model did not load: {first_line(cause)}")
            except (ActorUnavailableError, RayActorError) as err:
                # restarting (the constructor runs again): retry until it is back, or give up
                if time.monotonic() > deadline:
                    return self._retire(
                        f"it did not come back within {self._timeout:.0f} s: {first_line(err)}"
                    )
                self._state = WorkerState.DEAD
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.pid = int(info["pid"])
            self.gpus = list(info["gpus"])
            self.profile = info["profile"]
            self._state = WorkerState.IDLE
            _log.info("worker %s ready (pid %d, %s)", self.name, self.pid, info["device"])
            return True

    def _retire(self, why: str) -> bool:
        _log.error("worker %s retired: %s", self.name, why)
        self._state = WorkerState.RETIRED
        with contextlib.suppress(Exception):
            ray.kill(self._handle, no_restart=True)
        return False

    async def generate(
        self,
        request: DrawRequest,
        seeds: tuple[int, ...],
        *,
        on_step: StepCallback,
        cancel: threading.Event,
    ) -> Rendered:
        """Run one job on the actor; ``WorkerLostError`` when the actor dies under it."""
        if self._state is not WorkerState.IDLE:
            raise WorkerLostError(f"worker {self.name} is {self._state.value}")
        key = uuid.uuid4().hex
        self._state = WorkerState.DRAWING
        ref = self._handle.draw.remote(key, request, seeds)
        # the watch ends by itself when the actor says the job is over (or the actor is gone):
        # cancelling an await on a pending Ray call was seen to stall later calls for a minute
        watch = asyncio.create_task(self._watch(key, on_step, cancel), name=f"watch-{self.name}")
        try:
            rendered: Rendered = await ref
        except RayTaskError as err:
            cause = err.cause
            if isinstance(cause, WorkerLostError):
                self._state = WorkerState.DEAD  # ready() reloads it before its next job
            if isinstance(cause, BotError):
                raise cause from None
            _log.error("worker %s failed a job: %s", self.name, first_line(err))
            raise GenerationError(_FAILED_MESSAGE) from None
        except (RayActorError, ActorUnavailableError) as err:
            self._state = WorkerState.DEAD
            raise WorkerLostError(f"worker {self.name} was lost: {first_line(err)}") from None
        finally:
            await asyncio.wait({watch}, timeout=self._wait + 5)
            if not watch.done():
                watch.cancel()
            if self._state is WorkerState.DRAWING:
                self._state = WorkerState.IDLE
        return rendered

    async def _watch(self, key: str, on_step: StepCallback, cancel: threading.Event) -> None:
        """Pass progress on, forward a cancel, and kill the actor when it stays silent too long."""
        seen, cancelled = 0, False
        last = time.monotonic()
        while True:
            if cancel.is_set() and not cancelled:
                cancelled = True
                self._handle.cancel.remote(key)
            answer = asyncio.ensure_future(self._handle.progress.remote(key, seen, self._wait))
            await asyncio.wait({answer}, timeout=self._wait + self._timeout)
            if answer.done():
                try:
                    step, total = answer.result()
                except RayError:
                    return  # the actor is gone: the draw call reports it
                if total < 0:
                    return  # the job is over
            else:
                step, total = seen, 0
            now = time.monotonic()
            if step > seen:
                seen, last = step, now
                on_step(step, total)
            elif now - last > self._timeout:
                _log.error("worker %s silent for %.0f s; killing it (it restarts)", self.name, now - last)
                with contextlib.suppress(Exception):
                    ray.kill(self._handle, no_restart=False)
                return


class RayPool:
    """Connects to (or starts) Ray and creates one ``GpuWorker`` actor per worker.

    ``RAY_ADDRESS`` empty starts a Ray on this machine (shut down on close); ``auto`` or
    ``host:port`` joins a cluster. When Ray is already initialised (tests), it is used as is.
    ``cpus_per_worker`` is each actor's CPU request (tests use 0 to fit two cores);
    ``pipeline_factories`` replace the model loader, worker ``i`` taking entry ``i % len`` (tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline_factories: Sequence[PipelineFactory] = (),
        cpus_per_worker: float = 1.0,
        progress_wait: float = 0.5,
    ) -> None:
        self.settings = settings
        self.workers: list[RayWorker] = []
        self._factories = list(pipeline_factories)
        self._cpus = cpus_per_worker
        self._wait = progress_wait
        self._owns_ray = False

    async def start(self) -> None:
        settings = self.settings
        if not ray.is_initialized():
            address = settings.ray_address or "local"
            self._owns_ray = True
            try:
                await asyncio.to_thread(ray.init, address=address, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise ConfigError(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {first_line(exc)}"
                ) from None
        gpu = settings.device is not Device.CPU
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpu and gpus == 0:
            raise ConfigError(
                "the Ray cluster has no GPU: add a GPU machine (ray start --address=...) or set DEVICE=cpu"
            )
        count = settings.ray_workers or (gpus if gpu else 1)
        profile = resolve_profile(settings.model, cache_dir=settings.model_cache_dir)
        # tokens stay in the front end; each actor sees only its own GPU (CUDA_VISIBLE_DEVICES)
        remote = settings.model_copy(
            update={
                "discord_token": None,
                "telegram_token": None,
                "devices": [settings.device.value],
            }
        )
        actor_class = ray.remote(GpuWorker).options(  # type: ignore[attr-defined]
            num_gpus=1 if gpu else 0, num_cpus=self._cpus, max_restarts=-1, max_task_retries=0
        )
        for index in range(count):
            name = f"ray-{index}"
            factory = self._factories[index % len(self._factories)] if self._factories else None
            handle = actor_class.remote(remote, name, factory)
            self.workers.append(
                RayWorker(
                    handle,
                    name=name,
                    profile=profile,
                    timeout=settings.worker_timeout,
                    progress_wait=self._wait,
                )
            )
        _log.info(
            "%d Ray worker(s) (%s), cluster %s", count, "GPU" if gpu else "CPU", ray.cluster_resources()
        )

    async def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(worker._handle, no_restart=True)
        self.workers.clear()
        if self._owns_ray:
            # ray.shutdown can block for seconds after its daemons were signalled: bound it
            try:
                await asyncio.wait_for(asyncio.to_thread(ray.shutdown), SHUTDOWN_SECONDS)
            except TimeoutError:
                _log.warning("Ray did not shut down within %.0f s", SHUTDOWN_SECONDS)

    async def __aenter__(self) -> RayPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
