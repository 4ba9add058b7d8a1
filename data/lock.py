"""``ProcessLock``: one process per database, by an advisory lock on a file next to it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

from bot.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]


class ProcessLock:
    """An exclusive ``flock`` on ``path`` (created mode 0600), held from ``acquire`` to ``release``.

    The kernel drops it when the process ends, however it ends (a kill -9 too), so a stale
    lock file never blocks a restart.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None

    def acquire(self, what: str) -> None:
        """Take the lock or raise ``ConfigError`` naming ``what`` another process is using."""
        if self._file is not None or fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = handle.read(32).decode(errors="replace").strip() or "?"
            handle.close()
            raise ConfigError(
                f"another brushbot process (pid {holder}) is using {what}; stop it first (lock: {self.path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()  # closing drops the flock; the file stays (removing it would race)
