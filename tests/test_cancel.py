"""Cancel tells the truth: honoured (nothing delivered, refunded) or answered "too late" — in every phase.

Each test stops a job in one phase (denoising, decoding, saving, waiting in the outbox, being
sent), cancels it there, lets it go on, and checks the answer against what the chat received
and what the ledger holds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bot import messages
from bot.domain import DrawRequest, Job, JobState, SavedImage
from bot.errors import RequestError
from bot.ports import Rendered, StepCallback
from bot.recording import RecordingHub
from generation.images import ImageStore
from tests.support import ScriptedGenerator
from tests.test_service import ALICE, Harness, ledger


class DecodingGenerator(ScriptedGenerator):
    """After the last denoising step, "decodes" until released, deaf to cancel (as a VAE decode is)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoding = asyncio.Event()
        self.decoded = asyncio.Event()

    async def generate(
        self, request: DrawRequest, seeds: tuple[int, ...], *, on_step: StepCallback, cancel: threading.Event
    ) -> Rendered:
        rendered = await super().generate(request, seeds, on_step=on_step, cancel=cancel)
        self.decoding.set()
        await self.decoded.wait()
        return rendered


class GatedSink:
    """A real ImageStore whose ``save`` (on the encoder thread) waits for the test's go."""

    def __init__(self, inner: ImageStore) -> None:
        self.inner = inner
        self.saving = threading.Event()
        self.go = threading.Event()

    def save(self, job: Job, rendered: Rendered) -> list[SavedImage]:
        self.saving.set()
        self.go.wait(20)
        return self.inner.save(job, rendered)

    def fit(self, path: str, limit_bytes: int):  # type: ignore[no-untyped-def]
        return self.inner.fit(path, limit_bytes)


@dataclass(slots=True)
class GatedHub(RecordingHub):
    """A transport whose result sends hang (in flight) until released."""

    sending: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        self.sending.set()
        await self.go.wait()
        await RecordingHub.result(self, job, images, caption)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    await h.close()


def kinds(h: Harness) -> list[tuple[str, int]]:
    return sorted((row[1], row[2]) for row in ledger(h.settings.db_path))


async def assert_honoured(h: Harness, job_id: str) -> None:
    await h.settled()
    job = await h.store.get_job(job_id)
    assert job is not None and job.state is JobState.CANCELLED
    assert h.hub.of(job_id, "delivered") == []
    assert kinds(h) == [("refund", 1), ("reserve", -1)]
    assert (await h.service.credits(ALICE)).available == 10
    assert "refunded" in h.hub.of(job_id, "failed")[0].data


async def test_cancel_during_denoise_is_honoured(harness: Harness) -> None:
    harness.gen.hold = True
    await harness.open()
    ticket = await harness.draw(ALICE)
    await harness.gen.started.wait()
    answer = await harness.service.cancel(ALICE, ticket.job.id)
    assert "refunded when it stops" in messages.cancel_text(answer)
    await assert_honoured(harness, ticket.job.id)


async def test_cancel_during_decode_is_honoured(harness: Harness) -> None:
    harness.gen = gen = DecodingGenerator()
    await harness.open()
    ticket = await harness.draw(ALICE)
    await gen.decoding.wait()  # every step has run: only the decode is left
    answer = await harness.service.cancel(ALICE, ticket.job.id)
    assert "refunded when it stops" in messages.cancel_text(answer)
    gen.decoded.set()  # the images come back anyway; they must not be delivered
    await assert_honoured(harness, ticket.job.id)


async def test_cancel_while_saving_is_honoured(harness: Harness) -> None:
    harness.sink = sink = GatedSink(ImageStore(harness.settings.output_dir, "scripted"))
    await harness.open()
    ticket = await harness.draw(ALICE)
    await asyncio.to_thread(sink.saving.wait, 20)  # the GPU is done; the PNG is being written
    answer = await harness.service.cancel(ALICE, ticket.job.id)
    assert answer.state is JobState.RUNNING and "refunded when it stops" in messages.cancel_text(answer)
    sink.go.set()
    await assert_honoured(harness, ticket.job.id)


async def test_cancel_of_a_result_waiting_in_the_outbox_is_honoured(harness: Harness) -> None:
    harness.hub = hub = GatedHub()
    await harness.open()
    first = await harness.draw(ALICE, "first")
    await hub.sending.wait()  # the first result is being sent; the chat's outbox sends one at a time
    second = await harness.draw(ALICE, "second")
    async with asyncio.timeout(20):  # saved and handed to the outbox, behind the first
        while (await harness.service.job(second.job.id)).state is not JobState.DELIVERING:
            await asyncio.sleep(0)
    answer = await harness.service.cancel(ALICE, second.job.id)
    assert answer.state is JobState.CANCELLED
    assert messages.cancel_text(answer) == f"Cancelled job {second.job.id}. 1 credit(s) refunded."
    hub.go.set()
    await harness.settled()
    assert hub.finished() == [first.job.id]
    job = await harness.store.get_job(second.job.id)
    assert job is not None and job.state is JobState.CANCELLED
    assert (await harness.service.credits(ALICE)).available == 9  # the first one is charged


async def test_cancel_during_the_send_is_too_late_and_charged(harness: Harness) -> None:
    harness.hub = hub = GatedHub()
    await harness.open()
    ticket = await harness.draw(ALICE)
    await hub.sending.wait()
    with pytest.raises(RequestError, match=r"too late to cancel .* being delivered; its 1 credit"):
        await harness.service.cancel(ALICE, ticket.job.id)
    hub.go.set()
    await harness.settled()
    job = await harness.store.get_job(ticket.job.id)
    assert job is not None and job.state is JobState.DELIVERED
    assert hub.finished() == [ticket.job.id] and hub.of(ticket.job.id, "failed") == []
    assert kinds(harness) == [("commit", 0), ("reserve", -1)]
    with pytest.raises(RequestError, match=r"too late to cancel .* already delivered"):
        await harness.service.cancel(ALICE, ticket.job.id)


async def test_cancel_after_a_failed_send_is_too_late(harness: Harness) -> None:
    """A failed attempt may have reached the chat in part: a retry is not withdrawn."""
    await harness.open()
    harness.gen.hold = True
    ticket = await harness.draw(ALICE)
    harness.hub.fail_deliveries[ticket.job.id] = 1
    await harness.gen.started.wait()
    harness.gen.release()
    await harness.hub.wait_for(lambda hub: hub.of(ticket.job.id, "delivery-error"), 20)
    with pytest.raises(RequestError, match="too late"):
        await harness.service.cancel(ALICE, ticket.job.id)
    await harness.settled()
    assert harness.hub.finished() == [ticket.job.id]
