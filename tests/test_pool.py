"""A pool of workers: Ray actors on one real local cluster, local threads on two CPU "devices".

One Ray cluster serves the whole test run (``ray_cluster``); actors ask for no CPU so they fit two
cores, and the cluster has two logical GPUs so ``DEVICE=auto`` gets one worker per GPU. Workers
run the tiny model through a test-only wrapper (``tests.pool_hooks``): slow steps, a poison
prompt that kills its process, a model that never loads. Jobs, credits and images are real
(SQLite file, PNG files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bot import messages
from bot.config import Settings
from bot.domain import JobState, UserRef
from bot.errors import WorkerLostError
from bot.ports import WorkerState
from bot.recording import RecordingHub
from bot.service import Service
from data import SqliteStore
from generation.images import EncodedImage, ImageStore
from tests.pool_hooks import POISON, STALL, Hooked

ROOT = Path(__file__).resolve().parent.parent
ALICE = UserRef(platform="test", id="alice")
BOB = UserRef(platform="test", id="bob")
CAROL = UserRef(platform="test", id="carol")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray for the whole run: 2 CPUs, 2 logical GPUs; actors import this checkout."""
    ray = pytest.importorskip("ray")
    # the raylet (and so every actor) inherits this: actors import this tree and tests.pool_hooks
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), before) if p)
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
    )
    if before is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = before
    yield ray
    ray.shutdown()


def pool_settings(tmp_path: Path, model: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "model": str(model),
        "device": "cpu",
        "workers": "ray",
        "ray_workers": 2,
        "warmup": False,
        "db_path": tmp_path / "bot.sqlite3",
        "output_dir": tmp_path / "out",
        "model_cache_dir": tmp_path / "cache",
        "daily_credits": 10,
        "max_queued_per_user": 5,
        "progress_interval": 0.05,
        "worker_timeout": 60,
    }
    values.update(overrides)
    return Settings(**values)


