"""Chaos: ``python -m bot`` on both fake platforms, killed with SIGKILL at random moments, fuzzed and faulted.

One bot process serves the fake Telegram and the fake Discord at once (the tiny model, a real
SQLite file and output folder). Chaos users type ``/draw`` in private chats, a Telegram group and
Discord channels; fuzzers send random commands, forged button payloads and odd updates all the
while; the bot is SIGKILLed at random moments (some during its start) and started again on the
same database. Faults are injected meanwhile: every fifth job runs out of GPU memory, 429 storms
on both platforms, failed uploads, the disk full for a few seconds. At the end the last process
drains with SIGTERM and the books are read:

* jobs submitted, recorded, delivered, failed (refunded, the requester told), **lost** (a recorded
  job that did not end, a delivered one whose result never reached the chat, a failed one whose
  requester was never told, a Discord draw acknowledged without a job);
* **duplicated** results (a second result message for one job), **ledger mismatches** (per user:
  the ledger against what their delivered jobs cost; a job committed twice), **crashes** (a bot
  process that died without being killed, a traceback in its log);
* fuzzed commands answered, and those left unanswered (around a kill: the killed process had
  taken them off the platform; otherwise: a bug).

Goal: 0 lost, 0 ledger mismatches, 0 crashes, duplicates no more than kills (exit status 1 if not).

    .venv/bin/python benchmarks/chaos.py             # 200 jobs, 20 kills, 10,000 commands: ~8 min on 2 cores
    .venv/bin/python benchmarks/chaos.py --quick     # 16 jobs, 2 kills, 300 commands: ~1.5 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.discord.commands import MAX_OPTION_STRING
from adapters.telegram import parse_callback
from benchmarks._common import describe, machine, report, results_path, table
from tests.botprocess import BotProcess, books, discord_env, telegram_env
from tests.fakes.discord_server import FakeDiscord, FakeInteraction, FakeUser
from tests.fakes.telegram_server import ApiCall, FakeTelegram
from tests.test_discord_fuzz import FLAGS as DISCORD_FLAGS
from tests.test_telegram_fuzz import COMMANDS, FLAGS, odd_update

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ROOT / "benchmarks" / "chaos_faults"
#: a prompt with this runs out of GPU memory in the bot's process (see chaos_faults/sitecustomize.py)
OOM_MARK = "chaos-oom"
#: an interaction's message, edited with its status and its result
WEBHOOK_EDIT = r"/webhooks/\d+/[^/]+/messages/\d+"
CHANNEL_POST = r"/channels/\d+/messages"
#: text that is hard on parsers: right-to-left and zero-width marks, emoji, NUL, combining marks, CJK
ODD_TEXT = (
    "abcxyz ABC 0123456789 -_=+:/@#*[]()<>`~|\\\"' \u200b\u200d\u200f\u202e\ufeff\u0000\u0301🎨🦊👩‍🎨中文ж"
)
TERMINAL = ("delivered", "failed", "cancelled")
#: a command sent this many seconds or less before a kill may have been taken by the killed process
#: (Telegram counts an update as delivered once the next poll asks for the ones after it)
NEAR_A_KILL = 10.0


@dataclass(slots=True)
class Sent:
    """One thing a chaos user or a fuzzer sent, and how to find its answer."""

    platform: str
    kind: str  # "draw" (a planned job), "command", "forged", "odd"
    at: float
    expect: bool  # whether an answer is due (odd updates, other bots' commands: ignored by design)
    chat_id: int = 0
    message_id: int = 0  # Telegram: the command's message (answers reply to it)
    query_id: str = ""  # Telegram: a button press
    token: str = ""  # Discord: the interaction
    oom: bool = False
    text: str = ""  # the start of what was sent, for the report


@dataclass(slots=True)
class Runs:
    """The bot processes of the run: started, killed, died on their own."""

    starts: int = 0
    kills: list[float] = field(default_factory=list)
    kills_at_start: int = 0
    died: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)  # seconds from spawn to "running"
    ended: int = 0


class Chaos:
    def __init__(self, args: argparse.Namespace, folder: Path, model: Path,
                 tg: FakeTelegram, dc: FakeDiscord) -> None:  # fmt: skip
        self.args = args
        self.rng = random.Random(args.seed)
        self.folder = folder
        self.model = model
        self.tg = tg
        self.dc = dc
        self.db = folder / "bot.sqlite3"
        self.disk_flag = folder / "disk-full"
        self.sent: list[Sent] = []
        self.runs = Runs()
        self.faults: Counter[str] = Counter()
        self.up = asyncio.Event()
        self.calm = asyncio.Event()
        self.last: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self.process: BotProcess | None = None
        self.job_ids: list[str] = []  # recent ones, for forged buttons
        # the people
        self.tg_admin = FakeTelegram.user(500, "Admin", "admin")
        self.tg_users = [FakeTelegram.user(1000 + i, f"Painter{i}", f"painter{i}") for i in range(10)]
        self.tg_fuzzers = [FakeTelegram.user(2000 + i, f"Fuzz{i}", f"fuzz{i}") for i in range(40)]
        self.group = tg.group(-100_900, "chaos studio")
        self.dc_users = [dc.add_user(f"painter{i}") for i in range(10)]
        self.dc_fuzzers = [dc.add_user(f"fuzz{i}") for i in range(24)]
        self.channels = [dc.general, dc.add_channel("studio"), dc.add_channel("gallery")]
        self.anchor: dict[str, Any] | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    async def progress(self, every: float = 10.0) -> None:
        """A line on stderr now and then: how far the run is."""
        while True:
            await asyncio.sleep(every)
            self._progress_line()

    def ended(self, process: BotProcess) -> None:
        """Keep the log of a process that ended (for the tracebacks count and the log file)."""
        self.runs.lines.append(f"=== process {self.runs.ended + 1} ===")
        self.runs.lines.extend(process.lines)
        self.runs.ended += 1

    def _progress_line(self) -> None:
        kinds = Counter(f"{s.platform[0]}:{s.kind}" for s in self.sent)
        left = -1
        with contextlib.suppress(sqlite3.Error):
            left = self.unfinished()
        print(f"[{self.now():6.1f} s] up={self.up.is_set()} starts={self.runs.starts} "
              f"kills={len(self.runs.kills)} sent={dict(kinds)} unfinished={left} "
              f"telegram queue={self.tg.pending_updates}", file=sys.stderr, flush=True)  # fmt: skip

    # ------------------------------------------------------------------ the bot's processes

    def env(self) -> dict[str, str]:
        return {
            **telegram_env(self.tg), **discord_env(self.dc),
            "PYTHONPATH": f"{FAULTS}:{ROOT}", "CHAOS_OOM_MARK": OOM_MARK, "CHAOS_DISK_FULL": str(self.disk_flag),
            "ADMIN_IDS": f"telegram:{self.tg_admin['id']},discord:{self.dc.owner.id}",
            # fuzzers get one credit a day (their random draws stay few); painters are given more
            "DAILY_CREDITS": "1", "MAX_QUEUED_PER_USER": "50", "MAX_QUEUED_TOTAL": "1000",
            "SHUTDOWN_GRACE": "120", "MAX_STEPS": "60", "OMP_NUM_THREADS": "1",
        }  # fmt: skip

    async def keep_running(self, kills: int) -> None:
        """Start the bot, kill it at a random moment, start it again, until ``kills`` kills; leave the last up.

        One kill in seven comes during the start (loading, taking back unfinished jobs); a process
        that dies on its own is counted as a crash and started again.
        """
        while len(self.runs.kills) < kills:
            process = await self._spawn()
            at_start = self.calm.is_set() and self.rng.random() < 0.15
            spawned = time.monotonic()
            moment = spawned + self.rng.uniform(1.0, 6.0) if at_start else None
            watcher = asyncio.create_task(self._watch(process))
            running = asyncio.create_task(process.logged("brushbot is running", timeout=300))
            await asyncio.wait({watcher, running}, timeout=None if moment is None else moment - spawned,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if running.done() and not running.cancelled() and running.exception() is None:
                self.runs.ready.append(time.monotonic() - spawned)
                self.up.set()
                await self.calm.wait()  # the painters have their credits before the first kill
                left = (
                    self.rng.uniform(0.3, self.args.uptime) if moment is None else moment - time.monotonic()
                )
                await asyncio.wait({watcher}, timeout=max(0.0, left))
            running.cancel()
            if not watcher.done():  # still alive: this is the kill
                watcher.cancel()
                self.runs.kills.append(self.now())
                self.runs.kills_at_start += moment is not None and not self.up.is_set()
            self.up.clear()
            await process.kill()
            self.ended(process)
        while True:  # the last one, until it runs (one that dies on its own is started again)
            process = await self._spawn()
            spawned = time.monotonic()
            watcher = asyncio.create_task(self._watch(process))
            running = asyncio.create_task(process.logged("brushbot is running", timeout=300))
            await asyncio.wait({watcher, running}, return_when=asyncio.FIRST_COMPLETED)
            if not watcher.done():
                await running  # raises if it never got there
                self.runs.ready.append(time.monotonic() - spawned)
                self.up.set()
                self.last = watcher
                return
            running.cancel()
            await process.kill()
            self.ended(process)

    async def _spawn(self) -> BotProcess:
        process = self.process = BotProcess(self.folder, self.model, self.env())
        self.runs.starts += 1
        await process.start()
        return process

    async def _watch(self, process: BotProcess) -> None:
        assert process.proc is not None
        code = await process.proc.wait()
        self.up.clear()
        self.runs.died.append(f"exit {code} at {self.now():.1f} s")

    async def stop(self) -> int:
        """SIGTERM the last process: it drains and should exit 0."""
        assert self.process is not None and self.last is not None
        self.last.cancel()
        self.up.clear()
        self.process.signal(signal.SIGTERM)
        code = await self.process.exited(timeout=300)
        self.ended(self.process)
        return code

    # ------------------------------------------------------------------ chaos users

    async def give_painters_credits(self) -> None:
        await self.up.wait()
        chat = self.tg.private_chat(self.tg_admin)
        for user in self.tg_users:
            self.tg.inject_message(chat, self.tg_admin, f"/quota set {user['id']} 1000")
        for dc_user in self.dc_users:
            await self.dc.wait_response(
                await self.dc.slash("brush quota set", self.dc.owner, user=dc_user, credits=1000), timeout=60
            )
        await self.tg.wait_until(
            lambda: len(self.tg.calls_of("sendMessage", chat["id"], ok=True)) >= len(self.tg_users),
            timeout=120,
        )
        self.anchor = self.dc.post_as(self.dc_fuzzers[0], self.channels[1], "hello")
        self.calm.set()

    def planned_prompt(self, n: int) -> tuple[str, bool]:
        oom = n % 5 == 4  # every fifth job runs out of GPU memory
        steps = self.rng.choice([4, 8, 12, 24, 40])
        size = self.rng.choice(["64x64", "128x128", "128x64"])
        words = f"chaos {n} {OOM_MARK}" if oom else f"chaos {n} a fox in the snow"
        return f"{words} --steps {steps} --size {size} --seed {n}", oom

    async def submit_jobs(self, jobs: int, gap: float) -> None:
        for n in range(jobs):
            await asyncio.sleep(self.rng.expovariate(1 / gap))
            await self.fault_for(n, jobs)
            prompt, oom = self.planned_prompt(n)
            if n % 2 == 0:
                user = self.rng.choice(self.tg_users)
                chat = self.group if n % 10 == 0 else self.tg.private_chat(user)
                message = self.tg.inject_message(chat, user, f"/draw {prompt}")
                self.sent.append(Sent("telegram", "draw", self.now(), True, chat_id=int(chat["id"]),
                                      message_id=message["message_id"], oom=oom))  # fmt: skip
            else:
                it = await self.slash("draw", self.rng.choice(self.dc_users),
                                      channel=self.rng.choice(self.channels), prompt=prompt)  # fmt: skip
                if it is not None:
                    self.sent.append(Sent("discord", "draw", self.now(), True, token=it.token, oom=oom))

    async def slash(self, command: str, user: FakeUser, /, **options: Any) -> FakeInteraction | None:
        """A slash command once the bot is up (Discord offers none while the bot is away)."""
        await self.up.wait()
        try:
            return await self.dc.slash(command, user, **options)
        except (TimeoutError, ConnectionError, RuntimeError):  # killed between the check and the
            return None  # dispatch: the client shows "the application did not respond"

    # ------------------------------------------------------------------ faults

    async def fault_for(self, n: int, jobs: int) -> None:
        """The faults that begin as job ``n`` is typed: spread evenly over the run."""
        every = max(2, jobs // 10)
        step = n // every if n % every == every // 2 else None
        if step is None:
            return
        kind = ["429 storm", "upload failures", "disk full", "upload failures", "429 storm"][step % 5]
        self.faults[kind] += 1
        if kind == "429 storm":
            self.tg.fail("*", retry_after=1, times=25)
            for method, path in (("PATCH", WEBHOOK_EDIT), ("POST", CHANNEL_POST)):
                self.dc.rate_limit(method, path, retry_after=0.5, times=10)
        elif kind == "upload failures":
            self.tg.fail("sendPhoto", status=500, description="Internal Server Error", times=2)
            self.dc.fail("PATCH", WEBHOOK_EDIT, status=500, times=2, where=lambda r: bool(r.files))
        else:
            self.disk_flag.touch()
            asyncio.get_running_loop().call_later(4.0, lambda: self.disk_flag.unlink(missing_ok=True))

    # ------------------------------------------------------------------ fuzz

    def text(self, limit: int) -> str:
        """Random words, flags, numbers and odd characters, now and then far over ``limit``."""
        parts = []
        for _ in range(self.rng.randint(0, 6)):
            pick = self.rng.random()
            if pick < 0.35:
                parts.append("".join(self.rng.choices(ODD_TEXT, k=self.rng.randint(0, 20))))
            elif pick < 0.6:
                parts.append(self.rng.choice(FLAGS))
            elif pick < 0.8:
                parts.append(str(self.rng.randint(-(2**70), 2**70)))
            elif pick < 0.95:
                parts.append(self.rng.choice(["16:9", "0:0", "99999x99999", "nan", "inf", "@everyone",
                                              "<@1>", "[x](https://e.x)", "11", "-0"]))  # fmt: skip
            else:
                parts.append("ж" * self.rng.randint(1, limit * 10))
        return " ".join(parts)

    def forged(self) -> str:
        action = self.rng.choice(
            ["reroll", "png", "info", "del", "delete", "cancel", "edit", "subtle", "nope"]
        )
        pick = self.rng.random()
        if pick < 0.4 and self.job_ids:
            ident = self.rng.choice(self.job_ids)  # somebody's real job
        elif pick < 0.7:
            ident = "0" * 16
        else:
            ident = "".join(self.rng.choices(ODD_TEXT, k=self.rng.randint(0, 30)))
        return self.rng.choice(["bb", "bb:", "bb::", "garbage", f"bb:{action}:{ident}"])

    async def fuzz(self, count: int, seconds: float) -> None:
        """``count`` fuzzed inputs, half on each platform, spread over about ``seconds``."""
        pace = seconds / max(1, count)
        for n in range(count):
            await asyncio.sleep(self.rng.expovariate(1 / pace))
            if n % 50 == 0:
                self.refresh_job_ids()
            if n % 2 == 0:
                self.fuzz_telegram()
            else:
                await self.fuzz_discord()

    def fuzz_telegram(self) -> None:
        user = self.rng.choice(self.tg_fuzzers)
        chat = self.tg.private_chat(user)
        pick = self.rng.random()
        if pick < 0.7:
            target = self.rng.choice(["", "", "", "@brushbot_test_bot", "@some_other_bot"])
            text = f"/{self.rng.choice(COMMANDS)}{target} {self.text(4096)}"[:40960]
            message = self.tg.inject_message(chat, user, text)
            self.sent.append(Sent("telegram", "command", self.now(), "other" not in target,
                                  chat_id=int(chat["id"]), message_id=message["message_id"], text=text[:60]))  # fmt: skip
        elif pick < 0.9:
            where = self.group if self.rng.random() < 0.3 else chat
            mine = [m.message_id for m in self.tg.bot_messages(int(where["id"]))]
            message_id = self.rng.choice(mine) if mine and self.rng.random() < 0.8 else 424242
            query = self.tg.inject_callback(user, int(where["id"]), message_id, self.forged())
            self.sent.append(Sent("telegram", "forged", self.now(), True, query_id=query))
        else:
            kind = self.rng.choice(["edited", "channel post", "anonymous admin", "forwarded", "no sender"])
            self.tg.inject_update(
                odd_update(kind, self.group, f"/{self.rng.choice(COMMANDS)} {self.text(100)}")
            )
            self.sent.append(Sent("telegram", "odd", self.now(), False))

    async def fuzz_discord(self) -> None:
        user = self.rng.choice(self.dc_fuzzers)
        channel = self.rng.choice(self.channels)
        pick = self.rng.random()
        it: FakeInteraction | None
        kind = "command"
        if pick < 0.35:
            words = [self.text(MAX_OPTION_STRING // 10), self.rng.choice(DISCORD_FLAGS), self.text(20)]
            prompt = " ".join(words)[:MAX_OPTION_STRING] or "x"
            label = f"/draw {prompt}"
            it = await self.slash("draw", user, channel=channel, prompt=prompt)
        elif pick < 0.55:
            label = "/" + self.rng.choice(["credits", "jobs", "queue", "help"])
            it = await self.slash(label[1:], user, channel=channel)
        elif pick < 0.65:
            job = self.text(30)[:100] or "x"
            label = f"/cancel {job}"
            it = await self.slash("cancel", user, channel=channel, job=job)
        elif pick < 0.75:
            command = self.rng.choice(["brush quota grant", "brush ban", "brush stats"])
            options: dict[str, Any] = (
                {} if command == "brush stats" else {"user": self.rng.choice(self.dc_users)}
            )
            if command == "brush quota grant":
                options["credits"] = self.rng.randint(1, 1000)
            label = f"/{command}"
            it = await self.slash(command, user, channel=channel, **options)
        else:
            kind = "forged"
            await self.up.wait()
            assert self.anchor is not None
            custom_id = self.forged()[:100]
            label = f"button {custom_id}"
            try:
                it = await self.dc.forge_click(self.anchor, custom_id, user)
            except (TimeoutError, ConnectionError, RuntimeError):
                it = None
        if it is not None:
            self.sent.append(Sent("discord", kind, self.now(), True, token=it.token, text=label[:60]))

    def refresh_job_ids(self) -> None:
        with (
            contextlib.suppress(sqlite3.Error),
            contextlib.closing(sqlite3.connect(self.db, timeout=1)) as conn,
        ):
            rows = conn.execute("SELECT id FROM jobs ORDER BY seq DESC LIMIT 50").fetchall()
            self.job_ids = [r[0] for r in rows]

    # ------------------------------------------------------------------ the end

    def unfinished(self) -> int:
        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as conn:
            marks = ",".join("?" * len(TERMINAL))
            return int(
                conn.execute(f"SELECT COUNT(*) FROM jobs WHERE state NOT IN ({marks})", TERMINAL).fetchone()[
                    0
                ]
            )

    async def settle(self, timeout: float) -> None:
        """Until every recorded job ended and Telegram's queue is empty (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.unfinished() or self.tg.pending_updates:
                    await asyncio.sleep(0.5)
                await asyncio.sleep(5.0)  # the last answers and results leave


