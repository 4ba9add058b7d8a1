"""Settings: defaults, the documented example, one-line errors, and secrets kept secret."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from bot.config import Settings, load_settings
from bot.errors import ConfigError
from bot.logs import RedactSecrets
from tests.leaks import register_secret

ROOT = Path(__file__).resolve().parent.parent
TOKEN = register_secret("123456:AAE-very-secret-token-value", "test_config TOKEN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_env_example_documents_every_setting_and_loads() -> None:
    text = (ROOT / ".env.example").read_text()
    names = {m.group(1) for m in re.finditer(r"^([A-Z_]+)=", text, re.M)}
    # ``devices`` is derived from DEVICE, never read from the environment
    assert names == {f.upper() for f in Settings.model_fields} - {"DEVICES"}
    settings = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    assert settings.model == "z-image-turbo" and settings.output_dir == Path("outputs")
    assert settings.discord_token is None and settings.telegram_allowed_chats == []


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("DEVICE", "gpu", "DEVICE: 'gpu' is not a device; write auto, cpu, mps, cuda or a list"),
        ("DEVICE", "cuda:0,cpu", "DEVICE: a device list must be one kind"),
        ("DEVICE", "cpu:1", "DEVICE: 'cpu:1' is not a device"),
        ("WORKERS", "slurm", "WORKERS (got 'slurm'): expected 'local' or 'ray'"),
        ("RAY_WORKERS", "-1", "RAY_WORKERS"),
        ("WORKER_TIMEOUT", "0", "WORKER_TIMEOUT"),
        ("DTYPE", "fp8", "DTYPE"),
        ("OFFLOAD", "yes", "OFFLOAD"),
        ("MAX_STEPS", "lots", "MAX_STEPS"),
        ("DAILY_CREDITS", "-1", "DAILY_CREDITS"),
        ("ADMIN_IDS", "12345", "ADMIN_IDS"),
        ("CREDIT_TIMEZONE", "Mars/Base", "CREDIT_TIMEZONE"),
    ],
)
def test_invalid_values_stop_with_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert needle in str(info.value) and "\n" not in str(info.value)


NEEDS_GUILD = (
    "invalid setting DISCORD_ADMIN_PERMISSION: needs DISCORD_GUILD_ID "
    "(a permission makes someone a bot admin only in your own server)"
)


def test_a_discord_permission_makes_admins_only_with_the_operators_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # credits and bans are global: a permission held in whichever server invited the bot must not count
    monkeypatch.setenv("DISCORD_ADMIN_PERMISSION", "manage_guild")
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert str(info.value) == NEEDS_GUILD
    monkeypatch.setenv("DISCORD_GUILD_ID", "1234567890")
    settings = load_settings(_env_file=None)
    assert (settings.discord_admin_permission, settings.discord_guild_id) == ("manage_guild", 1234567890)
    monkeypatch.delenv("DISCORD_ADMIN_PERMISSION")
    assert load_settings(_env_file=None).discord_admin_permission is None  # a server alone is fine
    monkeypatch.delenv("DISCORD_GUILD_ID")
    monkeypatch.setenv("DISCORD_ADMIN_PERMISSION", "")  # empty is unset, as in .env.example
    assert load_settings(_env_file=None).discord_admin_permission is None


def test_a_device_list_means_one_local_worker_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE", "cuda:0, cuda:1")
    monkeypatch.setenv("DEVICES", "cpu")  # derived from DEVICE, never read
    settings = load_settings(_env_file=None)
    assert settings.device.value == "cuda" and settings.devices == ["cuda:0", "cuda:1"]
    assert load_settings(_env_file=None, device="cpu,cpu").devices == ["cpu", "cpu"]
    assert load_settings(_env_file=None, device="cpu").devices == ["cpu"]
    assert load_settings(_env_file=None, workers="ray", ray_address="auto").workers.value == "ray"


def test_tokens_never_show(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", TOKEN)
    monkeypatch.setenv("ADMIN_IDS", "telegram:1, discord:2")
    settings = load_settings(_env_file=None)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert settings.tokens_set() == {"DISCORD_TOKEN": False, "TELEGRAM_TOKEN": True}
    assert settings.admins == {"telegram:1", "discord:2"}
    logger = logging.getLogger("test.redact")
    logger.addFilter(RedactSecrets([TOKEN]))
    with caplog.at_level(logging.INFO, "test.redact"):
        logger.info("GET https://api.telegram.org/bot%s/getMe", TOKEN)
        try:
            raise RuntimeError(f"bad url /bot{TOKEN}/x")
        except RuntimeError:
            logger.exception("failed")
    assert TOKEN not in caplog.text and "[redacted]" in caplog.text


def test_a_bad_token_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "x")
    monkeypatch.setenv("MAX_IMAGES", "99")
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert "MAX_IMAGES" in str(info.value)
