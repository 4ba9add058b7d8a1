"""Busy chats: many people drawing in one Telegram group or Discord channel, against the platforms' limits.

The users type ``/draw`` into the fakes (``tests/fakes/``), which enforce the platforms' limits
for real: the Telegram fake at most 20 counted calls (messages, album items, edits, reactions)
in any 60 s per group and 429 with ``retry_after`` over that, the Discord fake its per-route
buckets with rate-limit headers and 429s. The real adapters (python-telegram-bot, discord.py)
take the commands and deliver the images from the real service and worker on the tiny model.

    (a) N users in one Telegram group, one job each: time until all are delivered against the
        raw pipeline time of the same images (back-to-back calls); goal ≤ 2 × raw + 3 s
    (b) M jobs from K users in one group: all delivered, group messages per image (goal ≤ 1.15),
        429s (goal 0), total time
    (c) the same two in one Discord channel (``discord a``, ``discord b``); its messages are the
        posts and edits in the channel (follow-ups, webhook and channel messages) beyond the
        acknowledgement every interaction must get (counted apart)
    (d) mixed: a busy group and a few private chats at once; the private users' latency
    (e) mixed busy: a group with more results waiting than its budget, and private chats that
        ask a little later; their latency shows whether the GPU draws for chats that can receive
        first (``mixed busy``, DELIVERY_AHEAD's default) or in fair order regardless
        (``mixed busy in fair order``: DELIVERY_AHEAD=0)

    .venv/bin/python benchmarks/busy_chat.py           # tiny Z-Image, 512², 8 steps, 20 per 60 s
    .venv/bin/python benchmarks/busy_chat.py --quick   # a few jobs, 64², 20 per 3 s: a smoke run

How the adapters are built and started is in ``start_telegram`` and ``start_discord`` only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    TimedPipeline,
    TinyBench,
    bench_request,
    bot_path,
    describe,
    fmt,
    machine,
    mark,
    quantile,
    quiet_logs,
    raw_call,
    report,
    run_in_temp,
    table,
    tiny_bench,
)
from bot.config import Settings
from bot.domain import DrawRequest
from tests.fakes.discord_server import Bucket, FakeDiscord
from tests.fakes.telegram_server import GROUP_LIMIT, FakeTelegram, Limit

#: the issue's goals
GOAL_FACTOR, GOAL_SLACK_S = 2.0, 3.0  # (a): delivered within 2 × raw + 3 s
GOAL_PER_IMAGE = 1.15  # (b): group messages per image
GROUP_ID = -100_900
DISCORD_TOKEN = "bench-bot-token-Zm9vYmFyYmF6cXV4"
_SEED = re.compile(r"\bseed[: ]+(\d+)", re.IGNORECASE)
_ENDED = ("delivered", "failed", "cancelled")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What one run measures."""

    size: int = 512
    steps: int = 8
    threads: int = 1
    burst_users: int = 12  # (a)
    busy_jobs: int = 40  # (b)
    busy_users: int = 20
    mixed_group_users: int = 12  # (d)
    mixed_private_users: int = 3
    #: (e): the private chats ask once this many of the group's photos were sent, its budget
    #: nearly spent and its backlog still on the GPU
    private_after_photos: int = 16
    delivery_ahead: float | None = None  # DELIVERY_AHEAD for the runs; None: the setting's default
    group_limit: Limit = GROUP_LIMIT
    discord_buckets: dict[str, Bucket] = field(default_factory=dict)  # overrides of the fake's
    cases: tuple[str, ...] = ("telegram a", "telegram b", "discord a", "discord b", "mixed", "mixed busy",
                              "mixed busy in fair order")  # fmt: skip
    timeout: float = 1800.0

    def request(self, case: int, index: int) -> DrawRequest:
        """Job ``index`` of case number ``case``; seeds are unique across the run."""
        seed = 10_000 * (case + 1) + index
        return bench_request(
            prompt=f"a lighthouse in a storm, study {seed}", seed=seed, size=self.size, steps=self.steps
        )

    def command(self, request: DrawRequest) -> str:
        """What a user types for ``request``."""
        return f"{request.prompt} --size {request.width}x{request.height} --steps {request.steps} --seed {request.seed}"


