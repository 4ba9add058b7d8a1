"""End to end on Ray: ``python -m bot`` against the fake Telegram server, a worker killed with ``kill -9``.

Starts the fake Bot API server, then the bot as its own process with ``WORKERS=ray RAY_WORKERS=2
DEVICE=cpu MODEL=<tiny dir>`` (it starts a private Ray); users type ``/draw`` in private chats; once
the first result is out, one ``ray::GpuWorker`` process is killed with SIGKILL. Checks that every
job is delivered exactly once and charged once, then stops the bot with SIGINT.

    .venv/bin/python benchmarks/ray_telegram.py            # 12 jobs, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))


def gpu_workers() -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::GpuWorker"):
            found.append(proc.info["pid"])
    return found


async def run(jobs: int, folder: Path) -> int:
    from generation.tiny import build_tiny_pipeline
    from tests.fakes.telegram_server import FakeTelegram

    model = build_tiny_pipeline(folder / "tiny")
    async with FakeTelegram(group_limit=None) as tg:
        env = {
            **os.environ,
            "TELEGRAM_TOKEN": tg.token,
            "TELEGRAM_BASE_URL": tg.base_url,
            "TELEGRAM_BASE_FILE_URL": tg.base_file_url,
            "WORKERS": "ray",
            "RAY_WORKERS": "2",
            "DEVICE": "cpu",
            "MODEL": str(model),
            "DB_PATH": str(folder / "bot.sqlite3"),
            "OUTPUT_DIR": str(folder / "out"),
            "MODEL_CACHE_DIR": str(folder / "cache"),
            "DAILY_CREDITS": "100",
            "MAX_QUEUED_PER_USER": "10",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("RAY_ADDRESS", None)
        started = time.perf_counter()
        bot = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=folder, env=env, stdout=sys.stdout, stderr=sys.stderr
        )
        try:
            await tg.wait_for("getUpdates", timeout=120)
            print(f"bot polling after {time.perf_counter() - started:.1f} s")
            users = [tg.user(1000 + i, f"user{i}") for i in range(4)]
            for n in range(jobs):
                user = users[n % len(users)]
                tg.inject_message(
                    tg.private_chat(user), user, f"/draw a lighthouse {n} --size 256x256 --steps 8"
                )
            await tg.wait_until(lambda: len(tg.calls_of("sendPhoto", ok=True)) >= 1, timeout=180)
            pids = gpu_workers()
            print(f"first photo after {time.perf_counter() - started:.1f} s; ray::GpuWorker pids {pids}")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                print(f"kill -9 {pids[0]}")
            await tg.wait_until(lambda: len(tg.calls_of("sendPhoto", ok=True)) >= jobs, timeout=240)
            await asyncio.sleep(2)  # anything sent twice would arrive now
            photos = len(tg.calls_of("sendPhoto", ok=True))
            print(f"{photos} photos for {jobs} jobs after {time.perf_counter() - started:.1f} s")
        finally:
            bot.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(bot.wait(), 30)
            except TimeoutError:
                bot.kill()
    with sqlite3.connect(folder / "bot.sqlite3") as conn:
        states = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        commits = conn.execute("SELECT count(*) FROM ledger WHERE kind = 'commit'").fetchone()[0]
    print(f"job states {dict(states)}; credit commits {commits}; bot exit {bot.returncode}")
    ok = photos == jobs and dict(states) == {"delivered": jobs} and commits == jobs
    print("OK: every job delivered once and charged once" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="brushbot-ray-telegram-") as tmp:
        return asyncio.run(run(args.jobs, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
