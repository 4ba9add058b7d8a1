"""The bot's own overhead: the same jobs as back-to-back raw pipeline calls and through the whole bot path.

(a) raw: ``pipe(...)`` back to back on one thread. (b) bot: several users submit at once to the
real ``Service`` (fair queue, dispatcher) → ``generation.Worker`` → ``ImageStore`` (PNG + metadata)
→ SQLite → a reply target. (c) the same as (b), but the users type ``/draw`` in private chats of
the fake Telegram Bot API and the real Telegram adapter (python-telegram-bot) takes the
commands and uploads the photos, so delivery is included. Same pipeline object, prompts, seeds
and sizes throughout; the order of (a), (b), (c) alternates between rounds so that a change in
machine load hits all of them. Prints a table and writes JSON.

    .venv/bin/python benchmarks/overhead.py            # 24 jobs × 3 rounds, tiny Z-Image, 512², 8 steps
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Call,
    LoopLag,
    TimedPipeline,
    bench_request,
    bot_path,
    busy_span,
    describe,
    endings,
    fmt,
    gaps_between,
    lag_summary,
    machine,
    mark,
    mb,
    ms,
    peak_rss_bytes,
    quantile,
    queued_before,
    quiet_logs,
    raw_call,
    report,
    rss_bytes,
    run_in_temp,
    table,
    tiny_bench,
    wait_ended,
)
from bot.domain import DrawRequest

PLATFORM = "bench"
#: the issue's goals on this 2-core CPU machine
TARGETS = {"throughput_ratio": 0.90, "loop_lag_p99_ms": 50.0, "gpu_idle_gap_median_ms": 5.0}
_SEED = re.compile(r"\bseed (\d+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What one run measures."""

    jobs: int = 24
    users: int = 4
    size: int = 512
    steps: int = 8
    rounds: int = 3
    threads: int = 1
    telegram: bool = True
    timeout: float = 600.0

    def prompt(self, index: int) -> str:
        return f"a red fox in the snow, study {index}"

    def seed(self, index: int) -> int:
        return 1000 + index

    def request(self, index: int) -> DrawRequest:
        """Job ``index`` as a ``DrawRequest``: the raw calls and the bot draw exactly these."""
        return bench_request(
            prompt=self.prompt(index), seed=self.seed(index), size=self.size, steps=self.steps
        )


@dataclass(slots=True)
class _Round:
    """One round of one path: what its clock, the pipeline and the reply side saw."""

    seconds: float
    cpu: float  # process CPU seconds, every thread (GPU, loop, encoders, SQLite, HTTP)
    calls: list[Call]
    submitted: dict[int, float]  # seed → when it was submitted (perf_counter)
    delivered: dict[int, float]  # seed → when the reply side had the image
    lag: list[float]
    failed: int
    #: CPU seconds of the service's encoder threads (PNG, chat preview, upload reads) in this round
    encode_cpu: float = 0.0


def _encoder_cpu() -> dict[int, float]:
    """CPU seconds so far of each of the service's ``brushbot-encode`` threads, by native thread id."""
    import threading

    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    return {
        t.id: t.user_time + t.system_time
        for t in psutil.Process().threads()
        if names.get(t.id, "").startswith("brushbot-encode")
    }


def _raw_round(pipe: TimedPipeline, cfg: Config) -> _Round:
    pipe.take()
    cpu = time.process_time()
    started = time.perf_counter()
    for i in range(cfg.jobs):
        raw_call(pipe, cfg.request(i))
    seconds = time.perf_counter() - started
    calls = pipe.take()
    return _Round(
        seconds=seconds, cpu=time.process_time() - cpu, calls=calls, submitted={},
        delivered={c.seed: c.end for c in calls}, lag=[], failed=0,
    )  # fmt: skip


async def _timed_round(
    path: Any, pipe: TimedPipeline, cfg: Config, submit_all: Callable[[], Awaitable[None]],
    finished: Callable[[], Awaitable[tuple[dict[int, float], int]]], submitted: dict[int, float],
) -> _Round:  # fmt: skip
    """Run one round through a bot path: submit everything, wait for every delivery, measure."""
    service = path.service
    pipe.take()
    encoders = _encoder_cpu()
    cpu = time.process_time()
    started = time.perf_counter()
    async with LoopLag() as lag:
        await submit_all()
        delivered, failed = await finished()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    encode_cpu = sum(v - encoders.get(k, 0.0) for k, v in _encoder_cpu().items())
    await service.wait_idle()
    return _Round(
        seconds=seconds, cpu=cpu, calls=pipe.take(), submitted=submitted, delivered=delivered, lag=lag.samples,
        failed=failed, encode_cpu=encode_cpu,
    )  # fmt: skip


