"""Settings from the environment and ``.env`` (pydantic-settings).

Tokens are ``SecretStr``: never printed, logged or shown in ``repr``. ``load_settings``
turns a validation error into one ``ConfigError`` line naming the variable.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.domain import UserRef
from bot.errors import ConfigError, RequestError


class Device(enum.StrEnum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"
    MPS = "mps"


class DType(enum.StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class WorkerBackend(enum.StrEnum):
    """Where the GPU workers run: threads in this process, or Ray actors on a cluster."""

    LOCAL = "local"
    RAY = "ray"


class Offload(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"


class Quantize(enum.StrEnum):
    """Weight precision of the big components: 16-bit (``none``), 8-bit (``fp8``, ``int8``) or 4-bit."""

    AUTO = "auto"
    NONE = "none"
    FP8 = "fp8"
    INT8 = "int8"
    NF4 = "nf4"


class Attention(enum.StrEnum):
    """The transformer's attention kernel (a diffusers attention backend)."""

    AUTO = "auto"
    NATIVE = "native"
    FLASH = "flash"
    FLASH3 = "flash3"
    SAGE = "sage"


_SIZE = re.compile(r"^(\d+)[x×](\d+)$")


def parse_size(text: str) -> tuple[int, int]:
    """``1024x768`` → (1024, 768); a ValueError naming the form otherwise."""
    match = _SIZE.match(text.strip().lower())
    if not match or not all(int(g) > 0 for g in match.groups()):
        raise ValueError(f"{text!r} is not a size; write WIDTHxHEIGHT, e.g. 1024x768")
    return int(match.group(1)), int(match.group(2))


_DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def parse_devices(value: str) -> tuple[Device, list[str]]:
    """``DEVICE`` as (its kind, one entry per local worker): ``cuda:0,cuda:1`` is two CUDA workers.

    Raises ``ValueError`` with one line for a name that is not a device, or a list that mixes kinds.
    """
    names = [part.strip().lower() for part in value.split(",") if part.strip()] or ["auto"]
    kinds: set[str] = set()
    for name in names:
        match = _DEVICE_NAME.match(name)
        if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
            raise ValueError(
                f"{name!r} is not a device; write auto, cpu, mps, cuda or a list like cuda:0,cuda:1"
            )
        kinds.add(match.group(1))
    if len(kinds) > 1:
        raise ValueError("a device list must be one kind, e.g. cuda:0,cuda:1 or cpu,cpu")
    kind = Device(kinds.pop())
    if kind is Device.AUTO and len(names) > 1:
        raise ValueError("auto picks one device; list the devices instead, e.g. cuda:0,cuda:1")
    return kind, names


