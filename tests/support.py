"""Test doubles of the ports that cannot be the real thing in a fast unit test.

``ScriptedGenerator`` is a Generator whose GPU time is scripted: each job can be held until a
test releases it, can fail with an injected error, and records the order jobs ran in. The
real worker on the tiny model is covered by the generation tests and the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import zlib
from dataclasses import dataclass, field

from PIL import Image

from bot.domain import DrawRequest, ModelProfile, StepRounding
from bot.errors import CancelledError
from bot.ports import Rendered, StepCallback

PROFILE = ModelProfile(
    name="scripted",
    family="z-image",
    default_width=64,
    default_height=64,
    default_steps=4,
    default_guidance=0.0,
    size_multiple=16,
    min_side=16,
    max_side=512,
    seconds_per_mpx_step=1.0,
    sizes={"square": (64, 64), "portrait": (48, 64), "landscape": (64, 48), "wide": (64, 32)},
    img2img=StepRounding.UP,
)


@dataclass
class ScriptedGenerator:
    """Runs jobs on the event loop, one at a time, as the test scripts them."""

    name: str = "scripted"
    profile: ModelProfile = PROFILE
    hold: bool = False
    runs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    #: every request run, in order (the image-to-image fields included)
    requests: list[DrawRequest] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self._release.set()

    async def generate(
        self, request: DrawRequest, seeds: tuple[int, ...], *, on_step: StepCallback, cancel: threading.Event
    ) -> Rendered:
        self.runs.append((request.prompt, seeds))
        self.requests.append(request)
        self.started.set()
        total = self.profile.steps_run(request)  # from a picture, only strength × steps run
        for step in range(1, total + 1):
            if self.hold and step == 2:
                while not self._release.is_set():
                    if cancel.is_set():
                        break
                    await asyncio.sleep(0.005)
                self._release.clear()
            if cancel.is_set():
                raise CancelledError("cancelled")
            on_step(step, total)
            await asyncio.sleep(0)
        if self.errors:
            raise self.errors.pop(0)
        images = [Image.new("RGB", (request.width, request.height), (seed % 256, 0, 0)) for seed in seeds]
        cost = total * request.megapixels * request.count
        return Rendered(images=images, seeds=seeds, seconds=cost, timings={"total": cost})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds a few bytes of data: a bomb's header, cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
