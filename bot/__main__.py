"""``python -m bot``: the composition root and command line.

    python -m bot                 run the chat adapters whose tokens are set (the console if none)
    python -m bot console         a terminal chat against the full service
    python -m bot draw PROMPT [flags] [--image PATH [--strength 0.6]] [--out DIR]
    python -m bot doctor          torch/CUDA, memory, the device plan, the model, which tokens are set
    python -m bot tiny-model DIR  write the tiny random demo pipeline (draws noise; for tests and demos)

This module is the one place in ``bot`` that wires the other packages together; it imports
them inside functions, so the core itself never loads torch or a platform library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot import messages
from bot.config import Settings, load_settings
from bot.domain import Job, UserRef
from bot.errors import BotError
from bot.grammar import Limits, build_request, precheck_picture_request, split_flags
from bot.inputs import read_picture_file
from bot.logs import setup_logging

_log = logging.getLogger("bot")


def _secrets(settings: Settings) -> list[str]:
    return [t.get_secret_value() for t in (settings.discord_token, settings.telegram_token) if t is not None]


# ---------------------------------------------------------------------------------- serve

#: after the drain, how long the commands Telegram already handed over may take to be answered
LAST_ANSWERS_SECONDS = 15.0


async def serve(settings: Settings, *, console: bool) -> None:
    """Run the service with the adapters whose tokens are set, or the console."""
    from adapters.console import ConsoleAdapter
    from bot.service import Service
    from data import SqliteStore
    from generation.images import ImageStore
    from generation.pool import start_workers
    from generation.sources import SourceStore

    tokens = settings.tokens_set()
    use_console = console or not any(tokens.values())
    async with contextlib.AsyncExitStack() as stack:
        # exclusive: a second bot on the same DB_PATH stops here with one line, before loading anything
        store = await stack.enter_async_context(SqliteStore(settings.db_path, exclusive=True))
        _log.info("loading model %s (%s workers) ...", settings.model, settings.workers.value)
        workers = await start_workers(settings, stack)
        service = Service(
            settings=settings,
            store=store,
            workers=workers,
            sink=ImageStore(settings.output_dir, workers[0].profile.name),
            sources=SourceStore(settings.output_dir),
        )
        await service.start()
        telegram = None
        if tokens["TELEGRAM_TOKEN"] and not console:
            from adapters.telegram import TelegramAdapter

            telegram = await stack.enter_async_context(TelegramAdapter(service, settings))
        if tokens["DISCORD_TOKEN"] and not console:
            from adapters.discord import DiscordAdapter

            await stack.enter_async_context(DiscordAdapter(service, settings))
        # Registered last, so it runs first: the service stops (leaving unfinished jobs for the
        # next start) before the adapters it delivers through are closed.
        stack.push_async_callback(service.close)
        console_adapter = None
        if use_console:
            console_adapter = ConsoleAdapter(service)
            await console_adapter.start()
            if not console:
                _log.info("no DISCORD_TOKEN or TELEGRAM_TOKEN set: starting the console")
        # from here on a signal is a graceful stop, also while the unfinished jobs are taken back
        stop, hurry = _on_signals()
        await service.recover()
        if console_adapter is None:
            _log.info("brushbot is running; Ctrl+C stops it (unfinished jobs resume on the next start)")
            await stop.wait()
            # the running image and the results owed get SHUTDOWN_GRACE seconds (a second signal: none)
            await service.drain(settings.shutdown_grace, hurry)
            if telegram is not None and not hurry.is_set():
                # updates already fetched count as delivered for Telegram: answer them before closing
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LAST_ANSWERS_SECONDS):
                        await telegram.finish_intake()
            return
        # the console answers until the drain is over (a /draw typed meanwhile is refused in one line)
        chat = asyncio.create_task(console_adapter.run(), name="console")
        try:
            if await _signalled_before(chat, stop):
                await service.drain(settings.shutdown_grace, hurry)
            else:
                chat.result()  # end of input or /quit (or the console's own failure)
        finally:
            chat.cancel()
            await asyncio.gather(chat, return_exceptions=True)


async def _signalled_before(task: asyncio.Task[None], stop: asyncio.Event) -> bool:
    """Wait until ``task`` ends or ``stop`` is set; whether ``stop`` was set first."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    return stop.is_set()


def _on_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """Handle SIGINT and SIGTERM: the first sets the first event, a second one the second."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, signalled)
    return stop, hurry


# ---------------------------------------------------------------------------------- draw


def _split_out(words: Sequence[str]) -> tuple[str, Path | None, Path | None]:
    """(the draw text, ``--out DIR``, ``--image PATH``) from the command line's words."""
    text: list[str] = []
    paths: dict[str, Path] = {}
    it = iter(words)
    for word in it:
        name, eq, inline = word.partition("=")
        if name in ("--out", "--image"):
            value = inline if eq else next(it, None)
            if not value:
                raise BotError(
                    f"{name} needs {'a directory' if name == '--out' else 'the path of a picture'}"
                )
            if name in paths:
                raise BotError(f"{name} is given twice")
            paths[name] = Path(value)
        else:
            text.append(word)
    return " ".join(text), paths.get("--out"), paths.get("--image")


