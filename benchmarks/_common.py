"""Shared helpers of the benchmarks: timed pipeline calls, delivery clocks, loop lag, RSS, tables, JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.domain import Job, Progress, SavedImage, Ticket
from bot.ports import Reply, ReplyFactory

_log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: where results go when neither --json nor $OUT says otherwise (``outputs/`` is git-ignored)
DEFAULT_RESULTS = ROOT / "outputs" / "benchmarks"
_MB = 1024 * 1024


# ---------------------------------------------------------------------------- numbers


def quantile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation; None for no values."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, rounded for reports (None stays None)."""
    return None if seconds is None else round(seconds * 1000, 3)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; an em dash for a missing one."""
    return "—" if value is None else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells[1:])
    return "\n".join(out)


# ---------------------------------------------------------------------------- the machine


def rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()  # no procfs (macOS): the peak is the closest we have


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def mb(n: int) -> float:
    return round(n / _MB, 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on, for the JSON and the table header."""
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            info[name] = __import__(name).__version__
    return info


def describe(info: dict[str, Any]) -> str:
    """The machine in one line."""
    device = info.get("gpu") or f"{info['cores']} CPU cores ({info['cpu']})"
    return (
        f"{info['date']} · {device} · Python {info['python']} · torch {info.get('torch', '?')} "
        f"· diffusers {info.get('diffusers', '?')}"
    )


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the folder; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def results_path(name: str, given: str | None) -> Path:
    """``given``, else ``$OUT/name`` (the device machine's output folder), else ``outputs/benchmarks/name``."""
    if given:
        return Path(given)
    out = os.environ.get("OUT")
    return Path(out) / name if out else DEFAULT_RESULTS / name


def quiet_logs(level: int = logging.WARNING) -> None:
    """Warnings and errors of the bot on stderr; the per-job INFO lines would drown the table."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # loading bars of diffusers and transformers would land in the middle of the report
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# ---------------------------------------------------------------------------- timing the pipeline


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One pipeline call as the thread that made it saw it (``perf_counter`` seconds)."""

    seed: int
    start: float
    end: float
    thread: int
    cpu: float = 0.0  # CPU seconds of the calling thread during the call

    @property
    def seconds(self) -> float:
        return self.end - self.start


class TimedPipeline:
    """Wraps a diffusers pipeline and records each call's start and end on the calling thread.

    Both the raw baseline and the bot's worker call the same wrapper around the same
    pipeline object, so whatever the wrapper costs is in both measurements alike.
    Everything else (``maybe_free_model_hooks``, ``transformer``...) is the pipeline's own.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[Call] = []

    def __call__(self, **kwargs: Any) -> Any:
        generators = kwargs.get("generator") or []
        seed = int(generators[0].initial_seed()) if generators else -1
        cpu = time.thread_time()
        start = time.perf_counter()
        try:
            return self.pipe(**kwargs)
        finally:
            end = time.perf_counter()
            # list.append is atomic: the worker thread and the loop never race on it
            self.calls.append(
                Call(
                    seed=seed,
                    start=start,
                    end=end,
                    thread=threading.get_ident(),
                    cpu=time.thread_time() - cpu,
                )
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def take(self) -> list[Call]:
        """The calls recorded so far, oldest first; the record starts empty again."""
        calls, self.calls = self.calls, []
        return sorted(calls, key=lambda c: c.start)


def raw_call(pipe: Any, *, prompt: str, seed: int, width: int, height: int, steps: int) -> list[Any]:
    """One back-to-back baseline call, with the same arguments ``generation.Worker`` passes."""
    import torch

    out = pipe(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=0.0,
        num_images_per_prompt=1,
        generator=[torch.Generator(device="cpu").manual_seed(seed)],
        output_type="pil",
    )
    return list(out.images)


def gaps_between(calls: Sequence[Call], waiting: Callable[[Call, Call], bool] | None = None) -> list[float]:
    """Seconds the calling thread spent between consecutive calls (only where ``waiting`` says work waited)."""
    ordered = sorted(calls, key=lambda c: c.start)
    return [
        b.start - a.end
        for a, b in itertools.pairwise(ordered)
        if a.thread == b.thread and (waiting is None or waiting(a, b))
    ]


def busy_span(calls: Sequence[Call]) -> float:
    """Seconds from the first call's start to the last call's end: the GPU thread's stretch of work."""
    return max(c.end for c in calls) - min(c.start for c in calls) if calls else 0.0


def queued_before(submitted: dict[int, float]) -> Callable[[Call, Call], bool]:
    """For ``gaps_between``: count a gap only if the next job (by seed) was submitted before the last ended.

    A gap while nothing was queued is the users' pause, not the bot's.
    """

    def waiting(previous: Call, following: Call) -> bool:
        return submitted.get(following.seed, float("inf")) < previous.end

    return waiting


# ---------------------------------------------------------------------------- the event loop


