"""SQLite persistence with aiosqlite: schema and migrations, the credits ledger and the job store."""

from data.sqlite_store import SqliteStore

__all__ = ["SqliteStore"]