#: why DISCORD_ADMIN_PERMISSION alone is refused: credits and bans are global, so a permission held
#: in any server the bot was invited to (whose owner may be anyone) must not make a bot admin
ADMIN_PERMISSION_NEEDS_GUILD = (
    "DISCORD_ADMIN_PERMISSION: needs DISCORD_GUILD_ID "
    "(a permission makes someone a bot admin only in your own server)"
)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every operator setting; ``.env.example`` documents each with its default."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        case_sensitive=False,
    )

    # model and device
    model: str = Field("z-image-turbo", description="preset, hub repo id, or local diffusers dir")
    #: the device kind; ``DEVICE`` may also list several (``cuda:0,cuda:1``): see ``devices``
    device: Device = Device.AUTO
    #: one entry per local worker (``WORKERS=local``), parsed from ``DEVICE``
    devices: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["auto"])
    dtype: DType = DType.AUTO
    offload: Offload = Offload.AUTO
    #: weight precision of the transformer (and text encoder): auto picks by free memory
    quantize: Quantize = Quantize.AUTO
    attention: Attention = Attention.AUTO
    #: regional torch.compile of the transformer's repeated blocks, warmed at start
    compile: bool = False
    #: sizes compiled at start besides the default and named sizes (WIDTHxHEIGHT, comma-separated)
    compile_sizes: Annotated[list[tuple[int, int]], NoDecode] = Field(default_factory=list)
    warmup: bool = True
    model_cache_dir: Path = Path(".cache/brushbot")

    # workers
    workers: WorkerBackend = WorkerBackend.LOCAL
    #: empty: start a Ray on this machine; ``auto`` or ``host:port``: join a running cluster
    ray_address: str = ""
    #: how many Ray workers; 0: one per GPU in the cluster (one with DEVICE=cpu)
    ray_workers: int = Field(0, ge=0, le=1024)
    #: a worker that reports no progress for this long is killed and restarted
    worker_timeout: float = Field(300.0, gt=0)

    # storage
    db_path: Path = Path("data/brushbot.sqlite3")
    output_dir: Path = Path("outputs")

    # platforms (secrets)
    discord_token: SecretStr | None = None
    telegram_token: SecretStr | None = None
    discord_api_base_url: str | None = None
    discord_gateway_url: str | None = None
    discord_guild_id: int | None = None
    discord_spoiler: bool = False
    #: a Discord permission (e.g. manage_guild) whose holders in DISCORD_GUILD_ID are admins too;
    #: empty = ADMIN_IDS only
    discord_admin_permission: str | None = None
    telegram_base_url: str | None = None
    telegram_base_file_url: str | None = None
    telegram_allowed_chats: Annotated[list[int], NoDecode] = Field(default_factory=list)

    # people and credits
    admin_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    daily_credits: int = Field(20, ge=0)
    credit_period_hours: int = Field(24, ge=1, le=24 * 31)
    credit_timezone: str = "UTC"

    # limits
    max_steps: int = Field(50, ge=1, le=1000)
    max_images: int = Field(4, ge=1, le=10)
    max_pixels: int = Field(1024 * 1024 * 2, ge=64 * 64)
    max_prompt_chars: int = Field(1000, ge=1)
    max_queued_per_user: int = Field(3, ge=1)
    max_queued_total: int = Field(100, ge=1)
    #: a picture to draw from: its largest file size, and its most pixels (checked before decoding;
    #: at most Pillow's own decompression-bomb threshold, about 89 megapixels)
    max_input_bytes: int = Field(20 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    max_input_pixels: int = Field(50_000_000, ge=64 * 64, le=89_000_000)
    default_negative_prompt: str = ""
    blocked_words: Annotated[list[str], NoDecode] = Field(default_factory=list)
    nsfw_words: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # behaviour
    progress_interval: float = Field(1.0, ge=0.01)
    #: progress edits in group chats, which share a tight budget (Telegram: 20 messages a minute)
    group_progress_interval: float = Field(3.0, ge=0.01)
    #: how often a busy group's queue board may be edited at most
    board_interval: float = Field(5.0, ge=0.01)
    #: a chat whose results would wait longer than this for its message budget lets other chats'
    #: jobs use the GPU first (0: draw in fair order regardless)
    delivery_ahead: float = Field(10.0, ge=0)
    #: on SIGTERM, seconds the running image and the deliveries owed get to finish before the
    #: bot exits anyway (what is left resumes on the next start)
    shutdown_grace: float = Field(30.0, ge=0, le=3600)
    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _device_list(cls, data: Any) -> Any:
        """``devices`` always comes from ``DEVICE`` (a ``DEVICES`` variable is not read)."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.lower() == "devices")}
        key = next((k for k in data if isinstance(k, str) and k.lower() == "device"), "device")
        value = data.get(key, Device.AUTO)
        if isinstance(value, Device):
            return {**data, "devices": [value.value]}
        if not isinstance(value, str):
            return data
        try:
            kind, names = parse_devices(value)
        except ValueError as exc:
            raise ValueError(f"DEVICE: {exc}") from None  # one line naming DEVICE, like a field error
        return {**data, key: kind, "devices": names}

    @model_validator(mode="after")
    def _admin_permission_needs_guild(self) -> Settings:
        """A Discord permission makes admins only in the operator's own server, so it needs one."""
        if self.discord_admin_permission and not self.discord_guild_id:
            raise ValueError(ADMIN_PERMISSION_NEEDS_GUILD)  # one line naming the variable, like DEVICE's
        return self

    @field_validator("admin_ids", "blocked_words", "nsfw_words", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("compile_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        parts = _split_csv(value)
        if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
            return [parse_size(p) for p in parts]
        return parts

    @field_validator("telegram_allowed_chats", mode="before")
    @classmethod
    def _csv_ints(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("admin_ids")
    @classmethod
    def _admins(cls, value: list[str]) -> list[str]:
        try:
            return [UserRef.parse(v).key for v in value]
        except RequestError as exc:
            raise ValueError(f"{exc}; write e.g. telegram:123,discord:456") from None

    @field_validator("credit_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("an IANA time zone such as UTC or Europe/Berlin") from exc
        return value

    @property
    def admins(self) -> frozenset[str]:
        return frozenset(self.admin_ids)

    def tokens_set(self) -> dict[str, bool]:
        """Which tokens are configured (never their values)."""
        return {
            "DISCORD_TOKEN": bool(self.discord_token and self.discord_token.get_secret_value()),
            "TELEGRAM_TOKEN": bool(self.telegram_token and self.telegram_token.get_secret_value()),
        }


def _describe(error: Any) -> str:
    loc = error.get("loc") or ()
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    named = re.match(r"^([A-Z_]+): (.*)$", msg)
    if not loc and named is not None:  # a check across fields names its variable itself
        return f"invalid setting {named.group(1)}: {named.group(2)}"
    name = str(loc[0] if loc else "?").upper()
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        msg = f"expected {ctx['expected']}"
    got = error.get("input")
    shown = "" if "TOKEN" in name or isinstance(got, dict) else f" (got {got!r})"
    return f"invalid setting {name}{shown}: {msg}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings; an invalid value raises one ``ConfigError`` line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None