class LoopLag:
    """Measures event-loop lag with a periodic timer: how late each ``interval`` tick fires.

    Use ``async with LoopLag() as lag:`` around the part to measure; ``lag.samples`` are seconds.
    Ticks delayed by the benchmark's own work (``with lag.excluded():``) are left out.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._excluded: list[tuple[float, float]] = []

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            if not any(start < now and end > due for start, end in self._excluded):
                self.samples.append(max(0.0, now - due))

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Blocking work of the measurement itself (on the loop): the ticks it delays are not lag."""
        start = time.monotonic()
        try:
            yield
        finally:
            self._excluded.append((start, time.monotonic()))

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick(), name="loop-lag-probe")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> dict[str, float | int | None]:
        return {
            "samples": len(self.samples),
            "p50_ms": ms(quantile(self.samples, 0.5)),
            "p99_ms": ms(quantile(self.samples, 0.99)),
            "max_ms": ms(max(self.samples, default=None) if self.samples else None),
        }


# ---------------------------------------------------------------------------- the reply side


@dataclass(slots=True)
class DeliveryClock:
    """A reply factory that notes when each job was delivered or failed, then passes the call on.

    ``inner`` is the reply target being measured (a ``RecordingHub``'s factory, or an adapter's);
    without one, calls end here. ``wait`` resolves once ``count`` jobs have reached either end.
    """

    inner: ReplyFactory | None = None
    delivered: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    deliveries: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ended: int = 0

    def factory(self, job: Job) -> Reply:
        return _ClockedReply(self, self.inner(job) if self.inner is not None else None)

    def _end(self) -> None:
        self._ended += 1
        self._changed.set()

    @property
    def ended(self) -> int:
        return self._ended

    async def wait(self, count: int, timeout: float) -> None:
        """Until ``count`` jobs have been delivered or failed since this clock was made."""
        async with asyncio.timeout(timeout):
            while self._ended < count:
                self._changed.clear()
                await self._changed.wait()


class _ClockedReply:
    def __init__(self, clock: DeliveryClock, inner: Reply | None) -> None:
        self._clock = clock
        self._inner = inner

    async def queued(self, job: Job, ticket: Ticket) -> None:
        if self._inner is not None:
            await self._inner.queued(job, ticket)

    async def progress(self, job: Job, progress: Progress) -> None:
        if self._inner is not None:
            await self._inner.progress(job, progress)

    async def delivered(self, job: Job, images: Sequence[SavedImage]) -> None:
        if self._inner is not None:
            await self._inner.delivered(job, images)
        self._clock.deliveries += 1
        if job.id not in self._clock.delivered:
            self._clock.delivered[job.id] = time.perf_counter()
            self._clock._end()

    async def failed(self, job: Job, message: str) -> None:
        if self._inner is not None:
            await self._inner.failed(job, message)
        if job.id not in self._clock.failed and job.id not in self._clock.delivered:
            self._clock.failed[job.id] = message
            self._clock._end()


# ---------------------------------------------------------------------------- the bot path


def bench_settings(folder: Path, *, model: str, device: str, jobs: int, **overrides: Any) -> Settings:
    """Settings for a benchmark service: paths under ``folder``, credits and queue limits out of the way."""
    values: dict[str, Any] = {
        "_env_file": None,  # a developer's .env must not change the figures
        "model": model,
        "device": device,
        "db_path": folder / "bench.sqlite3",
        "output_dir": folder / "outputs",
        "model_cache_dir": folder / "cache",
        "warmup": False,  # the pipeline is warmed up before it is handed over
        "daily_credits": 10**9,
        "max_queued_per_user": max(jobs, 1),
        "max_queued_total": max(jobs, 1),
    }
    values.update(overrides)
    return Settings(**values)


@dataclass(slots=True)
class BotPath:
    """A running service with one real worker around an already-built pipeline."""

    service: Any
    worker: Any
    store: Any


@contextlib.asynccontextmanager
async def bot_path(
    settings: Settings,
    pipe: Any,
    profile: Any,
    plan: Any,
    *,
    platform_name: str,
    factory: ReplyFactory,
) -> AsyncIterator[BotPath]:
    """The whole bot path: ``SqliteStore`` → ``Service`` (fair queue, dispatcher) → ``Worker`` → ``ImageStore``.

    The worker's thread takes ``pipe`` as its warm pipeline (``pipeline_factory``) instead
    of loading one, so the bot path and the raw baseline draw with the very same object.
    """
    from bot.service import Service
    from data import SqliteStore
    from generation.images import ImageStore
    from generation.worker import Worker

    store = SqliteStore(settings.db_path)
    await store.start()
    worker = Worker(settings, name="bench", pipeline_factory=lambda _settings: (pipe, profile, plan))
    try:
        await worker.start()
        service = Service(
            settings=settings,
            store=store,
            workers=[worker],
            sink=ImageStore(settings.output_dir, profile.name),
        )
        service.register(platform_name, factory)
        await service.start()
        try:
            yield BotPath(service=service, worker=worker, store=store)
        finally:
            await service.close()
    finally:
        await worker.close()
        await store.close()
