"""Shared helpers of the benchmarks: tiny set-up, timed pipeline calls, deliveries, loop lag, RSS, JSON."""

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
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.domain import DrawRequest
from bot.ports import Transport
from bot.recording import RecordingHub, ReplyEvent

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


def mark(ok: bool | None) -> str:
    """A goal's verdict for a table: ok, MISSED, or an em dash when it was not measured."""
    return "—" if ok is None else "ok" if ok else "MISSED"


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


def run_in_temp(
    prefix: str, measure: Callable[[Path], Coroutine[Any, Any, dict[str, Any]]]
) -> dict[str, Any]:
    """``measure`` a benchmark in a temporary folder (model, database, images) on a fresh event loop."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return asyncio.run(measure(Path(tmp)))


def report(
    result: dict[str, Any], render: Callable[[dict[str, Any]], str], name: str, given: str | None
) -> Path:
    """Print ``render(result)``, write the JSON (see ``results_path``) and say where; return the path."""
    print(render(result))
    path = write_json(results_path(name, given), result)
    print(f"\nJSON: {path}")
    return path


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


def bench_request(*, prompt: str, seed: int, size: int, steps: int) -> DrawRequest:
    """A benchmark's job: a square image, no guidance (Z-Image-Turbo's way), a fixed seed."""
    return DrawRequest(prompt=prompt, width=size, height=size, steps=steps, guidance=0.0, seed=seed)


def raw_call(pipe: Any, request: DrawRequest) -> list[Any]:
    """One back-to-back baseline call: the very call ``generation.Worker`` makes for ``request``."""
    from generation.worker import call_pipeline

    return call_pipeline(pipe, request, request.seeds(0))


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
        return lag_summary(self.samples)


def lag_summary(samples: Sequence[float]) -> dict[str, float | int | None]:
    """Loop-lag samples (seconds) for the JSON: count, then p50, p99 and max in ms."""
    return {
        "samples": len(samples),
        "p50": ms(quantile(samples, 0.5)),
        "p99": ms(quantile(samples, 0.99)),
        "max": ms(max(samples, default=None)),
    }


# ---------------------------------------------------------------------------- the reply side


_ENDS = ("delivered", "failed")


def endings(hub: RecordingHub) -> dict[str, ReplyEvent]:
    """Each job's first ``delivered`` or ``failed`` event (its ``at`` is when), by job id."""
    ends: dict[str, ReplyEvent] = {}
    for event in hub.events:
        if event.kind in _ENDS:
            ends.setdefault(event.job_id, event)
    return ends


async def wait_ended(hub: RecordingHub, count: int, timeout: float) -> None:
    """Until ``count`` jobs have been delivered or failed in ``hub`` (each event is looked at once)."""
    ended: set[str] = set()
    seen = 0

    def enough(hub: RecordingHub) -> bool:
        nonlocal seen
        for event in hub.events[seen:]:
            if event.kind in _ENDS:
                ended.add(event.job_id)
        seen = len(hub.events)
        return len(ended) >= count

    await hub.wait_for(enough, timeout)


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
class TinyBench:
    """The tiny model built, loaded and warmed up, ready for a benchmark's bot path and raw calls."""

    settings: Settings
    pipe: TimedPipeline
    profile: Any
    plan: Any


async def tiny_bench(
    folder: Path, *, threads: int, size: int, steps: int, jobs: int, warmups: int = 1, **settings: Any
) -> TinyBench:
    """Build the tiny model under ``folder``, load it on the CPU with ``threads`` torch threads, warm it up.

    ``settings`` override ``bench_settings``. The ``warmups`` raw calls at ``size`` and ``steps``
    keep first-call allocations and lazy set-up out of every figure; ``pipe.calls`` starts empty.
    """
    import torch

    from generation.loading import load_pipeline
    from generation.tiny import build_tiny_pipeline

    torch.set_num_threads(threads)
    model_dir = await asyncio.to_thread(build_tiny_pipeline, folder / "tiny")
    config = bench_settings(folder, model=str(model_dir), device="cpu", jobs=jobs, **settings)
    real, profile, plan = await asyncio.to_thread(load_pipeline, config)
    pipe = TimedPipeline(real)
    for i in range(warmups):
        request = bench_request(prompt="warm-up", seed=i, size=size, steps=steps)
        await asyncio.to_thread(raw_call, pipe, request)
    pipe.take()
    return TinyBench(settings=config, pipe=pipe, profile=profile, plan=plan)


@dataclass(slots=True)
class BotPath:
    """A running service with one real worker around an already-built pipeline."""

    service: Any
    store: Any


@contextlib.asynccontextmanager
async def bot_path(
    settings: Settings,
    pipe: Any,
    profile: Any,
    plan: Any,
    *,
    transport: Transport,
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
        service.register(transport)
        await service.start()
        try:
            yield BotPath(service=service, store=store)
        finally:
            await service.close()
    finally:
        await worker.close()
        await store.close()