async def _bot_round(path: Any, pipe: TimedPipeline, hub: Any, cfg: Config) -> _Round:
    """(b): users call ``Service.submit`` at once; the recording reply target ``hub`` takes the results."""
    from bot.domain import UserRef

    service = path.service
    ended_before = len(endings(hub))
    submitted: dict[int, float] = {}
    seed_of: dict[str, int] = {}

    async def user(number: int) -> None:
        who = UserRef(platform=PLATFORM, id=f"user{number}")
        for i in range(number, cfg.jobs, cfg.users):
            submitted[cfg.seed(i)] = time.perf_counter()
            ticket = await service.submit(who, cfg.request(i), delivery={"chat": who.id}, user_name=who.id)
            seed_of[ticket.job.id] = ticket.job.seeds[0]

    async def submit_all() -> None:
        async with asyncio.TaskGroup() as group:
            for number in range(cfg.users):
                group.create_task(user(number))

    async def finished() -> tuple[dict[int, float], int]:
        await wait_ended(hub, ended_before + cfg.jobs, cfg.timeout)
        ends = [e for job_id, e in endings(hub).items() if job_id in seed_of]
        delivered = {seed_of[e.job_id]: e.at for e in ends if e.kind == "delivered"}
        return delivered, sum(1 for e in ends if e.kind == "failed")

    return await _timed_round(path, pipe, cfg, submit_all, finished, submitted)


@dataclass(slots=True)
class _Telegram:
    """The fake Bot API and the real adapter, attached to the benchmark's service."""

    fake: Any
    adapter: Any
    users: list[dict[str, Any]]
    #: perf_counter() − monotonic(): the fake stamps calls with time.monotonic()
    offset: float


@contextlib.asynccontextmanager
async def _telegram(service: Any, settings: Any, users: int) -> AsyncIterator[_Telegram]:
    from pydantic import SecretStr

    from adapters.telegram import TelegramAdapter
    from tests.fakes.telegram_server import FakeTelegram

    # httpx would send even 127.0.0.1 through a configured proxy
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("PTB_TIMEDELTA", "1")
    async with FakeTelegram() as fake:
        tg_settings = settings.model_copy(
            update={
                "telegram_token": SecretStr(fake.token),
                "telegram_base_url": fake.base_url,
                "telegram_base_file_url": fake.base_file_url,
            }
        )
        adapter = TelegramAdapter(service, tg_settings, poll_timeout=5.0)
        await adapter.start()
        try:
            people = [fake.user(1000 + n, f"User{n}", f"user{n}") for n in range(users)]
            for person in people:
                fake.private_chat(person)
            yield _Telegram(
                fake=fake, adapter=adapter, users=people, offset=time.perf_counter() - time.monotonic()
            )
        finally:
            await adapter.close()


async def _telegram_round(path: Any, pipe: TimedPipeline, tg: _Telegram, cfg: Config) -> _Round:
    """(c): users type ``/draw`` in private chats; the adapter answers through the fake Bot API."""
    fake = tg.fake
    photos_before = len(fake.calls_of("sendPhoto"))
    submitted: dict[int, float] = {}

    async def submit_all() -> None:
        for i in range(cfg.jobs):
            person = tg.users[i % cfg.users]
            text = (
                f"/draw {cfg.prompt(i)} --size {cfg.size}x{cfg.size} --steps {cfg.steps} --seed {cfg.seed(i)}"
            )
            submitted[cfg.seed(i)] = time.perf_counter()
            fake.inject_message(fake.chats[person["id"]], person, text)
        await asyncio.sleep(0)

    async def finished() -> tuple[dict[int, float], int]:
        await fake.wait_for("sendPhoto", count=photos_before + cfg.jobs, timeout=cfg.timeout)
        delivered: dict[int, float] = {}
        failed = 0
        for call in fake.calls_of("sendPhoto")[photos_before:]:
            found = _SEED.search(str(call.params.get("caption", "")))
            if call.ok and found:
                delivered.setdefault(int(found.group(1)), call.at + tg.offset)
            else:
                failed += 1
        return delivered, failed

    return await _timed_round(path, pipe, cfg, submit_all, finished, submitted)