QUICK = Config(
    size=64,
    steps=2,
    burst_users=4,
    # today's adapter meters itself with PTB's AIORateLimiter (20 a minute per group, deletes
    # included, then one every 3 s): six jobs stay under it, so a smoke run takes seconds
    busy_jobs=6,
    busy_users=3,
    mixed_group_users=4,
    mixed_private_users=2,
    private_after_photos=3,
    group_limit=Limit(calls=20, window=3.0),
    discord_buckets={
        "POST /channels/{channel_id}/messages": Bucket(name="channel-message-create", limit=5, per=1.0)
    },
    timeout=300.0,
)


# ---------------------------------------------------------------------------- the adapters (re-point here)


def _env_for_fakes() -> None:
    # httpx would send even 127.0.0.1 through a configured proxy
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    os.environ.setdefault("PTB_TIMEDELTA", "1")


@contextlib.asynccontextmanager
async def start_telegram(service: Any, settings: Settings, fake: FakeTelegram) -> AsyncIterator[None]:
    """The Telegram adapter, as production builds it, on ``fake``; the one place to re-point.

    Its group budget is the fake's limit (the real 20 in any 60 s unless ``--quick`` shortens it).
    """
    from pydantic import SecretStr

    from adapters.telegram import TelegramAdapter

    _env_for_fakes()
    update = {
        "telegram_token": SecretStr(fake.token),
        "telegram_base_url": fake.base_url,
        "telegram_base_file_url": fake.base_file_url,
    }
    limit = fake.group_limit
    budget = {"group_limit": limit.calls, "group_window": limit.window} if limit is not None else {}
    adapter = TelegramAdapter(service, settings.model_copy(update=update), poll_timeout=5.0, **budget)
    await adapter.start()
    try:
        yield
    finally:
        await adapter.close()


@contextlib.asynccontextmanager
async def start_discord(service: Any, settings: Settings, fake: FakeDiscord) -> AsyncIterator[None]:
    """Today's Discord adapter, as production builds it, on ``fake``; the one place to re-point."""
    from pydantic import SecretStr

    from adapters.discord import DiscordAdapter

    update = {
        "discord_token": SecretStr(fake.token),
        "discord_api_base_url": fake.url,
        "discord_gateway_url": fake.gateway_url,
    }
    adapter = DiscordAdapter(service, settings.model_copy(update=update), guild_ready_timeout=0.5)
    await adapter.start()
    try:
        yield
    finally:
        await adapter.close()


# ---------------------------------------------------------------------------- what arrived


def _seed_of(data: bytes, caption: str) -> int | None:
    """The seed of a delivered image: its PNG metadata, else its caption."""
    from PIL import Image

    from generation.images import PARAMETERS_KEY, parse_parameters

    with contextlib.suppress(Exception):  # not a PNG (a JPEG fallback, a document): try the caption
        with Image.open(io.BytesIO(data)) as img:
            text = dict(getattr(img, "text", {}) or {}).get(PARAMETERS_KEY)
        if text:
            seed = parse_parameters(text).get("seed")
            if seed is not None:
                return int(seed)
    found = _SEED.search(caption)
    return int(found.group(1)) if found else None


class Arrivals:
    """Images that reached the chats, by seed: when (the fake's monotonic clock) and where."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.chat: dict[int, int] = {}
        self._seen = 0

    def telegram(self, fake: FakeTelegram) -> None:
        for call in fake.calls[self._seen :]:
            if call.ok and call.method in ("sendPhoto", "sendDocument", "sendMediaGroup"):
                media = call.params.get("media")
                captions = [str(m.get("caption", "")) for m in media] if isinstance(media, list) else []
                for n, upload in enumerate(call.uploads):
                    caption = captions[n] if n < len(captions) else str(call.params.get("caption", ""))
                    self._add(_seed_of(upload.data, caption), call.at, call.chat_id or 0)
        self._seen = len(fake.calls)

    def discord(self, fake: FakeDiscord) -> None:
        for request in fake.requests[self._seen :]:
            if request.files and 200 <= request.status < 300:
                content = (
                    str((request.json or {}).get("content", "")) if isinstance(request.json, dict) else ""
                )
                data = request.json.get("data") if isinstance(request.json, dict) else None
                if isinstance(data, dict):  # an interaction callback carries its message in ``data``
                    content = str(data.get("content", content))
                for upload in request.files:
                    self._add(_seed_of(upload.data, content), request.at, request.channel_id or 0)
        self._seen = len(fake.requests)

    def _add(self, seed: int | None, at: float, chat: int) -> None:
        if seed is not None and seed not in self.at:
            self.at[seed] = at
            self.chat[seed] = chat


async def _until_ended(store: Any, jobs: int, timeout: float) -> dict[str, int]:
    """Poll the store until ``jobs`` jobs are in it and all have ended; the states then.

    A job is recorded as delivered only after the platform answered the upload, so the fake has
    every arrival by then. Polling costs no precision: the times come from the fakes' records.
    """
    deadline = time.monotonic() + timeout
    while True:
        states: dict[str, int] = (await store.job_stats())["by_state"]
        if sum(states.values()) >= jobs and sum(states[s] for s in _ENDED) >= sum(states.values()):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every job ended within {timeout:.0f} s: {states}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- one case


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One job of a case: who asks where."""

    user: int
    private: bool
    request: DrawRequest


