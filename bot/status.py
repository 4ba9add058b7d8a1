"""The status engine: what each chat is told about its jobs, and when, within its message budget.

Every message the bot sends about a job goes through here. Messages are grouped by *lane* (a
chat, or a Discord interaction token: whatever shares one allowance); each lane has one
outbox, drained by one task, that sends the most important message first and only when the
lane's ``Budget`` allows it, so the platform never has reason to answer 429::

    RESULT  > NOTICE (refusals, errors, answers)  > ACK (first status, a new board)  > UPDATE

UPDATEs (progress edits, board edits) are folded: a newer one replaces the one still
waiting, and they are sent only while the lane has slack beyond the results it still owes
(an UPDATE that waited a whole budget period goes anyway, so a board is never stale for
long). Nothing else is ever dropped.

A quiet chat sees what it always saw: a status message (queued, then progress), then the
result replacing it. In a busy group (another job of the chat is unfinished, or its budget
is low) a job gets no status message of its own: one live *board* per chat shows what is
drawing and who waits, and each result arrives as a reply to its request. Lanes that share a
``Lane.group`` (a Discord channel, where every interaction has a webhook of its own) are busy
while another job of the group is unfinished: a new job there gets no status edits (the
platform's own acknowledgement stands), progress of the jobs that have a status thins to the
group interval, and each result replaces its acknowledgement. The texts are
``bot.messages``; the adapters only carry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot import messages
from bot.budget import Budget
from bot.domain import Job, Progress, SavedImage, Ticket
from bot.errors import CancelledError, RateLimitedError
from bot.ports import Lane, LaneKind, Phase, Transport

_log = logging.getLogger(__name__)

_BOARD = ("board", "")
#: a group lane with fewer free messages than this is busy even with one job (status + result + slack)
QUIET_FREE = 4


class Priority(enum.IntEnum):
    """Order in which a lane's waiting messages go out (lower first)."""

    RESULT = 0
    NOTICE = 1
    ACK = 2
    UPDATE = 3


@dataclass(slots=True, eq=False)
class _Op:
    priority: Priority
    seq: int
    cost: int
    run: Callable[[], Awaitable[None]]
    since: float
    key: tuple[str, str] | None = None
    job_id: str | None = None
    done: asyncio.Future[None] | None = None
    #: for messages whose cost is known only when they go (the board: posting 1, removing 0)
    cost_fn: Callable[[], int] | None = None
    #: its send was tried once (a 429 puts it back): part of it may have reached the chat
    tried: bool = False


@dataclass(slots=True, eq=False)
class _JobView:
    job: Job
    own_status: bool
    drawing: bool = False
    progress: Progress | None = None
    last_update: float = -math.inf


@dataclass(slots=True, eq=False)
class _LaneState:
    lane: Lane
    transport: Transport
    budget: Budget
    ops: list[_Op] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    jobs: dict[str, _JobView] = field(default_factory=dict)
    board_shown: bool = False
    board_at: float = -math.inf
    sent: int = 0
    in_flight: list[_Op] = field(default_factory=list)


