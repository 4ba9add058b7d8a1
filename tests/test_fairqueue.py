"""FairQueue: fairness bounds, newcomers, FIFO, cancellation and predictions, on simulated GPUs."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bot.fairqueue import FairQueue

COST = st.floats(min_value=0.01, max_value=100.0, allow_nan=False, allow_infinity=False)
WEIGHT = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0]) | st.floats(min_value=0.1, max_value=10.0)
#: how far off an estimate the measured cost may be
FACTOR = st.floats(min_value=0.2, max_value=5.0)
EPS = 1e-6  # float noise only; costs sum to at most a few thousand seconds here


@dataclass
class FakeClock:
    """Simulated wall time: it moves only when a job ends."""

    now: float = 0.0

    def advance_to(self, when: float) -> None:
        assert when >= self.now
        self.now = when


@dataclass(frozen=True, slots=True, kw_only=True)
class Ran:
    """One job as it ran on a fake GPU."""

    job: str
    user: str
    cost: float  # measured seconds (the estimate unless the test says otherwise)
    start: float
    end: float


@dataclass
class Gpus:
    """Runs a FairQueue on ``workers`` fake GPUs, the way the dispatcher does.

    A free worker pops at once; time then jumps to the earliest end, and that job is reported
    ``done`` (with its measured cost when ``report_measured``).
    """

    queue: FairQueue = field(default_factory=FairQueue)
    workers: int = 1
    report_measured: bool = False
    clock: FakeClock = field(default_factory=FakeClock)
    owner: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    busy: list[tuple[float, int, str]] = field(default_factory=list)
    starts: dict[str, float] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def push(
        self, job: str, user: str, cost: float, *, weight: float = 1.0, measured: float | None = None
    ) -> None:
        self.queue.push(job, user, cost, weight=weight)
        self.owner[job] = user
        self.estimate[job] = cost
        self.measured[job] = cost if measured is None else measured

    def fill(self) -> list[str]:
        """Start queued jobs on every free worker; the ids started."""
        out = []
        while len(self.busy) < self.workers:
            job = self.queue.pop()
            if job is None:
                break
            heapq.heappush(self.busy, (self.clock.now + self.measured[job], next(self._seq), job))
            self.starts[job] = self.clock.now
            self.started.append(job)
            out.append(job)
        return out

    def finish(self) -> Ran | None:
        """Let the earliest running job end; None when none runs."""
        if not self.busy:
            return None
        end, _, job = heapq.heappop(self.busy)
        self.clock.advance_to(end)
        self.queue.done(job, self.measured[job] if self.report_measured else None)
        return Ran(job=job, user=self.owner[job], cost=self.measured[job], start=self.starts[job], end=end)

    def step(self) -> Ran | None:
        """Fill the workers, then finish one job."""
        self.fill()
        return self.finish()


def users_of(k: int) -> list[str]:
    return [f"u{i}" for i in range(k)]


def push_all(gpus: Gpus, jobs: list[list[float]], weights: list[float], interleave: bool) -> None:
    """Push every user's jobs before anything runs (a common start)."""
    users = users_of(len(jobs))
    pairs = [(u, i) for u, costs in zip(users, jobs, strict=True) for i in range(len(costs))]
    if interleave:
        pairs.sort(key=lambda p: p[1])
    for user, i in pairs:
        w = weights[users.index(user)]
        gpus.push(f"{user}-{i}", user, jobs[users.index(user)][i], weight=w)


def cancel_due(queue: FairQueue, cancels: list[tuple[int, int]], step: int) -> None:
    for when, pick in cancels:
        if when == step and len(queue):
            order = queue.order()
            assert queue.remove(order[pick % len(order)])


# ---------------------------------------------------------------------------------- property 1


