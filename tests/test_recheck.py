"""Stored requests are checked again: a reroll, a variation and a resumed job meet today's limits and model.

Each test draws under one set of settings, restarts on the same database and output folder
under stricter ones, and checks that what no longer fits is refused (nothing charged) or ends
refunded with its reason.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bot.domain import VARY_SUBTLE, JobState
from bot.errors import RequestError
from tests.support import PROFILE, ScriptedGenerator
from tests.test_service import ALICE, Harness, ledger


async def drawn(tmp_path: Path, text: str) -> str:
    """One delivered job under the default settings; its id."""
    one = Harness(tmp_path)
    await one.open()
    try:
        ticket = await one.draw(ALICE, text)
        await one.until(lambda hub: ticket.job.id in hub.finished())
        await one.settled()
        return ticket.job.id
    finally:
        await one.close()


async def test_reroll_over_a_lowered_limit_is_refused_and_charges_nothing(tmp_path: Path) -> None:
    job_id = await drawn(tmp_path, "a fox --steps 8")
    before = ledger(tmp_path / "bot.sqlite3")
    two = Harness(tmp_path, max_steps=6)
    await two.open()
    try:
        with pytest.raises(RequestError) as err:
            await two.service.reroll(ALICE, job_id, delivery={"chat": ALICE.id})
        assert str(err.value) == (
            f"job {job_id} cannot be drawn again: its settings no longer fit this bot "
            "(--steps 8 is out of range: allowed 1–6)"
        )
        assert ledger(tmp_path / "bot.sqlite3") == before
        assert len(await two.store.user_jobs(ALICE)) == 1
    finally:
        await two.close()


async def test_reroll_that_still_fits_runs(tmp_path: Path) -> None:
    job_id = await drawn(tmp_path, "a fox --steps 6")
    two = Harness(tmp_path, max_steps=6)
    await two.open()
    try:
        ticket = await two.service.reroll(ALICE, job_id, delivery={"chat": ALICE.id})
        await two.until(lambda hub: ticket.job.id in hub.finished())
        assert ticket.job.request.steps == 6
    finally:
        await two.close()


async def test_variation_over_a_lowered_size_limit_is_refused(tmp_path: Path) -> None:
    job_id = await drawn(tmp_path, "a fox --size 128x128")
    two = Harness(tmp_path, max_pixels=64 * 64)
    await two.open()
    try:
        with pytest.raises(RequestError, match=r"no longer fit this bot .*too large: at most 4,096 pixels"):
            await two.service.vary(ALICE, job_id, VARY_SUBTLE, delivery={"chat": ALICE.id})
        assert len(await two.store.user_jobs(ALICE)) == 1
    finally:
        await two.close()


async def queued_then_restarted(
    tmp_path: Path, texts: list[str], model: str = PROFILE.name, **stricter: object
) -> tuple[Harness, list[str]]:
    """Jobs left unfinished by a stop (the first one running), then a restart under ``stricter`` settings."""
    one = Harness(tmp_path)
    one.gen.hold = True
    await one.open()
    ids = []
    for text in texts:
        ids.append((await one.draw(ALICE, text)).job.id)
        await one.gen.started.wait()
    await one.close()
    two = Harness(tmp_path, **stricter)
    two.gen = ScriptedGenerator(profile=replace(PROFILE, name=model))
    await two.open()
    return two, ids


async def test_recovered_jobs_that_no_longer_fit_end_refunded_with_their_reason(tmp_path: Path) -> None:
    two, (running, fits, over) = await queued_then_restarted(
        tmp_path, ["a --steps 8", "b", "c --n 3"], max_steps=6, max_images=2
    )
    try:
        await two.until(lambda hub: fits in hub.finished())
        await two.settled()
        states = {i: (await two.store.get_job(i)).state for i in (running, fits, over)}  # type: ignore[union-attr]
        assert states == {running: JobState.FAILED, fits: JobState.DELIVERED, over: JobState.FAILED}
        assert two.gen.runs == [("b", two.gen.runs[0][1])]  # only the one that fits was drawn
        told = two.hub.of(running, "failed")[0].data
        assert told == (
            f"Job {running} failed: its settings no longer fit this bot "
            "(--steps 8 is out of range: allowed 1–6). Your 2 credit(s) were refunded."
        )
        assert "--n 3 is out of range: allowed 1–2" in two.hub.of(over, "failed")[0].data
        assert (await two.service.credits(ALICE)).available == 9  # only "b" is charged
    finally:
        await two.close()


async def test_recovered_job_of_another_model_ends_refunded(tmp_path: Path) -> None:
    two, (job_id,) = await queued_then_restarted(tmp_path, ["a fox"], model="other")
    try:
        await two.settled()
        job = await two.store.get_job(job_id)
        assert job is not None and job.state is JobState.FAILED
        assert "asked of the model scripted, and the bot now runs other" in (job.error or "")
        assert two.gen.runs == []
        assert (await two.service.credits(ALICE)).available == 10
    finally:
        await two.close()


async def test_recovered_job_with_a_newly_blocked_word_ends_refunded(tmp_path: Path) -> None:
    two, (job_id,) = await queued_then_restarted(tmp_path, ["a gory fox"], blocked_words="gory")
    try:
        await two.settled()
        job = await two.store.get_job(job_id)
        assert job is not None and job.state is JobState.FAILED and "blocked word" in (job.error or "")
        assert (await two.service.credits(ALICE)).available == 10
    finally:
        await two.close()
