"""The fair job queue: per-user FIFO, GPU time shared by weight (start-time fair queueing).

How it works. Every user has a virtual clock, its *tag*, in normalised GPU seconds (seconds ÷
weight). The head job of each backlogged user sits in a heap keyed by ``(tag, push sequence)``;
``pop`` takes the smallest key and moves that user's tag on by ``cost / weight``. A user who
becomes backlogged starts at ``max(its tag, V)``, where the virtual time ``V`` is the smallest
start tag of the jobs running and the queued heads (with one GPU: of the job in service, as in
SFQ): being away earns no credit. ``V`` never decreases. When nothing is queued or running every
clock is forgotten, so an idle period leaves no debt either.
This is SFQ (Goyal, Vin & Cheng, 1996) with the tags of a user's later jobs derived when they
reach the head instead of stamped at push, so a weight change applies to queued jobs at once and
a cancelled job leaves no gap: the user's later jobs keep (or improve) their place.

Guarantees (``W_i``: GPU seconds user i has received, ``w_i``: its weight, costs as estimated,
or as measured once ``done`` reports them; ``tests/test_fairqueue.py`` asserts 1. and 2. as
stated, and of 3. that every job runs):

1. Users backlogged without a break since a common start (say, all waiting when the queue
   started) after every dispatch satisfy ``W_i/w_i − W_j/w_j ≤ c_i/w_i``, ``c_i`` the cost of i's
   latest job. With equal weights: ``|W_i − W_j| ≤`` one largest job cost. Over an arbitrary
   window in which both are backlogged (say one arrived later) the bound is SFQ's
   ``c_i^max/w_i + c_j^max/w_j`` — two largest jobs — and that one is tight: a latecomer who
   arrives just after the other user's largest job started catches up by that job, then may
   overshoot by one of its own.
2. A newcomer (nothing queued or running, clock not ahead of ``V``) runs its first job after at
   most one job of each user backlogged when it arrived, and after no job of later arrivals. A
   user whose last job has only just run is ahead of ``V`` by that job and waits for it: that is
   fairness by GPU time, not by request count.
3. No starvation: before a queued job whose start tag is ``T`` runs, each other user j gets at
   most ``w_j·(T − V)`` seconds plus one job, so with finitely many users every job runs.

``done(job_id, actual_cost)`` recharges the user by ``(actual − estimate) / weight``, so shares
follow measured GPU time; the clock stays after the job's start, so 2. still holds. Costs are
estimated GPU seconds, finite and > 0. The class is synchronous and not thread-safe: one owner
(the event loop) calls it.

Complexity (n queued jobs, u backlogged users, r running jobs — 1 on one GPU): ``push``, ``pop``
and ``done`` O(log u + r) amortised (lazy deletion; the heap is rebuilt when mostly stale),
``remove`` O(log u) amortised, ``count_for`` O(1), ``position``/``eta`` O(n), ``order(k)`` for a
short k O(u + k log u), ``order()``/``snapshot`` O(n log n). Predictions compute the tags on the
fly with the same float operations as ``pop``, so they change nothing and match it exactly.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

_log = logging.getLogger(__name__)

#: stale heap entries tolerated beyond twice the live ones before a rebuild
_SLACK = 64


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
    return number


def _after(tag: float, amount: float) -> float:
    """``tag + amount``, yet strictly later than ``tag`` even when the amount is below float resolution.

    Strictness is what limits a newcomer's wait to one job per user; see guarantee 2.
    """
    later = tag + amount
    return later if later > tag else math.nextafter(tag, math.inf)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Queued:
    id: str
    user: str
    cost: float
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _Running:
    user: str
    cost: float
    weight: float
    start: float
    finish: float


@dataclass(slots=True, kw_only=True)
class _User:
    """One user's mutable scheduling state (kept while they have jobs or their clock is ahead of V)."""

    weight: float
    #: backlogged: the start tag of the head job; otherwise the finish tag of the latest job
    tag: float
    jobs: OrderedDict[str, _Queued] = field(default_factory=OrderedDict)
    running: int = 0