@settings(max_examples=150, deadline=None)
@given(
    jobs=st.lists(st.lists(COST, min_size=1, max_size=25), min_size=2, max_size=6),
    interleave=st.booleans(),
    cancels=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 10**6)), max_size=10),
)
def test_equal_weights_stay_within_one_job(
    jobs: list[list[float]], interleave: bool, cancels: list[tuple[int, int]]
) -> None:
    """k users backlogged from a common start: over every prefix of the run, any two users'
    GPU time differs by at most one largest job — and more exactly, a user is ahead of another
    by at most its own latest job. Cancelled jobs (removed at random) change nothing."""
    gpus = Gpus()
    users = users_of(len(jobs))
    push_all(gpus, jobs, [1.0] * len(jobs), interleave)
    received = dict.fromkeys(users, 0.0)
    latest = dict.fromkeys(users, 0.0)
    largest = 0.0
    for step in itertools.count():
        cancel_due(gpus.queue, cancels, step)
        if any(gpus.queue.count_for(u) == 0 for u in users):
            break  # from here on they are not all backlogged
        ran = gpus.step()
        assert ran is not None
        largest = max(largest, ran.cost)
        # Halfway through the job (the fake clock at its midpoint) the bound holds as well.
        halfway = dict(received)
        halfway[ran.user] += ran.cost / 2
        assert max(halfway.values()) - min(halfway.values()) <= largest + EPS
        received[ran.user] += ran.cost
        latest[ran.user] = ran.cost
        assert max(received.values()) - min(received.values()) <= largest + EPS
        for i, j in itertools.permutations(users, 2):
            assert received[i] - received[j] <= latest[i] + EPS


# ---------------------------------------------------------------------------------- property 2


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    jobs=st.lists(st.lists(COST, min_size=1, max_size=25), min_size=2, max_size=5),
    interleave=st.booleans(),
    measured=st.booleans(),
    cancels=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 10**6)), max_size=8),
)
def test_weighted_shares_stay_within_one_job_scaled(
    data: st.DataObject,
    jobs: list[list[float]],
    interleave: bool,
    measured: bool,
    cancels: list[tuple[int, int]],
) -> None:
    """Weights w_i: W_i/w_i − W_j/w_j ≤ c_i/w_i (i's latest job), so received time is proportional
    to the weights within one largest job scaled by its weight. With ``measured`` the GPU time
    differs from the estimates and ``done`` reports it: the bound then holds in measured time."""
    weights = data.draw(st.lists(WEIGHT, min_size=len(jobs), max_size=len(jobs)))
    users = users_of(len(jobs))
    gpus = Gpus(report_measured=measured)
    push_all(gpus, jobs, weights, interleave)
    if measured:
        for job, estimate in list(gpus.estimate.items()):
            gpus.measured[job] = estimate * data.draw(FACTOR)
    w = dict(zip(users, weights, strict=True))
    share = dict.fromkeys(users, 0.0)  # W_i / w_i
    latest = dict.fromkeys(users, 0.0)  # c_i / w_i of the latest job
    largest = 0.0
    for step in itertools.count():
        cancel_due(gpus.queue, cancels, step)
        if any(gpus.queue.count_for(u) == 0 for u in users):
            break
        ran = gpus.step()
        assert ran is not None
        share[ran.user] += ran.cost / w[ran.user]
        latest[ran.user] = ran.cost / w[ran.user]
        largest = max(largest, latest[ran.user])
        assert max(share.values()) - min(share.values()) <= largest + EPS
        for i, j in itertools.permutations(users, 2):
            assert share[i] - share[j] <= latest[i] + EPS


