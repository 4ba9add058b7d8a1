"""Message budgets: how many messages a chat (a *lane*) may receive, and when the next may go.

``Budget`` is the base; two policies sit beside it:

* ``SlidingWindow`` — at most ``limit`` messages in any ``window`` seconds (a Telegram group:
  20 in any 60 s; a private chat: about one a second). A slot is stamped when the call
  *returns*, so a slow upload can never make the platform see two slots closer than we counted.
* ``LearnedBucket`` — a bucket whose size and reset the platform tells us in its rate-limit
  headers (Discord's ``X-RateLimit-Remaining`` / ``-Reset-After``); until it does, a guess.

Every budget also honours a ``retry_after`` that arrived anyway (``block``). Budgets are
synchronous and owned by one lane's outbox; the caller passes ``now`` (``time.monotonic``).
"""

from __future__ import annotations

import abc
import bisect
import math


class Budget(abc.ABC):
    """A lane's allowance: ``wait`` says how long until ``cost`` messages may go, ``spend`` takes them."""

    def __init__(self) -> None:
        self._blocked_until = -math.inf

    @property
    @abc.abstractmethod
    def limit(self) -> int:
        """Messages the lane may receive per period (its burst)."""

    @property
    @abc.abstractmethod
    def period(self) -> float:
        """Seconds over which ``limit`` applies."""

    @abc.abstractmethod
    def _free(self, now: float) -> int: ...

    @abc.abstractmethod
    def _wait(self, cost: int, now: float) -> float: ...

    @abc.abstractmethod
    def spend(self, cost: int, now: float) -> Spent:
        """Take ``cost`` slots now; call ``settle`` on the result once the call has returned."""

    def free(self, now: float) -> int:
        """Messages that may be sent now (0 while blocked by a retry-after)."""
        return 0 if now < self._blocked_until else self._free(now)

    def wait(self, cost: int, now: float) -> float:
        """Seconds until ``cost`` messages may be sent (0: now). A cost over the limit waits for a clear lane."""
        if now < self._blocked_until:
            return self._blocked_until - now
        return max(0.0, self._wait(max(1, cost), now))

    def block(self, seconds: float, now: float) -> None:
        """The platform refused a call with ``retry_after``: send nothing for ``seconds``."""
        self._blocked_until = max(self._blocked_until, now + max(0.0, seconds))

    def observe(self, *, limit: int | None, remaining: int, reset_after: float, now: float) -> None:  # noqa: B027
        """What the platform said about this lane's bucket (learned budgets use it; others ignore it)."""


class Spent:
    """Slots taken by one call; ``settle(now)`` stamps them with the time the call returned."""

    __slots__ = ("_budget", "_cost", "_settled")

    def __init__(self, budget: SlidingWindow | None, cost: int) -> None:
        self._budget = budget
        self._cost = cost
        self._settled = False

    def settle(self, now: float) -> None:
        if self._settled:
            return
        self._settled = True
        if self._budget is not None:
            self._budget._settle(self._cost, now)


class Unlimited(Budget):
    """No limit (the console, tests)."""

    @property
    def limit(self) -> int:
        return 1_000_000

    @property
    def period(self) -> float:
        return 1.0

    def _free(self, now: float) -> int:
        return self.limit

    def _wait(self, cost: int, now: float) -> float:
        return 0.0

    def spend(self, cost: int, now: float) -> Spent:
        return Spent(None, cost)


class SlidingWindow(Budget):
    """At most ``limit`` messages in any ``window`` seconds, plus ``margin`` seconds of safety."""

    def __init__(self, limit: int, window: float, *, margin: float = 0.0) -> None:
        super().__init__()
        if limit < 1 or window <= 0:
            raise ValueError("a sliding window needs limit >= 1 and window > 0")
        self._limit = limit
        self.window = window
        self.margin = margin
        self._stamps: list[float] = []  # sorted times the calls returned
        self._in_flight = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def period(self) -> float:
        return self.window

    def _expire(self, now: float) -> None:
        cut = bisect.bisect_right(self._stamps, now - self.window - self.margin)
        if cut:
            del self._stamps[:cut]

    def _free(self, now: float) -> int:
        self._expire(now)
        return self._limit - len(self._stamps) - self._in_flight

    def _wait(self, cost: int, now: float) -> float:
        need = min(cost, self._limit)
        free = self._free(now)
        if free >= need:
            return 0.0
        # the (need - free)-th oldest stamp has to leave the window; in-flight calls stamp later
        k = need - free
        if k > len(self._stamps):
            return self.window + self.margin  # waiting on calls still in flight: their stamps decide
        return self._stamps[k - 1] + self.window + self.margin - now

    def spend(self, cost: int, now: float) -> Spent:
        self._in_flight += cost
        return Spent(self, cost)

    def _settle(self, cost: int, now: float) -> None:
        self._in_flight -= cost
        for _ in range(cost):
            bisect.insort(self._stamps, now)


class LearnedBucket(Budget):
    """A bucket of ``limit`` calls per ``period`` seconds, corrected by what the platform reports."""

    def __init__(self, limit: int, period: float) -> None:
        super().__init__()
        if limit < 1 or period <= 0:
            raise ValueError("a bucket needs limit >= 1 and period > 0")
        self._limit = limit
        self._period = period
        self._remaining = limit
        self._reset_at = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def period(self) -> float:
        return self._period

    def _roll(self, now: float) -> None:
        if now >= self._reset_at:
            self._remaining = self._limit
            self._reset_at = math.inf  # the next call starts the period

    def _free(self, now: float) -> int:
        self._roll(now)
        return self._remaining

    def _wait(self, cost: int, now: float) -> float:
        need = min(cost, self._limit)
        if self._free(now) >= need:
            return 0.0
        return self._reset_at - now if math.isfinite(self._reset_at) else self._period

    def spend(self, cost: int, now: float) -> Spent:
        self._roll(now)
        if not math.isfinite(self._reset_at):
            self._reset_at = now + self._period
        self._remaining -= cost
        return Spent(None, cost)

    def observe(self, *, limit: int | None, remaining: int, reset_after: float, now: float) -> None:
        if limit is not None and limit >= 1:
            self._limit = limit
        self._remaining = max(0, min(remaining, self._limit))
        self._reset_at = now + max(0.0, reset_after)


__all__ = ["Budget", "LearnedBucket", "SlidingWindow", "Spent", "Unlimited"]
