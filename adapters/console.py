"""The console adapter: a terminal chat for trying brushbot without Discord or Telegram.

Type ``/draw a red fox in snow --seed 7`` and watch the queue, the progress and the saved
paths; ``/draw a watercolour --image photo.jpg --strength 0.5`` draws from a picture.
Input is read on a daemon thread of its own so the loop never blocks, and a stop (SIGTERM) does
not wait for a line that may never come.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from bot import messages
from bot.budget import Budget, Unlimited
from bot.domain import Job, SavedImage, UserRef
from bot.errors import BotError
from bot.inputs import read_picture_file, take_image_flag
from bot.ports import Lane, LaneKind, Phase
from bot.service import Service

_log = logging.getLogger(__name__)

PLATFORM = "console"

PROMPT = "brushbot> "


class ConsoleTransport:
    """Prints what the core says about the console user's jobs; one lane, no budget."""

    platform = PLATFORM

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._lane = Lane(key=f"{PLATFORM}:local", kind=LaneKind.CONSOLE)

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        return self._lane

    def budget(self, lane: Lane) -> Budget:
        return Unlimited()

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        return 1

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        self._out(text)

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        took = messages.job_seconds(job, time.time())
        self._out(messages.saved_text(job, [(image.path, image.seed) for image in images], took))

    async def notice(self, job: Job, text: str) -> None:
        self._out(text)

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        self._out(text)

    async def board(self, lane: Lane, text: str | None) -> None:
        if text:
            self._out(text)


class ConsoleAdapter:
    """Reads commands from a text stream and answers on another; ``run()`` returns at EOF or /quit."""

    def __init__(
        self,
        service: Service,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: UserRef | None = None,
    ) -> None:
        self._service = service
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self.user = user or UserRef(platform=PLATFORM, id=_whoami())

    async def __aenter__(self) -> ConsoleAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._service.register(ConsoleTransport(self.say))

    async def close(self) -> None:
        return None

    def say(self, text: str) -> None:
        self._stdout.write(text + "\n")
        self._stdout.flush()

    async def run(self, *, wait_for_jobs: bool = True) -> None:
        """The read–answer loop. At end of input, waits for this user's jobs to finish."""
        self.say(messages.CONSOLE_GREETING)
        interactive = self._stdin.isatty()
        lines = self._read_lines()
        while True:
            if interactive:
                self._stdout.write(PROMPT)
                self._stdout.flush()
            line = await lines.get()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            try:
                await self.handle(line)
            except BotError as err:
                self.say(f"⚠ {messages.error_text(err, self._service.next_refill_text())}")
            except Exception:
                _log.exception("console command failed: %s", line)
                self.say(f"⚠ {messages.GENERIC_ERROR}")
        if wait_for_jobs:
            await self.wait_idle()

    def _read_lines(self) -> asyncio.Queue[str]:
        """Lines of input as they come ("" at the end), read on a daemon thread.

        A daemon thread, not the loop's executor: a blocked ``readline`` must not keep the process
        from exiting once the console is stopped.
        """
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def read() -> None:
            while True:
                line = self._stdin.readline()
                try:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                except RuntimeError:  # the loop is closed: nobody reads any more
                    return
                if not line:
                    return

        threading.Thread(target=read, name="brushbot-console-input", daemon=True).start()
        return lines

    async def wait_idle(self) -> None:
        """Wait until every job has finished (the console has one user)."""
        await self._service.wait_idle()

    async def handle(self, line: str) -> None:
        """Run one command line."""
        command, _, rest = line.partition(" ")
        command = command.lower().split("@", 1)[0]
        svc = self._service
        if command in ("/draw", "/imagine"):
            rest, image = take_image_flag(rest)
            if image is None:
                request = svc.parse(rest)
                await svc.submit(self.user, request, delivery={}, user_name=self.user.id)
            else:
                data = await asyncio.to_thread(read_picture_file, image, svc.limits.max_input_bytes)
                await svc.submit_picture(self.user, rest, data, delivery={}, user_name=self.user.id)
        elif command == "/credits":
            self.say(messages.balance_text(await svc.credits(self.user), svc.next_refill_text()))
        elif command == "/jobs":
            self.say(messages.jobs_text(await svc.my_jobs(self.user)))
        elif command == "/queue":
            self.say(messages.queue_text(svc.queue_view()))
        elif command == "/cancel":
            job = await svc.cancel(self.user, rest.strip() or None)
            self.say(messages.cancel_text(job))
        elif command == "/stats":
            self.say(messages.stats_text(await svc.stats(self.user)))
        elif command in ("/help", "/start"):
            self.say(messages.help_text(PLATFORM, admin=svc.is_admin(self.user)))
        else:
            self.say(messages.sentence(messages.UNKNOWN_COMMAND.format(command=command[:30])))


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"