# ------------------------------------------------------------------- arrivals and departures


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    arrivals=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40), COST), min_size=1, max_size=80),
)
def test_any_window_of_common_backlog_within_two_jobs(
    data: st.DataObject, arrivals: list[tuple[int, int, float]]
) -> None:
    """Users arrive, drain, leave and come back. Over any window in which two users are both
    backlogged, their normalised GPU time differs by at most c_i^max/w_i + c_j^max/w_j (SFQ's
    bound; one job each side, because one of them may enter the window just after its rival
    started a large job). A returning user gets no credit for its absence, else it would
    exceed this bound. Virtual time never runs backwards."""
    weights = data.draw(st.lists(WEIGHT, min_size=5, max_size=5))
    users = users_of(5)
    w = dict(zip(users, weights, strict=True))
    gpus = Gpus()
    biggest: dict[str, float] = defaultdict(float)
    pending = sorted(arrivals, key=lambda a: a[1])
    before: list[set[str]] = []  # users with queued jobs just before each pop
    after: list[set[str]] = []  # ... and just after it, before any new arrival
    popped: list[tuple[str, float]] = []
    virtual = 0.0
    step = 0
    while pending or len(gpus.queue):
        if not len(gpus.queue) and pending[0][1] > step:
            step = pending[0][1]  # idle until the next arrival
        while pending and pending[0][1] <= step:
            index, _, cost = pending.pop(0)
            user = users[index]
            gpus.push(f"j{len(gpus.owner)}", user, cost, weight=w[user])
            biggest[user] = max(biggest[user], cost)
        assert gpus.queue.virtual_time >= virtual
        before.append({u for u in users if gpus.queue.count_for(u)})
        ran = gpus.step()
        assert ran is not None
        popped.append((ran.user, ran.cost))
        after.append({u for u in users if gpus.queue.count_for(u)})
        # an idle queue forgets every clock (V = 0 again); otherwise V only moves on
        virtual = gpus.queue.virtual_time if len(gpus.queue) else 0.0
        step += 1
    assert len(popped) == len(arrivals)
    for i, j in itertools.combinations(users, 2):
        bound = biggest[i] / w[i] + biggest[j] / w[j] + EPS
        diff = low = high = 0.0  # i's lead over j since the window began; its range
        for pair_before, (user, cost), pair_after in zip(before, popped, after, strict=True):
            if not {i, j} <= pair_before:
                continue
            diff += cost / w[i] if user == i else -cost / w[j] if user == j else 0.0
            low, high = min(low, diff), max(high, diff)
            assert high - low <= bound
            if not {i, j} <= pair_after:
                diff = low = high = 0.0  # one of them drained: the window of common backlog ends


def test_idle_user_returning_gets_no_burst() -> None:
    """r ran once and left while a stayed busy for 50 jobs; when r comes back with 10 jobs the
    two alternate: virtual time has caught up, so r's absence earned it nothing."""
    gpus = Gpus()
    gpus.push("r0", "r", 1.0)
    for i in range(100):
        gpus.push(f"a{i}", "a", 1.0)
    for _ in range(50):
        gpus.step()
    assert gpus.queue.virtual_time == pytest.approx(49.0)
    for i in range(1, 11):
        gpus.push(f"r{i}", "r", 1.0)
    predicted = gpus.queue.order(limit=20)
    ran = [gpus.step() for _ in range(20)]
    assert [r.job for r in ran if r is not None] == predicted
    who = "".join(r.user for r in ran if r is not None)
    assert "rr" not in who
    assert who.count("r") == 10


def test_idle_queue_forgets_every_debt() -> None:
    """After the queue has been empty, a user who had a huge job is even with everyone."""
    gpus = Gpus()
    gpus.push("big", "a", 500.0)
    gpus.push("small", "b", 1.0)
    while gpus.step():
        pass
    assert gpus.queue.virtual_time == 0.0
    for i in range(3):
        gpus.push(f"b{i}", "b", 1.0)
    gpus.push("a0", "a", 1.0)
    assert gpus.queue.position("a0") == 1  # after b0 (pushed first, same tag), before b1


def test_user_who_just_ran_waits_for_its_share() -> None:
    """Fair by GPU time, not by request count: a user whose 30 s job has just run waits while
    the others get about 30 s of their own — it is not a newcomer."""
    gpus = Gpus()
    gpus.push("a0", "a", 30.0)
    for i in range(40):
        gpus.push(f"b{i}", "b", 1.0)
    assert gpus.queue.pop() == "a0"  # equal start tags, a pushed first
    gpus.queue.done("a0")
    gpus.push("a1", "a", 1.0)
    assert (
        gpus.queue.position("a1") == 31
    )  # b0..b30: b30 starts at tag 30, the same as a1, and was pushed first


