"""The SQLite schema as an ordered list of migrations, versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

import aiosqlite

from bot.errors import ConfigError

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One step of the schema: applied in its own transaction, then ``user_version = version``."""

    version: int
    name: str
    statements: tuple[str, ...]


_INITIAL = Migration(
    version=1,
    name="users, usage, append-only ledger, jobs",
    statements=(
        """
        CREATE TABLE users (
            platform     TEXT    NOT NULL,
            id           TEXT    NOT NULL,
            display_name TEXT    NOT NULL DEFAULT '',
            banned       INTEGER NOT NULL DEFAULT 0 CHECK (banned IN (0, 1)),
            allowance    INTEGER CHECK (allowance IS NULL OR allowance >= 0),
            bonus        INTEGER NOT NULL DEFAULT 0 CHECK (bonus >= 0),
            created_at   REAL    NOT NULL,
            seen_at      REAL    NOT NULL,
            PRIMARY KEY (platform, id)
        )
        """,
        # credits used (reserved or committed) per user and period; a new period key is a fresh row
        """
        CREATE TABLE usage (
            platform TEXT    NOT NULL,
            user_id  TEXT    NOT NULL,
            period   TEXT    NOT NULL,
            used     INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
            PRIMARY KEY (platform, user_id, period),
            FOREIGN KEY (platform, user_id) REFERENCES users (platform, id)
        )
        """,
        # AUTOINCREMENT: ledger ids are never reused, so "newest first" is "highest id first"
        """
        CREATE TABLE ledger (
            id       INTEGER PRIMARY KEY AUTOINCREMENT,
            at       REAL    NOT NULL,
            platform TEXT    NOT NULL,
            user_id  TEXT    NOT NULL,
            kind     TEXT    NOT NULL CHECK (kind IN ('reserve', 'commit', 'refund', 'grant', 'set',
                                                      'reset', 'ban', 'unban', 'weight')),
            amount   INTEGER NOT NULL,
            job_id   TEXT,
            actor    TEXT,
            note     TEXT    NOT NULL DEFAULT '',
            period   TEXT,
            FOREIGN KEY (platform, user_id) REFERENCES users (platform, id)
        )
        """,
        "CREATE INDEX ledger_user ON ledger (platform, user_id, id)",
        """
        CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END
        """,
        """
        CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END
        """,
        """
        CREATE TABLE jobs (
            id               TEXT    PRIMARY KEY,
            seq              INTEGER NOT NULL UNIQUE,
            platform         TEXT    NOT NULL,
            user_id          TEXT    NOT NULL,
            user_name        TEXT    NOT NULL DEFAULT '',
            request          TEXT    NOT NULL,
            model            TEXT    NOT NULL,
            credits          INTEGER NOT NULL CHECK (credits >= 0),
            gpu_seconds      REAL    NOT NULL,
            seeds            TEXT    NOT NULL,
            state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'delivering',
                                                                'delivered', 'failed', 'cancelled')),
            created_at       REAL    NOT NULL,
            started_at       REAL,
            finished_at      REAL,
            error            TEXT,
            outputs          TEXT    NOT NULL DEFAULT '[]',
            free             INTEGER NOT NULL DEFAULT 0 CHECK (free IN (0, 1)),
            charge_allowance INTEGER NOT NULL DEFAULT 0,
            charge_bonus     INTEGER NOT NULL DEFAULT 0,
            charge_period    TEXT,
            FOREIGN KEY (platform, user_id) REFERENCES users (platform, id)
        )
        """,
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX jobs_user ON jobs (platform, user_id, created_at)",
    ),
)

_WEIGHTS_AND_DELIVERY = Migration(
    version=2,
    name="fair-share weight per user; delivery reference per job (survives restarts)",
    statements=(
        "ALTER TABLE users ADD COLUMN weight REAL NOT NULL DEFAULT 1.0 CHECK (weight > 0)",
        "ALTER TABLE jobs ADD COLUMN delivery TEXT NOT NULL DEFAULT '{}'",
    ),
)

_UNTOLD = Migration(
    version=3,
    name="whether a job's requester is still to be told how it ended (survives a crash)",
    statements=("ALTER TABLE jobs ADD COLUMN untold INTEGER NOT NULL DEFAULT 0 CHECK (untold IN (0, 1))",),
)

#: every migration in order; ``MIGRATIONS[i].version == i + 1``
MIGRATIONS: tuple[Migration, ...] = (_INITIAL, _WEIGHTS_AND_DELIVERY, _UNTOLD)

#: the schema version this code writes
LATEST_VERSION = MIGRATIONS[-1].version


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already rolled it back on its own."""
    try:
        await db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        # some errors (SQLITE_FULL, SQLITE_IOERR, ...) end the transaction themselves
        _log.debug("rollback: %s", exc)


async def user_version(db: aiosqlite.Connection) -> int:
    """The schema version stored in the database file (0 for a new file)."""
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(db: aiosqlite.Connection, *, target: int = LATEST_VERSION, label: str = "database") -> int:
    """Apply the missing migrations up to ``target``, one transaction each; return the version.

    ``db`` must be in autocommit mode (``isolation_level=None``): each step runs inside its own
    ``BEGIN IMMEDIATE``, so two processes starting at once cannot both apply a step.
    Raises ``ConfigError`` when the file is newer than this code.
    """
    current = await user_version(db)
    if current > LATEST_VERSION:
        raise ConfigError(
            f"{label} has schema version {current}, newer than this brushbot supports "
            f"({LATEST_VERSION}): upgrade brushbot or use another DB_PATH"
        )
    for migration in MIGRATIONS:
        if migration.version > target:
            break
        if migration.version <= current:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            # re-read under the write lock: another process may have migrated meanwhile
            current = await user_version(db)
            if migration.version > current:
                for statement in migration.statements:
                    await db.execute(statement)
                # user_version is part of the database header, so it commits with the step
                await db.execute(f"PRAGMA user_version = {migration.version:d}")
                _log.info("%s: migrated to schema version %d (%s)", label, migration.version, migration.name)
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
        current = max(current, migration.version)
    return current