def _json(value: Any) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def telegram_answers(chaos: Chaos, jobs: Collection[str] = ()) -> tuple[set[tuple[int, int]], set[str]]:
    """The (chat, message) commands the bot answered, and the button presses it answered.

    An answer in a group replies to its command; in a private chat it does not, so there the
    commands owed an answer and the bot's messages that are not about a job (a status or a
    result carries the job's buttons) are paired: each such message with the latest command
    sent before it that none took yet (answers follow their commands closely; taking the
    oldest instead would pass the gap a lost command leaves on to the chat's last command).
    A command ignored by design (another bot's) or answered by the job it became (``jobs``:
    ``str((chat, message))``) takes none, or a later command's answer would look missing.
    """
    tg = chaos.tg
    answered: set[tuple[int, int]] = set()
    loose: dict[int, list[float]] = {}
    for call in tg.calls:
        if (
            not call.ok
            or call.chat_id is None
            or call.method not in ("sendMessage", "sendPhoto", "sendDocument")
        ):
            continue
        where = _json(call.params.get("reply_parameters"))
        if isinstance(where, dict):
            answered.add((call.chat_id, int(where.get("message_id", 0))))
        elif telegram_job(call) is None:
            loose.setdefault(call.chat_id, []).append(call.at)
    for chat_id, times in loose.items():
        commands = sorted((s for s in chaos.sent if s.platform == "telegram" and s.chat_id == chat_id and s.expect
                           and s.message_id and (chat_id, s.message_id) not in answered
                           and str((chat_id, s.message_id)) not in jobs), key=lambda s: s.at)  # fmt: skip
        waiting: list[Sent] = []  # sent before the message at hand, not yet paired
        for at in sorted(times):
            while commands and chaos.started + commands[0].at <= at:
                waiting.append(commands.pop(0))
            if waiting:  # the latest: a command a killed process took leaves no later one unpaired
                answered.add((chat_id, waiting.pop().message_id))
    pressed = {str(c.params.get("callback_query_id")) for c in tg.calls_of("answerCallbackQuery")}
    return answered, pressed