def _added_latency(rounds: list[_Round]) -> tuple[list[float], list[float], list[float]]:
    """Per job: (GPU start − when the GPU could have started it) + (delivered − GPU end)."""
    pre: list[float] = []
    post: list[float] = []
    total: list[float] = []
    for r in rounds:
        previous_end: float | None = None
        for call in r.calls:
            if call.seed not in r.submitted or call.seed not in r.delivered:
                continue
            submitted = r.submitted[call.seed]
            ready = submitted if previous_end is None else max(submitted, previous_end)
            before, after = call.start - ready, r.delivered[call.seed] - call.end
            pre.append(before)
            post.append(after)
            total.append(before + after)
            previous_end = call.end
    return pre, post, total


def _drawn(rounds: list[_Round]) -> dict[str, Any]:
    """What the pipeline was called for in each round: how many calls, which seeds (sorted)."""
    return {
        "round_calls": [len(r.calls) for r in rounds],
        "round_seeds": [sorted(c.seed for c in r.calls) for r in rounds],
    }


def _summary(rounds: list[_Round], raw: list[_Round], cfg: Config) -> dict[str, Any]:
    """The figures of one bot path over all rounds, against the raw calls of the same rounds."""
    raw_total = sum(r.seconds for r in raw)
    total = sum(r.seconds for r in rounds)
    pre, post, added = _added_latency(rounds)
    gaps: list[float] = []
    for r in rounds:
        gaps += gaps_between(r.calls, queued_before(r.submitted))
    delivered = sum(len(r.delivered) for r in rounds)
    return {
        "seconds": round(total, 4),
        "throughput_ratio": round(raw_total / total, 4) if total else None,
        # the GPU thread's pace while jobs waited: leaves out the first submit and the last delivery
        "steady_ratio": round(raw_total / spans, 4)
        if (spans := sum(busy_span(r.calls) for r in rounds))
        else None,
        "rounds": [round(a.seconds / r.seconds, 4) for a, r in zip(raw, rounds, strict=True)],
        "pipe_call_median_ms": ms(quantile([c.seconds for r in rounds for c in r.calls], 0.5)),
        "pipe_call_cpu_median_ms": ms(quantile([c.cpu for r in rounds for c in r.calls], 0.5)),
        "cpu_ms_per_job": ms(sum(r.cpu for r in rounds) / (cfg.jobs * len(rounds))),
        "encode_cpu_ms_per_job": ms(sum(r.encode_cpu for r in rounds) / (cfg.jobs * len(rounds))),
        "jobs_delivered": delivered,
        "jobs_failed": sum(r.failed for r in rounds),
        "lost_jobs": cfg.jobs * len(rounds) - delivered,
        "added_latency_ms": {
            "median": ms(quantile(added, 0.5)),
            "p95": ms(quantile(added, 0.95)),
            "before_gpu_median": ms(quantile(pre, 0.5)),
            "after_gpu_median": ms(quantile(post, 0.5)),
        },
        "gpu_idle_gap_ms": {
            "count": len(gaps),
            "median": ms(quantile(gaps, 0.5)),
            "max": ms(max(gaps) if gaps else None),
        },
        "loop_lag_ms": lag_summary([s for r in rounds for s in r.lag]),
        **_drawn(rounds),
    }


