"""SqliteStore against a real SQLite file: credits, ledger, jobs, migrations and concurrency."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from bot.domain import Balance, DrawRequest, Job, JobState, LedgerKind, UserRef
from bot.errors import ConfigError, NoCreditsError, NotFoundError, RequestError
from bot.ports import CreditPolicy, Store
from data import SqliteStore, schema

ALICE = UserRef(platform="telegram", id="100")
BOB = UserRef(platform="discord", id="200")
ADMIN = "telegram:1"
TODAY = CreditPolicy(allowance=5, period="2026-11-30")
TOMORROW = CreditPolicy(allowance=5, period="2026-12-01")


class Clock:
    """A settable clock: timestamps in tests are exact, never the wall time."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_job(job_id: str, user: UserRef = ALICE, *, credits: int = 1, created_at: float = 1_800_000_000.0,
             prompt: str = "a red fox in snow", free: bool = False, user_name: str = "") -> Job:  # fmt: skip
    return Job(
        id=job_id,
        user=user,
        user_name=user_name,
        request=DrawRequest(prompt=prompt, width=1024, height=1024, steps=8, guidance=0.0, seed=7, count=1),
        model="z-image-turbo",
        credits=credits,
        gpu_seconds=2.5,
        seeds=(7,),
        delivery={"chat": 42},
        created_at=created_at,
        free=free,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "db" / "brushbot.sqlite3", clock=clock) as opened:
        yield opened


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file with the stdlib driver, the way an operator would inspect it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------- setup and schema


async def test_start_creates_file_with_pragmas_and_latest_schema(store: SqliteStore) -> None:
    assert store.path.exists()
    assert rows(store.path, "PRAGMA journal_mode") == [("wal",)]
    assert rows(store.path, "PRAGMA user_version") == [(schema.LATEST_VERSION,)]
    as_port: Store = store  # mypy checks SqliteStore against the Protocol here
    assert as_port is store


def test_store_matches_the_port_signatures() -> None:
    import inspect

    for name, member in vars(Store).items():
        if name.startswith("_") or not callable(member):
            continue
        ours = inspect.signature(getattr(SqliteStore, name))
        theirs = inspect.signature(member)
        assert list(ours.parameters) == list(theirs.parameters), name
        for param in theirs.parameters.values():
            assert ours.parameters[param.name].kind == param.kind, (name, param.name)
            assert ours.parameters[param.name].default == param.default, (name, param.name)