# ---------------------------------------------------------------------------------- property 3


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    jobs=st.lists(st.lists(COST, min_size=1, max_size=12), min_size=1, max_size=5),
    workers=st.integers(1, 3),
    warmup=st.integers(0, 30),
    measured=st.booleans(),
    cancels=st.lists(st.integers(0, 10**6), max_size=4),
    newcomer_weight=WEIGHT,
    later=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 6), COST), max_size=8),
)
def test_newcomer_waits_at_most_one_job_per_backlogged_user(
    data: st.DataObject,
    jobs: list[list[float]],
    workers: int,
    warmup: int,
    measured: bool,
    cancels: list[int],
    newcomer_weight: float,
    later: list[tuple[int, int, float]],
) -> None:
    """Whatever happened before (jobs run, estimates corrected, cancellations, one to three
    workers busy), a newcomer's first job starts after at most one job of each user backlogged
    when it arrived, and after no job of anyone arriving later."""
    weights = data.draw(st.lists(WEIGHT, min_size=len(jobs), max_size=len(jobs)))
    gpus = Gpus(workers=workers, report_measured=measured)
    push_all(gpus, jobs, weights, interleave=data.draw(st.booleans()))
    if measured:
        for job, estimate in list(gpus.estimate.items()):
            gpus.measured[job] = estimate * data.draw(FACTOR)
    for _ in range(warmup):
        if gpus.step() is None:
            break
    for pick in cancels:
        if len(gpus.queue):
            gpus.queue.remove(gpus.queue.order()[pick % len(gpus.queue)])
    if data.draw(st.booleans()):
        gpus.fill()  # arrive while jobs run, not between two
    backlogged = set(gpus.queue.users())
    gpus.push("new-0", "new", data.draw(COST), weight=newcomer_weight)
    gpus.push("new-1", "new", data.draw(COST), weight=newcomer_weight)
    others = [*users_of(5), "late-a", "late-b", "late-c"]
    ahead: dict[str, int] = defaultdict(int)
    for step in itertools.count():
        for index, when, cost in later:
            if when == step:
                gpus.push(f"late{len(gpus.owner)}", others[index], cost)
        started = gpus.fill()
        if "new-0" in started:
            for job in started[: started.index("new-0")]:
                ahead[gpus.owner[job]] += 1
            break
        for job in started:
            ahead[gpus.owner[job]] += 1
        assert gpus.finish() is not None
    for user, count in ahead.items():
        assert count <= (1 if user in backlogged else 0), (user, count, backlogged)


# ---------------------------------------------------------------------------------- property 4 and 5