def telegram_job(call: ApiCall) -> str | None:
    """The job a result carries in its buttons."""
    markup = _json(call.params.get("reply_markup")) or {}
    for button in (b for row in markup.get("inline_keyboard", []) for b in row):
        parsed = parse_callback(button.get("callback_data"))
        if parsed is not None:
            return parsed[1]
    return None


def discord_job(payload: object) -> str | None:
    ids = FakeDiscord.custom_ids(payload) if isinstance(payload, dict) else []
    return next((cid.split(":")[2] for cid in ids if cid.startswith("bb:") and cid.count(":") == 2), None)


def read_jobs(db: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT id, platform, state, error, request, delivery FROM jobs").fetchall()
    return [dict(r) for r in rows]


def tally(chaos: Chaos, exit_code: int) -> dict[str, Any]:
    tg, dc = chaos.tg, chaos.dc
    states, mismatches = books(chaos.db)
    jobs = read_jobs(chaos.db)
    told_text = " ".join(
        [str(c.params.get("text", "")) for c in tg.calls if c.ok and c.method in ("sendMessage", "editMessageText")]
        + [str((r.json or {}).get("content", "")) for r in dc.requests if isinstance(r.json, dict)
           and 200 <= r.status < 300 and not r.dropped]
    )  # fmt: skip
    tg_results = Counter(
        telegram_job(c) for c in tg.calls if c.ok and c.method in ("sendPhoto", "sendDocument")
    )
    dc_messages = Counter(discord_job(m) for m in dc.messages.values() if m.get("attachments"))
    dc_uploads = {
        discord_job(r.json) for r in dc.requests if r.files and 200 <= r.status < 300 and not r.dropped
    }
    by_key = {}
    for job in jobs:
        delivery = _json(job["delivery"]) or {}
        key = delivery.get("token") or (delivery.get("chat_id"), delivery.get("message_id"))
        by_key[str(key)] = job
    replies, pressed = telegram_answers(chaos, by_key)

    out: dict[str, Any] = {}
    kill_times = chaos.runs.kills
    for platform in ("telegram", "discord"):
        mine = [j for j in jobs if j["platform"] == platform]
        planned = [s for s in chaos.sent if s.platform == platform and s.kind == "draw"]
        lost: list[str] = []
        for job in mine:
            if job["state"] not in TERMINAL:
                lost.append(f"{job['id']} left {job['state']}")
            elif job["state"] == "delivered":
                shown = tg_results[job["id"]] if platform == "telegram" else job["id"] in dc_uploads
                if not shown:
                    lost.append(f"{job['id']} delivered but no result in the chat")
            elif f"Job {job['id']} " not in told_text:
                lost.append(f"{job['id']} {job['state']} ({job['error']}) but its requester was never told")
        unanswered_draws = 0
        for s in planned:
            key = s.token if platform == "discord" else str((s.chat_id, s.message_id))
            if key in by_key:
                continue
            if platform == "discord" and dc.interactions[s.token].callback_status is not None:
                deferred = (dc.interactions[s.token].callback_type or 0) == 5
                if deferred:  # "thinking…" with no job behind it
                    lost.append(f"Discord draw {s.token[:10]}… acknowledged, no job recorded")
                continue
            if platform == "telegram" and (s.chat_id, s.message_id) in replies:
                continue  # refused in one line
            unanswered_draws += 1
        results = tg_results if platform == "telegram" else dc_messages
        duplicated = sum(n - 1 for job, n in results.items() if job is not None and n > 1)
        fuzz = [s for s in chaos.sent if s.platform == platform and s.kind != "draw" and s.expect]
        unanswered = [s for s in fuzz if not answered(s, replies, pressed, dc, by_key)]
        near = [s for s in unanswered if any(0 <= k - s.at < NEAR_A_KILL for k in kill_times)]
        failed = [j for j in mine if j["state"] == "failed"]
        out[platform] = {
            "draws typed": len(planned),
            "jobs recorded": len(mine),
            "jobs from fuzzers": len(mine)
            - len([s for s in planned if (s.token or str((s.chat_id, s.message_id))) in by_key]),
            "delivered": sum(j["state"] == "delivered" for j in mine),
            "failed, refunded, told": len(failed) - sum("never told" in x for x in lost),
            "failed: out of memory": sum("out of memory" in (j["error"] or "") for j in failed),
            "failed: disk full": sum("could not save" in (j["error"] or "") for j in failed),
            "failed: other": sum(
                "out of memory" not in (j["error"] or "") and "could not save" not in (j["error"] or "")
                for j in failed
            ),
            "cancelled": sum(j["state"] == "cancelled" for j in mine),
            "lost": len(lost),
            "lost detail": lost[:20],
            "failure reasons": Counter(str(j["error"])[:80] for j in failed).most_common(8),
            "draws never answered (taken by a killed process)": unanswered_draws,
            "duplicated results": duplicated,
            "fuzzed inputs": len([s for s in chaos.sent if s.platform == platform and s.kind != "draw"]),
            "fuzzed, answer due": len(fuzz),
            "fuzzed, unanswered near a kill": len(near),
            "fuzzed, unanswered otherwise": len(unanswered) - len(near),
            "unanswered detail": [
                f"{s.kind} at {s.at:.1f} s{' (near a kill)' if s in near else ''}: {s.text!r}"
                for s in sorted(unanswered, key=lambda s: s in near)
            ][:12],
        }
    tracebacks = [i for i, line in enumerate(chaos.runs.lines) if line.startswith("Traceback")]
    errors = Counter(
        next((ln for ln in chaos.runs.lines[i + 1:i + 60] if ln and not ln.startswith((" ", "Traceback"))), "?")[:120]
        for i in tracebacks
    )  # fmt: skip
    crashes = len(chaos.runs.died) + len(tracebacks)
    duplicates = sum(out[p]["duplicated results"] for p in out)
    lost_total = sum(out[p]["lost"] for p in out)
    goal = (
        not lost_total and not mismatches and not crashes and duplicates <= len(kill_times) and exit_code == 0
    )
    return {
        "benchmark": "chaos",
        "machine": machine(),
        "seed": chaos.args.seed,
        "seconds": round(chaos.now(), 1),
        "kills": len(kill_times),
        "kill times (s)": [round(k, 1) for k in kill_times],
        "kills during start-up": chaos.runs.kills_at_start,
        "starts": chaos.runs.starts,
        "seconds to running (median)": sorted(chaos.runs.ready)[len(chaos.runs.ready) // 2]
        if chaos.runs.ready
        else None,
        "faults": dict(chaos.faults)
        | {
            "out of memory (jobs)": sum(s.oom for s in chaos.sent),
            "429s served": sum(1 for c in tg.calls if c.status == 429)
            + sum(1 for r in dc.requests if r.status == 429),
            "5xx served": sum(1 for c in tg.calls if c.status >= 500)
            + sum(1 for r in dc.requests if r.status >= 500),
        },
        "platforms": out,
        "jobs recorded": len(states),
        "lost": lost_total,
        "duplicated": duplicates,
        "ledger mismatches": len(mismatches),
        "ledger detail": mismatches[:20],
        "crashes": crashes,
        "processes that died on their own": chaos.runs.died,
        "tracebacks": dict(errors.most_common(10)),
        "drain exit status": exit_code,
        "goal met": goal,
    }


def answered(
    s: Sent, replies: set[tuple[int, int]], pressed: set[str], dc: FakeDiscord, jobs: Mapping[str, Any]
) -> bool:
    """Whether the bot answered ``s``: a reply, a press answered, an interaction acknowledged, or a job taken."""
    if s.platform == "telegram":
        if s.kind == "forged":
            return s.query_id in pressed
        return (s.chat_id, s.message_id) in replies or str((s.chat_id, s.message_id)) in jobs
    return dc.interactions[s.token].callback_status is not None


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from generation.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(folder / "tiny")
    async with FakeTelegram() as tg, FakeDiscord() as dc:
        chaos = Chaos(args, folder, model, tg, dc)
        ticker = asyncio.create_task(chaos.progress())
        life = asyncio.create_task(chaos.keep_running(args.kills))
        await chaos.give_painters_credits()
        seconds = args.jobs * args.gap
        await asyncio.gather(chaos.submit_jobs(args.jobs, args.gap), chaos.fuzz(args.fuzz, seconds))
        await life  # the last kill is done; this process stays up
        await chaos.up.wait()
        await chaos.settle(args.settle)
        code = await chaos.stop()
        ticker.cancel()
        chaos.disk_flag.unlink(missing_ok=True)
        log = results_path("chaos-bot.log", args.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(chaos.runs.lines) + "\n", encoding="utf-8")
        print(f"the bot's log: {log}", file=sys.stderr)
        return tally(chaos, code)


def render(result: Mapping[str, Any]) -> str:
    platforms = result["platforms"]
    keys = [
        k for k in platforms["telegram"] if k not in ("lost detail", "failure reasons", "unanswered detail")
    ]
    rows = [[k, platforms["telegram"][k], platforms["discord"][k],
             platforms["telegram"][k] + platforms["discord"][k]] for k in keys]  # fmt: skip
    lines = [
        f"chaos: seed {result['seed']}, {result['seconds']} s, {result['kills']} kills "
        f"({result['kills during start-up']} during start-up), {result['starts']} starts, "
        f"median {result['seconds to running (median)']:.1f} s to running",
        describe(result["machine"]),
        "kills at (s): " + ", ".join(f"{k:.1f}" for k in result["kill times (s)"]),
        "faults: " + ", ".join(f"{k} {v}" for k, v in result["faults"].items()),
        "",
        table(["", "telegram", "discord", "total"], rows),
        "",
        f"lost {result['lost']}, duplicated {result['duplicated']} (kills {result['kills']}), "
        f"ledger mismatches {result['ledger mismatches']}, crashes {result['crashes']}, "
        f"drain exit {result['drain exit status']}",
    ]
    for platform in ("telegram", "discord"):
        for item in platforms[platform]["lost detail"]:
            lines.append(f"  lost ({platform}): {item}")
        for item in platforms[platform]["unanswered detail"]:
            lines.append(f"  unanswered ({platform}): {item}")
        for reason, n in platforms[platform]["failure reasons"]:
            lines.append(f"  failed ({platform}) ×{n}: {reason}")
    lines += [f"  ledger: {item}" for item in result["ledger detail"]]
    lines += [f"  died: {item}" for item in result["processes that died on their own"]]
    lines += [f"  traceback ×{n}: {line}" for line, n in result["tracebacks"].items()]
    lines.append("goal (0 lost, 0 mismatches, 0 crashes, duplicates <= kills): " +
                 ("met" if result["goal met"] else "NOT met"))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="planned /draw jobs, half on each platform")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs at random moments")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzzed commands, presses and updates")
    parser.add_argument("--gap", type=float, default=1.5, help="mean seconds between two planned jobs")
    parser.add_argument(
        "--uptime", type=float, default=12.0, help="longest seconds a process lives before its kill"
    )
    parser.add_argument(
        "--settle", type=float, default=600.0, help="longest wait for the last jobs at the end"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="16 jobs, 2 kills, 300 fuzzed inputs")
    parser.add_argument("--log", help="the bot's log (default: outputs/benchmarks/chaos-bot.log)")
    parser.add_argument("--json", help="where to write the figures (default: outputs/benchmarks/chaos)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.kills, args.fuzz, args.gap, args.uptime = 16, 2, 300, 0.6, 5.0
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    report(result, render, "chaos", args.json)
    return 0 if result["goal met"] else 1


if __name__ == "__main__":
    sys.exit(main())