async def test_migration_from_version_1_keeps_data(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "old.sqlite3"
    async with aiosqlite.connect(path, isolation_level=None) as db:
        assert await schema.migrate(db, target=1) == 1
        await db.execute(
            "INSERT INTO users (platform, id, display_name, bonus, created_at, seen_at) "
            "VALUES ('telegram', '100', 'Alice', 3, 1, 2)"
        )
        await db.execute(
            "INSERT INTO jobs (id, seq, platform, user_id, user_name, request, model, credits, gpu_seconds, "
            "seeds, state, created_at, charge_allowance, charge_period) VALUES ('old1', 1, 'telegram', '100', "
            "'Alice', ?, 'z-image-turbo', 1, 2.5, '[7]', 'queued', 10, 1, '2026-11-30')",
            (json.dumps(make_job("x").request.to_json()),),
        )
        await db.execute("INSERT INTO usage VALUES ('telegram', '100', '2026-11-30', 1)")
    assert rows(path, "PRAGMA user_version") == [(1,)]

    async with SqliteStore(path, clock=clock) as store:
        assert rows(path, "PRAGMA user_version") == [(schema.LATEST_VERSION,)]
        record = await store.get_user(ALICE)
        assert record is not None and record.display_name == "Alice" and record.weight == 1.0
        job = await store.get_job("old1")
        assert job is not None and job.delivery == {} and job.request.prompt == "a red fox in snow"
        assert await store.balance(ALICE, TODAY) == Balance(period=TODAY.period, allowance=5, used=1, bonus=3)
        # the upgraded schema works for new writes too
        await store.update_delivery("old1", {"chat": 1})
        assert await store.finish_job("old1", JobState.FAILED, at=20.0, error="restart")
        assert (await store.balance(ALICE, TODAY)).used == 0


async def test_database_newer_than_code_is_a_config_error(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "future.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer than this brushbot"):
        await SqliteStore(path, clock=clock).start()


async def test_not_a_database_is_a_config_error(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not an SQLite file at all" * 100)
    with pytest.raises(ConfigError, match="cannot use database"):
        await SqliteStore(path, clock=clock).start()


# ---------------------------------------------------------------------- credits


async def test_unknown_user_has_the_default_allowance(store: SqliteStore) -> None:
    balance = await store.balance(BOB, TODAY)
    assert (balance.allowance, balance.used, balance.bonus, balance.available) == (5, 0, 0, 5)
    assert await store.get_user(BOB) is None  # reading a balance creates nobody


async def test_concurrent_reservations_never_overspend(store: SqliteStore) -> None:
    results = await asyncio.gather(
        *(store.add_job(make_job(f"j{i}"), policy=TODAY) for i in range(100)), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, NoCreditsError)]
    assert (len(accepted), len(refused)) == (5, 95)
    assert str(refused[0]) == "not enough credits: this needs 1, you have 0"
    assert (await store.balance(ALICE, TODAY)).available == 0
    kinds = [e.kind for e in await store.history(ALICE, 1000)]
    assert kinds == [LedgerKind.RESERVE] * 5
    assert rows(store.path, "SELECT COUNT(*) FROM jobs") == [(5,)]


async def test_concurrent_reservations_across_two_connections(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "shared.sqlite3"
    async with SqliteStore(path, clock=clock) as one, SqliteStore(path, clock=clock) as two:
        stores = itertools.cycle((one, two))
        results = await asyncio.gather(
            *(next(stores).add_job(make_job(f"j{i}"), policy=TODAY) for i in range(100)),
            return_exceptions=True,
        )
        unexpected = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, NoCreditsError)
        ]
        assert unexpected == []
        assert sum(1 for r in results if not isinstance(r, BaseException)) == 5
        assert sum(1 for r in results if isinstance(r, NoCreditsError)) == 95
        assert (await one.balance(ALICE, TODAY)).available == 0
        assert (await two.balance(ALICE, TODAY)).available == 0
    assert rows(path, "SELECT COUNT(*) FROM ledger WHERE kind = 'reserve'") == [(5,)]
    assert rows(path, "SELECT COUNT(*) FROM jobs") == [(5,)]


async def test_refused_job_inserts_nothing(store: SqliteStore) -> None:
    with pytest.raises(NoCreditsError, match="this needs 6, you have 5"):
        await store.add_job(make_job("big", credits=6, user_name="Alice"), policy=TODAY)
    assert await store.get_job("big") is None
    assert await store.get_user(ALICE) is None
    assert await store.history(ALICE) == []


async def test_reserve_spends_allowance_first_and_refund_returns_the_exact_split(store: SqliteStore) -> None:
    await store.grant(ALICE, 4, actor=ADMIN, policy=TODAY)
    await store.add_job(make_job("a", credits=3), policy=TODAY)  # allowance 3
    balance = await store.add_job(make_job("b", credits=4), policy=TODAY)  # allowance 2 + bonus 2
    assert balance is not None
    assert (balance.used, balance.bonus, balance.available) == (5, 2, 2)
    assert rows(
        store.path, "SELECT id, charge_allowance, charge_bonus, charge_period FROM jobs ORDER BY seq"
    ) == [("a", 3, 0, TODAY.period), ("b", 2, 2, TODAY.period)]

    assert await store.finish_job("b", JobState.FAILED, at=5.0, error="out of memory")
    after = await store.balance(ALICE, TODAY)
    assert (after.used, after.bonus, after.available) == (3, 4, 6)
    refund = (await store.history(ALICE, 1))[0]
    assert (refund.kind, refund.amount, refund.job_id, refund.at) == (LedgerKind.REFUND, 4, "b", 5.0)
    job = await store.get_job("b")
    assert job is not None and (job.state, job.error, job.finished_at) == (
        JobState.FAILED,
        "out of memory",
        5.0,
    )


