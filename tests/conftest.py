"""Shared fixtures: offline hub, a network guard, a log scan for secrets, the tiny model and a worker."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# before anything imports huggingface_hub: tests never reach the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# the tiny model's ops are too small to split: on this shared 2-core machine one torch
# thread ran a 64² generation in 0.11 s against 0.2-1.6 s with two (measured under load)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bot.config import Settings
from tests.leaks import SCANNER, SECRETS, Leak, LeakScanner

#: the root logger's level while the suite runs: every library's records reach the scan
LOG_LEVEL = logging.DEBUG


class NetworkBlockedError(RuntimeError):
    """A test tried to reach a non-loopback address."""


def _allowed(address: Any) -> bool:
    """Loopback IPs, ``localhost`` and non-IP sockets (Unix sockets, socketpairs) are fine."""
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX path or abstract name
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS and the network


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any socket connect to a non-loopback address, like PTB's OfflineRequest."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        if not _allowed(address):
            raise NetworkBlockedError(f"tests may not connect to {address!r}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not _allowed(address):
            raise NetworkBlockedError(f"tests may not connect to {address!r}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield


def _leak_report(leaks: list[Leak], when: str) -> str:
    shown = "\n".join(f"  {leak}" for leak in leaks[:20])
    more = f"\n  ... and {len(leaks) - 20} more" if len(leaks) > 20 else ""
    return f"{len(leaks)} line(s) {when} contain a test secret:\n{shown}{more}"


@pytest.fixture(scope="session", autouse=True)
def leak_scanner() -> Iterator[LeakScanner]:
    """``tests.leaks.SCANNER`` on the root logger for the whole session, the root at ``LOG_LEVEL``.

    It is there before any adapter starts, so the bot's redaction reaches it as it reaches an
    operator's handler.
    """
    root = logging.getLogger()
    level = root.level
    root.addHandler(SCANNER)
    root.setLevel(LOG_LEVEL)
    SCANNER.active = True
    try:
        yield SCANNER
    finally:
        SCANNER.active = False
        root.removeHandler(SCANNER)
        root.setLevel(level)
    leaks = SCANNER.check()
    if leaks:
        pytest.fail(_leak_report(leaks, "logged after the last test (a session fixture's teardown)"))


@pytest.fixture(autouse=True)
def no_leaked_secrets(leak_scanner: LeakScanner, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a line logged during it (or output by a ``python -m bot`` it ran) holds a secret.

    ``@pytest.mark.logs_secrets("FakeTelegram bot token", reason=...)`` lets a test that drives a
    library without the bot's redaction log those secrets (by label), and only those.
    """
    leaks = leak_scanner.check()
    if leaks:  # a wider fixture's set-up, or a thread left over from an earlier test
        pytest.fail(_leak_report(leaks, "logged before this test began"))
    allowed: set[str] = set()
    mark = request.node.get_closest_marker("logs_secrets")
    if mark is not None:
        if not mark.args or not mark.kwargs.get("reason"):
            pytest.fail("logs_secrets needs the labels of the secrets it lets through and a reason")
        allowed.update(mark.args)
    yield
    leaks = [leak for leak in leak_scanner.check() if leak.label not in allowed]
    if leaks:
        pytest.fail(_leak_report(leaks, "logged during this test"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's captured log and output are shown with the test secrets masked."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        report.sections = [(title, SECRETS.redact(content)) for title, content in report.sections]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Z-Image pipeline, built once per test session."""
    from generation.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Stable Diffusion pipeline (``tiny-sd``), built once per test session."""
    from generation.tiny import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (``tiny-sdxl``), built once per test session."""
    from generation.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def tiny_settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings for the tiny model on the CPU, every path under ``tmp_path``, no warm-up."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]  # a developer's .env must not leak in
        model=str(tiny_model_dir),
        device="cpu",  # type: ignore[arg-type]
        output_dir=tmp_path / "outputs",
        db_path=tmp_path / "brushbot.sqlite3",
        model_cache_dir=tmp_path / "cache",
        warmup=False,
    )


@pytest.fixture
async def tiny_worker(tiny_settings: Settings) -> AsyncIterator[Any]:
    """A started ``generation.Worker`` on the tiny model."""
    from generation.worker import Worker

    async with Worker(tiny_settings) as worker:
        yield worker
