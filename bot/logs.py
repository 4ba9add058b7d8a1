"""Logging set-up with a filter that keeps secrets (bot tokens) out of every log line."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

REDACTED = "[redacted]"


class RedactSecrets(logging.Filter):
    """Replaces each secret in a record's message, arguments and traceback with ``[redacted]``.

    ``patterns`` catch secrets that are not known in advance (Discord's interaction tokens): each
    is a regex whose group 1 is the part to keep, and whatever else it matches is redacted.
    """

    def __init__(self, secrets: Iterable[str], patterns: Iterable[re.Pattern[str]] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 6]
        self._patterns = tuple(patterns)

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        for pattern in self._patterns:
            text = pattern.sub(rf"\1{REDACTED}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets and not self._patterns:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the handler's to report, not this filter's
            return True
        cleaned = self._clean(message)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def guard_logs(
    secrets: Iterable[str], patterns: Iterable[re.Pattern[str]] = (), loggers: Iterable[str] = ()
) -> Callable[[], None]:
    """Redact ``secrets`` and ``patterns`` (see ``RedactSecrets``) in every log line; returns the undo.

    The filter goes on the root logger's handlers (records from anywhere that reach them) and on
    each named logger and its existing descendants: a logger's filters do not apply to records
    of its children, and they still hold when a handler is added somewhere else later.
    """
    redactor = RedactSecrets(secrets, patterns)
    prefixes = tuple(loggers)
    targets: list[logging.Filterer] = [*logging.getLogger().handlers]
    targets.extend(logging.getLogger(name) for name in prefixes)
    targets.extend(
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if isinstance(logger, logging.Logger)
        and name not in prefixes
        and any(name.startswith(f"{prefix}.") for prefix in prefixes)
    )
    for target in targets:
        target.addFilter(redactor)

    def undo() -> None:
        for target in targets:
            target.removeFilter(redactor)

    return undo


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to stderr with timestamps; secrets are redacted on every handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    # HTTP client libraries log request URLs, and Telegram's URLs contain the token.
    for noisy in ("httpx", "httpcore", "discord.http", "discord.gateway", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