def ledger(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT user_id, kind, job_id FROM ledger ORDER BY id").fetchall()


class Front:
    """The front end as ``python -m bot`` builds it, on the given workers, started on demand."""

    def __init__(self, settings: Settings, workers: Sequence[Any]) -> None:
        self.settings = settings
        self.workers = list(workers)
        self.hub = RecordingHub()
        self.started: list[str] = []  # job ids in the order they first started drawing

    async def open(self) -> Service:
        self.store = SqliteStore(self.settings.db_path)
        await self.store.start()
        self.service = Service(
            settings=self.settings,
            store=self.store,
            workers=self.workers,
            sink=ImageStore(self.settings.output_dir, self.workers[0].profile.name),
            delivery_backoff=(0.01,),
        )
        self.service.register(self.hub)
        real_started = self.service.status.started

        def started(job: Any) -> None:
            if job.id not in self.started:
                self.started.append(job.id)
            real_started(job)

        self.service.status.started = started  # type: ignore[method-assign]
        return self.service

    async def draw(self, user: UserRef, text: str = "a fox") -> str:
        ticket = await self.service.submit(user, self.service.parse(text), delivery={"chat": user.id})
        return ticket.job.id

    async def settled(self) -> None:
        async with asyncio.timeout(120):
            await self.service.wait_idle()

    async def close(self) -> None:
        await self.service.close()
        await self.store.close()


@pytest.fixture(scope="session")
def ray_pool(
    ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Any]:
    """Two Ray workers for the run: ``DEVICE=auto`` on 2 logical GPUs (one each), slow steps.

    Tests that kill a worker leave it restarting; the next test's dispatcher waits until it is warm.
    """
    from generation.ray_worker import RayPool

    settings = pool_settings(
        tmp_path_factory.mktemp("ray-pool"), tiny_model_dir, device="auto", ray_workers=0
    )
    pool = RayPool(
        settings, pipeline_factories=[Hooked(step_seconds=0.1)], cpus_per_worker=0, progress_wait=0.2
    )
    asyncio.run(pool.start())
    yield pool
    asyncio.run(pool.close())


@contextlib.asynccontextmanager
async def front_on(settings: Settings, workers: Sequence[Any]) -> AsyncIterator[Front]:
    front = Front(settings, workers)
    await front.open()
    try:
        yield front
    finally:
        await front.close()


async def until(predicate: Any, seconds: float = 60) -> None:
    """Wait for a condition the front end reaches on its own (checked every few milliseconds)."""
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_two_ray_workers_draw_at_once_one_per_logical_gpu(ray_pool: Any) -> None:
    import threading

    from bot.domain import DrawRequest

    workers = ray_pool.workers
    # DEVICE=auto on a cluster with 2 (logical) GPUs: one worker per GPU, each holding one
    assert [w.name for w in workers] == ["ray-0", "ray-1"]
    assert all([await w.ready() for w in workers])
    assert len({w.pid for w in workers}) == 2 and sorted(len(w.gpus) for w in workers) == [1, 1]
    assert workers[0].gpus != workers[1].gpus
    events: list[tuple[str, int]] = []
    request = DrawRequest(prompt="a fox", width=64, height=64, steps=4, guidance=0.0)

    async def run(worker: Any, seed: int) -> Any:
        def on_step(step: int, total: int) -> None:
            events.append((worker.name, step))

        return await worker.generate(request, (seed,), on_step=on_step, cancel=threading.Event())

    results = await asyncio.gather(run(workers[0], 1), run(workers[1], 2))
    for rendered in results:
        (image,) = rendered.images
        assert isinstance(image, EncodedImage) and image.png.startswith(b"\x89PNG") and image.size == (64, 64)
        assert "encode" in rendered.timings
    # both drew at once: each worker reported a step before the other reported its last one
    last = {name: max(i for i, (n, _) in enumerate(events) if n == name) for name in ("ray-0", "ray-1")}
    first = {name: min(i for i, (n, _) in enumerate(events) if n == name) for name in ("ray-0", "ray-1")}
    assert first["ray-0"] < last["ray-1"] and first["ray-1"] < last["ray-0"]


async def test_a_cancelled_job_stops_mid_denoise_on_its_ray_worker(ray_pool: Any) -> None:
    import threading

    from bot.domain import DrawRequest
    from bot.errors import CancelledError

    worker = ray_pool.workers[0]
    assert await worker.ready()
    cancel = threading.Event()
    steps: list[int] = []

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        cancel.set()  # the user pressed Cancel after the first step

    request = DrawRequest(prompt="a fox", width=64, height=64, steps=8, guidance=0.0)
    with pytest.raises(CancelledError):
        await worker.generate(request, (1,), on_step=on_step, cancel=cancel)
    assert steps and max(steps) < 8 and worker.state is WorkerState.IDLE


async def test_fair_across_the_pool_and_a_sigkilled_worker_loses_nothing(
    ray_pool: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = pool_settings(tmp_path, tiny_model_dir)
    async with front_on(settings, ray_pool.workers) as front:
        service = front.service
        ids = {
            "a1": await front.draw(ALICE),
            "a2": await front.draw(ALICE),
            "a3": await front.draw(ALICE),
            "b1": await front.draw(BOB),
            "b2": await front.draw(BOB),
            "c1": await front.draw(CAROL),  # the newcomer: after one job of each backlogged user
        }
        await service.start()
        # kill -9 the worker drawing Bob's first job, in the middle of it
        target = ids["b1"]
        await until(lambda: (live := service._live.get(target)) is not None and live.progress is not None)
        (name,) = [n for n, job in service.dispatcher.current.items() if job == target]
        worker = next(w for w in front.workers if w.name == name)
        os.kill(worker.pid, signal.SIGKILL)
        await front.settled()
        stats = await service.stats(UserRef(platform="test", id="admin"), vouched=True)
    names = [{v: k for k, v in ids.items()}[j] for j in front.started]
    # the newcomer starts after one job of each backlogged user, whichever worker is free; Alice
    # and Bob alternate while both wait (the lost job kept its place at the head of Bob's queue)
    assert names[:3] == ["a1", "b1", "c1"] and sorted(names) == sorted(ids)
    for n in range(1, 6):
        alice, bob = sum(x[0] == "a" for x in names[:n]), sum(x[0] == "b" for x in names[:n])
        assert abs(alice - bob) <= 1 or bob == 2
    with sqlite3.connect(settings.db_path) as conn:
        states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    assert set(states.values()) == {JobState.DELIVERED.value}
    delivered = [e.job_id for e in front.hub.events if e.kind == "delivered"]
    assert sorted(delivered) == sorted(ids.values())  # each exactly once
    rows = ledger(settings.db_path)
    for job_id in ids.values():
        assert [kind for _, kind, j in rows if j == job_id] == ["reserve", "commit"]
    assert {k for k in stats if k.startswith("worker ")} == {"worker ray-0", "worker ray-1"}


async def test_a_worker_silent_for_worker_timeout_is_killed_and_its_job_lost_to_it(
    ray_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from bot.domain import DrawRequest
    from generation.ray_worker import RayWorker

    assert await ray_pool.workers[1].ready()
    # the same actor, watched with WORKER_TIMEOUT=1
    strict = RayWorker(
        ray_pool.workers[1]._handle, name="strict", profile=ray_pool.workers[1].profile, timeout=1.0
    )
    assert await strict.ready()
    request = DrawRequest(prompt=STALL, width=64, height=64, steps=4, guidance=0.0)
    with caplog.at_level(logging.ERROR, "generation.ray_worker"), pytest.raises(WorkerLostError):
        await strict.generate(request, (1,), on_step=lambda s, t: None, cancel=threading.Event())
    assert strict.state is WorkerState.DEAD
    assert any("silent for" in r.getMessage() for r in caplog.records)


async def test_a_poison_job_fails_and_is_refunded_after_one_retry(
    ray_pool: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = pool_settings(tmp_path, tiny_model_dir)
    async with front_on(settings, ray_pool.workers) as front:
        service = front.service
        await service.start()
        poison = await front.draw(ALICE, POISON)
        await until(lambda: poison not in service._live, 120)
        fine = await front.draw(BOB)  # the restarted workers draw again
        await front.settled()
        assert (await service.credits(ALICE)).available == 10
    with sqlite3.connect(settings.db_path) as conn:
        rows = dict((r[0], (r[1], r[2])) for r in conn.execute("SELECT id, state, error FROM jobs"))
    assert rows[poison] == (JobState.FAILED.value, messages.POISON_JOB)
    assert rows[fine][0] == JobState.DELIVERED.value
    assert [kind for _, kind, j in ledger(settings.db_path) if j == poison] == ["reserve", "refund"]
    assert any(messages.POISON_JOB in str(e.data) for e in front.hub.of(poison, "failed"))


async def test_a_worker_that_cannot_load_is_retired_and_the_rest_go_on(
    ray_cluster: Any, tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from generation.ray_worker import RayPool

    settings = pool_settings(tmp_path, tiny_model_dir)
    factories = [Hooked(broken=True), Hooked()]
    with caplog.at_level(logging.ERROR, "generation.ray_worker"):
        async with (
            RayPool(settings, pipeline_factories=factories, cpus_per_worker=0) as pool,
            front_on(settings, pool.workers) as front,
        ):
            service = front.service
            await service.start()
            ids = [await front.draw(ALICE), await front.draw(BOB)]
            await front.settled()
            await until(lambda: service.dispatcher.alive == 1)
            stats = await service.stats(UserRef(platform="test", id="admin"), vouched=True)
    assert stats["worker ray-0"].startswith("retired") and not stats["worker ray-1"].startswith("retired")
    assert sorted(e.job_id for e in front.hub.events if e.kind == "delivered") == sorted(ids)
    retired = [r for r in caplog.records if "retired" in r.getMessage()]
    assert len(retired) == 1 and "a test model that never loads" in retired[0].getMessage()


async def test_workers_local_with_two_cpu_devices(tmp_path: Path, tiny_model_dir: Path) -> None:
    from generation.pool import LocalPool

    three_devices = pool_settings(tmp_path, tiny_model_dir, workers="local", device="cpu,cpu,cpu")
    factories = [Hooked(), Hooked(broken=True), Hooked()]
    async with LocalPool(three_devices, pipeline_factories=factories) as three:
        # a device whose model cannot load is left out; the others serve
        assert [w.name for w in three.workers] == ["cpu", "cpu-3"] and three.retired == ["cpu-2"]
    settings = pool_settings(tmp_path, tiny_model_dir, workers="local", device="cpu,cpu")
    async with LocalPool(settings) as pool:
        assert [w.name for w in pool.workers] == ["cpu", "cpu-2"]
        assert len({w.thread_ident for w in pool.workers}) == 2
        front = Front(settings, pool.workers)
        service = await front.open()
        ids = [await front.draw(ALICE), await front.draw(BOB), await front.draw(CAROL)]
        await service.start()
        await front.settled()
        stats = await service.stats(UserRef(platform="test", id="admin"), vouched=True)
        await front.close()
    assert sorted(e.job_id for e in front.hub.events if e.kind == "delivered") == sorted(ids)
    assert {k for k in stats if k.startswith("worker ")} == {"worker cpu", "worker cpu-2"}


# ---- the service over pool workers that die, without Ray (fast, scripted) ----------------------


class DyingWorker:
    """A scripted ``PoolWorker``: ``lose`` prompts make it die under the job; ``broken`` never loads."""

    def __init__(self, name: str, *, lose: Sequence[str] = (), broken: bool = False) -> None:
        from tests.support import ScriptedGenerator

        self.name = name
        self._gen = ScriptedGenerator(name=name)
        self.profile = self._gen.profile
        self.lose = set(lose)
        self.broken = broken
        self.ran: list[str] = []
        self._state = WorkerState.WARMING

    @property
    def state(self) -> WorkerState:
        return self._state

    async def ready(self) -> bool:
        await asyncio.sleep(0)
        self._state = WorkerState.RETIRED if self.broken else WorkerState.IDLE
        return not self.broken

    async def generate(self, request: Any, seeds: Any, *, on_step: Any, cancel: Any) -> Any:
        self.ran.append(request.prompt)
        self._state = WorkerState.DRAWING
        try:
            if request.prompt in self.lose:
                on_step(1, 4)
                self._state = WorkerState.DEAD
                raise WorkerLostError(f"worker {self.name} was lost")
            return await self._gen.generate(request, seeds, on_step=on_step, cancel=cancel)
        finally:
            if self._state is WorkerState.DRAWING:
                self._state = WorkerState.IDLE


def scripted_settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        model="scripted",
        db_path=tmp_path / "bot.sqlite3",
        output_dir=tmp_path / "out",
        daily_credits=10,
        progress_interval=0.05,
    )


async def test_a_job_whose_worker_died_runs_again_on_another_and_is_charged_once(tmp_path: Path) -> None:
    settings = scripted_settings(tmp_path)
    first, second = DyingWorker("w0", lose=["unlucky"]), DyingWorker("w1")
    async with front_on(settings, [first, second]) as front:
        await front.service.start()
        job = await front.draw(ALICE, "unlucky")
        await front.settled()
        assert (await front.service.credits(ALICE)).available == 9
    assert first.ran == ["unlucky"] and second.ran == ["unlucky"]
    assert [e.kind for e in front.hub.of(job) if e.kind in ("delivered", "failed")] == ["delivered"]
    assert [kind for _, kind, j in ledger(settings.db_path) if j == job] == ["reserve", "commit"]


async def test_a_job_that_kills_two_workers_fails_refunded(tmp_path: Path) -> None:
    settings = scripted_settings(tmp_path)
    workers = [DyingWorker("w0", lose=["bad"]), DyingWorker("w1", lose=["bad"])]
    async with front_on(settings, workers) as front:
        await front.service.start()
        job = await front.draw(ALICE, "bad")
        after = await front.draw(BOB, "fine")
        await front.settled()
        assert (await front.service.credits(ALICE)).available == 10
    assert sum(w.ran.count("bad") for w in workers) == 2
    assert [kind for _, kind, j in ledger(settings.db_path) if j == job] == ["reserve", "refund"]
    assert after in front.hub.finished()


async def test_no_worker_left_refuses_new_requests_and_fails_queued_ones(tmp_path: Path) -> None:
    from bot.errors import NoWorkersError

    settings = scripted_settings(tmp_path)
    async with front_on(settings, [DyingWorker("w0", broken=True), DyingWorker("w1", broken=True)]) as front:
        queued = await front.draw(ALICE)  # before the workers reported: it waits, then fails
        await front.service.start()
        await front.settled()
        with pytest.raises(NoWorkersError, match="no image generator is running"):
            await front.draw(BOB)
        assert (await front.service.credits(ALICE)).available == 10
        stats = await front.service.stats(UserRef(platform="test", id="admin"), vouched=True)
    assert [kind for _, kind, j in ledger(settings.db_path) if j == queued] == ["reserve", "refund"]
    assert any(messages.WORKERS_GONE in str(e.data) for e in front.hub.of(queued, "failed"))
    assert stats["worker w0"].startswith("retired") and stats["worker w1"].startswith("retired")


def test_workers_ray_without_ray_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    import sys

    from bot.errors import ConfigError
    from generation.pool import start_workers

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "generation.ray_worker", raising=False)
    settings = pool_settings(tmp_path, tiny_model_dir)

    async def start() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await start_workers(settings, stack)

    with pytest.raises(ConfigError, match=r"^WORKERS=ray needs Ray: pip install 'brushbot\[ray\]'"):
        asyncio.run(start())