class FairQueue:
    """Jobs of many users, handed out fairly by GPU cost and weight; FIFO within a user."""

    def __init__(self) -> None:
        self._users: dict[str, _User] = {}
        self._queued: dict[str, _Queued] = {}
        self._running: dict[str, _Running] = {}
        #: (tag, head job's push sequence, user); an entry is live only while it matches the user
        self._heap: list[tuple[float, int, str]] = []
        #: (tag, user) of idle users, dropped once V passes their tag (they have nothing left to owe)
        self._idle: list[tuple[float, str]] = []
        self._backlogged = 0
        self._seq = itertools.count()

    # ------------------------------------------------------------------ changes

    def push(self, job_id: str, user: str, cost: float, *, weight: float = 1.0) -> None:
        """Queue a job at the end of ``user``'s FIFO; ``weight`` becomes the user's weight.

        Raises ``ValueError`` for a job id already queued or running, or a cost or weight
        that is not a finite number above 0.
        """
        if job_id in self._queued or job_id in self._running:
            raise ValueError(f"job {job_id!r} is already queued or running")
        cost = _positive("cost", cost)
        weight = _positive("weight", weight)
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _User(weight=weight, tag=-math.inf)
        else:
            state.weight = weight
        record = _Queued(id=job_id, user=user, cost=cost, seq=next(self._seq))
        if not state.jobs:
            # Becoming backlogged: catch up with virtual time, so past idleness earns nothing.
            state.tag = max(state.tag, self._now())
            heapq.heappush(self._heap, (state.tag, record.seq, user))
            self._backlogged += 1
        state.jobs[job_id] = record
        self._queued[job_id] = record

    def set_weight(self, user: str, weight: float) -> None:
        """Change a user's weight for their queued jobs from now on (the head's start is kept).

        A user with nothing queued or running is not tracked: their next ``push`` sets the weight.
        """
        weight = _positive("weight", weight)
        state = self._users.get(user)
        if state is not None:
            state.weight = weight

    def pop(self, defer: Callable[[str], bool] | None = None, *, look: int = 16) -> str | None:
        """The id of the next job to run, now recorded as running; None when nothing is queued.

        ``defer(job_id)`` may ask to pass over a head job for now (its chat cannot take more
        results yet): the first of the next ``look`` users' heads in fair order that is not
        deferred runs instead. When all of them are deferred, the fair head runs anyway, so
        the GPU never idles. A passed-over user keeps their place and start tag.
        """
        top = self._top()
        if top is None:
            return None
        if defer is not None and defer(self._head(self._users[top[2]]).id):
            skipped = [heapq.heappop(self._heap)]
            chosen = None
            while len(skipped) < look:
                entry = self._top()
                if entry is None:
                    break
                if not defer(self._head(self._users[entry[2]]).id):
                    chosen = heapq.heappop(self._heap)
                    break
                skipped.append(heapq.heappop(self._heap))
            for entry in skipped:
                heapq.heappush(self._heap, entry)
            if chosen is not None:
                return self._take(chosen)
        return self._take(heapq.heappop(self._heap))

    def _take(self, entry: tuple[float, int, str]) -> str:
        start, _, user = entry
        state = self._users[user]
        job_id, record = state.jobs.popitem(last=False)
        del self._queued[job_id]
        finish = _after(start, record.cost / state.weight)
        self._running[job_id] = _Running(
            user=user, cost=record.cost, weight=state.weight, start=start, finish=finish
        )
        state.running += 1
        state.tag = finish
        if state.jobs:
            heapq.heappush(self._heap, (finish, self._head(state).seq, user))
        else:
            self._backlogged -= 1
        self._prune(self._now())
        return job_id

    def done(self, job_id: str, actual_cost: float | None = None) -> None:
        """A popped job has ended (finished, failed or cancelled).

        ``actual_cost``, the measured GPU seconds (0 allowed), recharges the user by the
        difference from the estimate. Raises ``KeyError`` when the job is not running.
        """
        actual = None
        if actual_cost is not None:
            actual = float(actual_cost)
            if not math.isfinite(actual) or actual < 0:
                raise ValueError(f"actual_cost must be a finite number ≥ 0, got {actual_cost!r}")
        run = self._running.get(job_id)
        if run is None:
            raise KeyError(f"job {job_id!r} is not running")
        v = self._now()  # taken while the job still counts: V is at most its start
        del self._running[job_id]
        state = self._users[run.user]
        state.running -= 1
        if actual is not None and actual != run.cost:
            if state.tag == run.finish:
                # No later job of this user has started: recompute exactly, as if known at pop.
                charged = _after(run.start, actual / run.weight)
            else:
                charged = state.tag + (actual - run.cost) / run.weight
            # charged ≥ the job's start ≥ V in exact arithmetic; the max only absorbs rounding
            tag = max(charged, v)
            if tag != state.tag:
                state.tag = tag
                if state.jobs:
                    heapq.heappush(self._heap, (tag, self._head(state).seq, run.user))
                    self._compact()
        if not state.jobs and state.running == 0:
            self._went_idle(run.user, state)

    def requeue(self, job_id: str) -> None:
        """A popped job goes back to the head of its user's queue, as if it had never been popped.

        For a job whose worker died under it: it keeps its start tag, so it runs next for its
        user and ahead of anyone whose tag is later. Raises ``KeyError`` when it is not running.
        """
        run = self._running.pop(job_id)
        state = self._users[run.user]
        state.running -= 1
        record = _Queued(id=job_id, user=run.user, cost=run.cost, seq=next(self._seq))
        if not state.jobs:
            self._backlogged += 1
        state.jobs[job_id] = record
        state.jobs.move_to_end(job_id, last=False)
        self._queued[job_id] = record
        # the user's own later jobs keep their order behind it; its tag is the start it had
        state.tag = min(state.tag, run.start)
        heapq.heappush(self._heap, (state.tag, record.seq, run.user))
        self._compact()

    def remove(self, job_id: str) -> bool:
        """Cancel a queued job; False when it is not queued (unknown, running or done).

        The user's later jobs keep their place: the next one inherits the removed head's tag.
        """
        record = self._queued.pop(job_id, None)
        if record is None:
            return False
        state = self._users[record.user]
        was_head = next(iter(state.jobs)) == job_id
        del state.jobs[job_id]
        if was_head:
            if state.jobs:
                heapq.heappush(self._heap, (state.tag, self._head(state).seq, record.user))
                self._compact()
            else:
                self._backlogged -= 1
                if state.running == 0:
                    self._went_idle(record.user, state)
        return True

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """The number of queued (not running) jobs."""
        return len(self._queued)

    def __contains__(self, job_id: object) -> bool:
        """Whether the job is queued (a running job is not)."""
        return job_id in self._queued

    def running(self) -> list[str]:
        """Ids of popped jobs not yet reported ``done``."""
        return list(self._running)

    def users(self) -> list[str]:
        """Users with queued jobs, whoever runs next first."""
        heads = [(s.tag, self._head(s).seq, user) for user, s in self._users.items() if s.jobs]
        return [user for _, _, user in sorted(heads)]

    def queued_for(self, user: str) -> list[str]:
        """The user's queued job ids in FIFO order."""
        state = self._users.get(user)
        return list(state.jobs) if state is not None else []

    def count_for(self, user: str) -> int:
        """How many jobs the user has queued, in O(1)."""
        state = self._users.get(user)
        return len(state.jobs) if state is not None else 0

    @property
    def virtual_time(self) -> float:
        """``V``: the normalised GPU time a newly backlogged user starts at."""
        return self._now()

    def order(self, limit: int | None = None) -> list[str]:
        """Queued job ids in the order they will run if nothing else is pushed."""
        return [record.id for record in self._predicted(limit)]

    def snapshot(self) -> list[tuple[str, str, float]]:
        """``(job id, user, estimated cost)`` of every queued job, in predicted run order."""
        return [(r.id, r.user, r.cost) for r in self._predicted(None)]

    def position(self, job_id: str) -> int:
        """How many queued jobs run before this one (0 = next). ``KeyError`` if not queued."""
        return self._ahead(job_id)[0]

    def eta(self, job_id: str, running_remaining: float = 0.0) -> float:
        """Estimated seconds until the job starts: what remains of the running job(s) plus the
        estimated costs of the queued jobs before it. ``KeyError`` if not queued."""
        return running_remaining + self._ahead(job_id)[1]

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _head(state: _User) -> _Queued:
        return next(iter(state.jobs.values()))

    def _now(self) -> float:
        # Every queued head is at V or later by construction, which is what bounds a newcomer's
        # wait; taking running jobs into the minimum keeps V from racing ahead with several workers.
        top = self._top()
        earliest = top[0] if top is not None else math.inf
        for run in self._running.values():
            earliest = min(earliest, run.start)
        return earliest if earliest < math.inf else 0.0

    def _live(self, tag: float, seq: int, user: str) -> bool:
        state = self._users.get(user)
        return state is not None and bool(state.jobs) and state.tag == tag and self._head(state).seq == seq

    def _top(self) -> tuple[float, int, str] | None:
        heap = self._heap
        while heap:
            if self._live(*heap[0]):
                return heap[0]
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        if len(self._heap) > 2 * self._backlogged + _SLACK:
            self._heap = [(s.tag, self._head(s).seq, u) for u, s in self._users.items() if s.jobs]
            heapq.heapify(self._heap)

    def _went_idle(self, user: str, state: _User) -> None:
        if not self._queued and not self._running:
            # Nothing queued or running: everybody is even again (SFQ's idle rule), and resetting
            # to 0 keeps the tags small.
            self._users.clear()
            self._heap.clear()
            self._idle.clear()
            self._backlogged = 0
            _log.debug("fair queue idle: virtual time reset")
            return
        heapq.heappush(self._idle, (state.tag, user))
        if len(self._idle) > 2 * len(self._users) + _SLACK:
            self._idle = [(s.tag, u) for u, s in self._users.items() if not s.jobs and s.running == 0]
            heapq.heapify(self._idle)

    def _prune(self, v: float) -> None:
        # An idle user whose tag V has passed would restart at V anyway: forget them.
        idle = self._idle
        while idle and idle[0][0] <= v:
            _, user = heapq.heappop(idle)
            state = self._users.get(user)
            if state is not None and not state.jobs and state.running == 0 and state.tag <= v:
                del self._users[user]

    def _tags(self, state: _User) -> Iterator[tuple[float, int, _Queued]]:
        # The same float operations as pop(), so predictions match it exactly.
        tag, weight = state.tag, state.weight
        for record in state.jobs.values():
            yield tag, record.seq, record
            tag = _after(tag, record.cost / weight)

    def _predicted(self, limit: int | None) -> list[_Queued]:
        total = len(self._queued)
        want = total if limit is None else max(0, min(limit, total))
        if want * 4 >= total:
            # Most of the queue: tag every job and sort. _tags() inlined, as this is the hot loop;
            # push sequences are unique, so the records themselves are never compared.
            tagged: list[tuple[float, int, _Queued]] = []
            append = tagged.append
            for state in self._users.values():
                tag, weight = state.tag, state.weight
                for record in state.jobs.values():
                    append((tag, record.seq, record))
                    later = tag + record.cost / weight
                    tag = later if later > tag else math.nextafter(tag, math.inf)
            tagged.sort()
            return [record for _, _, record in tagged[:want]]
        # A few (a /queue view): replay pop() on a copy of the heap, following only the users reached.
        heap = self._heap.copy()
        streams: dict[str, Iterator[tuple[float, int, _Queued]]] = {}
        following: dict[str, tuple[float, int, _Queued]] = {}
        out: list[_Queued] = []
        while heap and len(out) < want:
            tag, seq, user = heapq.heappop(heap)
            stream = streams.get(user)
            if stream is None:
                if not self._live(tag, seq, user):
                    continue
                stream = streams[user] = self._tags(self._users[user])
                record = next(stream)[2]
            else:
                expected = following.get(user)
                if expected is None or expected[0] != tag or expected[1] != seq:
                    continue  # a stale entry of the real heap
                record = expected[2]
            out.append(record)
            nxt = next(stream, None)
            if nxt is not None:
                following[user] = nxt
                heapq.heappush(heap, (nxt[0], nxt[1], user))
        return out

    def _ahead(self, job_id: str) -> tuple[int, float]:
        record = self._queued.get(job_id)
        if record is None:
            raise KeyError(f"job {job_id!r} is not queued")
        key_tag, key_seq = next((t, s) for t, s, r in self._tags(self._users[record.user]) if r is record)
        count, seconds = 0, 0.0
        # _tags() inlined: this walks every queued job, and a user whose head is already later
        # than the job is skipped in O(1).
        for state in self._users.values():
            tag = state.tag
            if not state.jobs or tag > key_tag:
                continue
            weight = state.weight
            for other in state.jobs.values():
                if tag > key_tag or (tag == key_tag and other.seq >= key_seq):
                    break
                count += 1
                seconds += other.cost
                later = tag + other.cost / weight
                tag = later if later > tag else math.nextafter(tag, math.inf)
        return count, seconds
