"""The one exception tree of brushbot.

Every error a user can cause or see is a ``BotError``; its ``str()`` is the one line
shown in chat. Operators see tracebacks in the log, users never do::

    BotError
    ├── ConfigError            a setting is invalid (start-up stops)
    ├── RequestError           the request itself is bad (grammar, limits, blocked words)
    ├── RefusedError           the request is fine but cannot be accepted now
    │   ├── BannedError
    │   ├── QueueFullError     per-user or global queue limit
    │   ├── NoCreditsError
    │   └── NoWorkersError     every GPU worker is retired: nothing could draw it
    ├── NotAuthorizedError     admin-only operation by a non-admin, or someone else's job
    ├── NotFoundError          unknown job or user
    ├── GenerationError        the model failed this job
    │   ├── OutOfMemoryError
    │   ├── CancelledError     the job was cancelled while running
    │   └── WorkerLostError    the worker process died under the job (it may run again elsewhere)
    └── DeliveryError          the result could not be sent
        ├── UnreachableError   the chat is gone or forbids the bot: do not retry
        └── RateLimitedError   the platform said "retry after N seconds": wait, then retry
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every brushbot error; ``str(err)`` is a one-line user-facing message."""


class ConfigError(BotError):
    """A setting is missing or invalid."""


class RequestError(BotError):
    """The request is malformed or over a limit; nothing was changed."""


class RefusedError(BotError):
    """The request is valid but cannot be accepted right now."""


class BannedError(RefusedError):
    """The user is banned."""


class QueueFullError(RefusedError):
    """A queue limit is reached."""


class NoCreditsError(RefusedError):
    """The user has too few credits for this request."""


class NoWorkersError(RefusedError):
    """No GPU worker is left to draw (every one is retired)."""


class NotAuthorizedError(BotError):
    """The caller may not do this."""


class NotFoundError(BotError):
    """The job or user does not exist."""


class GenerationError(BotError):
    """Generation of a job failed."""


class OutOfMemoryError(GenerationError):
    """The device ran out of memory for this job."""


class CancelledError(GenerationError):
    """The job was cancelled while it ran."""


class WorkerLostError(GenerationError):
    """The worker died under the job before returning it; the job may run again on another."""


class DeliveryError(BotError):
    """Sending a result failed; may be retried."""


class UnreachableError(DeliveryError):
    """The chat can no longer be reached; retrying will not help."""


class MessageRefusedError(UnreachableError):
    """The platform refused this message (a bad request); retrying will not help, but the chat
    may still take a line of text saying so."""


class RateLimitedError(DeliveryError):
    """The platform refused a call for now (HTTP 429); ``retry_after`` seconds until it may be repeated."""

    def __init__(self, retry_after: float, message: str = "the chat asked the bot to slow down") -> None:
        super().__init__(message)
        self.retry_after = retry_after


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``str(exc)`` cut to ``limit`` characters, or the type's name if it is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
