"""Soak: many jobs from many users through the whole service on the tiny model; nothing may be lost.

Each user keeps a couple of jobs waiting and submits the next as soon as one ends, so the
service runs at a steady state. Each user gets exactly the credits their jobs cost. Reports jobs
lost (must be 0), jobs refused at submit (must be 0: a credit leaked shows up here), credit
mismatches (must be 0: every user's used credits equal the credits of their delivered jobs, and
every job's ledger is exactly one reservation and one commit) and RSS after job 100 and after
the last job (1,000).

    .venv/bin/python benchmarks/soak.py                # 1,000 jobs, 50 users, 64², 8 steps
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    LoopLag,
    bench_request,
    bot_path,
    describe,
    fmt,
    machine,
    mark,
    mb,
    ms,
    peak_rss_bytes,
    quantile,
    quiet_logs,
    report,
    rss_bytes,
    run_in_temp,
    table,
    tiny_bench,
)
from bot.budget import Budget, Unlimited
from bot.domain import DrawRequest, Job, LedgerKind, SavedImage, UserRef, credit_cost
from bot.ports import Lane, LaneKind, Phase

PLATFORM = "soak"
#: the issue's goal: RSS may grow less than this from job 100 to the last job
RSS_GROWTH_GOAL_PCT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What one soak run does."""

    jobs: int = 1000
    users: int = 50
    size: int = 64
    steps: int = 8
    waiting_per_user: int = 2
    threads: int = 1
    timeout: float = 1800.0

    @property
    def first_mark(self) -> int:
        """After how many finished jobs the first RSS reading is taken (job 100 of 1,000)."""
        return max(1, self.jobs // 10)


@dataclass(slots=True)
class _Tally:
    """Counts what every reply target saw; keeps no per-job objects once a job has ended."""

    cfg: Config
    slots: dict[str, asyncio.Semaphore]
    delivered: Counter[str] = field(default_factory=Counter)  # job id → deliveries (must be 1)
    failed: dict[str, str] = field(default_factory=dict)
    delivered_by_user: Counter[str] = field(default_factory=Counter)
    rss: dict[int, int] = field(default_factory=dict)
    ended: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lag: LoopLag = field(default_factory=LoopLag)

    def end(self, job: Job) -> None:
        """``job`` was delivered or failed: its user's slot is free again."""
        self._ended(job.user)

    def skip(self, user: UserRef) -> None:
        """A job of ``user`` was refused at submit: it never ran, but it is over all the same."""
        self._ended(user)

    def _ended(self, user: UserRef) -> None:
        self.ended += 1
        self.slots[user.key].release()
        if self.ended in (self.cfg.first_mark, self.cfg.jobs):
            with self.lag.excluded():  # the measurement's own pause, not the bot's
                gc.collect()  # a leak is what survives a collection; garbage awaiting one is not
                self.rss[self.ended] = rss_bytes()
        if self.ended >= self.cfg.jobs:
            self.done.set()


class _SoakTransport:
    """The soak's chat: counts deliveries and failures per job; no budget, nothing shown."""

    platform = PLATFORM

    def __init__(self, tally: _Tally) -> None:
        self._tally = tally

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        return Lane(key=f"{PLATFORM}:{delivery.get('chat', '')}", kind=LaneKind.PRIVATE)

    def budget(self, lane: Lane) -> Budget:
        return Unlimited()

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        return 1

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        return None

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        tally = self._tally
        tally.delivered[job.id] += 1
        if tally.delivered[job.id] == 1:
            tally.delivered_by_user[job.user.key] += 1
            tally.end(job)

    async def notice(self, job: Job, text: str) -> None:
        if job.id not in self._tally.failed and job.id not in self._tally.delivered:
            self._tally.failed[job.id] = text
            self._tally.end(job)

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        return None

    async def board(self, lane: Lane, text: str | None) -> None:
        return None


def _request(cfg: Config, index: int) -> DrawRequest:
    return bench_request(prompt=f"soak {index}", seed=index, size=cfg.size, steps=cfg.steps)


async def _credit_mismatches(path: Any, users: list[UserRef], tally: _Tally, cost: int) -> list[str]:
    """Every way the credits disagree with what was delivered, one line each (empty when all agree)."""
    service = path.service
    problems: list[str] = []
    for user in users:
        balance = await service.credits(user)
        expected = tally.delivered_by_user[user.key] * cost
        if balance.used != expected:
            problems.append(f"{user.key}: {balance.used} credits used, {expected} delivered")
        per_job: dict[str, Counter[LedgerKind]] = {}
        for entry in await path.store.history(user, limit=100_000):
            if entry.job_id is not None:
                per_job.setdefault(entry.job_id, Counter())[entry.kind] += 1
        for job_id, kinds in per_job.items():
            want = Counter({LedgerKind.RESERVE: 1, LedgerKind.COMMIT: 1})
            if job_id in tally.failed:
                want = Counter({LedgerKind.RESERVE: 1, LedgerKind.REFUND: 1})
            if kinds != want:
                problems.append(f"{user.key}: job {job_id} ledger {dict(kinds)}")
    return problems


async def _measure(cfg: Config, folder: Path) -> dict[str, Any]:
    from bot.errors import BotError

    tiny = await tiny_bench(
        folder,
        threads=cfg.threads,
        size=cfg.size,
        steps=cfg.steps,
        jobs=cfg.jobs,
        max_queued_per_user=cfg.waiting_per_user,
        max_queued_total=cfg.users * cfg.waiting_per_user,
    )
    pipe, profile, plan = tiny.pipe, tiny.profile, tiny.plan
    # every job costs the same; above the model's default size that is more than 1 credit
    cost = credit_cost(_request(cfg, 0), profile)
    # exactly enough credits: any credit leaked by the service shows up as a refused job
    settings = tiny.settings.model_copy(update={"daily_credits": math.ceil(cfg.jobs / cfg.users) * cost})

    users = [UserRef(platform=PLATFORM, id=f"user{n:03d}") for n in range(cfg.users)]
    tally = _Tally(cfg=cfg, slots={u.key: asyncio.Semaphore(cfg.waiting_per_user) for u in users})
    submitted: list[str] = []
    refused: list[str] = []
    async with bot_path(settings, pipe, profile, plan, transport=_SoakTransport(tally)) as path:
        service = path.service

        async def user(number: int) -> None:
            who = users[number]
            for i in range(number, cfg.jobs, cfg.users):
                await tally.slots[who.key].acquire()
                try:
                    ticket = await service.submit(who, _request(cfg, i), delivery={"chat": who.id})
                except BotError as err:
                    refused.append(f"{who.key} job {i}: {err}")
                    tally.skip(who)
                    continue
                submitted.append(ticket.job.id)

        pipe.take()
        started = time.perf_counter()
        async with tally.lag as lag:
            async with asyncio.TaskGroup() as group:
                for number in range(cfg.users):
                    group.create_task(user(number))
            async with asyncio.timeout(cfg.timeout):
                while tally.ended < cfg.jobs:
                    tally.done.clear()
                    await tally.done.wait()
        seconds = time.perf_counter() - started
        await service.wait_idle()
        calls = pipe.take()
        stats = await path.store.job_stats()
        unfinished = await path.store.unfinished_jobs()
        mismatches = await _credit_mismatches(path, users, tally, cost)

    delivered_once = sum(1 for j in submitted if tally.delivered[j] == 1)
    duplicates = sum(1 for n in tally.delivered.values() if n > 1)
    # lost: accepted, then never delivered exactly once; a refusal is reported on its own (never a success)
    lost = len(submitted) - delivered_once
    first, last = tally.rss.get(cfg.first_mark), tally.rss.get(cfg.jobs)
    growth = None if not first or not last else round(100.0 * (last - first) / first, 2)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "machine": machine(),
        "config": {
            "model": "tiny z-image (random weights)",
            "jobs": cfg.jobs,
            "users": cfg.users,
            "size": cfg.size,
            "steps": cfg.steps,
            "waiting_per_user": cfg.waiting_per_user,
            "torch_threads": cfg.threads,
        },
        "seconds": round(seconds, 3),
        "jobs_per_second": round(cfg.jobs / seconds, 3) if seconds else None,
        "submitted": len(submitted),
        "delivered": delivered_once,
        "failed": len(tally.failed),
        "refused": len(refused),
        "credits_per_job": cost,
        "duplicate_deliveries": duplicates,
        "lost_jobs": lost,
        "store": {
            "by_state": stats["by_state"],
            "credits_committed": stats["credits_committed"],
            "unfinished": len(unfinished),
        },
        "credit_mismatches": len(mismatches),
        "credit_problems": mismatches[:20],
        "errors": (refused + [f"{j}: {m}" for j, m in tally.failed.items()])[:20],
        "pipe_call_median_ms": ms(quantile([c.seconds for c in calls], 0.5)),
        "loop_lag_ms": lag.summary(),
        "rss_mb": {
            f"after_job_{cfg.first_mark}": None if first is None else mb(first),
            f"after_job_{cfg.jobs}": None if last is None else mb(last),
            "growth_pct": growth,
            "peak": mb(peak_rss_bytes()),
        },
    }
    result["targets"] = {
        "no_lost_jobs": lost == 0,
        "none_refused": not refused,
        "no_credit_mismatches": not mismatches,
        "rss_growth_pct": None if growth is None else growth < RSS_GROWTH_GOAL_PCT,
    }
    return result