class QueueModel(RuleBasedStateMachine):
    """Random pushes, pops, completions (with measured costs), cancellations and weight changes,
    with up to several jobs running, checked against a plain FIFO-per-user model: every pop is
    the predicted next job and the head of its user's FIFO; position/eta/snapshot agree with
    order(); at the end every job not cancelled has run exactly once (no starvation)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = FairQueue()
        self.fifo: dict[str, list[str]] = defaultdict(list)
        self.cost: dict[str, float] = {}
        self.owner: dict[str, str] = {}
        self.running: list[str] = []
        self.ran: list[str] = []
        self.cancelled: set[str] = set()
        self.ids = itertools.count()
        self.virtual = 0.0

    def queued(self) -> list[str]:
        return [job for jobs in self.fifo.values() for job in jobs]

    @rule(user=st.sampled_from("abcde"), cost=COST, weight=st.none() | WEIGHT)
    def push(self, user: str, cost: float, weight: float | None) -> None:
        job = f"{user}{next(self.ids)}"
        if weight is None:
            self.queue.push(job, user, cost)
        else:
            self.queue.push(job, user, cost, weight=weight)
        self.fifo[user].append(job)
        self.cost[job] = cost
        self.owner[job] = user

    @rule()
    def pop(self) -> None:
        predicted = self.queue.order(limit=1)
        job = self.queue.pop()
        if job is None:
            assert predicted == []
        else:
            assert predicted == [job]
            user = self.owner[job]
            assert self.fifo[user][0] == job  # FIFO within a user
            self.fifo[user].pop(0)
            self.running.append(job)
            self.ran.append(job)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100), measured=st.none() | st.floats(min_value=0.0, max_value=200.0))
    def done(self, pick: int, measured: float | None) -> None:
        job = self.running.pop(pick % len(self.running))
        self.queue.done(job, measured)

    @rule(pick=st.integers(0, 10**6))
    def remove(self, pick: int) -> None:
        known = [*sorted(self.cost), "nope"]
        job = known[pick % len(known)]
        queued = job in self.queued()
        assert self.queue.remove(job) == queued
        if queued:
            self.fifo[self.owner[job]].remove(job)
            self.cancelled.add(job)

    @rule(user=st.sampled_from("abcdef"), weight=WEIGHT)
    def set_weight(self, user: str, weight: float) -> None:
        self.queue.set_weight(user, weight)

    @invariant()
    def mirrors_the_model(self) -> None:
        queued = self.queued()
        assert len(self.queue) == len(queued)
        assert all(job in self.queue for job in queued)
        assert not any(job in self.queue for job in self.running)
        assert sorted(self.queue.running()) == sorted(self.running)
        assert sorted(self.queue.users()) == sorted(u for u, jobs in self.fifo.items() if jobs)
        for user in "abcdef":
            assert self.queue.queued_for(user) == self.fifo.get(user, [])
            assert self.queue.count_for(user) == len(self.fifo.get(user, []))

    @invariant()
    def predictions_agree(self) -> None:
        order = self.queue.order()
        assert sorted(order) == sorted(self.queued())
        for user, jobs in self.fifo.items():
            assert [job for job in order if self.owner[job] == user] == jobs
        assert self.queue.snapshot() == [(job, self.owner[job], self.cost[job]) for job in order]
        assert self.queue.order(limit=3) == order[:3]
        seconds = 0.0
        for position, job in enumerate(order):
            assert self.queue.position(job) == position
            assert self.queue.eta(job, 7.5) == pytest.approx(7.5 + seconds)
            seconds += self.cost[job]

    @invariant()
    def virtual_time_moves_forward(self) -> None:
        now = self.queue.virtual_time
        if not len(self.queue) and not self.running:
            assert now == 0.0  # idle: everyone even again
        else:
            assert now >= self.virtual
        self.virtual = now

    def teardown(self) -> None:
        while self.running:
            self.queue.done(self.running.pop())
        while (job := self.queue.pop()) is not None:
            assert self.fifo[self.owner[job]].pop(0) == job
            self.ran.append(job)
            self.queue.done(job)
        assert sorted(self.ran) == sorted(set(self.cost) - self.cancelled)
        assert len(self.queue) == 0 and self.queue.running() == []


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    pushes=st.lists(st.tuples(st.integers(0, 5), COST), min_size=1, max_size=60),
    pops=st.integers(0, 20),
    workers=st.integers(1, 3),
    cancels=st.lists(st.integers(0, 10**6), max_size=6),
    reweigh=st.lists(st.tuples(st.integers(0, 5), WEIGHT), max_size=3),
)
def test_order_and_position_match_the_actual_run(
    data: st.DataObject,
    pushes: list[tuple[int, float]],
    pops: int,
    workers: int,
    cancels: list[int],
    reweigh: list[tuple[int, float]],
) -> None:
    """After any history (jobs run, cancelled, weights changed), order() and position() are the
    order in which the jobs then really start, on one GPU or several, and eta() the estimated
    seconds before each."""
    weights = data.draw(st.lists(WEIGHT, min_size=6, max_size=6))
    gpus = Gpus(workers=workers)
    for n, (user, cost) in enumerate(pushes):
        gpus.push(f"j{n}", f"u{user}", cost, weight=weights[user])
    for _ in range(pops):
        gpus.step()
    for pick in cancels:
        if len(gpus.queue):
            gpus.queue.remove(gpus.queue.order()[pick % len(gpus.queue)])
    for user, weight in reweigh:
        gpus.queue.set_weight(f"u{user}", weight)
    gpus.fill()  # jobs on the GPUs while we look
    predicted = gpus.queue.order()
    positions = {job: gpus.queue.position(job) for job in predicted}
    etas = {job: gpus.queue.eta(job, 2.0) for job in predicted}
    assert positions == {job: n for n, job in enumerate(predicted)}
    for limit in (0, 1, 2, 5, len(predicted) // 3, len(predicted) + 1):
        assert gpus.queue.order(limit=limit) == predicted[:limit]
    gpus.started.clear()
    while gpus.step():
        pass
    assert gpus.started == predicted
    waited = 2.0
    for job in predicted:
        assert etas[job] == pytest.approx(waited)
        waited += gpus.estimate[job]


# ------------------------------------------------------------------------------------ examples


def test_round_robin_with_equal_costs() -> None:
    queue = FairQueue()
    for i in range(3):
        for user in "abc":
            queue.push(f"{user}{i}", user, 2.0)
    assert queue.order() == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    assert queue.position("c1") == 5
    assert queue.eta("c1", running_remaining=1.5) == 1.5 + 5 * 2.0
    assert queue.users() == ["a", "b", "c"]


def test_fair_by_gpu_time_not_by_count() -> None:
    """A 10-second job takes a's turn for as long as b's ten 1-second jobs."""
    queue = FairQueue()
    for i in range(3):
        queue.push(f"a{i}", "a", 10.0)
    for i in range(25):
        queue.push(f"b{i}", "b", 1.0)
    order = "".join(job[0] for job in queue.order())
    assert order.startswith("ab" + "b" * 9 + "a" + "b" * 10 + "a")


def test_weights_share_in_proportion() -> None:
    queue = FairQueue()
    for i in range(12):
        queue.push(f"a{i}", "a", 1.0, weight=2.0)
    for i in range(12):
        queue.push(f"b{i}", "b", 1.0)
    first = [queue.pop() for _ in range(9)]
    assert sum(1 for job in first if job and job[0] == "a") == 6


def test_set_weight_applies_from_now_on() -> None:
    queue = FairQueue()
    for i in range(20):
        queue.push(f"a{i}", "a", 1.0)
        queue.push(f"b{i}", "b", 1.0)
    for _ in range(4):
        job = queue.pop()
        assert job is not None
        queue.done(job)
    queue.set_weight("a", 3.0)
    nxt = "".join(job[0] for job in queue.order(limit=12))
    assert nxt.count("a") == 9 and nxt.count("b") == 3
    queue.set_weight("nobody", 2.0)  # nothing queued: nothing to change
    assert queue.count_for("nobody") == 0


def test_latest_push_sets_the_weight() -> None:
    queue = FairQueue()
    for i in range(10):
        queue.push(f"b{i}", "b", 1.0)
    queue.push("a0", "a", 1.0, weight=1.0)
    for i in range(1, 10):
        queue.push(f"a{i}", "a", 1.0, weight=4.0)
    nxt = "".join(job[0] for job in queue.order(limit=10))
    assert nxt.count("a") == 8


def test_cancelled_jobs_leave_no_gap() -> None:
    queue = FairQueue()
    for i in range(3):
        queue.push(f"a{i}", "a", 1.0)
    for i in range(2):
        queue.push(f"b{i}", "b", 1.0)
    assert queue.remove("a0")  # the head: a1 takes its place
    assert queue.order() == ["a1", "b0", "a2", "b1"]
    assert queue.remove("a2")
    assert queue.order() == ["a1", "b0", "b1"]
    assert queue.queued_for("a") == ["a1"]
    assert not queue.remove("a2")
    assert not queue.remove("never")


def test_measured_cost_recharges_the_user() -> None:
    """a's job was estimated at 1 s but took 5: a then waits while b catches up."""
    queue = FairQueue()
    for i in range(6):
        queue.push(f"a{i}", "a", 1.0)
        queue.push(f"b{i}", "b", 1.0)
    assert queue.pop() == "a0"
    queue.done("a0", actual_cost=5.0)
    assert queue.order()[:5] == ["b0", "b1", "b2", "b3", "b4"]
    assert queue.pop() == "b0"
    queue.done("b0", actual_cost=0.0)  # a refund never moves b back before its own start
    assert queue.order()[0] == "b1"


