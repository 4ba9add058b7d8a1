"""Credit refill periods and the shared user-facing texts."""

from __future__ import annotations

from datetime import UTC, datetime

from bot import messages
from bot.credits import next_refill, period_key
from bot.domain import DrawRequest, Job, UserRef


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_daily_periods_change_at_midnight_utc() -> None:
    assert period_key(at("2026-11-30T23:59:59")) == "2026-11-30"
    assert period_key(at("2026-12-01T00:00:00")) == "2026-12-01"
    assert next_refill(at("2026-11-30T13:00:00")).isoformat() == "2026-12-01T00:00:00+00:00"


def test_periods_follow_the_configured_time_zone() -> None:
    # 23:30 UTC is already the next day in Berlin (UTC+1 in winter)
    assert period_key(at("2026-11-30T23:30:00"), 24, "Europe/Berlin") == "2026-12-01"
    assert (
        next_refill(at("2026-11-30T12:00:00"), 24, "Europe/Berlin").isoformat() == "2026-12-01T00:00:00+01:00"
    )


def test_shorter_and_longer_periods() -> None:
    assert period_key(at("2026-11-30T05:59:00"), 6) == "2026-11-30T00/6h"
    assert period_key(at("2026-11-30T06:00:00"), 6) == "2026-11-30T06/6h"
    week = {period_key(at(f"2026-11-{day}T12:00:00"), 24 * 7) for day in range(23, 30)}
    assert 1 <= len(week) <= 2  # seven consecutive days span at most two weekly periods


def _job(prompt: str, negative: str = "") -> Job:
    request = DrawRequest(
        prompt=prompt, negative_prompt=negative, width=1024, height=768, steps=8, guidance=0.0, count=2
    )
    return Job(
        id="abc1234567",
        user=UserRef(platform="telegram", id="1"),
        request=request,
        model="z-image-turbo",
        credits=2,
        gpu_seconds=3.0,
        seeds=(41, 42),
        created_at=0.0,
        started_at=10.0,
        finished_at=13.5,
    )


def test_caption_keeps_settings_and_fits_the_limit() -> None:
    caption = messages.caption(_job("a fox " * 400, negative="blurry"), 3.5)
    assert len(caption) <= 1024
    assert caption.endswith("1024x768 · 8 steps · cfg 0 · seed 41, 42 · z-image-turbo · 3.5s")
    assert "Negative: blurry" in caption and "…" in caption


def test_progress_bar_and_durations() -> None:
    assert messages.bar(0.5, 10) == "[█████░░░░░] 50%"
    assert messages.bar(2.0, 4) == "[████] 100%"
    assert [messages.duration(s) for s in (0.2, 59, 61, 3723)] == ["1s", "59s", "1m 01s", "1h 02m"]
    assert messages.job_seconds(_job("x")) == 3.5
