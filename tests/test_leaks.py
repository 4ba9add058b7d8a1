"""The suite-wide scan for secrets in log lines: it reports what it should, masked, and nothing else."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import pytest

from bot.logs import RedactSecrets, guard_logs
from tests.botprocess import BotProcess
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_server import DEFAULT_TOKEN, FakeTelegram
from tests.leaks import SECRETS, LeakScanner, Secrets, excerpt, mask, register_secret

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent


def fresh_secret() -> str:
    return register_secret(f"probe-{secrets.token_urlsafe(18)}", "a probe token")


def test_a_secret_logged_by_any_logger_fails_the_test(leak_scanner: LeakScanner) -> None:
    root = logging.getLogger()
    assert leak_scanner in root.handlers
    # the session's level, at most the bot's default (INFO): what an operator sees, the scan sees
    level = root.level
    assert logging.NOTSET < level <= logging.INFO
    token = fresh_secret()
    logging.getLogger("some.library").log(level, "GET http://127.0.0.1/bot%s/getMe failed", token)
    logging.getLogger("some.library").log(level, "nothing secret here")
    # what the autouse fixture does after each test (consumed here, so this test itself passes)
    leaks = leak_scanner.check()
    assert len(leaks) == 1
    [leak] = leaks
    assert leak.source == "some.library" and leak.label == "a probe token"
    assert token not in str(leak) and mask(token) in leak.excerpt and "/getMe failed" in leak.excerpt
    assert leak_scanner.check() == []  # each line is checked once


def test_a_leak_fails_that_test_naming_the_logger_and_masking_the_secret(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the autouse fixtures themselves, in a pytest of their own (a leak there must not fail this run)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(
        "from tests.conftest import leak_scanner, no_leaked_secrets, pytest_runtest_makereport  # noqa: F401\n"
    )
    token = "inner-secret-token-value-0123456789"
    pytester.makepyfile(
        test_inner=f"""
import logging
import pytest
from tests.leaks import register_secret

TOKEN = register_secret({token!r}, "inner token")
OTHER = register_secret("other-secret-token-value-987654", "other token")

def test_logs_it():
    logging.getLogger("some.library").debug("GET /bot%s/getMe", TOKEN)

def test_logs_nothing_secret():
    logging.getLogger("some.library").debug("GET /bot[redacted]/getMe")

@pytest.mark.logs_secrets("inner token", reason="the marker lets this label through, only this one")
def test_marked():
    logging.getLogger("some.library").debug("GET /bot%s/getMe", TOKEN)
    logging.getLogger("else").info("and %s", OTHER)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    everything = result.stdout.str()
    # the short summary repeats each message in full where pytest thinks it runs on CI: count in the reports
    out = everything.split("short test summary info")[0]
    assert token not in everything and "other-secret-token-value-987654" not in everything
    # not in the report, nor in the log pytest shows for the failed test (masked there too)
    assert "Captured log call" in out and f"GET /bot{mask(token)}/getMe" in out.split("Captured log call")[1]
    assert token not in out and "other-secret-token-value-987654" not in out
    logs_it, marked = (
        out.index("ERROR at teardown of test_logs_it"),
        out.index("ERROR at teardown of test_marked"),
    )
    leak = f"inner token in some.library: DEBUG some.library: GET /bot{mask(token)}/getMe"
    other = f"other token in else: INFO else: and {mask('other-secret-token-value-987654')}"
    assert out.count(leak) == 1 and logs_it < out.index(leak) < marked  # only the unmarked test
    assert out.count(other) == 1 and marked < out.index(other)


def test_a_secret_in_a_traceback_is_found(leak_scanner: LeakScanner) -> None:
    token = fresh_secret()
    try:
        raise RuntimeError(f"bad url /bot{token}/x")
    except RuntimeError:
        logging.getLogger("some.library").exception("failed")  # the message itself is clean
    [leak] = leak_scanner.check()
    assert leak.source == "some.library" and token not in str(leak)