def test_running_jobs_are_not_queued() -> None:
    queue = FairQueue()
    queue.push("x", "a", 1.0)
    assert "x" in queue and len(queue) == 1
    assert queue.pop() == "x"
    assert "x" not in queue and len(queue) == 0
    assert queue.running() == ["x"]
    assert not queue.remove("x")
    with pytest.raises(KeyError):
        queue.position("x")
    with pytest.raises(ValueError, match="already"):
        queue.push("x", "a", 1.0)
    queue.done("x")
    assert queue.pop() is None
    queue.push("x", "a", 1.0)  # a finished id may come back (a restart re-queues it)


@pytest.mark.parametrize("cost", [0.0, -1.0, math.nan, math.inf])
def test_rejects_costs_that_are_not_positive(cost: float) -> None:
    with pytest.raises(ValueError, match="cost"):
        FairQueue().push("x", "a", cost)


def test_rejects_bad_input() -> None:
    queue = FairQueue()
    queue.push("x", "a", 1.0)
    with pytest.raises(ValueError, match="already"):
        queue.push("x", "b", 1.0)
    with pytest.raises(ValueError, match="weight"):
        queue.push("y", "a", 1.0, weight=0.0)
    with pytest.raises(ValueError, match="weight"):
        queue.set_weight("a", -2.0)
    with pytest.raises(KeyError):
        queue.done("x")  # queued, not running
    with pytest.raises(KeyError):
        queue.eta("nope")
    assert queue.pop() == "x"
    with pytest.raises(ValueError, match="actual_cost"):
        queue.done("x", actual_cost=-1.0)
    queue.done("x", actual_cost=0.5)
    assert len(queue) == 0 and queue.running() == []