async def draw(settings: Settings, words: Sequence[str]) -> list[str]:
    """Draw one request directly on the worker (no queue, no credits) and save it."""
    from generation.images import ImageStore
    from generation.sources import SourceStore
    from generation.worker import Worker

    text, out, picture = _split_out(words)
    if out is not None:
        # the picture drawn from is kept next to the outputs, where the worker looks for it
        settings = settings.model_copy(update={"output_dir": out})
    worker = Worker(settings)
    limits = Limits.from_settings(settings)
    options = split_flags(text)
    # the profile is known before the model loads: refuse a bad request without waiting for it
    if picture is None:
        request = build_request(options, worker.profile, limits)
    else:
        precheck_picture_request(options, worker.profile, limits)
        data = await asyncio.to_thread(read_picture_file, picture, limits.max_input_bytes)
        keeper = SourceStore(settings.output_dir)
        source = await asyncio.to_thread(
            keeper.keep, data, max_pixels=limits.max_input_pixels, keep_pixels=2 * limits.max_pixels
        )
        request = build_request(options, worker.profile, limits, source)
    for note in request.notes:
        print(f"note: {note}", file=sys.stderr)
    async with worker:
        seeds = request.seeds(secrets.randbits(32))
        started = time.perf_counter()

        def on_step(step: int, total: int) -> None:
            sys.stderr.write(f"\r{messages.bar(step / total, 24)} step {step}/{total}")
            sys.stderr.flush()

        rendered = await worker.generate(request, seeds, on_step=on_step, cancel=threading.Event())
        sys.stderr.write("\n")
        job = Job(
            id=secrets.token_hex(5),
            user=UserRef(platform="cli", id="local"),
            request=request,
            model=worker.profile.name,
            credits=0,
            gpu_seconds=rendered.seconds,
            seeds=rendered.seeds,
            created_at=time.time(),
            free=True,
        )
        sink = ImageStore(settings.output_dir, worker.profile.name)
        saved = await asyncio.to_thread(sink.save, job, rendered)
        total = time.perf_counter() - started
    for image in saved:
        print(f"{image.path}\tseed {image.seed}")
    timings = " ".join(f"{k} {v:.2f}s" for k, v in rendered.timings.items())
    steps = (
        f"{worker.profile.steps_run(request)} of {request.steps}" if request.from_picture else request.steps
    )
    print(f"generated {len(saved)} image(s) {request.width}x{request.height}, {steps} steps, "
          f"in {rendered.seconds:.2f}s on the GPU thread ({timings}); {total:.2f}s with saving; "
          f"model loaded in {worker.load_seconds or 0:.1f}s")  # fmt: skip
    return [s.path for s in saved]


# ---------------------------------------------------------------------------------- doctor


def doctor(settings: Settings) -> int:
    """Print what brushbot would run on, without loading the model."""
    from generation.loading import doctor_report

    for line in doctor_report(settings):
        print(line)
    for name, is_set in settings.tokens_set().items():
        print(f"{name}: {'set' if is_set else 'not set'}")
    print(f"database: {settings.db_path} · outputs: {settings.output_dir} · admins: {len(settings.admins)}")
    return 0


# ---------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brushbot", description="Local AI image generation for chat groups."
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the configured chat adapters (the default)")
    sub.add_parser("console", help="a terminal chat against the full service")
    p_draw = sub.add_parser("draw", help="draw one prompt and save it", prefix_chars="\0")
    p_draw.add_argument(
        "words",
        nargs="*",
        help="PROMPT [--ar 16:9 --seed 7 --n 2 ...] [--image PATH --strength 0.6] [--out DIR]",
    )
    sub.add_parser("doctor", help="report torch/CUDA, memory, device plan, model and tokens")
    p_tiny = sub.add_parser("tiny-model", help="write the tiny random demo pipeline to DIR")
    p_tiny.add_argument("dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except BotError as err:
        print(f"brushbot: {err}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, _secrets(settings))
    command = args.command or "run"
    try:
        if command == "tiny-model":
            from generation.tiny import build_tiny_pipeline

            print(build_tiny_pipeline(args.dir))
        elif command == "doctor":
            return doctor(settings)
        elif command == "draw":
            asyncio.run(draw(settings, args.words))
        else:
            asyncio.run(serve(settings, console=command == "console"))
    except BotError as err:
        print(f"brushbot: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _entry() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