async def test_reset_keeps_unfinished_reservations_so_refunds_stay_exact(store: SqliteStore) -> None:
    big = CreditPolicy(allowance=10, period=TODAY.period)
    await store.add_job(make_job("done", credits=2), policy=big)
    assert await store.finish_job("done", JobState.DELIVERED, at=1.0)
    await store.add_job(make_job("waiting", credits=3), policy=big)
    after_reset = await store.reset(ALICE, actor=ADMIN, policy=big)
    assert (after_reset.used, after_reset.available) == (3, 7)  # only the delivered job is forgiven
    await store.add_job(make_job("later", credits=5), policy=big)
    assert await store.finish_job("waiting", JobState.FAILED, at=2.0)
    balance = await store.balance(ALICE, big)
    assert (balance.used, balance.available) == (5, 5)  # "later" still holds its 5; nothing given twice


async def test_a_failed_write_changes_nothing(store: SqliteStore) -> None:
    await store.add_job(make_job("dup", credits=2), policy=TODAY)
    with pytest.raises(sqlite3.IntegrityError):
        await store.add_job(make_job("dup", credits=2), policy=TODAY)
    assert (await store.balance(ALICE, TODAY)).used == 2
    assert [e.kind for e in await store.history(ALICE)] == [LedgerKind.RESERVE]


async def test_finish_job_is_idempotent(store: SqliteStore) -> None:
    await store.add_job(make_job("j"), policy=TODAY)
    assert await store.finish_job("j", JobState.DELIVERED, at=3.0) is True
    assert await store.finish_job("j", JobState.DELIVERED, at=4.0) is False
    assert await store.finish_job("j", JobState.CANCELLED, at=5.0) is False
    kinds = [e.kind for e in await store.history(ALICE)]
    assert kinds == [LedgerKind.COMMIT, LedgerKind.RESERVE]
    assert (await store.balance(ALICE, TODAY)).available == 4
    job = await store.get_job("j")
    assert job is not None and (job.state, job.finished_at) == (JobState.DELIVERED, 3.0)
    # late events for a final job change nothing
    await store.mark_running("j", at=9.0)
    job = await store.get_job("j")
    assert job is not None and job.state is JobState.DELIVERED and job.started_at is None
    with pytest.raises(NotFoundError):
        await store.finish_job("nope", JobState.FAILED, at=1.0)
    with pytest.raises(ValueError):
        await store.finish_job("j", JobState.RUNNING, at=1.0)


async def test_period_rollover_refills_allowance_and_keeps_bonus(store: SqliteStore) -> None:
    await store.grant(ALICE, 2, actor=ADMIN, policy=TODAY)
    await store.add_job(make_job("a", credits=6), policy=TODAY)  # 5 allowance + 1 bonus
    assert (await store.balance(ALICE, TODAY)).available == 1
    tomorrow = await store.balance(ALICE, TOMORROW)
    assert (tomorrow.used, tomorrow.bonus, tomorrow.available) == (0, 1, 6)
    # a refund after the rollover returns the allowance part to yesterday, the bonus part to the bonus
    assert await store.finish_job("a", JobState.CANCELLED, at=1.0)
    assert (await store.balance(ALICE, TOMORROW)).available == 7
    assert (await store.balance(ALICE, TODAY)).used == 0


async def test_free_jobs_reserve_nothing(store: SqliteStore) -> None:
    assert await store.add_job(make_job("f", credits=50, free=True), policy=None) is None
    job = await store.get_job("f")
    assert job is not None and job.free
    assert await store.finish_job("f", JobState.FAILED, at=1.0, error="boom")
    assert await store.history(ALICE) == []
    assert (await store.balance(ALICE, TODAY)).available == 5