def _raw_seconds(pipe: TimedPipeline, jobs: Sequence[Job]) -> float:
    """The same images as back-to-back pipeline calls (what ``benchmarks/overhead.py`` calls raw)."""
    pipe.take()
    started = time.perf_counter()
    for job in jobs:
        raw_call(pipe, job.request)
    seconds = time.perf_counter() - started
    pipe.take()
    return seconds


@contextlib.asynccontextmanager
async def _service(
    tiny: TinyBench, folder: Path, name: str, jobs: int, delivery_ahead: float | None = None
) -> AsyncIterator[Any]:
    """A fresh service (own database) around the warm pipeline, for one case."""
    from bot.recording import RecordingHub

    slug = name.replace(" ", "-")
    settings = tiny.settings.model_copy(
        update={
            "db_path": folder / f"{slug}.sqlite3",
            "output_dir": folder / f"out-{slug}",
            "max_queued_per_user": max(jobs, 1),
            "max_queued_total": max(jobs, 1),
        }
        | ({} if delivery_ahead is None else {"delivery_ahead": delivery_ahead})
    )
    hub = RecordingHub(platform="bench")  # nothing is submitted for it: the adapters bring the jobs
    async with bot_path(settings, tiny.pipe, tiny.profile, tiny.plan, transport=hub) as path:
        yield path, settings


def _latencies(jobs: Sequence[Job], sent: dict[int, float], arrivals: Arrivals) -> list[float]:
    return [arrivals.at[j.request.seed] - sent[j.request.seed] for j in jobs if j.request.seed in arrivals.at]


