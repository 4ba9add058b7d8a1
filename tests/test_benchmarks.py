"""The benchmarks run from a clean checkout: small versions of each, as the commands a person types.

They start as subprocesses all at once (each sets process-wide torch threads and imports torch
on its own), and each test then reads its own one's table and JSON. The assertions are about
completeness and correctness (no job lost, credits add up, both sides of a ratio drew the same
images), never about how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.leaks import SCANNER

ROOT = Path(__file__).resolve().parent.parent
#: a hang guard, not a speed assertion: the five together take seconds
TIMEOUT = 600


@dataclass
class Ran:
    """One finished benchmark command."""

    returncode: int
    stdout: str
    stderr: str
    data: dict[str, Any]


class _Started:
    def __init__(self, args: list[str], json_path: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OUT"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.json_path = json_path
        self.name = args[0]
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ran: Ran | None = None

    def result(self) -> Ran:
        if self._ran is None:
            try:
                out, err = self.process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
            found = self.json_path is not None and self.json_path.is_file()
            data = json.loads(self.json_path.read_text()) if self.json_path and found else {}
            self._ran = Ran(returncode=self.process.returncode, stdout=out, stderr=err, data=data)
            SCANNER.feed(f"{self.name} stdout", out)
            SCANNER.feed(f"{self.name} stderr", err)
        return self._ran

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Started]]:
    folder = tmp_path_factory.mktemp("benchmarks")
    started = {
        "gpu": _Started(
            ["benchmarks/gpu.py", "--tiny", "--images", "2", "--out", str(folder / "gpu")],
            folder / "gpu" / "gpu.json",
        ),
        "overhead": _Started(
            [
                "benchmarks/overhead.py",
                "--jobs",
                "6",
                "--rounds",
                "2",
                "--size",
                "64",
                "--json",
                str(folder / "o.json"),
            ],
            folder / "o.json",
        ),
        # 128²: four credits a job on the tiny model (64² is one), so the allowance must scale with it
        "soak": _Started(
            [
                "benchmarks/soak.py",
                "--jobs",
                "60",
                "--users",
                "5",
                "--size",
                "128",
                "--json",
                str(folder / "soak.json"),
            ],
            folder / "soak.json",
        ),
        "credits": _Started(["benchmarks/credits.py", "--count", "60", "--concurrency", "4"]),
        "scheduler": _Started(
            ["benchmarks/scheduler.py", "--jobs", "2000", "--users", "200", "--trials", "10"]
        ),
        "busy_chat": _Started(
            ["benchmarks/busy_chat.py", "--quick", "--json", str(folder / "busy.json")], folder / "busy.json"
        ),
    }
    try:
        yield started
    finally:
        for run in started.values():
            run.stop()


def _finished(run: _Started) -> Ran:
    ran = run.result()
    assert ran.returncode == 0, f"exit {ran.returncode}\n{ran.stdout}\n{ran.stderr[-3000:]}"
    assert run.json_path is None or ran.data, "no JSON written"
    return ran


def test_overhead_measures_the_bot_path_against_raw_calls(runs: dict[str, _Started]) -> None:
    ran = _finished(runs["overhead"])
    data = ran.data
    assert "throughput ratio vs (a), end to end" in ran.stdout and "event-loop lag" in ran.stdout
    assert data["lost_jobs"] == 0
    assert data["bot"]["jobs_delivered"] == 12 and data["bot"]["jobs_failed"] == 0
    # (c): the same jobs typed into private chats of the fake Telegram, photos uploaded by the adapter
    telegram = data["telegram"]
    assert telegram.get("jobs_delivered") == 12, telegram
    assert telegram["lost_jobs"] == telegram["jobs_failed"] == 0
    # the store agrees: every job of (b) and (c) and the warm-up delivered, nothing left running
    by_state = data["bot"]["store"]["by_state"]
    assert by_state["delivered"] == 25 and by_state["queued"] == by_state["running"] == 0
    # every ratio compares the same work: each round, each side called the pipeline once per job,
    # with exactly the raw side's seeds (no retry, no extra call, no job drawn twice)
    raw = data["raw"]
    assert raw["round_calls"] == [6, 6] and raw["round_seeds"] == [list(range(1000, 1006))] * 2
    for side in (data["bot"], telegram):
        assert side["round_calls"] == raw["round_calls"] and side["round_seeds"] == raw["round_seeds"]
    assert len(raw["rounds_s"]) == len(data["bot"]["rounds"]) == len(telegram["rounds"]) == 2
    # every job was matched from its submit through its pipeline call to its delivery
    assert data["added_latency_ms"]["median"] is not None and data["added_latency_ms"]["p95"] is not None
    assert data["gpu_idle_gap_ms"]["median"] is not None and data["gpu_idle_gap_ms"]["max"] is not None
    assert (
        set(data["loop_lag_ms"]) == {"samples", "p50", "p99", "max"}
        and data["loop_lag_ms"]["p99"] is not None
    )
    assert set(data["targets"]) >= {"throughput_ratio", "loop_lag_p99_ms", "gpu_idle_gap_median_ms"}


def test_soak_loses_nothing_and_credits_add_up(runs: dict[str, _Started]) -> None:
    ran = _finished(runs["soak"])
    data = ran.data
    assert "jobs lost" in ran.stdout and "jobs refused" in ran.stdout and "credit mismatches" in ran.stdout
    assert data["lost_jobs"] == 0 and data["credit_mismatches"] == 0, data["credit_problems"]
    assert data["submitted"] == data["delivered"] == 60
    assert data["refused"] == data["failed"] == data["duplicate_deliveries"] == 0, data["errors"]
    assert data["store"]["by_state"]["delivered"] == 60 and data["store"]["unfinished"] == 0
    assert data["credits_per_job"] == 4 and data["store"]["credits_committed"] == 60 * 4
    assert set(data["loop_lag_ms"]) == {"samples", "p50", "p99", "max"}
    # both RSS readings were taken: after job 6 and after the last one
    assert data["rss_mb"]["growth_pct"] is not None


def test_gpu_benchmark_runs_tiny_on_the_cpu(runs: dict[str, _Started]) -> None:
    ran = _finished(runs["gpu"])
    data = ran.data
    assert "configuration" in ran.stdout and "PNG encode ms" in ran.stdout
    rows = {row["name"]: row for row in data["rows"]}
    base = rows["baseline"]
    assert base["status"] == "ok", base["note"]
    assert base["raw_images"] == base["bot_images"] == base["burst_images"] == 2
    # the burst's ratio compares the same images: the raw calls' seeds, each drawn once
    assert base["burst_seeds"] == base["raw_seeds"] == [0, 1]
    assert set(base["split_ms"]) == {"text_encoding", "denoising", "vae_decode", "to_pil", "png_encode"}
    assert base["finite"] is True
    # every speed-up has its row, measured or saying why not
    assert "fp8 layerwise casting" in rows and "torch.compile repeated blocks" in rows
    assert any(name.startswith("attention") for name in rows)
    # the memory tiers load through load_pipeline: int8 runs on the CPU, the CUDA-only ones say so
    assert rows["QUANTIZE=int8"]["status"] == "ok" and rows["QUANTIZE=int8"]["first_image_s"] is not None
    assert rows["QUANTIZE=nf4"]["note"] == "needs CUDA" and "8 GiB budget, QUANTIZE=auto" in rows
    for row in data["rows"]:
        assert row["status"] in ("ok", "partial", "skipped", "unavailable"), row
        assert row["status"] == "ok" or row["note"]


def test_credits_benchmark_measures_each_mode(runs: dict[str, _Started]) -> None:
    ran = _finished(runs["credits"])
    rows = [line.split() for line in ran.stdout.splitlines()[3:]]
    modes = [" ".join(row[:-4]) for row in rows]
    assert modes == ["sequential", "4 coroutines", "4 coroutines, 2 connections"], ran.stdout
    assert [row[-4] for row in rows] == ["60"] * 3  # every reservation was made and committed


def test_scheduler_benchmark_reports_every_row(runs: dict[str, _Started]) -> None:
    ran = _finished(runs["scheduler"])
    assert ran.stdout.startswith("FairQueue — 2,000 jobs from 200 users"), ran.stdout
    for what in (
        "push, filling 0 → 2,000",
        "pop + done, 2,000 → 1,600 queued",
        "push, 1,600 → 2,000 queued",
        "remove (cancel) at ~2,000 queued",
        "position() of the next job",
        "position() of the middle job",
        "position() of the last job",
        "eta() of the last job",
        "order(limit=20)",
        "snapshot() of every job",
        "count_for()",
        "newcomer's wait in this queue",
        "newcomer behind 10 × 100 jobs, arriving first",
        "newcomer behind 10 × 100 jobs, mid-run",
    ):
        assert f"  {what}  " in ran.stdout, what
    assert "10 random arrivals, bound 10" in ran.stdout


def test_busy_chat_delivers_and_counts_every_case_against_the_enforcing_fakes(
    runs: dict[str, _Started],
) -> None:
    ran = _finished(runs["busy_chat"])
    data = ran.data
    assert "all delivered s" in ran.stdout and "per image" in ran.stdout and "429s" in ran.stdout
    assert data["config"]["telegram_group_limit"] == {"calls": 20, "window_s": 3.0}
    cases = data["cases"]
    assert set(cases) == {
        "telegram a", "telegram b", "discord a", "discord b", "mixed", "mixed busy", "mixed busy in fair order"
    }  # fmt: skip
    for name, case in cases.items():
        # every job arrived (found by the seed in its PNG) and nothing failed; the goals are not asserted
        assert case["delivered"] == case["jobs"] > 0 and case["failed"] == 0, (name, case)
        assert case["raw_s"] > 0 and case["deliver_s"] > 0 and case["latency_s"]["max"] is not None
        shared = case["jobs"] - case.get("private", {}).get("jobs", 0)
        # each image in the shared chat took at least one counted message (an album item counts;
        # on Discord the interaction's acknowledgement is counted apart)
        spent = case["messages"] + case.get("interaction_callbacks", 0)
        assert spent >= shared and case["per_image"] == round(case["messages"] / shared, 3)
        assert case["rate_limited"] >= 0
    assert data["config"]["delivery_ahead_s"] is None
    for name in ("telegram a", "telegram b", "mixed", "mixed busy", "mixed busy in fair order"):
        case = cases[name]
        assert sum(case["group_calls_by_method"].values()) >= case["messages"]
        assert case["busiest_window"] <= 20  # the fake never let more through than its limit
    assert cases["mixed"]["private"]["delivered"] == cases["mixed"]["private"]["jobs"] == 2
    for name in ("discord a", "discord b"):
        assert cases[name]["fake_errors"] == 0 and cases[name]["unanswered_interactions"] == 0
        assert cases[name]["interaction_callbacks"] == cases[name]["jobs"]  # each /draw acknowledged once
    assert set(data["targets"]) == {
        "telegram a: within 2 x raw + 3 s",
        "telegram b: all delivered",
        "telegram b: <= 1.15 messages per image",
        "telegram b: no 429",
        "discord a: within 2 x raw + 3 s",
        "discord b: all delivered",
        "discord b: <= 1.15 messages per image",
        "discord b: no 429",
    }


def test_chaos_pairs_private_answers_only_with_commands_owed_one() -> None:
    """In a private chat the bot's answers do not reply to their command: chaos pairs them in order.

    A command ignored by design (another bot's) must take no answer, a job's own messages (its
    status, its result: they carry its buttons) answer no command, and a command that got no
    answer (a killed process took it) must not pass its gap on to the chat's later commands.
    """
    from benchmarks.chaos import Sent, answered, telegram_answers
    from tests.fakes.telegram_server import ApiCall, FakeTelegram

    tg = FakeTelegram()
    chat, t0 = 42, 1000.0
    sent = [
        Sent(
            "telegram", "command", 0.5, True, chat_id=chat, message_id=9
        ),  # /stats: a killed process took it
        Sent("telegram", "command", 1.0, False, chat_id=chat, message_id=1),  # /help@some_other_bot
        Sent("telegram", "command", 2.0, True, chat_id=chat, message_id=2),  # /help: answered at 2.1
        Sent("telegram", "command", 3.0, True, chat_id=chat, message_id=3),  # /draw: a job, its status
        Sent("telegram", "command", 4.0, True, chat_id=chat, message_id=5),  # /credits: answered at 4.1
        Sent("telegram", "command", 6.0, True, chat_id=chat, message_id=7),  # /queue: never answered
    ]
    status_buttons = {"inline_keyboard": [[{"text": "Cancel", "callback_data": "bb:cancel:abcdef0123"}]]}
    bot = [
        (2.1, {}),
        (3.1, {"reply_markup": status_buttons}),
        (4.1, {}),
        (6.5, {"reply_markup": status_buttons}),
    ]
    for seq, (at, extra) in enumerate(bot):
        tg.calls.append(ApiCall(seq=seq, method="sendMessage", params={"chat_id": chat, "text": "x", **extra},
                                files={}, status=200, at=t0 + at))  # fmt: skip
    chaos = SimpleNamespace(tg=tg, sent=sent, started=t0)
    jobs = {str((chat, 3)): {"id": "abcdef0123"}}
    replies, pressed = telegram_answers(chaos, jobs)  # type: ignore[arg-type]
    assert replies == {(chat, 2), (chat, 5)} and not pressed
    owed = [s for s in sent if s.expect]
    assert [answered(s, replies, pressed, None, jobs) for s in owed] == [False, True, True, True, False]  # type: ignore[arg-type]
