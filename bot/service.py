"""The core service every adapter calls: submit, cancel, look up, administer.

It validates requests, charges credits through the store, queues jobs fairly, drives the GPU
workers through the dispatcher, saves and delivers results off the GPU thread, and makes sure
every job ends in a recorded state with its credits committed or refunded exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from bot import messages
from bot.config import Settings
from bot.credits import next_refill, period_key
from bot.dispatcher import Dispatcher
from bot.domain import (
    Balance,
    DrawRequest,
    Job,
    JobState,
    ModelProfile,
    Progress,
    QueueEntry,
    QueueView,
    SavedImage,
    SourceImage,
    Ticket,
    UploadFile,
    UserRecord,
    UserRef,
    UserView,
    credit_cost,
    gpu_cost,
)
from bot.errors import (
    BannedError,
    CancelledError,
    DeliveryError,
    GenerationError,
    MessageRefusedError,
    NotAuthorizedError,
    NotFoundError,
    NoWorkersError,
    QueueFullError,
    RefusedError,
    RequestError,
    UnreachableError,
    WorkerLostError,
)
from bot.fairqueue import FairQueue
from bot.grammar import (
    Limits,
    RawOptions,
    build_request,
    check_request,
    check_strength,
    parse_draw,
    precheck_picture_request,
    split_flags,
)
from bot.inputs import check_picture, check_size
from bot.ports import (
    CreditPolicy,
    Generator,
    ImageSink,
    PoolWorker,
    Rendered,
    SourceKeeper,
    Store,
    Transport,
    WorkerState,
)
from bot.status import StatusEngine
from bot.words import find_blocked

_log = logging.getLogger(__name__)

#: the recorded reason of a job cancelled once the GPU had taken it
_DRAWING_CANCELLED = "cancelled while drawing"
#: seconds between delivery attempts; the last failure ends the job failed and refunded
DELIVERY_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)
#: a job whose worker died under it this many times is a "poison job": failed and refunded
LOST_LIMIT = 2


@dataclass(slots=True)
class _Live:
    """In-memory companions of an unfinished job (never the source of truth: the store is)."""

    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    progress: Progress | None = None
    #: how many workers died under this job
    lost: int = 0
    #: why a user's (or admin's) cancel was accepted; once set, no result of this job is delivered
    cancelled_by: str | None = None
    #: a delivery attempt failed: part of the result may have reached the chat, so a cancel is too late
    tried: bool = False


class Service:
    """The platform-neutral core. Build once in ``__main__``; use as an async context manager."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        workers: Sequence[Generator],
        sink: ImageSink,
        clock: Callable[[], float] = time.time,
        rand32: Callable[[], int] = lambda: secrets.randbits(32),
        delivery_backoff: Sequence[float] = DELIVERY_BACKOFF,
        sources: SourceKeeper | None = None,
    ) -> None:
        if not workers:
            raise ValueError("at least one worker is needed")
        self.settings = settings
        self.store = store
        self.profile: ModelProfile = workers[0].profile
        self.limits = Limits.from_settings(settings)
        self._sink = sink
        self._sources = sources  # None: drawing from pictures is off
        self._clock = clock
        self._rand32 = rand32
        self._backoff = tuple(delivery_backoff)
        self._queue = FairQueue()
        self._dispatcher = Dispatcher(
            self._queue, workers, self._execute, self._defer, on_empty=self._workers_gone
        )
        #: images drawn and GPU seconds, by worker name
        self._worker_work: dict[str, list[float]] = {w.name: [0, 0.0] for w in workers}
        self._live: dict[str, _Live] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        #: set whenever a job ends (``drain`` re-checks what is left)
        self._ended = asyncio.Event()
        self._draining = False
        self.status = StatusEngine(
            progress_interval=settings.progress_interval,
            group_progress_interval=settings.group_progress_interval,
            board_interval=settings.board_interval,
            position=self.position,
            current=self._current_job,
        )
        self._submit_lock = asyncio.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="brushbot-encode")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._speed = self.profile.seconds_per_mpx_step
        self._closing = False
        self._started_at = clock()
        self.jobs_done = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the dispatcher. Call ``recover()`` once the adapters are registered."""
        self._dispatcher.start()

    async def close(self) -> None:
        """Stop without losing anything: unfinished jobs stay in the store for ``recover()``."""
        self._closing = True
        for live in self._live.values():
            live.cancel.set()
        await self._dispatcher.close()
        await self.status.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._encoder.shutdown(wait=True, cancel_futures=True)

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> bool:
        """Stop taking jobs, then let what is drawing or being delivered finish, for ``grace`` seconds.

        New submits are refused and queued jobs stay queued in the store for the next start. Returns
        True when every started job ended and every chat was told in time; False when ``grace`` ran
        out (or ``hurry`` was set): ``close()`` then interrupts what is left, to resume on the next start.
        """
        self._draining = True
        started = [live for live in self._live.values() if live.job.state is not JobState.QUEUED]
        _log.info("shutting down: stopping intake; %d started job(s) may finish within %.0fs",
                  len(started), grace)  # fmt: skip

        async def settled() -> None:
            while any(live.job.state is not JobState.QUEUED for live in self._live.values()):
                self._ended.clear()
                await self._ended.wait()
            await self.status.flushed()

        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(settled())]
        if hurry is not None:
            waiters.append(asyncio.ensure_future(hurry.wait()))
        try:
            done, _ = await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        finished = waiters[0] in done
        left = sum(1 for live in self._live.values() if live.job.state is not JobState.QUEUED)
        queued = len(self._live) - left
        if finished:
            _log.info(
                "shutting down: started jobs finished; %d queued job(s) wait for the next start", queued
            )
        else:
            _log.warning(
                "shutting down: %d started and %d queued job(s) resume on the next start", left, queued
            )
        return finished

    async def wait_idle(self) -> None:
        """Wait until every job has reached a final state and every chat has been told."""
        await self._idle.wait()
        await self.status.flushed()

    def register(self, transport: Transport) -> None:
        """An adapter registers its transport: how its platform's messages are carried."""
        self.status.register(transport)

    def _defer(self, job_id: str) -> bool:
        """Whether a queued job should let others use the GPU first: its chat cannot take its result for a while."""
        ahead = self.settings.delivery_ahead
        live = self._live.get(job_id)
        return ahead > 0 and live is not None and self.status.backlog(live.job) > ahead

    def _current_job(self, job_id: str) -> Job | None:
        live = self._live.get(job_id)
        return live.job if live is not None else None

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    # ------------------------------------------------------------------ helpers

    def is_admin(self, user: UserRef, *, vouched: bool = False) -> bool:
        """An admin is listed in ``ADMIN_IDS``, or ``vouched`` for by its adapter.

        An adapter vouches only when the operator configured a platform permission that makes
        admins (``DISCORD_ADMIN_PERMISSION``) and the platform says this user holds it in the
        operator's own server (``DISCORD_GUILD_ID``).
        """
        return vouched or user.key in self.settings.admins

    def _policy(self) -> CreditPolicy:
        return CreditPolicy(
            allowance=self.settings.daily_credits,
            period=period_key(
                self._clock(), self.settings.credit_period_hours, self.settings.credit_timezone
            ),
        )

    def next_refill_text(self) -> str:
        when = next_refill(self._clock(), self.settings.credit_period_hours, self.settings.credit_timezone)
        return when.strftime("%Y-%m-%d %H:%M %Z")

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def require_admin(self, actor: UserRef, vouched: bool = False) -> None:
        """Raise ``NotAuthorizedError`` unless ``actor`` is an admin (see ``is_admin``)."""
        if not self.is_admin(actor, vouched=vouched):
            raise NotAuthorizedError("only bot admins can do that")

    def parse(self, text: str) -> DrawRequest:
        """Parse and validate the text of a ``/draw`` command."""
        return parse_draw(text, self.profile, self.limits)

    def build(self, options: RawOptions) -> DrawRequest:
        """Validate options from a platform form (Discord's typed options)."""
        return build_request(options, self.profile, self.limits)

    def estimate(self, request: DrawRequest) -> float:
        return gpu_cost(request, self._speed, self.profile)

    def cost(self, request: DrawRequest) -> int:
        """Credits a request costs (shown before it runs)."""
        return credit_cost(request, self.profile)

    # ------------------------------------------------------------------ submit

    def _recheck(self, job: Job, request: DrawRequest) -> None:
        """A stored request against the current model and limits; ``RequestError`` says what no longer fits."""
        try:
            check_request(request, self.profile, self.limits)
        except RequestError as err:
            raise RequestError(messages.not_again_text(job, messages.no_longer_fits_text(str(err)))) from None

    def _check_content(self, request: DrawRequest, *, nsfw_allowed: bool) -> None:
        # Only the prompt: a negative prompt that names a word asks for its absence.
        word = find_blocked(request.prompt, self.settings.blocked_words)
        if word is not None:
            raise RequestError(f"the prompt contains a blocked word ({word}); nothing was queued")
        word = None if nsfw_allowed else find_blocked(request.prompt, self.settings.nsfw_words)
        if word is not None:
            raise RequestError(f"“{word}” is only allowed in channels marked NSFW; nothing was queued")

    async def submit(
        self,
        user: UserRef,
        request: DrawRequest,
        *,
        delivery: dict[str, Any],
        user_name: str = "",
        nsfw_allowed: bool = True,
    ) -> Ticket:
        """Validate, check bans and limits, reserve credits, persist and queue one job."""
        if self._draining or self._closing:
            raise RefusedError(messages.SHUTTING_DOWN)
        self._check_content(request, nsfw_allowed=nsfw_allowed)
        if self._dispatcher.alive == 0:
            raise NoWorkersError(messages.NO_WORKERS)
        async with self._submit_lock:
            record = await self.store.touch_user(user, user_name)
            if record.banned:
                raise BannedError("you are banned from drawing here")
            mine = self._queue.count_for(user.key) + sum(
                1 for live in self._live.values() if live.job.user == user and live.started is not None
            )
            if mine >= self.settings.max_queued_per_user:
                raise QueueFullError(
                    f"you already have {mine} jobs waiting (limit {self.settings.max_queued_per_user}); "
                    "wait for one to finish or /cancel one"
                )
            if len(self._queue) >= self.settings.max_queued_total:
                raise QueueFullError(
                    f"the queue is full ({self.settings.max_queued_total} jobs); try again in a few minutes"
                )
            free = self.is_admin(user)
            job = Job(
                id=secrets.token_hex(5),
                user=user,
                user_name=user_name or record.display_name,
                request=request,
                model=self.profile.name,
                credits=self.cost(request),
                gpu_seconds=self.estimate(request),
                seeds=request.seeds(self._rand32()),
                delivery=dict(delivery),
                created_at=self._clock(),
                free=free,
            )
            balance = await self.store.add_job(job, policy=None if free else self._policy())
            live = _Live(job=job)
            self._live[job.id] = live
            self._idle.clear()
            self._queue.push(job.id, user.key, job.gpu_seconds, weight=record.weight)
        self._dispatcher.wake()
        ticket = self._ticket(job, None if balance is None else balance.available)
        _log.info(
            "job %s queued for %s: %dx%d, %d steps, %d image(s), %d credit(s), position %d",
            job.id, user.key, request.width, request.height, request.steps, request.count,
            job.credits, ticket.position,
        )  # fmt: skip
        self.status.queued(job, ticket)
        return ticket

    def _ticket(self, job: Job, credits_left: int | None) -> Ticket:
        position, eta = self.position(job.id)
        return Ticket(
            job=job, position=position, eta_seconds=eta, credits_cost=job.credits, credits_left=credits_left
        )

    async def reroll(
        self,
        actor: UserRef,
        job_id: str,
        *,
        delivery: dict[str, Any],
        user_name: str = "",
        nsfw_allowed: bool = True,
    ) -> Ticket:
        """The same settings with a new seed, charged to ``actor``."""
        job = await self.job(job_id)
        request = replace(job.request, seed=None, notes=())
        self._recheck(job, request)
        return await self.submit(
            actor, request, delivery=delivery, user_name=user_name, nsfw_allowed=nsfw_allowed
        )

    # ------------------------------------------------------------------ pictures (image-to-image)

    def check_picture_size(self, size_bytes: int) -> None:
        """Refuse a picture by the size its platform declares, before downloading it (``MAX_INPUT_BYTES``)."""
        check_size(size_bytes, self.limits.max_input_bytes)

    @property
    def draws_from_pictures(self) -> bool:
        """Whether this bot draws from pictures: the model can, and pictures can be kept."""
        return self._sources is not None and self.profile.img2img is not None

    async def keep_picture(self, data: bytes) -> SourceImage:
        """Check a user's picture (size, format by its bytes, pixels before decoding) and keep it.

        Every refusal is one ``RequestError`` line; nothing is charged.
        """
        if self._sources is None:
            raise RequestError("drawing from a picture is not enabled here")
        check_picture(data, self.limits.max_input_bytes)
        keeper, limits = self._sources, self.limits
        # decoding is blocking work: never on the event loop. Twice the largest output is kept,
        # enough for any crop to the output's shape; a 12 MP photo kept whole took 6 s to encode.
        return await asyncio.to_thread(
            keeper.keep, data, max_pixels=limits.max_input_pixels, keep_pixels=2 * limits.max_pixels
        )

    async def submit_picture(
        self,
        user: UserRef,
        text: str | RawOptions,
        picture: bytes | Callable[[], Awaitable[bytes]],
        *,
        delivery: dict[str, Any],
        user_name: str = "",
        nsfw_allowed: bool = True,
    ) -> Ticket:
        """Draw from a picture: ``text`` is what follows ``/draw`` (or a platform form's options).

        The words are checked first, then the picture is fetched (``picture`` may be a download
        to start only then), checked and kept, then the job is submitted like any other (the job
        row holds the kept picture's reference).
        """
        options = split_flags(text) if isinstance(text, str) else text
        precheck_picture_request(options, self.profile, self.limits)
        data = picture if isinstance(picture, bytes) else await picture()
        source = await self.keep_picture(data)
        request = build_request(options, self.profile, self.limits, source)
        return await self.submit(
            user, request, delivery=delivery, user_name=user_name, nsfw_allowed=nsfw_allowed
        )

    async def vary(
        self,
        actor: UserRef,
        job_id: str,
        strength: float,
        *,
        delivery: dict[str, Any],
        user_name: str = "",
        nsfw_allowed: bool = True,
    ) -> Ticket:
        """A variation of a finished job's first image: its prompt and size, a new seed, one image.

        ``strength`` is ``VARY_SUBTLE`` or ``VARY_STRONG`` from the Vary buttons; charged to ``actor``.
        """
        job = await self.job(job_id)
        strength = check_strength(strength, job.request.steps, self.profile)
        source = await self.keep_picture(await self.result_picture(job.id))
        request = replace(job.request, seed=None, count=1, notes=(), strength=strength, source=source.ref)
        self._recheck(job, request)
        return await self.submit(
            actor, request, delivery=delivery, user_name=user_name, nsfw_allowed=nsfw_allowed
        )

    async def result_picture(self, job_id: str) -> bytes:
        """The PNG bytes of a job's first image, to draw from (``/draw`` as a reply to a result)."""
        job = await self.job(job_id)
        if not job.outputs:
            raise RequestError(f"job {job.id} has no picture to vary yet ({job.state.value})")
        try:
            return await asyncio.to_thread(_read_bytes, job.outputs[0])
        except FileNotFoundError:
            raise RequestError(f"the picture of job {job.id} is no longer on disk") from None

    # ------------------------------------------------------------------ looking

    async def job(self, job_id: str) -> Job:
        live = self._live.get(job_id)
        if live is not None:
            return live.job
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFoundError(f"there is no job {job_id[:20]}")
        return job

    def _running_remaining(self) -> float:
        now = time.perf_counter()
        remaining = 0.0
        for live in self._live.values():
            if live.started is not None:
                remaining = max(remaining, live.job.gpu_seconds - (now - live.started))
        return max(0.0, remaining)

    def position(self, job_id: str) -> tuple[int, float]:
        """(position, ETA in seconds) of a queued job; (0, 0) for a running or unknown one."""
        if job_id not in self._queue:
            return 0, 0.0
        return self._queue.position(job_id), self._queue.eta(job_id, self._running_remaining())

    async def my_jobs(self, user: UserRef, limit: int = 10) -> list[QueueEntry]:
        """The user's recent jobs, unfinished ones with their position."""
        out: list[QueueEntry] = []
        for job in await self.store.user_jobs(user, limit):
            live = self._live.get(job.id)
            if live is not None:
                position, eta = self.position(job.id)
                out.append(
                    QueueEntry(
                        job=live.job, position=position, eta_seconds=eta,
                        running=live.started is not None, progress=live.progress,
                    )
                )  # fmt: skip
            else:
                out.append(QueueEntry(job=job, position=0, eta_seconds=0.0))
        return out

    def queue_view(self, limit: int = 20) -> QueueView:
        entries: list[QueueEntry] = [
            QueueEntry(job=live.job, position=0, eta_seconds=0.0, running=True, progress=live.progress)
            for live in self._live.values()
            if live.started is not None
        ]
        elapsed = self._running_remaining()
        for job_id in self._queue.order(limit):  # O(n + k log u): no full sort for a /queue view
            live = self._live[job_id]
            entries.append(QueueEntry(job=live.job, position=len(entries), eta_seconds=elapsed))
            elapsed += live.job.gpu_seconds
        return QueueView(
            entries=tuple(entries), total_queued=len(self._queue), users_waiting=len(self._queue.users())
        )

    async def credits(self, user: UserRef) -> Balance:
        if self.is_admin(user):
            balance = await self.store.balance(user, self._policy())
            return replace(balance, unlimited=True)
        return await self.store.balance(user, self._policy())

    async def upload_file(self, path: str, limit_bytes: int) -> UploadFile:
        """The saved PNG, or a smaller encoding when it exceeds ``limit_bytes`` (off the loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encoder, self._sink.fit, path, limit_bytes)

    async def update_delivery(self, job_id: str, **fields: Any) -> None:
        """Adapters record chat references (e.g. the status message id) so a restart can reuse them."""
        await self.store.update_delivery(job_id, fields)
        live = self._live.get(job_id)
        if live is not None:
            live.job = replace(live.job, delivery={**live.job.delivery, **fields})

    async def authorize_delete(self, actor: UserRef, job_id: str, *, vouched: bool = False) -> Job:
        """The job, when ``actor`` may delete its result (the requester or an admin)."""
        job = await self.job(job_id)
        if job.user != actor and not self.is_admin(actor, vouched=vouched):
            raise NotAuthorizedError("only the person who asked for this image or an admin can delete it")
        return job

    # ------------------------------------------------------------------ cancel

    def _newest_cancellable(self, actor: UserRef) -> str:
        mine = [
            live.job for live in self._live.values() if live.job.user == actor and live.job.state.cancellable
        ]
        if not mine:
            raise RequestError(messages.NOTHING_TO_CANCEL)
        return max(mine, key=lambda job: job.created_at).id

    async def cancel(self, actor: UserRef, job_id: str | None = None, *, vouched: bool = False) -> Job:
        """Cancel a job, truthfully: honoured (nothing delivered, refunded) or refused as too late.

        A queued job, or one whose result still waits unsent in its chat's outbox, is cancelled
        and refunded at once (the returned job is CANCELLED). A drawing job (denoising, decoding
        or being saved) is interrupted; whatever it still produces is thrown away and it is
        refunded when it stops (the returned job is RUNNING). Once a send of the result has
        begun, ``RequestError`` says it is too late. Without a job id, the caller's newest
        unfinished job.
        """
        job_id = job_id.strip() if job_id else self._newest_cancellable(actor)
        job = await self.job(job_id)
        if job.user != actor and not self.is_admin(actor, vouched=vouched):
            raise NotAuthorizedError("you can only cancel your own jobs")
        live = self._live.get(job_id)
        if live is None or live.job.state.final:
            raise RequestError(messages.too_late_text(job))
        who = "you" if actor == job.user else "an admin"
        # No await between these checks and the decision: the job cannot change phase meanwhile.
        if live.cancelled_by is not None:
            return live.job  # already stopping
        if live.job.state is JobState.QUEUED:  # not started (while shutting down, no longer in the queue)
            self._queue.remove(job_id)
            live.cancelled_by = f"cancelled by {who}"
            await self._end(live, JobState.CANCELLED, live.cancelled_by)
            return live.job
        if live.job.state is JobState.DELIVERING:
            if live.tried or not self.status.withdraw(job_id):
                raise RequestError(messages.too_late_text(live.job))
            live.cancelled_by = f"cancelled by {who}"
            _log.info("job %s: result withdrawn before sending, cancelled by %s", job_id, actor.key)
            await self._end(live, JobState.CANCELLED, live.cancelled_by)
            return live.job
        live.cancelled_by = f"cancelled by {who}"
        live.cancel.set()
        _log.info("job %s: cancel requested by %s", job_id, actor.key)
        return live.job

    # ------------------------------------------------------------------ running

    async def _execute(self, worker: Generator, job_id: str) -> None:
        live = self._live.get(job_id)
        if live is None or self._draining:
            self._queue.done(job_id)  # shutting down: a queued job stays queued in the store
            return
        started = self._clock()
        live.started = time.perf_counter()
        live.job = job = replace(live.job, state=JobState.RUNNING, started_at=started)
        self.status.started(job)
        # The row is marked running while the GPU already draws: the write is off the critical path.
        marking = asyncio.ensure_future(self.store.mark_running(job_id, at=started))

        def on_step(step: int, total: int) -> None:
            self._on_progress(live, step, total)

        rendered: Rendered | None = None
        failure: tuple[JobState, str] | None = None
        requeued = False
        try:
            rendered = await worker.generate(job.request, job.seeds, on_step=on_step, cancel=live.cancel)
        except WorkerLostError as err:
            live.lost += 1
            if live.lost >= LOST_LIMIT:
                _log.error("job %s: its worker died under it %d times; giving up", job_id, live.lost)
                failure = (JobState.FAILED, messages.POISON_JOB)
            elif live.cancel.is_set():
                failure = (JobState.CANCELLED, "cancelled while drawing")
            else:
                _log.warning("job %s: worker %s lost (%s); the job goes back to the queue", job_id,
                             worker.name, err)  # fmt: skip
                requeued = True
        except CancelledError:
            failure = (JobState.CANCELLED, _DRAWING_CANCELLED)
        except GenerationError as err:
            _log.warning("job %s failed: %s", job_id, err)
            failure = (JobState.FAILED, str(err))
        except Exception:
            _log.exception("job %s: unexpected error from worker %s", job_id, worker.name)
            failure = (JobState.FAILED, "something went wrong while drawing")
        finally:
            live.started = None
            if requeued and not self._closing:
                # back to the head of its user's queue, for the next free worker
                self._queue.requeue(job_id)
                live.job = replace(live.job, state=JobState.QUEUED, started_at=None)
                self._dispatcher.wake()
            else:
                self._queue.done(job_id, rendered.seconds if rendered is not None else None)
        if rendered is not None:
            work = self._worker_work.setdefault(worker.name, [0, 0.0])
            work[0] += len(rendered.seeds)
            work[1] += rendered.seconds
        try:
            await marking
        except Exception:
            # not fatal: the end state is still recorded below (or the job is recovered on restart)
            _log.exception("job %s: could not be marked running", job_id)
        if requeued:
            return  # its row stays "running" until it runs again (or is recovered on restart)
        if failure is not None:
            if failure[0] is JobState.CANCELLED and self._closing:
                return  # shutting down: the job stays "running" and is re-queued on restart
            await self._end(live, *failure)
            return
        assert rendered is not None
        self._learn_speed(job, rendered)
        if live.cancelled_by is not None:
            # cancelled during the decode, after the last step: the cancel was promised, keep it
            await self._end(live, JobState.CANCELLED, _DRAWING_CANCELLED)
            return
        # Saving and delivery happen elsewhere: the dispatcher can start the next job now.
        self._spawn(self._finish(live, rendered), f"finish-{job_id}")

    def _caption(self, job: Job) -> str:
        return messages.caption(job, messages.job_seconds(job, self._clock()))

    def _learn_speed(self, job: Job, rendered: Rendered) -> None:
        work = gpu_cost(job.request, 1.0, self.profile)  # megapixel-steps run, doubled with CFG
        if work > 0 and rendered.seconds > 0:
            self._speed = 0.7 * self._speed + 0.3 * (rendered.seconds / work)

    def _on_progress(self, live: _Live, step: int, total: int) -> None:
        if live.started is None:
            return  # generation has ended: no progress may follow the result
        live.progress = Progress(step=step, total=total, elapsed=time.perf_counter() - live.started)
        self.status.progress(live.job, live.progress)

    async def _finish(self, live: _Live, rendered: Rendered) -> None:
        job = live.job
        loop = asyncio.get_running_loop()
        try:
            saved = await loop.run_in_executor(self._encoder, self._sink.save, job, rendered)
        except OSError as err:
            # a full or unwritable OUTPUT_DIR: one line for the operator; the next job tries again
            _log.error("job %s: the images could not be saved in %s: %s", job.id, self.settings.output_dir,
                       err.strerror or err)  # fmt: skip
            await self._end(live, JobState.FAILED, messages.SAVE_FAILED)
            return
        except Exception:
            _log.exception("job %s: saving the images failed", job.id)
            await self._end(live, JobState.FAILED, messages.SAVE_FAILED)
            return
        try:
            await self.store.mark_generated(job.id, [s.path for s in saved])
        except Exception:
            _log.exception("job %s: the saved images could not be recorded", job.id)
            await self._end(live, JobState.FAILED, messages.RECORD_FAILED)
            return
        if live.cancelled_by is not None:
            # cancelled while saving: nothing was sent yet, so the cancel holds
            await self._end(live, JobState.CANCELLED, _DRAWING_CANCELLED)
            return
        # from here on a cancel is answered "too late" once the result's send has begun
        live.job = replace(live.job, state=JobState.DELIVERING, outputs=tuple(s.path for s in saved))
        await self._deliver(live, saved)

    async def _deliver(self, live: _Live, saved: Sequence[SavedImage]) -> None:
        job = live.job
        if not self.status.knows(job.user.platform):
            await self._end(live, JobState.FAILED, f"no {job.user.platform} connection to deliver to")
            return
        attempts = len(self._backoff) + 1
        for attempt in range(attempts):
            try:
                await self.status.deliver(live.job, saved, self._caption)
            except CancelledError:
                return  # withdrawn unsent by ``cancel``, which records the end
            except MessageRefusedError as err:  # the chat is there: tell the requester in a line of text
                _log.warning("job %s: the result was refused: %s", job.id, err)
                await self._end(live, JobState.FAILED, f"the result could not be posted: {err}")
                return
            except UnreachableError as err:
                _log.warning("job %s: chat unreachable: %s", job.id, err)
                await self._end(live, JobState.FAILED, f"the chat could not be reached: {err}", notify=False)
                return
            except Exception as err:
                if attempt + 1 >= attempts:
                    _log.error("job %s: delivery failed %d times, giving up: %s", job.id, attempts, err)
                    await self._end(live, JobState.FAILED, "the result could not be delivered")
                    return
                live.tried = True
                delay = self._backoff[attempt]
                if not isinstance(err, DeliveryError):
                    _log.exception("job %s: delivery attempt %d failed", job.id, attempt + 1)
                else:
                    _log.warning("job %s: delivery attempt %d failed (%s); retrying in %.0fs", job.id,
                                 attempt + 1, err, delay)  # fmt: skip
                await asyncio.sleep(delay)
            else:
                await self._end(live, JobState.DELIVERED, None, notify=False)
                return

    async def _end(self, live: _Live, state: JobState, error: str | None, *, notify: bool = True) -> None:
        """Record a final state (commit or refund happens in the same transaction) and tell the chat."""
        job = live.job
        try:
            try:
                untold = notify and error is not None
                changed = await self.store.finish_job(
                    job.id, state, at=self._clock(), error=error, untold=untold
                )
            except Exception:
                # the row stays unfinished, so the next start recovers it; nothing is charged twice
                _log.exception("job %s: could not record its end (%s)", job.id, state.value)
                return
            live.job = replace(job, state=state, error=error, finished_at=self._clock())
            if changed:
                self.jobs_done += 1
                _log.info("job %s %s%s", job.id, state.value, f": {error}" if error else "")
            if notify and changed and error is not None:
                self._tell_ended(live.job, error)
        finally:
            self.status.ended(job.id)
            self._live.pop(job.id, None)
            self._ended.set()
            if not self._live:
                self._idle.set()

    def _tell_ended(self, job: Job, error: str) -> None:
        """Tell the requester how the job ended; the row keeps saying "untold" until that was tried."""
        told = self.status.failed(job, messages.ended_text(job, error))
        if told is not None:
            told.add_done_callback(functools.partial(self._told, job.id))

    def _told(self, job_id: str, future: asyncio.Future[None]) -> None:
        if future.cancelled():  # stopped before it went out: the next start tells them
            return
        if future.exception() is not None:  # tried: a chat that refused it is not asked again
            _log.warning("job %s: could not tell the chat it ended: %s", job_id, future.exception())
        self._spawn(self._mark_told(job_id), f"told-{job_id}")

    async def _mark_told(self, job_id: str) -> None:
        try:
            await self.store.mark_told(job_id)
        except Exception:  # told once more after the next start, at worst
            _log.exception("job %s: could not record that its chat was told", job_id)

    # ------------------------------------------------------------------ recovery

    async def recover(self) -> int:
        """Re-queue (in their original order) or re-deliver every unfinished job; returns how many."""
        for ended in await self.store.untold_jobs():  # a crash came between its end and the telling
            if self.status.knows(ended.user.platform):
                self._tell_ended(ended, ended.error or "it did not finish")
        count = 0
        for job in await self.store.unfinished_jobs():
            if job.id in self._live:
                continue
            live = _Live(job=job)
            self._live[job.id] = live
            self._idle.clear()
            count += 1
            if not self.status.knows(job.user.platform):
                await self._end(live, JobState.FAILED, f"the {job.user.platform} adapter is not running")
                continue
            saved = await asyncio.to_thread(_saved_outputs, job) if job.state is JobState.DELIVERING else None
            if saved is not None:
                self._spawn(self._deliver(live, saved), f"redeliver-{job.id}")
                continue
            live.job = replace(job, state=JobState.QUEUED, started_at=None)
            reason = self._unfit(job)
            if reason is not None:
                _log.warning("job %s: not resumed: %s", job.id, reason)
                await self._end(live, JobState.FAILED, reason)
                continue
            record = await self.store.get_user(job.user)
            self._queue.push(job.id, job.user.key, job.gpu_seconds, weight=record.weight if record else 1.0)
            left = None if job.free else (await self.store.balance(job.user, self._policy())).available
            self.status.queued(live.job, self._ticket(live.job, left), resumed=True)
        if count:
            _log.info("recovered %d unfinished job(s)", count)
            self._dispatcher.wake()
        return count

    def _unfit(self, job: Job) -> str | None:
        """Why a recovered job can no longer run as it was asked (model, limits, words), or None."""
        if job.model != self.profile.name:
            return messages.model_changed_text(job, self.profile.name)
        try:
            check_request(job.request, self.profile, self.limits)
            self._check_content(job.request, nsfw_allowed=True)
        except RequestError as err:
            return messages.no_longer_fits_text(str(err))
        return None

    # ------------------------------------------------------------------ admin

    async def _target(self, target: UserRef) -> UserRecord:
        record = await self.store.get_user(target)
        return record or await self.store.touch_user(target)

    async def admin_show(self, actor: UserRef, target: UserRef, *, vouched: bool = False) -> UserView:
        self.require_admin(actor, vouched)
        record = await self._target(target)
        balance = await self.store.balance(target, self._policy())
        history = await self.store.history(target, 10)
        return UserView(record=record, balance=balance, history=tuple(history))

    async def admin_set(
        self, actor: UserRef, target: UserRef, amount: int | None, *, vouched: bool = False
    ) -> Balance:
        self.require_admin(actor, vouched)
        if amount is not None and not 0 <= amount <= 1_000_000:
            raise RequestError(f"allowance {amount} is out of range: allowed 0–1000000")
        return await self.store.set_allowance(target, amount, actor=actor.key, policy=self._policy())

    async def admin_grant(
        self, actor: UserRef, target: UserRef, amount: int, *, vouched: bool = False
    ) -> Balance:
        self.require_admin(actor, vouched)
        if amount == 0 or not -1_000_000 <= amount <= 1_000_000:
            raise RequestError(f"grant {amount} is out of range: allowed -1000000–1000000, not 0")
        return await self.store.grant(target, amount, actor=actor.key, policy=self._policy())

    async def admin_reset(self, actor: UserRef, target: UserRef, *, vouched: bool = False) -> Balance:
        self.require_admin(actor, vouched)
        return await self.store.reset(target, actor=actor.key, policy=self._policy())

    async def admin_ban(
        self, actor: UserRef, target: UserRef, banned: bool = True, *, vouched: bool = False
    ) -> UserRecord:
        self.require_admin(actor, vouched)
        if banned and self.is_admin(target):
            raise RequestError("admins cannot be banned; remove them from ADMIN_IDS first")
        return await self.store.set_banned(target, banned, actor=actor.key)

    async def admin_weight(
        self, actor: UserRef, target: UserRef, weight: float, *, vouched: bool = False
    ) -> UserRecord:
        self.require_admin(actor, vouched)
        if not 0.01 <= weight <= 100:
            raise RequestError(f"weight {weight:g} is out of range: allowed 0.01–100")
        record = await self.store.set_weight(target, weight, actor=actor.key)
        self._queue.set_weight(target.key, weight)
        return record

    async def seen(self, user: UserRef, display_name: str) -> None:
        """Remember a user's display name (or @username) so admins can refer to them by it."""
        await self.store.touch_user(user, display_name)

    async def find_user(self, platform: str, name: str) -> UserRef | None:
        record = await self.store.find_user(platform, name)
        return record.user if record else None

    async def stats(self, actor: UserRef, *, vouched: bool = False) -> dict[str, Any]:
        self.require_admin(actor, vouched)
        stats = dict(await self.store.job_stats())
        stats.update(
            queued=len(self._queue),
            running=sum(1 for live in self._live.values() if live.started is not None),
            users_waiting=len(self._queue.users()),
            model=self.profile.name,
            workers=len(self._dispatcher.workers),
            **self._worker_stats(),
            seconds_per_mpx_step=round(self._speed, 4),
            **self.status.stats(),
            uptime_seconds=round(self._clock() - self._started_at),
        )
        return stats

    def _worker_stats(self) -> dict[str, str]:
        """One line per worker: what it does, images done, seconds per image."""
        lines: dict[str, str] = {}
        for worker in self._dispatcher.workers:
            job_id = self._dispatcher.current.get(worker.name)
            if isinstance(worker, PoolWorker):
                state = worker.state
            else:
                state = WorkerState.DRAWING if job_id is not None else WorkerState.IDLE
            images, seconds = self._worker_work.get(worker.name, [0, 0.0])
            lines[f"worker {worker.name}"] = messages.worker_line(state.value, job_id, int(images), seconds)
        return lines

    def _workers_gone(self) -> None:
        """The last worker retired: what is queued can never run, so it ends failed and refunded."""
        for job_id in self._queue.order():
            live = self._live.get(job_id)
            if live is not None and self._queue.remove(job_id):
                self._spawn(self._end(live, JobState.FAILED, messages.WORKERS_GONE), f"fail-{job_id}")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _saved_outputs(job: Job) -> list[SavedImage] | None:
    """The saved images of a job that was generated but not delivered, if all files still exist."""
    if not job.outputs or not all(os.path.exists(p) for p in job.outputs):
        return None
    return [
        SavedImage(
            path=p, seed=s, width=job.request.width, height=job.request.height, size_bytes=os.path.getsize(p)
        )
        for p, s in zip(job.outputs, job.seeds, strict=False)
    ]


__all__ = ["QueueEntry", "QueueView", "Service", "UserView"]
