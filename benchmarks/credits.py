"""Credit reservations per second on SQLite: add_job + finish_job cycles on a temporary file."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# runnable as a plain script from anywhere: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.domain import DrawRequest, Job, JobState, UserRef
from bot.ports import CreditPolicy
from data import SqliteStore

_REQUEST = DrawRequest(prompt="a red fox in snow", width=1024, height=1024, steps=8, guidance=0.0, count=1)
# large enough that no reservation is refused: the benchmark measures the accepted path
_POLICY = CreditPolicy(allowance=10**9, period="2026-11-30")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One measured mode."""

    mode: str
    reservations: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.reservations / self.seconds if self.seconds else float("inf")


def _job(index: int, user: UserRef) -> Job:
    return Job(
        id=f"job-{index}",
        user=user,
        request=_REQUEST,
        model="z-image-turbo",
        credits=1,
        gpu_seconds=2.0,
        seeds=(index,),
        delivery={"chat": 1},
        created_at=time.time(),
    )


async def _cycle(store: SqliteStore, index: int, user: UserRef) -> None:
    await store.add_job(_job(index, user), policy=_POLICY)
    await store.finish_job(f"job-{index}", JobState.DELIVERED, at=time.time())


async def _run(mode: str, count: int, concurrency: int, connections: int, folder: Path) -> Result:
    path = folder / f"{mode.replace(' ', '_')}.sqlite3"
    stores = [SqliteStore(path) for _ in range(connections)]
    for store in stores:
        await store.start()
    try:
        indexes = iter(range(count))
        picks = itertools.cycle(stores)

        async def worker(number: int) -> None:
            store = next(picks)
            user = UserRef(platform="bench", id=str(number))
            for index in indexes:
                await _cycle(store, index, user)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for number in range(concurrency):
                group.create_task(worker(number))
        seconds = time.perf_counter() - started
    finally:
        for store in stores:
            await store.close()
    return Result(mode=mode, reservations=count, seconds=seconds)


async def measure(count: int, concurrency: int) -> list[Result]:
    """Measure each mode on its own fresh file."""
    with tempfile.TemporaryDirectory(prefix="brushbot-bench-") as tmp:
        folder = Path(tmp)
        return [
            await _run("sequential", count, 1, 1, folder),
            await _run(f"{concurrency} coroutines", count, concurrency, 1, folder),
            await _run(f"{concurrency} coroutines, 2 connections", count, concurrency, 2, folder),
        ]


def _table(results: list[Result]) -> str:
    header = f"{'mode':<34} {'reservations':>12} {'seconds':>8} {'per second':>11} {'ms/cycle':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.mode:<34} {r.reservations:>12} {r.seconds:>8.2f} {r.per_second:>11.0f} "
            f"{1000 * r.seconds / r.reservations:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="reservations per mode (default 2000)")
    parser.add_argument("--concurrency", type=int, default=50, help="coroutines in the concurrent modes")
    args = parser.parse_args(argv)
    print(
        f"brushbot credits benchmark: add_job (reserve) + finish_job (commit) per cycle; "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, WAL, synchronous=NORMAL"
    )
    print(_table(asyncio.run(measure(args.count, args.concurrency))))


if __name__ == "__main__":
    main()