def test_newcomer_bound_survives_float_absorption() -> None:
    """Once virtual time is huge, a 1-second job no longer moves a float tag; tags still advance
    (to the next float), so b's later jobs cannot tie with the newcomer and run before it."""
    queue = FairQueue()
    queue.push("a0", "a", 1e17)
    queue.push("b0", "b", 1e17)
    for i in range(1, 4):
        queue.push(f"b{i}", "b", 1.0)
    for _ in range(2):
        job = queue.pop()
        assert job is not None
        queue.done(job)
    queue.push("n0", "n", 1.0)
    assert queue.order() == ["b1", "n0", "b2", "b3"]


def test_departed_users_are_forgotten() -> None:
    """A queue that is never idle keeps no record of every visitor it ever served: once virtual
    time passes a departed user's clock, "start at V" is all there is left to know. (White-box:
    memory is not visible through the API.)"""
    queue = FairQueue()
    for i in range(300):
        queue.push(f"a{i}", "a", 1.0)
    for n in range(100):
        queue.push(f"v{n}", f"visitor{n}", 1.0)
        for _ in range(2):
            job = queue.pop()
            assert job is not None
            queue.done(job)
    assert len(queue._users) <= 3


def test_short_predictions_skip_stale_heap_entries() -> None:
    """Corrections and a cancelled head leave outdated heap entries behind, before and after the
    live ones; a short order() (which replays the heap) must skip them and agree with the full
    prediction and with pop()."""
    queue = FairQueue()
    for i in range(10):
        for user in "abc":
            queue.push(f"{user}{i}", user, 1.0)
    assert queue.pop() == "a0"
    queue.done("a0", actual_cost=4.0)  # a's entry at tag 1 is outdated: a is at 4 now
    assert queue.remove("b0")  # b's entry for b0 is outdated: b1 inherits its tag
    assert queue.pop() == "c0"
    queue.done("c0", actual_cost=0.25)  # c's entry at tag 1 is outdated: c is at 0.25 now
    full = queue.order()
    assert full[:10] == ["b1", "c1", "b2", "c2", "b3", "c3", "b4", "c4", "a1", "b5"]
    for limit in (1, 3, 5):
        assert queue.order(limit=limit) == full[:limit]
    popped = []
    while (job := queue.pop()) is not None:
        popped.append(job)
        queue.done(job)
    assert popped == full


def test_pop_can_pass_over_deferred_heads_without_losing_their_place() -> None:
    q = FairQueue()
    for user in ("a", "b", "c"):
        q.push(f"{user}1", user, 1.0)
        q.push(f"{user}2", user, 1.0)
    deferred = {"a1", "a2"}
    assert q.pop(lambda job: job in deferred) == "b1"  # a's head is passed over, b's is next in fair order
    assert q.pop(lambda job: job in deferred) == "c1"
    assert q.pop() == "a1"  # without deferring, a is first again: it kept its place
    everything = {"a2", "b2", "c2"}
    assert q.pop(lambda job: job in everything) in everything  # all deferred: the fair head runs anyway
    assert len(q) == 2


def test_requeue_puts_a_lost_job_back_at_the_head_of_its_users_queue() -> None:
    q = FairQueue()
    for job, user in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")]:
        q.push(job, user, 1.0)
    assert [q.pop(), q.pop()] == ["a1", "b1"]  # two workers
    q.requeue("a1")  # its worker died under it
    assert "a1" in q and q.queued_for("a") == ["a1", "a2"]
    # it keeps its start: it runs before anyone else's next job
    assert q.pop() == "a1"
    q.done("b1")
    q.done("a1")
    assert [q.pop(), q.pop()] == ["a2", "b2"]
    with pytest.raises(KeyError):
        q.requeue("zz")