class StatusEngine:
    """Owns every lane's outbox and every job's status; built by the service, one per process."""

    def __init__(
        self,
        *,
        progress_interval: float = 1.0,
        group_progress_interval: float = 3.0,
        board_interval: float = 5.0,
        position: Callable[[str], tuple[int, float]] = lambda job_id: (0, 0.0),
        current: Callable[[str], Job | None] = lambda job_id: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transports: dict[str, Transport] = {}
        self._lanes: dict[str, _LaneState] = {}
        self._job_lane: dict[str, _LaneState] = {}
        self._groups: dict[str, set[str]] = {}  # group key -> its unfinished job ids
        self._job_group: dict[str, str] = {}
        self._progress_interval = progress_interval
        self._group_progress_interval = group_progress_interval
        self._board_interval = board_interval
        self._position = position
        self._current = current
        self._clock = clock
        self._seq = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # ------------------------------------------------------------------ wiring

    def register(self, transport: Transport) -> None:
        """An adapter's transport; jobs and answers of its platform go through it."""
        self._transports[transport.platform] = transport

    def knows(self, platform: str) -> bool:
        return platform in self._transports

    async def close(self) -> None:
        """Stop every outbox; what was not delivered stays in the store and is delivered after a restart."""
        self._closed = True
        tasks = [st.task for st in self._lanes.values() if st.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for st in self._lanes.values():
            for op in st.ops:
                if op.done is not None and not op.done.done():
                    op.done.cancel()
            st.ops.clear()
        self._idle.set()

    async def flushed(self) -> None:
        """Wait until everything that matters has been sent: results, notices, acknowledgements.

        Folded updates (progress, board edits) may still wait for slack.
        """
        await self._idle.wait()

    def _check_idle(self) -> None:
        pending = any(
            op.priority < Priority.UPDATE for st in self._lanes.values() for op in (*st.ops, *st.in_flight)
        )
        if pending:
            self._idle.clear()
        else:
            self._idle.set()

    def observe(self, lane_key: str, *, limit: int | None, remaining: int, reset_after: float) -> None:
        """A platform's rate-limit headers for a lane (Discord): the lane's budget learns from them."""
        st = self._lanes.get(lane_key)
        if st is not None:
            st.budget.observe(limit=limit, remaining=remaining, reset_after=reset_after, now=self._clock())
            st.wake.set()

    def backlog(self, job: Job) -> float:
        """Seconds until a new result could be sent to ``job``'s chat, behind the results waiting there."""
        st = self._job_lane.get(job.id)
        if st is None:
            return 0.0
        owed = sum(_cost_of(op) for op in (*st.ops, *st.in_flight) if op.priority is Priority.RESULT) + 1
        budget, now = st.budget, self._clock()
        limit = budget.limit
        # within one burst the budget knows exactly; beyond it, results go at its average rate
        return budget.wait(min(owed, limit), now) + max(0, owed - limit) * budget.period / limit

    def stats(self) -> dict[str, int]:
        """Messages sent and waiting, over all lanes."""
        return {
            "lanes": len(self._lanes),
            "messages_sent": sum(st.sent for st in self._lanes.values()),
            "messages_waiting": sum(len(st.ops) for st in self._lanes.values()),
        }

    # ------------------------------------------------------------------ a job's life

    def queued(self, job: Job, ticket: Ticket, *, resumed: bool = False) -> None:
        """A job was accepted (or re-queued after a restart): acknowledge it as the lane can afford."""
        st = self._lane_of(job.user.platform, job.delivery)
        if st is None:
            return
        now = self._clock()
        others = [v for v in st.jobs.values() if v.job.id != job.id]
        busy = st.lane.board and (bool(others) or st.budget.free(now) < QUIET_FREE)
        busy = busy or self._group_busy(st.lane, job.id)
        view = _JobView(job=job, own_status=not busy)
        st.jobs[job.id] = view
        self._job_lane[job.id] = st
        if st.lane.group is not None:
            self._groups.setdefault(st.lane.group, set()).add(job.id)
            self._job_group[job.id] = st.lane.group
        if view.own_status:
            text = messages.ticket_text(ticket) + ("\n" + messages.RESUMED if resumed else "")
            self._push(st, Priority.ACK, lambda: st.transport.status(self._fresh(job), text, Phase.QUEUED),
                       key=("ack", job.id), job_id=job.id)  # fmt: skip
        elif st.lane.board:
            self._board(st, Priority.UPDATE if st.board_shown else Priority.ACK)

    def started(self, job: Job) -> None:
        """The GPU took the job."""
        view, st = self._view(job)
        if view is None or st is None:
            return
        view.job, view.drawing = job, True
        if not view.own_status and st.lane.board:
            self._board(st, Priority.UPDATE)

    def progress(self, job: Job, progress: Progress) -> None:
        """A denoising step finished: maybe edit the status (folded, throttled, only with slack)."""
        view, st = self._view(job)
        if view is None or st is None or not view.drawing:
            return
        view.progress = progress
        now = self._clock()
        shared = st.lane.kind is LaneKind.GROUP or self._group_busy(st.lane, job.id)
        interval = self._group_progress_interval if shared else self._progress_interval
        if progress.step >= progress.total or now - view.last_update < interval:
            return  # the last step is followed by the result at once
        view.last_update = now
        if view.own_status:
            text = messages.progress_text(job, progress)
            self._push(st, Priority.UPDATE, lambda: st.transport.status(self._fresh(job), text, Phase.DRAWING),
                       key=("progress", job.id), job_id=job.id)  # fmt: skip
        elif st.lane.board:
            self._board(st, Priority.UPDATE)

    async def deliver(self, job: Job, images: Sequence[SavedImage], caption: Callable[[Job], str]) -> None:
        """Send the result (first in its lane's line); raises what the transport raised."""
        st = self._lane_of(job.user.platform, job.delivery)
        if st is None:
            raise RuntimeError(f"no transport for {job.user.platform}")
        self._job_lane.setdefault(job.id, st)
        self._settle_updates(st, job)
        cost = st.transport.result_cost(job, images)
        done = asyncio.get_running_loop().create_future()

        async def run() -> None:
            fresh = self._fresh(job)
            await st.transport.result(fresh, images, caption(fresh))

        self._push(st, Priority.RESULT, run, cost=cost, job_id=job.id, done=done)
        await done

    def withdraw(self, job_id: str) -> bool:
        """Take back a job's result that still waits in its outbox; False once its send has begun.

        The waiting ``deliver`` call raises ``bot.errors.CancelledError``.
        """
        st = self._job_lane.get(job_id)
        if st is None:
            return False
        for op in st.ops:
            if op.job_id == job_id and op.priority is Priority.RESULT and not op.tried:
                st.ops.remove(op)
                if op.done is not None and not op.done.done():
                    op.done.set_exception(CancelledError("withdrawn before sending"))
                self._check_idle()
                return True
        return False

    def failed(self, job: Job, text: str) -> asyncio.Future[None] | None:
        """Tell the chat how the job ended (not delivered); returns when it was said, or None."""
        st = self._lane_of(job.user.platform, job.delivery)
        if st is None:
            return None
        self._settle_updates(st, job)
        done = asyncio.get_running_loop().create_future()
        self._push(
            st, Priority.NOTICE, lambda: st.transport.notice(self._fresh(job), text), job_id=job.id, done=done
        )
        return done

    def ended(self, job_id: str) -> None:
        """The job reached a final state: it leaves its lane (and the board, and its group)."""
        group = self._job_group.pop(job_id, None)
        if group is not None:
            members = self._groups.get(group)
            if members is not None:
                members.discard(job_id)
                if not members:
                    del self._groups[group]
        st = self._job_lane.pop(job_id, None)
        if st is None:
            return
        st.jobs.pop(job_id, None)
        self._drop_updates(st, job_id)
        if st.board_shown or any(op.key == _BOARD for op in st.ops):
            self._board(st, Priority.UPDATE)

    def carry(
        self, platform: str, delivery: Mapping[str, Any], run: Callable[[], Awaitable[None]], *, cost: int = 1
    ) -> asyncio.Future[None] | None:
        """Send something an adapter composed (an original file on request) in line with the chat's budget.

        Returns when it was sent (or raises what ``run`` raised); None when the platform is unknown.
        """
        st = self._lane_of(platform, delivery)
        if st is None:
            return None
        done = asyncio.get_running_loop().create_future()
        self._push(st, Priority.NOTICE, run, cost=cost, done=done)
        return done

    def say(self, platform: str, delivery: Mapping[str, Any], text: str) -> bool:
        """Answer a command in its chat, in line with that chat's budget (a failure is logged).

        False when the platform has no transport.
        """
        st = self._lane_of(platform, delivery)
        if st is None:
            return False
        self._push(st, Priority.NOTICE, lambda: st.transport.say(delivery, text))
        return True

    def _group_busy(self, lane: Lane, job_id: str) -> bool:
        """Whether another job of the lane's group (a Discord channel) is unfinished."""
        if lane.group is None:
            return False
        return bool(self._groups.get(lane.group, set()) - {job_id})

    def _fresh(self, job: Job) -> Job:
        """The job as the service has it now: message ids recorded since the message was queued count."""
        return self._current(job.id) or job

    # ------------------------------------------------------------------ the board

    def _board(self, st: _LaneState, priority: Priority) -> None:
        async def run() -> None:
            if st.jobs:
                await st.transport.board(st.lane, self._board_text(st))
                st.board_shown = True
            elif st.board_shown:
                await st.transport.board(st.lane, None)
                st.board_shown = False
            st.board_at = self._clock()

        # removing the board is free (deletes are not counted by the platforms)
        self._push(st, priority, run, key=_BOARD, cost_fn=lambda: 1 if st.jobs else 0)

    def _board_text(self, st: _LaneState) -> str:
        drawing = [v for v in st.jobs.values() if v.drawing]
        waiting = sorted(
            ((self._position(v.job.id), v) for v in st.jobs.values() if not v.drawing),
            key=lambda item: item[0][0],
        )
        return messages.board_text(
            [(v.job, v.progress) for v in drawing],
            [(v.job, pos, eta) for (pos, eta), v in waiting],
        )

    # ------------------------------------------------------------------ outbox

    def _lane_of(self, platform: str, delivery: Mapping[str, Any]) -> _LaneState | None:
        transport = self._transports.get(platform)
        if transport is None or self._closed:
            return None
        lane = transport.lane(delivery)
        st = self._lanes.get(lane.key)
        if st is None:
            st = self._lanes[lane.key] = _LaneState(
                lane=lane, transport=transport, budget=transport.budget(lane)
            )
        elif st.lane != lane:
            st.lane = lane
        return st

    def _view(self, job: Job) -> tuple[_JobView | None, _LaneState | None]:
        st = self._job_lane.get(job.id)
        return (st.jobs.get(job.id) if st is not None else None), st

    def _push(
        self,
        st: _LaneState,
        priority: Priority,
        run: Callable[[], Awaitable[None]],
        *,
        cost: int = 1,
        key: tuple[str, str] | None = None,
        job_id: str | None = None,
        done: asyncio.Future[None] | None = None,
        cost_fn: Callable[[], int] | None = None,
    ) -> None:
        if key is not None:
            for op in st.ops:
                if op.key == key:  # fold: the newer message replaces the waiting one
                    op.run, op.priority = run, min(op.priority, priority)
                    self._check_idle()
                    st.wake.set()
                    return
        op = _Op(priority=priority, seq=next(self._seq), cost=cost, run=run, since=self._clock(),
                 key=key, job_id=job_id, done=done, cost_fn=cost_fn)  # fmt: skip
        st.ops.append(op)
        if priority < Priority.UPDATE:
            self._idle.clear()
        st.wake.set()
        if st.task is None or st.task.done():
            st.task = asyncio.create_task(self._drain(st), name=f"outbox-{st.lane.key}")
            st.task.add_done_callback(_drain_done)

    def _settle_updates(self, st: _LaneState, job: Job) -> None:
        """The job's end is on its way: no more progress, in its lane and in the lane it was queued in.

        They differ when the lane changed meanwhile (a Discord interaction's token ran out: the
        end goes to the channel, while a progress edit may still wait in the interaction's lane).
        """
        lanes = [st]
        queued_in = self._job_lane.get(job.id)
        if queued_in is not None and queued_in is not st:
            lanes.append(queued_in)
        for lane in lanes:
            view = lane.jobs.get(job.id)
            if view is not None:
                view.job, view.drawing = job, False
            self._drop_updates(lane, job.id)

    def _drop_updates(self, st: _LaneState, job_id: str) -> None:
        """A job's result or failure is on its way: its waiting acknowledgement and progress are moot."""
        st.ops = [op for op in st.ops if not (op.job_id == job_id and op.priority >= Priority.ACK)]
        self._check_idle()

    def _owed(self, st: _LaneState) -> int:
        """Messages the lane still owes to more important things: results to come and waiting notices."""
        waiting = sum(max(_cost_of(op), 1) for op in st.ops if op.priority < Priority.UPDATE)
        return min(st.budget.limit - 1, waiting + len(st.jobs))

    def _pick(self, st: _LaneState, now: float) -> tuple[_Op | None, float]:
        """The op to send next (or None) and, when None, how long to wait before looking again."""
        best: _Op | None = None
        soonest = math.inf
        period = st.budget.period
        for op in sorted(st.ops, key=lambda o: (o.priority, o.seq)):
            if op.priority < Priority.UPDATE:
                return op, 0.0
            cost = _cost_of(op)
            starved = now - op.since >= period
            early = op.key == _BOARD and now - st.board_at < self._board_interval and cost > 0
            if early and not starved:
                soonest = min(soonest, st.board_at + self._board_interval - now)
                continue
            if starved or cost == 0 or st.budget.free(now) - cost >= self._owed(st):
                best = op
                break
            slack_in = st.budget.wait(self._owed(st) + cost, now)
            soonest = min(soonest, max(slack_in, 0.01), op.since + period - now)
        return best, soonest

    async def _drain(self, st: _LaneState) -> None:
        while True:
            st.wake.clear()
            if not st.ops:
                await st.wake.wait()
                continue
            now = self._clock()
            op, later = self._pick(st, now)
            if op is None:
                await _sleep_or_wake(st.wake, later)
                continue
            cost = _cost_of(op)
            delay = st.budget.wait(cost, now) if cost > 0 else 0.0
            if delay > 0:
                await _sleep_or_wake(st.wake, delay)
                continue
            st.ops.remove(op)
            st.in_flight.append(op)
            spent = st.budget.spend(cost, now)
            op.tried = True
            try:
                await op.run()
            except RateLimitedError as err:
                # the platform disagreed with our count: honour it and send the same message again
                _log.warning("lane %s: rate limited, retrying in %.1fs", st.lane.key, err.retry_after)
                st.budget.block(err.retry_after, self._clock())
                st.ops.append(op)
            except asyncio.CancelledError:
                if op.done is not None and not op.done.done():
                    op.done.cancel()
                raise
            except Exception as err:
                if op.done is not None and not op.done.done():
                    op.done.set_exception(err)
                else:
                    _log.warning("lane %s: a message could not be sent: %s", st.lane.key, err)
            else:
                st.sent += cost
                if op.done is not None and not op.done.done():
                    op.done.set_result(None)
            finally:
                spent.settle(self._clock())
                st.in_flight.remove(op)
                self._check_idle()


def _cost_of(op: _Op) -> int:
    return op.cost_fn() if op.cost_fn is not None else op.cost


async def _sleep_or_wake(wake: asyncio.Event, seconds: float) -> None:
    if not math.isfinite(seconds):
        await wake.wait()
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=max(0.0, seconds))


def _drain_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("outbox %s died", task.get_name(), exc_info=task.exception())


__all__ = ["Priority", "StatusEngine"]
