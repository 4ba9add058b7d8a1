"""Test-only pipeline factories for pool workers: slow steps, a poison prompt, a model that cannot load.

Instances are pickled into Ray actors, so this module stays importable there (no pytest, no fixtures).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from bot.config import Settings
from bot.domain import ModelProfile
from bot.errors import ConfigError
from generation.loading import LoadPlan, load_pipeline

#: a prompt that ends the worker process that draws it, as a crashing kernel would
POISON = "poison pill"
#: a prompt whose drawing hangs before its first step, as a stuck GPU would
STALL = "stall forever"


@dataclass(frozen=True, slots=True)
class Hooked:
    """Loads the real (tiny) model, wrapped: each step sleeps ``step_seconds``; ``POISON`` kills."""

    step_seconds: float = 0.0
    broken: bool = False

    def __call__(self, settings: Settings) -> tuple[Any, ModelProfile, LoadPlan]:
        if self.broken:
            raise ConfigError(f"cannot load MODEL={settings.model}: a test model that never loads")
        pipe, profile, plan = load_pipeline(settings)
        return _HookedPipeline(pipe, self.step_seconds), profile, plan


class _HookedPipeline:
    def __init__(self, pipe: Any, step_seconds: float) -> None:
        self._pipe = pipe
        self._step_seconds = step_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("prompt") == POISON:
            os.kill(os.getpid(), signal.SIGKILL)
        if kwargs.get("prompt") == STALL:
            time.sleep(600)
        inner = kwargs.get("callback_on_step_end")
        if self._step_seconds and inner is not None:

            def slow(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> Any:
                time.sleep(self._step_seconds)  # the worker's GPU thread, simulating a slow step
                return inner(pipe, i, t, callback_kwargs)

            kwargs["callback_on_step_end"] = slow
        return self._pipe(*args, **kwargs)