def render(result: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    c, t, rss = result["config"], result["targets"], result["rss_mb"]
    first, last = (k for k in rss if k.startswith("after_job_"))
    head = (
        f"brushbot soak: {c['jobs']} jobs from {c['users']} users through the service, tiny Z-Image "
        f"{c['size']}x{c['size']}, {c['steps']} steps, ≤ {c['waiting_per_user']} waiting per user\n"
        f"{describe(result['machine'])}"
    )
    body = table(
        ["metric", "value", "goal", ""],
        [
            ["wall time s / jobs per s", f"{fmt(result['seconds'], 1)} / {fmt(result['jobs_per_second'], 1)}", "", ""],
            ["delivered / submitted", f"{result['delivered']} / {result['submitted']}", "", ""],
            ["jobs lost", str(result["lost_jobs"]), "0", mark(t["no_lost_jobs"])],
            ["jobs refused at submit", str(result["refused"]), "0", mark(t["none_refused"])],
            ["credit mismatches", str(result["credit_mismatches"]), "0", mark(t["no_credit_mismatches"])],
            [f"RSS MB after job {first.removeprefix('after_job_')} / {last.removeprefix('after_job_')}",
             f"{fmt(rss[first], 1)} / {fmt(rss[last], 1)}", "", ""],
            ["RSS growth %", fmt(rss["growth_pct"], 2), "< 5", mark(t["rss_growth_pct"])],
            ["event-loop lag p50 / p99 ms",
             f"{fmt(result['loop_lag_ms']['p50'])} / {fmt(result['loop_lag_ms']['p99'])}", "", ""],
        ],
    )  # fmt: skip
    return f"{head}\n\n{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in all (default 1000)")
    parser.add_argument("--users", type=int, default=50, help="users (default 50)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    parser.add_argument("--waiting", type=int, default=2, help="jobs each user keeps waiting (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", help="where to write the JSON (default $OUT or outputs/benchmarks)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.users < 1 or args.waiting < 1:
        parser.error("--jobs, --users and --waiting must be at least 1")
    quiet_logs()
    cfg = Config(
        jobs=args.jobs,
        users=min(args.users, args.jobs),
        size=args.size,
        steps=args.steps,
        waiting_per_user=args.waiting,
        threads=args.threads,
    )
    result = run_in_temp("brushbot-soak-", lambda folder: _measure(cfg, folder))
    report(result, render, "soak.json", args.json)
    return (
        0
        if all(result["targets"][k] for k in ("no_lost_jobs", "none_refused", "no_credit_mismatches"))
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