async def test_admin_operations_are_in_the_ledger_with_actor(store: SqliteStore, clock: Clock) -> None:
    await store.touch_user(ALICE, "Alice")
    assert (await store.grant(ALICE, 10, actor=ADMIN, policy=TODAY)).available == 15
    with pytest.raises(RequestError, match="only 10 bonus"):
        await store.grant(ALICE, -11, actor=ADMIN, policy=TODAY)
    assert (await store.grant(ALICE, -4, actor=ADMIN, policy=TODAY)).bonus == 6
    assert (await store.set_allowance(ALICE, 50, actor=ADMIN, policy=TODAY)).allowance == 50
    await store.add_job(make_job("a", credits=20), policy=TODAY)
    assert await store.finish_job("a", JobState.DELIVERED, at=1.0)
    assert (await store.reset(ALICE, actor=ADMIN, policy=TODAY)).used == 0
    assert (await store.set_allowance(ALICE, None, actor=ADMIN, policy=TODAY)).allowance == 5
    clock.now += 60
    assert (await store.set_banned(ALICE, True, actor=ADMIN)).banned is True
    assert (await store.set_banned(ALICE, False, actor="discord:9")).banned is False
    assert (await store.set_weight(ALICE, 2.5, actor=ADMIN)).weight == 2.5
    with pytest.raises(RequestError):
        await store.set_weight(ALICE, 0, actor=ADMIN)
    with pytest.raises(RequestError):
        await store.set_allowance(ALICE, -1, actor=ADMIN, policy=TODAY)

    history = await store.history(ALICE, 100)
    assert [(e.kind, e.amount, e.actor) for e in history] == [
        (LedgerKind.WEIGHT, 0, ADMIN),
        (LedgerKind.UNBAN, 0, "discord:9"),
        (LedgerKind.BAN, 0, ADMIN),
        (LedgerKind.SET, -45, ADMIN),  # allowance 50 -> 5 with nothing used: 45 fewer available
        (LedgerKind.RESET, 20, ADMIN),
        (LedgerKind.COMMIT, 0, None),
        (LedgerKind.RESERVE, -20, ALICE.key),
        (LedgerKind.SET, 45, ADMIN),
        (LedgerKind.GRANT, -4, ADMIN),
        (LedgerKind.GRANT, 10, ADMIN),
    ]
    assert history[0].at == clock.now and history[0].note == "weight 1 -> 2.5"
    assert [e.id for e in history] == sorted((e.id for e in history), reverse=True)
    assert len(await store.history(ALICE, 2)) == 2
    record = await store.get_user(ALICE)
    assert record is not None and (record.display_name, record.weight, record.banned, record.allowance) == (
        "Alice", 2.5, False, None,
    )  # fmt: skip
    assert rows(store.path, "SELECT banned, typeof(banned) FROM users") == [(0, "integer")]


async def test_ledger_is_append_only(store: SqliteStore) -> None:
    await store.grant(ALICE, 1, actor=ADMIN, policy=TODAY)
    conn = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE ledger SET amount = 1000")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM ledger")
    finally:
        conn.close()


# ---------------------------------------------------------------------- users


async def test_touch_and_find_user(store: SqliteStore, clock: Clock) -> None:
    await store.touch_user(ALICE, "Ålice_Fox")
    clock.now += 1
    await store.touch_user(ALICE)  # no name: the stored one stays
    await store.touch_user(UserRef(platform="telegram", id="300"), "@bob")
    await store.touch_user(BOB, "bob")

    found = await store.find_user("telegram", "@ålice_fox")
    assert found is not None and found.user == ALICE and found.display_name == "Ålice_Fox"
    found = await store.find_user("telegram", "BOB")
    assert found is not None and found.user.id == "300"
    found = await store.find_user("telegram", "100")
    assert found is not None and found.user == ALICE
    assert await store.find_user("telegram", "carol") is None
    assert await store.find_user("telegram", "@") is None
    assert rows(store.path, "SELECT created_at, seen_at FROM users WHERE id = '100'") == [
        (clock.now - 1, clock.now)
    ]


