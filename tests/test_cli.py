"""The command line, run as a user would: draw twice for identical pixels, the console, doctor."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bot.__main__ import draw
from bot.config import Settings
from generation.images import read_parameters
from tests.leaks import SCANNER, register_secret

ROOT = Path(__file__).resolve().parent.parent
TOKEN = register_secret("987654:secret-telegram-token-value", "test_cli TOKEN")


def run_bot(
    args: list[str], tmp_path: Path, model: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.endswith("_TOKEN") and k not in ("MODEL", "ADMIN_IDS")
    }
    environ.update(
        MODEL=str(model),
        DEVICE="cpu",
        WARMUP="false",
        DB_PATH=str(tmp_path / "bot.sqlite3"),
        OUTPUT_DIR=str(tmp_path / "outputs"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    SCANNER.feed("python -m bot stdout", done.stdout)
    SCANNER.feed("python -m bot stderr", done.stderr)
    return done


def test_draw_writes_pngs_with_their_seeds_and_repeats_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    runs = []
    for name in ("one", "two"):
        done = run_bot(
            ["draw", "a red fox", "--seed", "7", "--n", "2", "--out", str(tmp_path / name)],
            tmp_path,
            tiny_model_dir,
        )
        assert done.returncode == 0, done.stderr
        paths = [
            line.split("\t")[0] for line in done.stdout.splitlines() if line.endswith(("seed 7", "seed 8"))
        ]
        assert len(paths) == 2 and "generated 2 image(s)" in done.stdout
        runs.append(paths)
    for index, (first, second) in enumerate(zip(*runs, strict=True)):
        params = read_parameters(first)
        assert params["prompt"] == "a red fox" and int(params["seed"]) == 7 + index
        assert Image.open(first).tobytes() == Image.open(second).tobytes()


def test_draw_refuses_bad_flags_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = run_bot(["draw", "a fox", "--steps", "0"], tmp_path, tiny_model_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "brushbot: --steps 0 is out of range: allowed 1–50"


def test_no_token_runs_the_console_against_the_service(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = "/help\n/draw a red fox --seed 3\n/draw x --n 99\n/credits\n"
    done = run_bot([], tmp_path, tiny_model_dir, stdin=script)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "brushbot console" in out and "/draw <prompt>" in out
    assert "Queued job" in out and "seed 3" in out
    assert "--n 99 is out of range" in out
    assert "credit(s) left" in out
    assert "Job " in out and ".png" in out and "(seed 3)" in out
    assert (tmp_path / "bot.sqlite3").exists()


def test_doctor_reports_without_showing_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = run_bot(["doctor"], tmp_path, tiny_model_dir, TELEGRAM_TOKEN=TOKEN, LOG_LEVEL="DEBUG")
    assert done.returncode == 0, done.stderr
    assert "torch" in done.stdout and "plan:" in done.stdout
    assert "model files: local folder found" in done.stdout
    assert "TELEGRAM_TOKEN: set" in done.stdout and "DISCORD_TOKEN: not set" in done.stdout
    assert TOKEN not in done.stdout + done.stderr


def test_invalid_setting_stops_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = run_bot(["doctor"], tmp_path, tiny_model_dir, DEVICE="gpu")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "brushbot: invalid setting DEVICE: 'gpu' is not a device; write auto, cpu, mps, cuda or a list like cuda:0,cuda:1"
    )


def test_doctor_refuses_a_discord_permission_without_the_operators_server(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    done = run_bot(
        ["doctor"], tmp_path, tiny_model_dir, DISCORD_ADMIN_PERMISSION="manage_guild", DISCORD_GUILD_ID=""
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "brushbot: invalid setting DISCORD_ADMIN_PERMISSION: needs DISCORD_GUILD_ID "
        "(a permission makes someone a bot admin only in your own server)"
    )


def test_draw_from_a_picture_repeats_exactly_and_records_the_strength(
    tmp_path: Path, tiny_model_dir: Path, tiny_settings: Settings
) -> None:
    photo = tmp_path / "in.png"
    Image.radial_gradient("L").resize((96, 64)).convert("RGB").save(photo)
    args = ["a watercolour", "--image", str(photo), "--strength", "0.5", "--seed", "7"]
    done = run_bot(["draw", *args, "--out", str(tmp_path / "one")], tmp_path, tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert "generated 1 image(s) 80x48, 4 of 8 steps" in done.stdout  # the picture's shape; 0.5 × 8
    first = next(line.split("\t")[0] for line in done.stdout.splitlines() if line.endswith("seed 7"))
    # the rerun: the same command in this process (a second interpreter start would double the time)
    (second,) = asyncio.run(draw(tiny_settings, [*args, "--out", str(tmp_path / "two")]))
    assert Image.open(first).tobytes() == Image.open(second).tobytes()
    params = read_parameters(first)
    kept = list((tmp_path / "one" / "sources").glob("*.png"))
    assert len(kept) == 1 and params["prompt"] == "a watercolour" and params["denoising_strength"] == "0.5"
    assert params["brushbot"]["source"] == kept[0].stem and params["source_hash"] == kept[0].stem[:10]
    assert [p.name for p in (tmp_path / "two" / "sources").iterdir()] == [kept[0].name]


def test_draw_refuses_a_gif_named_png_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    fake = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(fake, format="GIF")
    done = run_bot(["draw", "a fox", "--image", str(fake)], tmp_path, tiny_model_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "brushbot: GIF pictures are not supported: send a PNG, JPEG or WebP"
    )
