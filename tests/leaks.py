"""The test secrets, and a log handler that finds any of them in what the suite logs.

Every token a test uses is registered here with ``register_secret``: the fakes register each
bot token and interaction token as they create it, test modules their own constants.
``tests/conftest.py`` puts ``SCANNER`` on the root logger for the whole session and fails any
test whose log lines contain a registered secret; the helpers that start ``python -m bot``
feed it the process's output too. Importable without pytest (the benchmarks import the fakes).
"""

from __future__ import annotations

import bisect
import copy
import logging
import re
import threading
from dataclasses import dataclass

#: as ``bot.logs.RedactSecrets``: a shorter string cannot be told from ordinary text
MIN_LENGTH = 6
#: secrets are indexed by this many leading characters (at most ``MIN_LENGTH``)
_PREFIX = 4
#: characters of context shown either side of a leak
_CONTEXT = 60


@dataclass(frozen=True, slots=True, kw_only=True)
class Leak:
    """A registered secret found in one line: where it came from and the line, the secret masked."""

    source: str  # the logger's name, or "python -m bot stderr" and the like
    label: str  # what the secret is ("FakeDiscord interaction token")
    excerpt: str

    def __str__(self) -> str:
        return f"{self.label} in {self.source}: {self.excerpt}"


def mask(secret: str) -> str:
    """How a leaked secret is shown in a report: its first characters only."""
    return f"{secret[:_PREFIX]}…[{len(secret)} chars]"


class Secrets:
    """The registered secrets, indexed by their first characters so one pass finds them all.

    The suite registers thousands (one per Discord interaction); testing each against every
    line would cost more than the tests, so a regex finds where any secret's prefix occurs and
    only there are the secrets of that prefix compared.
    """

    def __init__(self) -> None:
        self._labels: dict[str, str] = {}
        self._by_prefix: dict[str, dict[int, set[str]]] = {}
        self._finder: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str, label: str) -> str:
        """Register ``value`` (shorter than ``MIN_LENGTH``: ignored); returns it."""
        if len(value) < MIN_LENGTH:
            return value
        with self._lock:
            if value not in self._labels:
                self._labels[value] = label
                prefix = value[:_PREFIX]
                if prefix not in self._by_prefix:
                    self._finder = None
                self._by_prefix.setdefault(prefix, {}).setdefault(len(value), set()).add(value)
        return value

    def __contains__(self, value: object) -> bool:
        return value in self._labels

    def label(self, value: str) -> str:
        return self._labels[value]

    def find(self, text: str) -> list[tuple[int, str]]:
        """Every registered secret in ``text``, as (position, secret), in order."""
        with self._lock:
            if self._finder is None and self._by_prefix:
                alternatives = "|".join(re.escape(p) for p in self._by_prefix)
                self._finder = re.compile(f"(?=({alternatives}))")
            finder, index = self._finder, self._by_prefix
        if finder is None:
            return []
        hits: list[tuple[int, str]] = []
        for match in finder.finditer(text):
            start = match.start()
            for length, values in index[match.group(1)].items():
                candidate = text[start : start + length]
                if candidate in values:
                    hits.append((start, candidate))
        return hits

    def redact(self, text: str) -> str:
        """``text`` with every registered secret masked (see ``mask``)."""
        parts: list[str] = []
        done = 0
        for start, secret in sorted(self.find(text), key=lambda hit: (hit[0], -len(hit[1]))):
            if start >= done:  # (not a shorter secret inside one already masked)
                parts += [text[done:start], mask(secret)]
                done = start + len(secret)
        return "".join([*parts, text[done:]]) if parts else text


#: every secret the suite uses
SECRETS = Secrets()


def register_secret(value: str, label: str) -> str:
    """Register a token the tests use, so the suite fails if it is ever logged; returns it."""
    return SECRETS.add(value, label)


class LeakScanner(logging.Handler):
    """A root-logger handler that keeps each formatted line until ``check`` looks for secrets.

    It is an ordinary handler, so the redaction the bot installs (``bot.logs.guard_logs`` puts
    its filter on the root logger's handlers) applies to it as to an operator's handler. Those
    filters rewrite the record they get, so they run here on a copy: pytest's own handlers,
    after this one, still see the record as the logger made it.
    """

    def __init__(self, secrets: Secrets) -> None:
        super().__init__(logging.NOTSET)
        self.secrets = secrets
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.active = False  # lines are kept only while installed (not in a benchmark's process)
        self._lines: list[tuple[str, str]] = []

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filters:
            record = copy.copy(record)
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append((record.name, line))

    def feed(self, source: str, text: str) -> None:
        """Output that did not go through this process's logging (a subprocess's stderr), kept by line."""
        if self.active:
            with self.lock:  # type: ignore[union-attr]  # a Handler always has its lock
                self._lines.extend((source, line) for line in text.splitlines())

    def take(self) -> list[tuple[str, str]]:
        """The lines kept since the last call, as (source, line); forgets them."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
        return lines

    def check(self, lines: list[tuple[str, str]] | None = None) -> list[Leak]:
        """The leaks in ``lines`` (default: everything kept since the last ``take``/``check``)."""
        if lines is None:
            lines = self.take()
        if not lines:
            return []
        starts: list[int] = []
        offset = 0
        for _, line in lines:
            starts.append(offset)
            offset += len(line) + 1
        text = "\n".join(line for _, line in lines)
        found: dict[int, list[str]] = {}
        for position, secret in self.secrets.find(text):
            found.setdefault(bisect.bisect_right(starts, position) - 1, []).append(secret)
        leaks = []
        for i, secrets in sorted(found.items()):
            source, line = lines[i]
            label = self.secrets.label(secrets[0])
            leaks.append(Leak(source=source, label=label, excerpt=excerpt(line, secrets)))
        return leaks


def excerpt(line: str, secrets: list[str]) -> str:
    """``line`` around the first secret, every secret in it masked."""
    first = line.find(secrets[0])
    start, end = max(0, first - _CONTEXT), first + len(secrets[0]) + _CONTEXT
    for secret in set(secrets):  # widen the window so that its edges cut no secret in two
        for match in re.finditer(re.escape(secret), line):
            if match.start() < start < match.end():
                start = match.start()
            if match.start() < end < match.end():
                end = match.end()
    part = line[start:end]
    for secret in sorted(set(secrets), key=len, reverse=True):
        part = part.replace(secret, mask(secret))
    return ("…" if start else "") + part + ("…" if end < len(line) else "")


#: the session's scanner; ``tests/conftest.py`` installs it
SCANNER = LeakScanner(SECRETS)