async def _measure(cfg: Config, folder: Path) -> dict[str, Any]:
    from bot.recording import RecordingHub

    tiny = await tiny_bench(
        folder, threads=cfg.threads, size=cfg.size, steps=cfg.steps, jobs=cfg.jobs, warmups=2
    )
    settings, pipe, profile, plan = tiny.settings, tiny.pipe, tiny.profile, tiny.plan
    rss_ready = rss_bytes()

    hub = RecordingHub(platform=PLATFORM)
    rounds: dict[str, list[_Round]] = {"raw": [], "bot": [], "telegram": []}
    telegram_note = "skipped (--no-telegram)"
    async with contextlib.AsyncExitStack() as stack:
        path = await stack.enter_async_context(bot_path(settings, pipe, profile, plan, transport=hub))
        # the worker thread's first job pays for its own thread-local set-up: keep it out too
        warm = await _bot_round(path, pipe, hub, Config(jobs=1, users=1, size=cfg.size, steps=cfg.steps))
        if warm.failed or not warm.delivered:
            raise RuntimeError("the warm-up job through the bot failed")
        tg: _Telegram | None = None
        if cfg.telegram:
            try:
                tg = await stack.enter_async_context(_telegram(path.service, settings, cfg.users))
            except ImportError as err:  # a checkout without the adapter or its fake
                telegram_note = f"not measured: {err}"

        async def raw_step() -> _Round:
            return await asyncio.to_thread(_raw_round, pipe, cfg)

        async def bot_step() -> _Round:
            return await _bot_round(path, pipe, hub, cfg)

        steps: dict[str, Callable[[], Awaitable[_Round]]] = {"raw": raw_step, "bot": bot_step}
        if tg is not None:
            telegram = tg

            async def telegram_step() -> _Round:
                return await _telegram_round(path, pipe, telegram, cfg)

            steps["telegram"] = telegram_step
        order = list(steps)
        for number in range(cfg.rounds):
            # alternate the order, so a change in machine load does not always favour one side
            for name in order if number % 2 == 0 else reversed(order):
                rounds[name].append(await steps[name]())
        stats = await path.store.job_stats()

    raw = rounds["raw"]
    raw_calls = [c for r in raw for c in r.calls]
    bot = _summary(rounds["bot"], raw, cfg)
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "machine": machine(),
        "config": {
            "model": "tiny z-image (random weights)",
            "jobs": cfg.jobs,
            "users": cfg.users,
            "size": cfg.size,
            "steps": cfg.steps,
            "rounds": cfg.rounds,
            "torch_threads": cfg.threads,
        },
        "raw": {
            "seconds": round(sum(r.seconds for r in raw), 4),
            "rounds_s": [round(r.seconds, 4) for r in raw],
            "per_job_median_ms": ms(quantile([c.seconds for c in raw_calls], 0.5)),
            "pipe_call_cpu_median_ms": ms(quantile([c.cpu for c in raw_calls], 0.5)),
            "gap_median_ms": ms(quantile(gaps_between(raw_calls), 0.5)),
            "cpu_ms_per_job": ms(sum(r.cpu for r in raw) / (cfg.jobs * len(raw))),
            **_drawn(raw),
        },
        "bot": {
            **bot,
            "store": {"by_state": stats["by_state"], "credits_committed": stats["credits_committed"]},
        },
        # the headline figures are those of (b), the bot path with a recording reply target
        "throughput_ratio": bot["throughput_ratio"],
        "added_latency_ms": bot["added_latency_ms"],
        "gpu_idle_gap_ms": bot["gpu_idle_gap_ms"],
        "loop_lag_ms": bot["loop_lag_ms"],
        "lost_jobs": bot["lost_jobs"],
        "telegram": _summary(rounds["telegram"], raw, cfg) if rounds["telegram"] else {"note": telegram_note},
        "rss_mb": {"ready": mb(rss_ready), "end": mb(rss_bytes()), "peak": mb(peak_rss_bytes())},
    }
    result["targets"] = _verdicts(result)
    return result


def _verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    def at_least(value: float | None, goal: float) -> bool | None:
        return None if value is None else value >= goal

    def below(value: float | None, goal: float) -> bool | None:
        return None if value is None else value < goal

    telegram = result["telegram"]
    return {
        "throughput_ratio": at_least(result["throughput_ratio"], TARGETS["throughput_ratio"]),
        "loop_lag_p99_ms": below(result["loop_lag_ms"]["p99"], TARGETS["loop_lag_p99_ms"]),
        "gpu_idle_gap_median_ms": below(
            result["gpu_idle_gap_ms"]["median"], TARGETS["gpu_idle_gap_median_ms"]
        ),
        "no_lost_jobs": result["lost_jobs"] == 0 and telegram.get("lost_jobs", 0) == 0,
    }


