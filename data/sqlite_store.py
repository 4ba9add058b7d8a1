"""``SqliteStore``: users, the credits ledger and the job store in one SQLite file (aiosqlite)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from bot.domain import (
    Balance,
    DrawRequest,
    Job,
    JobState,
    LedgerEntry,
    LedgerKind,
    UserRecord,
    UserRef,
)
from bot.errors import ConfigError, NoCreditsError, NotFoundError, RequestError
from bot.ports import CreditPolicy
from data import schema
from data.lock import ProcessLock

_log = logging.getLogger(__name__)

_UNFINISHED = tuple(s.value for s in JobState if not s.final)
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in _UNFINISHED)
_DAY = 24 * 60 * 60.0
#: seconds between tries of a write that found the file locked by another process past busy_timeout
BUSY_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _casefold(value: object) -> object:
    # registered as an SQL function: SQLite's own lower()/NOCASE only fold ASCII
    return value.casefold() if isinstance(value, str) else value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _user_record(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        user=UserRef(platform=row["platform"], id=row["id"]),
        display_name=row["display_name"],
        weight=float(row["weight"]),
        banned=bool(row["banned"]),
        allowance=row["allowance"],
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        user=UserRef(platform=row["platform"], id=row["user_id"]),
        user_name=row["user_name"],
        request=DrawRequest.from_json(json.loads(row["request"])),
        model=row["model"],
        credits=int(row["credits"]),
        gpu_seconds=float(row["gpu_seconds"]),
        seeds=tuple(int(s) for s in json.loads(row["seeds"])),
        delivery=json.loads(row["delivery"]),
        state=JobState(row["state"]),
        created_at=float(row["created_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        outputs=tuple(str(o) for o in json.loads(row["outputs"])),
        free=bool(row["free"]),
    )


def _ledger_entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(
        id=int(row["id"]),
        at=float(row["at"]),
        user=UserRef(platform=row["platform"], id=row["user_id"]),
        kind=LedgerKind(row["kind"]),
        amount=int(row["amount"]),
        job_id=row["job_id"],
        actor=row["actor"],
        note=row["note"],
    )


def _first(rows: Iterable[sqlite3.Row]) -> sqlite3.Row | None:
    for row in rows:
        return row
    return None


class SqliteStore:
    """The ``bot.ports.Store`` on one SQLite file: WAL mode, one connection, one transaction per call.

    Every method is atomic: writes run inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on
    any error), and an ``asyncio.Lock`` keeps coroutines from interleaving statements on the
    shared connection. Several stores (processes) may open the same file; ``BEGIN IMMEDIATE``
    plus ``busy_timeout`` serialise their writes, and a write that still finds the file busy
    is tried again after each of ``busy_backoff`` before it fails (nothing was written).
    ``exclusive``: hold ``<file>.lock`` while open, so a second process (a second bot on the
    same ``DB_PATH``) refuses to start. A new file is created readable by its owner only.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 10.0,
        busy_backoff: Sequence[float] = BUSY_BACKOFF,
        exclusive: bool = False,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._busy_timeout_ms = max(0, int(busy_timeout * 1000))
        self._busy_backoff = tuple(busy_backoff)
        self._process_lock = ProcessLock(f"{self._path}.lock") if exclusive else None
        #: writes that found the file busy and were tried again
        self.busy_retries = 0
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the file (creating its directory), set the pragmas and apply missing migrations.

        Raises ``ConfigError`` when the file is not a usable database or is newer than this code.
        """
        if self._db is not None:
            return
        label = f"database {self._path}"
        try:
            await asyncio.to_thread(self._prepare_file, label)
        except OSError as exc:
            raise ConfigError(f"cannot open {label}: {exc.strerror or exc}") from None
        try:
            await self._open(label)
        except BaseException:
            if self._process_lock is not None:
                self._process_lock.release()
            raise

    def _prepare_file(self, label: str) -> None:
        """Take the process lock and create a missing file with mode 0600 (it holds chat tokens)."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._process_lock is not None:
            self._process_lock.acquire(label)
        if not self._path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    async def _open(self, label: str) -> None:
        try:
            # isolation_level=None: sqlite3 opens no transactions behind our back; we BEGIN ourselves
            db = await aiosqlite.connect(
                self._path, isolation_level=None, timeout=self._busy_timeout_ms / 1000
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {label}: {exc}") from None
        try:
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")
            await db.create_function("casefold", 1, _casefold, deterministic=True)
            # a damaged file is reported, before anything (even the journal mode) is written
            check = _first(await db.execute_fetchall("PRAGMA quick_check(1)"))
            if check is None or str(check[0]) != "ok":
                found = " ".join(str(check[0]).split())[:200] if check else "no answer"
                raise ConfigError(
                    f"{label} is damaged ({found}); "
                    "nothing was changed: restore it from a backup or move it away"
                )
            mode = _first(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
            if mode is None or str(mode[0]).lower() != "wal":
                _log.warning("%s: WAL mode unavailable, journal mode is %s", label, mode and mode[0])
            await db.execute("PRAGMA foreign_keys = ON")
            # with WAL, NORMAL never corrupts and keeps every transaction whole; a power cut may lose
            # the last few, each with its job row and ledger rows together
            await db.execute("PRAGMA synchronous = NORMAL")
            version = await schema.migrate(db, label=label)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise ConfigError(f"cannot use {label}: {exc}") from None
            raise
        self._db = db
        _log.info("%s open (schema version %d)", label, version)

    async def close(self) -> None:
        """Wait for the running transaction, then close the connection. Safe to call twice."""
        db = self._db
        if db is None:
            return
        async with self._lock:
            self._db = None
            await db.close()
        if self._process_lock is not None:
            self._process_lock.release()

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ transactions

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore is not started")
        return self._db

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; an exception in the body rolls everything back."""
        async with self._lock:
            db = self._conn()
            # IMMEDIATE takes the write lock up front, so a second connection waits in
            # busy_timeout here instead of failing later when a read would upgrade to a write
            await self._begin(db)
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException:
                await schema.rollback(db)
                raise

    async def _begin(self, db: aiosqlite.Connection) -> None:
        """``BEGIN IMMEDIATE``, tried again with backoff while another process holds the file."""
        for delay in (*self._busy_backoff, None):
            try:
                await db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if delay is None or not _is_busy(exc):
                    raise
                self.busy_retries += 1
                _log.warning("%s is busy (another process is writing); trying again in %.2gs", self, delay)
                await asyncio.sleep(delay)

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection for reads, so no read sees another call's open transaction."""
        async with self._lock:
            yield self._conn()

    @staticmethod
    async def _one(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return _first(await db.execute_fetchall(sql, params))

    @staticmethod
    async def _change(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await db.execute(sql, params)
        return int(cursor.rowcount)

    # ------------------------------------------------------------------ users (helpers)

    async def _touch(self, db: aiosqlite.Connection, user: UserRef, display_name: str) -> None:
        """Create the user or mark them seen now; a non-empty name replaces the stored one."""
        now = self._clock()
        await db.execute(
            "INSERT INTO users (platform, id, display_name, created_at, seen_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (platform, id) DO UPDATE SET seen_at = excluded.seen_at, "
            "display_name = CASE WHEN excluded.display_name != '' "
            "THEN excluded.display_name ELSE users.display_name END",
            (user.platform, user.id, display_name, now, now),
        )

    async def _ensure(self, db: aiosqlite.Connection, user: UserRef) -> sqlite3.Row:
        """The user's row, created if missing (an admin acting on someone is not them being seen)."""
        now = self._clock()
        await db.execute(
            "INSERT INTO users (platform, id, created_at, seen_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (platform, id) DO NOTHING",
            (user.platform, user.id, now, now),
        )
        row = await self._user_row(db, user)
        assert row is not None
        return row

    @classmethod
    async def _user_row(cls, db: aiosqlite.Connection, user: UserRef) -> sqlite3.Row | None:
        return await cls._one(
            db, "SELECT * FROM users WHERE platform = ? AND id = ?", (user.platform, user.id)
        )

    @classmethod
    async def _balance(cls, db: aiosqlite.Connection, user: UserRef, policy: CreditPolicy) -> Balance:
        row = await cls._one(
            db,
            "SELECT u.allowance, u.bonus, COALESCE(g.used, 0) AS used FROM users AS u "
            "LEFT JOIN usage AS g ON g.platform = u.platform AND g.user_id = u.id AND g.period = ? "
            "WHERE u.platform = ? AND u.id = ?",
            (policy.period, user.platform, user.id),
        )
        if row is None:
            return Balance(period=policy.period, allowance=policy.allowance, used=0, bonus=0)
        allowance = policy.allowance if row["allowance"] is None else int(row["allowance"])
        return Balance(
            period=policy.period, allowance=allowance, used=int(row["used"]), bonus=int(row["bonus"])
        )

    async def _append(
        self,
        db: aiosqlite.Connection,
        user: UserRef,
        kind: LedgerKind,
        amount: int,
        *,
        at: float | None = None,
        job_id: str | None = None,
        actor: str | None = None,
        note: str = "",
        period: str | None = None,
    ) -> None:
        await db.execute(
            "INSERT INTO ledger (at, platform, user_id, kind, amount, job_id, actor, note, period) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self._clock() if at is None else at,
                user.platform,
                user.id,
                kind.value,
                amount,
                job_id,
                actor,
                note,
                period,
            ),
        )

    # ------------------------------------------------------------------ users

    async def touch_user(self, user: UserRef, display_name: str = "") -> UserRecord:
        """Create the user or record that they were seen; a non-empty name replaces the stored one."""
        async with self._write() as db:
            await self._touch(db, user, display_name)
            row = await self._user_row(db, user)
        assert row is not None
        return _user_record(row)

    async def get_user(self, user: UserRef) -> UserRecord | None:
        """The stored user, or None if never seen."""
        async with self._read() as db:
            row = await self._user_row(db, user)
        return None if row is None else _user_record(row)

    async def find_user(self, platform: str, name: str) -> UserRecord | None:
        """A user of ``platform`` by id, display name or ``@username`` (case-insensitive).

        When several share a name, the one seen most recently wins.
        """
        text = name.strip()
        key = text.removeprefix("@").strip()
        if not key:
            return None
        async with self._read() as db:
            row = await self._one(
                db,
                "SELECT * FROM users WHERE platform = ? "
                "AND (id = ? OR casefold(ltrim(display_name, '@')) = ?) "
                "ORDER BY id = ? DESC, seen_at DESC LIMIT 1",
                (platform.strip().lower(), text, key.casefold(), text),
            )
        return None if row is None else _user_record(row)

    # ------------------------------------------------------------------ credits

    async def balance(self, user: UserRef, policy: CreditPolicy) -> Balance:
        """The user's credits in ``policy.period``; an unknown user has the default allowance."""
        async with self._read() as db:
            return await self._balance(db, user, policy)

    async def grant(self, user: UserRef, amount: int, *, actor: str, policy: CreditPolicy) -> Balance:
        """Add ``amount`` bonus credits (kept across periods); a negative amount takes some back."""
        if amount == 0:
            raise RequestError("the amount to grant must not be 0")
        async with self._write() as db:
            row = await self._ensure(db, user)
            bonus = int(row["bonus"])
            if bonus + amount < 0:
                raise RequestError(f"cannot take {-amount} credits: {user} has only {bonus} bonus credits")
            await db.execute(
                "UPDATE users SET bonus = bonus + ? WHERE platform = ? AND id = ?",
                (amount, user.platform, user.id),
            )
            await self._append(
                db,
                user,
                LedgerKind.GRANT,
                amount,
                actor=actor,
                note=f"bonus {bonus} -> {bonus + amount}",
                period=policy.period,
            )
            return await self._balance(db, user, policy)

    async def set_allowance(
        self, user: UserRef, amount: int | None, *, actor: str, policy: CreditPolicy
    ) -> Balance:
        """Give the user their own allowance per period; None returns them to the default."""
        if amount is not None and amount < 0:
            raise RequestError(f"an allowance must be 0 or more, got {amount}")
        async with self._write() as db:
            row = await self._ensure(db, user)
            before = await self._balance(db, user, policy)
            await db.execute(
                "UPDATE users SET allowance = ? WHERE platform = ? AND id = ?",
                (amount, user.platform, user.id),
            )
            after = await self._balance(db, user, policy)
            old = "default" if row["allowance"] is None else str(row["allowance"])
            new = "default" if amount is None else str(amount)
            await self._append(
                db,
                user,
                LedgerKind.SET,
                after.available - before.available,
                actor=actor,
                note=f"allowance {old} -> {new} ({before.allowance} -> {after.allowance} per period)",
                period=policy.period,
            )
            return after

    async def reset(self, user: UserRef, *, actor: str, policy: CreditPolicy) -> Balance:
        """Forget what the user used in the current period (bonus credits are untouched)."""
        async with self._write() as db:
            await self._ensure(db, user)
            before = await self._balance(db, user, policy)
            # Jobs still queued or running keep what they reserved, so their refunds stay exact.
            await db.execute(
                f"""UPDATE usage SET used = (
                        SELECT COALESCE(SUM(charge_allowance), 0) FROM jobs
                        WHERE platform = usage.platform AND user_id = usage.user_id
                          AND charge_period = usage.period AND state IN ({_UNFINISHED_SQL}))
                    WHERE platform = ? AND user_id = ? AND period = ?""",
                (user.platform, user.id, policy.period),
            )
            after = await self._balance(db, user, policy)
            await self._append(
                db,
                user,
                LedgerKind.RESET,
                after.available - before.available,
                actor=actor,
                note=f"used {before.used} -> {after.used} (still reserved by unfinished jobs)"
                if after.used
                else f"used {before.used} -> 0",
                period=policy.period,
            )
            return after

    async def set_banned(self, user: UserRef, banned: bool, *, actor: str) -> UserRecord:
        """Ban or unban the user."""
        async with self._write() as db:
            row = await self._ensure(db, user)
            await db.execute(
                "UPDATE users SET banned = ? WHERE platform = ? AND id = ?",
                (int(banned), user.platform, user.id),
            )
            was = bool(row["banned"])
            note = ("already banned" if banned else "was not banned") if was == banned else ""
            await self._append(
                db, user, LedgerKind.BAN if banned else LedgerKind.UNBAN, 0, actor=actor, note=note
            )
            updated = await self._user_row(db, user)
        assert updated is not None
        return _user_record(updated)

    async def set_weight(self, user: UserRef, weight: float, *, actor: str) -> UserRecord:
        """Set the user's share of the GPU relative to others (default 1)."""
        if not (math.isfinite(weight) and weight > 0):
            raise RequestError(f"a weight must be a number above 0, got {weight}")
        async with self._write() as db:
            row = await self._ensure(db, user)
            await db.execute(
                "UPDATE users SET weight = ? WHERE platform = ? AND id = ?",
                (float(weight), user.platform, user.id),
            )
            await self._append(
                db, user, LedgerKind.WEIGHT, 0, actor=actor, note=f"weight {row['weight']:g} -> {weight:g}"
            )
            updated = await self._user_row(db, user)
        assert updated is not None
        return _user_record(updated)

    async def history(self, user: UserRef, limit: int = 20) -> list[LedgerEntry]:
        """The user's ledger entries, newest first."""
        if limit <= 0:
            return []
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT * FROM ledger WHERE platform = ? AND user_id = ? ORDER BY id DESC LIMIT ?",
                (user.platform, user.id, limit),
            )
        return [_ledger_entry(row) for row in rows]

    # ------------------------------------------------------------------ jobs

    async def add_job(self, job: Job, *, policy: CreditPolicy | None) -> Balance | None:
        """Insert the job (queued) and reserve its credits in one transaction.

        The allowance of the period is spent before bonus credits; the split is kept on the job
        so a refund returns exactly what was taken. ``policy=None``: a free job, nothing reserved,
        returns None. Raises ``NoCreditsError`` (inserting nothing) when the balance is too low.
        """
        async with self._write() as db:
            await self._touch(db, job.user, job.user_name)
            balance: Balance | None = None
            from_allowance = from_bonus = 0
            if policy is not None:
                before = await self._balance(db, job.user, policy)
                if before.available < job.credits:
                    raise NoCreditsError(
                        f"not enough credits: this needs {job.credits}, you have {before.available}"
                    )
                from_allowance = min(job.credits, max(0, before.allowance - before.used))
                from_bonus = job.credits - from_allowance
                if from_allowance:
                    await db.execute(
                        "INSERT INTO usage (platform, user_id, period, used) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (platform, user_id, period) DO UPDATE SET used = used + excluded.used",
                        (job.user.platform, job.user.id, policy.period, from_allowance),
                    )
                if from_bonus:
                    await db.execute(
                        "UPDATE users SET bonus = bonus - ? WHERE platform = ? AND id = ?",
                        (from_bonus, job.user.platform, job.user.id),
                    )
                balance = Balance(
                    period=policy.period,
                    allowance=before.allowance,
                    used=before.used + from_allowance,
                    bonus=before.bonus - from_bonus,
                )
            await db.execute(
                "INSERT INTO jobs (id, seq, platform, user_id, user_name, request, model, credits, "
                "gpu_seconds, seeds, delivery, state, created_at, started_at, finished_at, error, outputs, "
                "free, charge_allowance, charge_bonus, charge_period) "
                "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), "
                "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, '[]', ?, ?, ?, ?)",
                (
                    job.id,
                    job.user.platform,
                    job.user.id,
                    job.user_name,
                    _dumps(job.request.to_json()),
                    job.model,
                    job.credits,
                    job.gpu_seconds,
                    _dumps(list(job.seeds)),
                    _dumps(dict(job.delivery)),
                    JobState.QUEUED.value,
                    job.created_at,
                    int(policy is None),
                    from_allowance,
                    from_bonus,
                    None if policy is None else policy.period,
                ),
            )
            if policy is not None:
                await self._append(
                    db,
                    job.user,
                    LedgerKind.RESERVE,
                    -job.credits,
                    job_id=job.id,
                    actor=job.user.key,
                    note=f"reserved {job.credits} (allowance {from_allowance}, bonus {from_bonus})",
                    period=policy.period,
                )
            return balance

    async def _change_live_job(self, job_id: str, sql: str, params: Sequence[Any]) -> None:
        """Run an UPDATE on a job that is not final; a final job is left alone (a late event)."""
        async with self._write() as db:
            changed = await self._change(
                db, f"{sql} WHERE id = ? AND state IN ({_UNFINISHED_SQL})", (*params, job_id)
            )
            if changed:
                return
            row = await self._one(db, "SELECT state FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFoundError(f"no job {job_id}")
        _log.debug("job %s is already %s; left unchanged", job_id, row["state"])

    async def mark_running(self, job_id: str, *, at: float) -> None:
        """The job is on the GPU now (a job already final is left alone)."""
        await self._change_live_job(
            job_id, "UPDATE jobs SET state = ?, started_at = ?", (JobState.RUNNING.value, at)
        )

    async def mark_generated(self, job_id: str, outputs: Sequence[str]) -> None:
        """The images are saved at ``outputs``; delivery is pending."""
        await self._change_live_job(
            job_id,
            "UPDATE jobs SET state = ?, outputs = ?",
            (JobState.DELIVERING.value, _dumps([str(o) for o in outputs])),
        )

    async def finish_job(
        self, job_id: str, state: JobState, *, at: float, error: str | None = None, untold: bool = False
    ) -> bool:
        """Move a job to a final state; commit its credits if DELIVERED, refund them otherwise.

        Idempotent: returns False (and changes nothing) when the job was already final. A refund
        returns the bonus part to the bonus and the allowance part to the period it came from.
        """
        if not state.final:
            raise ValueError(f"finish_job needs a final state, got {state}")
        async with self._write() as db:
            row = await self._one(db, "SELECT * FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            if JobState(row["state"]).final:
                return False
            await db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, untold = ? WHERE id = ?",
                (state.value, at, error, int(untold), job_id),
            )
            if row["free"]:
                return True
            user = UserRef(platform=row["platform"], id=row["user_id"])
            credits, period = int(row["credits"]), row["charge_period"]
            if state is JobState.DELIVERED:
                await self._append(
                    db,
                    user,
                    LedgerKind.COMMIT,
                    0,
                    at=at,
                    job_id=job_id,
                    note=f"committed {credits}",
                    period=period,
                )
                return True
            from_allowance, from_bonus = int(row["charge_allowance"]), int(row["charge_bonus"])
            if from_allowance:
                await db.execute(
                    "UPDATE usage SET used = used - ? WHERE platform = ? AND user_id = ? AND period = ?",
                    (from_allowance, user.platform, user.id, period),
                )
            if from_bonus:
                await db.execute(
                    "UPDATE users SET bonus = bonus + ? WHERE platform = ? AND id = ?",
                    (from_bonus, user.platform, user.id),
                )
            await self._append(
                db,
                user,
                LedgerKind.REFUND,
                credits,
                at=at,
                job_id=job_id,
                note=f"{state.value}: refunded {credits} (allowance {from_allowance}, bonus {from_bonus})",
                period=period,
            )
            return True

    async def update_delivery(self, job_id: str, delivery: dict[str, Any]) -> None:
        """Merge ``delivery`` into the job's stored delivery reference (top-level keys replaced)."""
        async with self._write() as db:
            row = await self._one(db, "SELECT delivery FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            merged = {**json.loads(row["delivery"]), **delivery}
            await db.execute("UPDATE jobs SET delivery = ? WHERE id = ?", (_dumps(merged), job_id))

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or None if unknown."""
        async with self._read() as db:
            row = await self._one(db, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    async def unfinished_jobs(self) -> list[Job]:
        """Jobs queued, running or delivering, in submit order (to re-queue after a restart)."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT * FROM jobs WHERE state IN ({_UNFINISHED_SQL}) ORDER BY seq"
            )
        return [_job(row) for row in rows]

    async def mark_told(self, job_id: str) -> None:
        async with self._write() as db:
            await db.execute("UPDATE jobs SET untold = 0 WHERE id = ?", (job_id,))

    async def untold_jobs(self) -> list[Job]:
        async with self._read() as db:
            rows = await db.execute_fetchall("SELECT * FROM jobs WHERE untold = 1 ORDER BY seq")
        return [_job(row) for row in rows]

    async def user_jobs(self, user: UserRef, limit: int = 10) -> list[Job]:
        """The user's jobs, newest first."""
        if limit <= 0:
            return []
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT * FROM jobs WHERE platform = ? AND user_id = ? "
                "ORDER BY created_at DESC, seq DESC LIMIT ?",
                (user.platform, user.id, limit),
            )
        return [_job(row) for row in rows]

    async def job_stats(self) -> dict[str, Any]:
        """Counts for the operator.

        Keys: ``jobs`` (all), ``by_state`` (every state, zeros included), ``jobs_24h`` (submitted
        in the last 24 h), ``images_24h`` (delivered in the last 24 h), ``users`` and
        ``users_24h`` (distinct submitters), ``gpu_seconds`` (estimated GPU time of delivered
        jobs) and ``credits_committed`` (credits of delivered, charged jobs).
        """
        since = self._clock() - _DAY
        async with self._read() as db:
            # one read transaction: every figure comes from the same snapshot
            await db.execute("BEGIN")
            try:
                by_state = {state.value: 0 for state in JobState}
                for row in await db.execute_fetchall("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                    by_state[row["state"]] = int(row["n"])
                totals = await self._one(
                    db,
                    "SELECT COUNT(*) AS jobs_24h, "
                    "COUNT(DISTINCT platform || ':' || user_id) AS users_24h "
                    "FROM jobs WHERE created_at >= ?",
                    (since,),
                )
                users = await self._one(
                    db, "SELECT COUNT(*) AS n FROM (SELECT DISTINCT platform, user_id FROM jobs)"
                )
                delivered = await self._one(
                    db,
                    "SELECT COALESCE(SUM(gpu_seconds), 0.0) AS gpu, "
                    "COALESCE(SUM(CASE WHEN free = 0 THEN credits ELSE 0 END), 0) AS credits, "
                    "COALESCE(SUM(CASE WHEN finished_at >= ? THEN json_array_length(outputs) ELSE 0 END), 0) "
                    "AS images_24h "
                    "FROM jobs WHERE state = 'delivered'",
                    (since,),
                )
            finally:
                await db.execute("COMMIT")
        assert totals is not None and users is not None and delivered is not None
        return {
            "jobs": sum(by_state.values()),
            "by_state": by_state,
            "jobs_24h": int(totals["jobs_24h"]),
            "images_24h": int(delivered["images_24h"]),
            "users": int(users["n"]),
            "users_24h": int(totals["users_24h"]),
            "gpu_seconds": float(delivered["gpu"]),
            "credits_committed": int(delivered["credits"]),
        }
