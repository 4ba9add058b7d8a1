"""Faults that ``benchmarks/chaos.py`` injects into the ``python -m bot`` it starts (never shipped).

The chaos run puts this folder first on ``PYTHONPATH``, so Python imports this module at start-up
in the bot's process, before ``bot`` runs. Two faults, each only when its variable is set:

* ``CHAOS_OOM_MARK``: a request whose prompt contains it raises CUDA's out-of-memory error where
  the pipeline would run (what a too-large image does on a real card);
* ``CHAOS_DISK_FULL``: while the file it names exists, saving a PNG fails with ``ENOSPC``.
"""

from __future__ import annotations

import errno
import os
from typing import Any


def _install(oom_mark: str | None, disk_flag: str | None) -> None:
    import generation.images as images
    import generation.worker as worker

    if oom_mark:
        real_call = worker.call_pipeline

        def call_pipeline(pipe: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if oom_mark in request.prompt:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (chaos)")
            return real_call(pipe, request, *args, **kwargs)

        worker.call_pipeline = call_pipeline  # type: ignore[assignment]

    if disk_flag:
        real_save = images.ImageStore.save

        def save(self: Any, job: Any, rendered: Any) -> Any:
            if os.path.exists(disk_flag):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.output_dir))
            return real_save(self, job, rendered)

        images.ImageStore.save = save  # type: ignore[method-assign]


if os.environ.get("CHAOS_OOM_MARK") or os.environ.get("CHAOS_DISK_FULL"):
    _install(os.environ.get("CHAOS_OOM_MARK"), os.environ.get("CHAOS_DISK_FULL"))