# ---------------------------------------------------------------------- jobs


async def test_job_round_trip_with_unicode_prompt(store: SqliteStore) -> None:
    job = make_job("u1", prompt="一只在雪中的红狐狸 🦊 — «renard»", user_name="Алиса")
    await store.add_job(job, policy=TODAY)
    assert await store.get_job("u1") == job

    await store.mark_running("u1", at=1_800_000_001.0)
    await store.mark_generated("u1", ["outputs/u1-0.png"])
    await store.update_delivery("u1", {"message_id": 9})
    await store.update_delivery("u1", {"chat": 43})
    stored = await store.get_job("u1")
    assert stored is not None
    assert stored.state is JobState.DELIVERING and stored.started_at == 1_800_000_001.0
    assert stored.outputs == ("outputs/u1-0.png",)
    assert stored.delivery == {"chat": 43, "message_id": 9}
    assert stored.request == job.request and stored.user_name == "Алиса"
    assert rows(store.path, "SELECT free, typeof(free) FROM jobs") == [(0, "integer")]
    with pytest.raises(NotFoundError):
        await store.mark_running("missing", at=1.0)
    with pytest.raises(NotFoundError):
        await store.update_delivery("missing", {})


async def test_unfinished_jobs_in_submit_order_and_user_jobs_newest_first(store: SqliteStore) -> None:
    for i, job_id in enumerate(["c", "a", "d", "b"]):
        await store.add_job(make_job(job_id, created_at=100.0 + i), policy=TODAY)
    await store.mark_running("a", at=110.0)
    await store.mark_generated("d", ["x.png"])
    await store.finish_job("c", JobState.DELIVERED, at=111.0)
    assert [j.id for j in await store.unfinished_jobs()] == ["a", "d", "b"]
    assert [j.state for j in await store.unfinished_jobs()] == [
        JobState.RUNNING, JobState.DELIVERING, JobState.QUEUED,
    ]  # fmt: skip
    assert [j.id for j in await store.user_jobs(ALICE, 3)] == ["b", "d", "a"]
    assert await store.user_jobs(BOB) == []


async def test_job_stats(store: SqliteStore, clock: Clock) -> None:
    old = clock.now - 2 * 24 * 3600
    await store.add_job(make_job("old", created_at=old), policy=TODAY)
    await store.finish_job("old", JobState.DELIVERED, at=old + 5)
    await store.add_job(make_job("a", credits=2, created_at=clock.now), policy=TODAY)
    await store.mark_generated("a", ["1.png", "2.png"])
    await store.finish_job("a", JobState.DELIVERED, at=clock.now)
    await store.add_job(make_job("f", user=BOB, free=True, created_at=clock.now), policy=None)
    await store.mark_generated("f", ["3.png"])
    await store.finish_job("f", JobState.DELIVERED, at=clock.now)
    await store.add_job(make_job("q", created_at=clock.now), policy=TODAY)

    stats = await store.job_stats()
    assert stats["by_state"] == {
        "queued": 1, "running": 0, "delivering": 0, "delivered": 3, "failed": 0, "cancelled": 0,
    }  # fmt: skip
    assert stats["jobs"] == 4 and stats["jobs_24h"] == 3 and stats["images_24h"] == 3
    assert stats["users"] == 2 and stats["users_24h"] == 2
    assert stats["gpu_seconds"] == pytest.approx(7.5)
    assert stats["credits_committed"] == 3


async def test_closed_store_refuses_calls(tmp_path: Path, clock: Clock) -> None:
    store = SqliteStore(tmp_path / "x.sqlite3", clock=clock)
    await store.start()
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="not started"):
        await store.balance(ALICE, TODAY)