def _summary(
    name: str, jobs: Sequence[Job], raw_s: float, sent: dict[int, float], arrivals: Arrivals,
    states: dict[str, int], messages: int, refused: int, extra: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    start = min(sent.values())
    delivered = [j for j in jobs if j.request.seed in arrivals.at]
    end = max((arrivals.at[j.request.seed] for j in delivered), default=start)
    shared = [j for j in jobs if not j.private]
    images = sum(1 for j in shared if j.request.seed in arrivals.at)
    latency = _latencies(jobs, sent, arrivals)
    return {
        "case": name,
        "jobs": len(jobs),
        "users": len({j.user for j in jobs}),
        "delivered": len(delivered),
        "failed": states.get("failed", 0),
        "raw_s": round(raw_s, 3),
        "deliver_s": round(end - start, 3),
        "goal_s": round(GOAL_FACTOR * raw_s + GOAL_SLACK_S, 3),
        "messages": messages,
        "per_image": round(messages / images, 3) if images else None,
        "rate_limited": refused,
        "latency_s": {
            "median": _round(quantile(latency, 0.5)),
            "max": _round(max(latency, default=None)),
        },
        **extra,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def _telegram_case(
    cfg: Config, tiny: TinyBench, folder: Path, name: str, number: int, groups: int, privates: int,
    jobs_each: int, private_after_photos: int = 0, jobs: list[Job] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``groups`` users in the group and ``privates`` in private chats, ``jobs_each`` jobs each, typed at
    once (the private ones once ``private_after_photos`` of the group's photos were sent)."""
    jobs = jobs or [
        Job(user=u, private=u >= groups, request=cfg.request(number, k * (groups + privates) + u))
        for k in range(jobs_each)
        for u in range(groups + privates)
    ]
    raw_s = await asyncio.to_thread(_raw_seconds, tiny.pipe, jobs)
    async with (
        FakeTelegram(group_limit=cfg.group_limit) as fake,
        _service(tiny, folder, name, len(jobs), cfg.delivery_ahead) as (path, settings),
        start_telegram(path.service, settings, fake),
    ):
        group = fake.group(GROUP_ID, "busy artists")
        people = [fake.user(5000 + u, f"User{u}", f"user{u}") for u in range(groups + privates)]
        chats = [group if u < groups else fake.private_chat(people[u]) for u in range(groups + privates)]
        before = len(fake.calls)
        sent: dict[int, float] = {}
        waited = not private_after_photos
        for job in sorted(jobs, key=lambda j: j.private) if private_after_photos else jobs:
            if job.private and not waited:
                await fake.wait_for(
                    "sendPhoto", lambda c: c.chat_id == GROUP_ID and c.ok, count=private_after_photos,
                    timeout=cfg.timeout,
                )  # fmt: skip
                waited = True
            sent[job.request.seed] = time.monotonic()
            fake.inject_message(chats[job.user], people[job.user], "/draw " + cfg.command(job.request))
        states = await _until_ended(path.store, len(jobs), cfg.timeout)
        arrivals = Arrivals()
        arrivals.telegram(fake)
        calls = fake.calls[before:]
        group_calls = [c for c in calls if c.chat_id == GROUP_ID]
        by_method = Counter(c.method for c in group_calls if c.ok)
        private_jobs = [j for j in jobs if j.private]
        private_latency = _latencies(private_jobs, sent, arrivals)
        extra: dict[str, Any] = {
            "limit": {"calls": cfg.group_limit.calls, "window_s": cfg.group_limit.window},
            "group_calls_by_method": dict(sorted(by_method.items())),
            "busiest_window": fake.busiest_window(GROUP_ID, cfg.group_limit.window),
            "rate_limited_by_method": dict(Counter(c.method for c in fake.rate_limited)),
            "retry_after_s": [c.retry_after for c in fake.rate_limited],
        }
        if private_jobs:
            extra["private"] = {
                "jobs": len(private_jobs),
                "delivered": sum(1 for j in private_jobs if j.request.seed in arrivals.at),
                "latency_median_s": _round(quantile(private_latency, 0.5)),
                "latency_max_s": _round(max(private_latency, default=None)),
            }
        return _summary(
            name, jobs, raw_s, sent, arrivals, states, fake.counted(GROUP_ID), len(fake.rate_limited), extra
        )


async def _busy_with_privates(
    cfg: Config, tiny: TinyBench, folder: Path, name: str, number: int, per_user: int
) -> dict[str, Any]:
    """(e) the busy group of (b), and private chats asking once its budget is nearly spent.

    The group's results outrun its budget; the private ones can be delivered at once. Each
    group user's jobs are typed first, so a private job arrives behind a deep group backlog.
    """
    users = cfg.busy_users
    jobs = [
        Job(
            user=u, private=u >= users, request=cfg.request(number, k * (users + cfg.mixed_private_users) + u)
        )
        for k in range(per_user)
        for u in range(users + cfg.mixed_private_users)
        if u < users or k == 0
    ]
    return await _telegram_case(
        cfg, tiny, folder, name, number, users, cfg.mixed_private_users, 0, cfg.private_after_photos,
        jobs=jobs,
    )  # fmt: skip


async def _discord_case(
    cfg: Config, tiny: TinyBench, folder: Path, name: str, number: int, users: int, jobs_each: int
) -> dict[str, Any]:
    """``users`` members run ``/draw`` in one channel, ``jobs_each`` each, at once."""
    jobs = [
        Job(user=u, private=False, request=cfg.request(number, k * users + u))
        for k in range(jobs_each)
        for u in range(users)
    ]
    raw_s = await asyncio.to_thread(_raw_seconds, tiny.pipe, jobs)
    async with (
        FakeDiscord(token=DISCORD_TOKEN, buckets=cfg.discord_buckets) as fake,
        _service(tiny, folder, name, len(jobs)) as (path, settings),
        start_discord(path.service, settings, fake),
    ):
        channel = fake.general
        members = [fake.add_user(f"user{u}") for u in range(users)]
        before = len(fake.requests)
        sent: dict[int, float] = {}
        loop = asyncio.get_running_loop()

        async def slash(job: Job) -> None:
            sent[job.request.seed] = loop.time()
            await fake.slash("draw", members[job.user], channel=channel, prompt=cfg.command(job.request))

        await asyncio.gather(*(slash(job) for job in jobs))
        states = await _until_ended(path.store, len(jobs), cfg.timeout)
        arrivals = Arrivals()
        arrivals.discord(fake)
        writes = [r for r in fake.writes(channel.id) if fake.requests.index(r) >= before]
        # every interaction must be acknowledged (the 3-second rule): the callbacks are counted
        # apart, "messages" are what the bot posted or edited beyond them
        callbacks = [r for r in writes if r.path.startswith("/interactions/")]
        late_acks = sum(
            1 for i in fake.interactions.values() if i.callback_status is None or i.callback_status >= 400
        )
        extra = {
            "channel_writes_by_route": dict(
                sorted(Counter(f"{r.method} {r.bucket}" for r in writes).items())
            ),
            "rate_limited_by_bucket": dict(Counter(str(r.bucket) for r in fake.rate_limited)),
            "retry_after_s": [(r.response or {}).get("retry_after") for r in fake.rate_limited],
            "interaction_callbacks": len(callbacks),
            "unanswered_interactions": late_acks,
            "fake_errors": len(fake.errors),
        }
        messages = len(writes) - len(callbacks)
        return _summary(name, jobs, raw_s, sent, arrivals, states, messages, len(fake.rate_limited), extra)


# ---------------------------------------------------------------------------- the run


async def _measure(cfg: Config, folder: Path) -> dict[str, Any]:
    tiny = await tiny_bench(
        folder,
        threads=cfg.threads,
        size=cfg.size,
        steps=cfg.steps,
        jobs=max(cfg.busy_jobs, cfg.burst_users, cfg.mixed_group_users + cfg.mixed_private_users),
        warmups=2,
    )
    per_user = max(1, -(-cfg.busy_jobs // cfg.busy_users))
    plans: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
        "telegram a": lambda n: _telegram_case(cfg, tiny, folder, "telegram a", n, cfg.burst_users, 0, 1),
        "telegram b": lambda n: _telegram_case(
            cfg, tiny, folder, "telegram b", n, cfg.busy_users, 0, per_user
        ),
        "discord a": lambda n: _discord_case(cfg, tiny, folder, "discord a", n, cfg.burst_users, 1),
        "discord b": lambda n: _discord_case(cfg, tiny, folder, "discord b", n, cfg.busy_users, per_user),
        "mixed": lambda n: _telegram_case(
            cfg, tiny, folder, "mixed", n, cfg.mixed_group_users, cfg.mixed_private_users, 1
        ),
        "mixed busy": lambda n: _busy_with_privates(cfg, tiny, folder, "mixed busy", n, per_user),
        # the same with DELIVERY_AHEAD=0: the GPU draws in fair order whatever the chats can take
        "mixed busy in fair order": lambda n: _busy_with_privates(
            replace(cfg, delivery_ahead=0.0), tiny, folder, "mixed busy in fair order", n, per_user
        ),
    }
    cases: dict[str, Any] = {}
    for number, name in enumerate(cfg.cases):
        started = time.perf_counter()
        cases[name] = await plans[name](number)
        cases[name]["wall_s"] = round(time.perf_counter() - started, 3)
        print(f"{name}: done in {cases[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "benchmark": "busy_chat",
        "machine": machine(),
        "config": {
            "model": "tiny z-image (random weights)",
            "size": cfg.size,
            "steps": cfg.steps,
            "torch_threads": cfg.threads,
            "delivery_ahead_s": cfg.delivery_ahead,
            "telegram_group_limit": {"calls": cfg.group_limit.calls, "window_s": cfg.group_limit.window},
            "discord_bucket_overrides": {
                route: {"limit": b.limit, "per_s": b.per} for route, b in cfg.discord_buckets.items()
            },
        },
        "cases": cases,
    }
    result["targets"] = _verdicts(cases)
    return result


def _verdicts(cases: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for name, case in cases.items():
        if name.endswith(" a"):
            out[f"{name}: within 2 x raw + 3 s"] = case["deliver_s"] <= case["goal_s"]
        if name.endswith(" b"):
            out[f"{name}: all delivered"] = case["delivered"] == case["jobs"]
            per_image = case["per_image"]
            out[f"{name}: <= {GOAL_PER_IMAGE} messages per image"] = (
                None if per_image is None else per_image <= GOAL_PER_IMAGE
            )
            out[f"{name}: no 429"] = case["rate_limited"] == 0
    return out


def render(result: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    c = result["config"]
    limit = c["telegram_group_limit"]
    head = (
        f"brushbot busy chats: tiny Z-Image {c['size']}x{c['size']}, {c['steps']} steps, torch threads "
        f"{c['torch_threads']}; Telegram group limit {limit['calls']} per {limit['window_s']:g} s; "
        f"DELIVERY_AHEAD {'default' if c.get('delivery_ahead_s') is None else c['delivery_ahead_s']}\n"
        f"{describe(result['machine'])}"
    )
    rows = []
    for name, case in result["cases"].items():
        rows.append(
            [
                name,
                f"{case['delivered']}/{case['jobs']}",
                str(case["users"]),
                fmt(case["raw_s"]),
                fmt(case["deliver_s"]),
                fmt(case["goal_s"]) if name.endswith(" a") else "",
                str(case["messages"]),
                fmt(case["per_image"]),
                str(case["rate_limited"]),
                f"{fmt(case['latency_s']['median'])} / {fmt(case['latency_s']['max'])}",
            ]
        )
    cases = table(
        ["case", "delivered", "users", "raw s", "all delivered s", "goal s", "messages", "per image", "429s",
         "latency median / max s"],
        rows,
    )  # fmt: skip
    notes = []
    for name in ("mixed", "mixed busy", "mixed busy in fair order"):
        mixed = result["cases"].get(name, {}).get("private")
        if mixed:
            notes.append(
                f"{name}: {mixed['delivered']}/{mixed['jobs']} private jobs, latency median "
                f"{fmt(mixed['latency_median_s'])} s, max {fmt(mixed['latency_max_s'])} s"
            )
    for name, case in result["cases"].items():
        spent = case.get("group_calls_by_method") or case.get("channel_writes_by_route")
        if spent:
            notes.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in spent.items()))
    goals = table(["goal", "verdict"], [[goal, mark(ok)] for goal, ok in result["targets"].items()])
    return f"{head}\n\n{cases}\n\n" + "\n".join(notes) + f"\n\n{goals}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few jobs at 64², 2 steps, 20 per 3 s: a smoke run"
    )
    parser.add_argument("--cases", help="comma-separated subset of: " + ", ".join(Config().cases))
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; quick 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; quick 2)")
    parser.add_argument("--limit", type=int, help="Telegram group limit: calls per window (default 20)")
    parser.add_argument("--window", type=float, help="Telegram group limit: window in seconds (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--delivery-ahead", type=float, help="DELIVERY_AHEAD seconds for the runs (default: the setting's)"
    )
    parser.add_argument("--json", help="where to write the JSON (default $OUT or outputs/benchmarks)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.cases:
        wanted = tuple(c.strip() for c in args.cases.split(","))
        unknown = [c for c in wanted if c not in Config().cases]
        if unknown:
            parser.error(f"unknown cases {unknown}; known: {', '.join(Config().cases)}")
        cfg = replace(cfg, cases=wanted)
    limit = replace(
        cfg.group_limit,
        calls=args.limit if args.limit is not None else cfg.group_limit.calls,
        window=args.window if args.window is not None else cfg.group_limit.window,
    )
    cfg = replace(
        cfg,
        group_limit=limit,
        size=args.size or cfg.size,
        steps=args.steps or cfg.steps,
        threads=args.threads,
        delivery_ahead=args.delivery_ahead,
    )
    if cfg.threads < 1 or cfg.size < 16 or cfg.steps < 1:
        parser.error("--threads and --steps must be at least 1, --size at least 16")
    quiet_logs()
    result = run_in_temp("brushbot-busy-chat-", lambda folder: _measure(cfg, folder))
    report(result, render, "busy_chat.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
