"""Fair queue speed and fairness: push/pop/remove rates at 100,000 queued jobs, position(), newcomer waits."""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# runnable as a plain script from anywhere: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.fairqueue import FairQueue


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One line of the table."""

    what: str
    value: str
    note: str = ""


def _cost(rng: random.Random) -> float:
    # GPU seconds: mostly single 1024² images, some batches and large sizes
    return rng.choice((1.0, 1.5, 2.0, 4.0, 8.0)) * rng.uniform(0.8, 1.25)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} /s"


def _time(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def throughput(jobs: int, users: int, rng: random.Random) -> list[Row]:
    """Rates with ``jobs`` queued from ``users`` users, and the cost of the queries."""
    queue = FairQueue()
    names = [f"user{n}" for n in range(users)]
    weights = {name: rng.choice((1.0, 1.0, 1.0, 2.0, 0.5)) for name in names}
    plan = [(f"job{n}", rng.choice(names), _cost(rng)) for n in range(jobs)]
    rows: list[Row] = []

    start = time.perf_counter()
    for job, user, cost in plan:
        queue.push(job, user, cost, weight=weights[user])
    rows.append(Row(what=f"push, filling 0 → {jobs:,}", value=_rate(jobs, time.perf_counter() - start)))
    backlogged = len(queue.users())

    batch = jobs // 5
    start = time.perf_counter()
    popped = []
    for _ in range(batch):
        job_id = queue.pop()
        assert job_id is not None
        queue.done(job_id)
        popped.append(job_id)
    rows.append(
        Row(
            what=f"pop + done, {jobs:,} → {jobs - batch:,} queued",
            value=_rate(batch, time.perf_counter() - start),
        )
    )
    refill = [(f"again{n}", rng.choice(names), _cost(rng)) for n in range(batch)]
    start = time.perf_counter()
    for job, user, cost in refill:
        queue.push(job, user, cost, weight=weights[user])
    rows.append(
        Row(what=f"push, {jobs - batch:,} → {jobs:,} queued", value=_rate(batch, time.perf_counter() - start))
    )

    victims = rng.sample(queue.order(), batch // 2)
    start = time.perf_counter()
    for job in victims:
        queue.remove(job)
    rows.append(
        Row(
            what=f"remove (cancel) at ~{jobs:,} queued",
            value=_rate(len(victims), time.perf_counter() - start),
            note="random jobs, heads included",
        )
    )
    for n in range(len(victims)):
        queue.push(f"back{n}", rng.choice(names), _cost(rng))

    order = queue.order()
    n = len(order)
    for label, job in (("next", order[0]), ("middle", order[n // 2]), ("last", order[-1])):
        seconds = _time(partial(queue.position, job), 5)
        rows.append(
            Row(what=f"position() of the {label} job", value=f"{seconds * 1000:.1f} ms", note=f"{n:,} queued")
        )
    seconds = _time(lambda: queue.eta(order[-1], 3.0), 5)
    rows.append(Row(what="eta() of the last job", value=f"{seconds * 1000:.1f} ms"))
    seconds = _time(lambda: queue.order(limit=20), 20)
    rows.append(Row(what="order(limit=20)", value=f"{seconds * 1000:.2f} ms", note="a /queue view"))
    seconds = _time(queue.snapshot, 3)
    rows.append(Row(what="snapshot() of every job", value=f"{seconds * 1000:.0f} ms"))
    seconds = _time(lambda: queue.count_for(names[0]), 10_000)
    rows.append(Row(what="count_for()", value=f"{seconds * 1e6:.2f} µs"))

    queue.push("newcomer", "newcomer", 2.0)
    rows.append(
        Row(
            what="newcomer's wait in this queue",
            value=f"{queue.position('newcomer'):,} jobs",
            note=f"bound: one per backlogged user ({backlogged:,})",
        )
    )
    return rows


def newcomer_waits(users: int, per_user: int, trials: int, rng: random.Random) -> list[Row]:
    """A newcomer's wait behind ``users`` × ``per_user`` jobs, arriving at random moments."""
    rows = []
    queue = FairQueue()
    for i in range(per_user):
        for u in range(users):
            queue.push(f"u{u}-{i}", f"u{u}", _cost(rng))
    queue.push("new", "new", 2.0)
    rows.append(
        Row(
            what=f"newcomer behind {users} × {per_user} jobs, arriving first",
            value=f"{queue.position('new')} jobs",
            note=f"bound {users}; eta {queue.eta('new'):.1f} s",
        )
    )

    waits = []
    for trial in range(trials):
        queue = FairQueue()
        for i in range(per_user):
            for u in range(users):
                queue.push(f"u{u}-{i}", f"u{u}", _cost(rng), weight=rng.choice((1.0, 2.0)))
        for _ in range(rng.randrange(users * per_user // 2)):
            job_id = queue.pop()
            assert job_id is not None
            queue.done(job_id, _cost(rng))  # measured costs differ from the estimates
        running = queue.pop()  # the newcomer arrives while a job runs
        before = len(queue.users())
        queue.push(f"new{trial}", "new", 2.0)
        wait = queue.position(f"new{trial}")
        assert wait <= before, (wait, before)
        waits.append(wait)
        assert running is not None
    rows.append(
        Row(
            what=f"newcomer behind {users} × {per_user} jobs, mid-run",
            value=f"mean {statistics.fmean(waits):.1f}, max {max(waits)} jobs",
            note=f"{trials} random arrivals, bound {users}",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    rows = throughput(args.jobs, args.users, rng)
    rows += newcomer_waits(10, 100, args.trials, rng)

    print(f"FairQueue — {args.jobs:,} jobs from {args.users:,} users, python {platform.python_version()}")
    width = max(len(row.what) for row in rows)
    vwidth = max(len(row.value) for row in rows)
    for row in rows:
        print(f"  {row.what:<{width}}  {row.value:>{vwidth}}  {row.note}")


if __name__ == "__main__":
    main()