def render(result: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    c, t = result["config"], result["targets"]
    raw, bot, tg = result["raw"], result["bot"], result["telegram"]
    paths = [("(b) bot", bot)] + ([("(c) Telegram", tg)] if "seconds" in tg else [])

    def each(pick: Callable[[dict[str, Any]], str]) -> list[str]:
        return [pick(p) for _, p in paths]

    head = (
        f"brushbot overhead: {c['jobs']} jobs × {c['rounds']} rounds, {c['users']} users, tiny Z-Image "
        f"{c['size']}x{c['size']}, {c['steps']} steps, torch threads {c['torch_threads']}\n"
        f"{describe(result['machine'])}"
    )
    rounds = table(
        ["round", "(a) raw s", *(f"{name} ratio" for name, _ in paths)],
        [
            [str(i + 1), fmt(raw["rounds_s"][i]), *(fmt(p["rounds"][i], 3) for _, p in paths)]
            for i in range(len(raw["rounds_s"]))
        ],
    )
    metrics = table(
        ["metric (raw: (a))", *(name for name, _ in paths), "goal for (b)", ""],
        [
            ["throughput ratio vs (a), end to end", *each(lambda p: fmt(p["throughput_ratio"], 3)), "≥ 0.90",
             mark(t["throughput_ratio"])],
            ["  GPU-thread pace while jobs waited vs (a)", *each(lambda p: fmt(p["steady_ratio"], 3)), "", ""],
            ["pipe call median ms (raw " + fmt(raw["per_job_median_ms"], 1) + ")",
             *each(lambda p: fmt(p["pipe_call_median_ms"], 1)), "", ""],
            ["  its CPU time on the GPU thread (raw " + fmt(raw["pipe_call_cpu_median_ms"], 1) + ")",
             *each(lambda p: fmt(p["pipe_call_cpu_median_ms"], 1)), "", ""],
            ["CPU ms per job, all threads (raw " + fmt(raw["cpu_ms_per_job"], 1) + ")",
             *each(lambda p: fmt(p["cpu_ms_per_job"], 1)), "", ""],
            ["  of it on the encoder threads (PNG, preview, uploads)",
             *each(lambda p: fmt(p["encode_cpu_ms_per_job"], 1)), "", ""],
            ["added latency per job, median / p95 ms",
             *each(lambda p: f"{fmt(p['added_latency_ms']['median'], 1)} / {fmt(p['added_latency_ms']['p95'], 1)}"),
             "", ""],
            ["  before the GPU / after it, median ms",
             *each(lambda p: f"{fmt(p['added_latency_ms']['before_gpu_median'], 1)} / "
                             f"{fmt(p['added_latency_ms']['after_gpu_median'], 1)}"), "", ""],
            ["GPU-thread idle gap, median / max ms",
             *each(lambda p: f"{fmt(p['gpu_idle_gap_ms']['median'])} / {fmt(p['gpu_idle_gap_ms']['max'])}"),
             "median < 5", mark(t["gpu_idle_gap_median_ms"])],
            ["event-loop lag while drawing, p50 / p99 ms",
             *each(lambda p: f"{fmt(p['loop_lag_ms']['p50'])} / {fmt(p['loop_lag_ms']['p99'])}"),
             "p99 < 50", mark(t["loop_lag_p99_ms"])],
            ["lost jobs", *each(lambda p: str(p["lost_jobs"])), "0", mark(t["no_lost_jobs"])],
        ],
    )  # fmt: skip
    foot = f"peak RSS {fmt(result['rss_mb']['peak'], 0)} MB (whole process, all paths)"
    if "note" in tg:
        foot += f"\n(c) Telegram: {tg['note']}"
    return f"{head}\n\n{rounds}\n\n{metrics}\n{foot}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=24, help="jobs per round (default 24)")
    parser.add_argument("--users", type=int, default=4, help="users submitting at once (default 4)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the order alternating (default 3)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the other core encodes PNGs)"
    )
    parser.add_argument("--no-telegram", action="store_true", help="skip (c), the fake Telegram in the loop")
    parser.add_argument("--json", help="where to write the JSON (default $OUT or outputs/benchmarks)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.users < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--jobs, --users, --rounds and --threads must be at least 1")
    quiet_logs()
    cfg = Config(
        jobs=args.jobs,
        users=min(args.users, args.jobs),
        size=args.size,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        telegram=not args.no_telegram,
    )
    result = run_in_temp("brushbot-overhead-", lambda folder: _measure(cfg, folder))
    report(result, render, "overhead.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