def test_the_bots_redaction_applies_to_the_scanner_and_only_to_its_copy(
    leak_scanner: LeakScanner, caplog: pytest.LogCaptureFixture
) -> None:
    token = fresh_secret()
    # guard_logs as an adapter calls it: the filter goes on the root handlers, the scanner included;
    # "elsewhere" is no guarded logger, so only the handler's filter stands between it and the line
    undo = guard_logs([token], loggers=("adapters",))
    try:
        assert any(isinstance(f, RedactSecrets) for f in leak_scanner.filters)
        logging.getLogger("elsewhere").warning("token %s", token)
    finally:
        undo()
    lines = leak_scanner.take()
    assert ("elsewhere", "WARNING elsewhere: token [redacted]") in lines
    assert leak_scanner.check(lines) == []
    # a filter on the scanner rewrites a copy: a handler after it still gets the record as logged
    only_here = RedactSecrets([token])
    leak_scanner.addFilter(only_here)
    try:
        logging.getLogger("elsewhere").warning("token %s", token)
    finally:
        leak_scanner.removeFilter(only_here)
    assert leak_scanner.check() == []
    assert caplog.records[-1].getMessage() == f"token {token}"


async def test_a_secret_in_a_bot_process_output_fails_the_test(
    leak_scanner: LeakScanner, tmp_path: Path
) -> None:
    token = fresh_secret()
    process = BotProcess(tmp_path, tmp_path / "model", {})
    stderr = asyncio.StreamReader()
    stderr.feed_data(f"12:00:00 INFO    bot: fine\n12:00:01 ERROR   httpx: POST /bot{token}/x\n".encode())
    stderr.feed_eof()
    await process._read(stderr, process.lines, "python -m bot stderr")
    assert process.lines[1].endswith(f"/bot{token}/x")  # the test still reads the real line
    [leak] = leak_scanner.check()
    assert leak.source == "python -m bot stderr" and token not in str(leak)
    leak_scanner.feed("python -m bot stdout", f"ok\nsaid {token}\n")
    [leak] = leak_scanner.check()
    assert leak.source == "python -m bot stdout" and leak.excerpt == f"said {mask(token)}"


def test_the_fakes_register_their_tokens() -> None:
    FakeTelegram()
    assert DEFAULT_TOKEN in SECRETS
    telegram = FakeTelegram(token="77:AnotherTokenOnlyThisTestUses_q")
    discord = FakeDiscord(token="discord-token-only-this-test-uses")
    assert telegram.token in SECRETS and discord.token in SECRETS
    # (interaction tokens: tests/test_discord.py checks one the fake made for a real bot)


def test_every_secret_is_found_among_many_with_shared_prefixes() -> None:
    book = Secrets()
    many = [book.add(f"itok_{secrets.token_urlsafe(24)}", "interaction") for _ in range(2000)]
    short = book.add("itok_abcdef", "short one")
    assert book.add("tok", "too short") == "tok" and "tok" not in book
    text = f"{many[7]} and 'token': '{many[1999]}'\nitok_abcdefg\nitok_zzz {many[3][:-1]}"
    assert book.find(text) == [(0, many[7]), (len(many[7]) + 15, many[1999]), (text.index(short), short)]
    assert book.find("nothing here") == [] and Secrets().find("itok_abcdef") == []
    assert book.redact(text) == (
        f"{mask(many[7])} and 'token': '{mask(many[1999])}'\n{mask(short)}g\nitok_zzz {many[3][:-1]}"
    )
    longer = book.add("itok_abcdef-and-more", "longer one")
    assert book.redact(f"<{longer}>") == f"<{mask(longer)}>"  # not the shorter secret inside it


def test_an_excerpt_never_shows_a_secret_even_where_the_window_would_cut_it() -> None:
    token = "0123456789-secret-value-ABCDEFGHIJ"
    line = "x" * 200 + token + "y" * 50 + token + "z" * 200
    shown = excerpt(line, [token, token])
    assert token[:10] not in shown and token[-10:] not in shown and mask(token) in shown
    assert shown.startswith("…x") and shown.endswith(mask(token) + "…")
