"""A local fake of Discord (REST API and gateway) for running the real discord.py client in tests.

``FakeDiscord`` is an aiohttp server on 127.0.0.1 with the REST routes a bot uses (login,
application info, command sync, interaction callbacks, webhook follow-ups and edits, channel
messages) and a websocket gateway (HELLO, IDENTIFY, READY, GUILD_CREATE, heartbeats, RESUME,
INTERACTION_CREATE, ``zlib-stream`` compression when asked). It behaves like Discord where a
bot can tell the difference: interaction callbacks must come within ``ack_deadline`` seconds,
interaction tokens expire after ``token_lifetime``, the first follow-up of a deferred response
replaces its "thinking" message, uploads over ``attachment_size_limit`` are refused with 413,
a 429 carries the ``Via`` header discord.py looks for, and JSON bodies are sent with the exact
``application/json`` content type discord.py requires.

Every REST request is recorded (method, path, query, JSON body, uploaded files with their
bytes, the status returned); errors can be injected per route; interactions (slash commands
typed against the synced command schema, button clicks, modal submits) are injected through
the gateway, in the fake's own guild, in other guilds the bot is in (``add_guild``, with what each
member may do there) or in a DM (``dm_channel``). Point discord.py at it with ``discord.http.Route.BASE = fake.url`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)``.

Rate limits work as Discord's do: each route belongs to a bucket (``DEFAULT_BUCKETS``, overridable
per route) counted per major parameter (channel id, webhook id + token, guild id) in fixed windows
that start with the first request. Every REST answer carries ``X-RateLimit-Limit``, ``-Remaining``,
``-Reset``, ``-Reset-After`` and ``-Bucket``; a request over its bucket gets 429 with
``retry_after`` (float seconds), ``Retry-After`` and ``X-RateLimit-Scope: user``, is not served,
and is kept in ``rate_limited``. discord.py reads these headers: it waits before sending when a
bucket's Remaining hit 0 and retries a 429 after ``retry_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import re
import secrets
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

from tests.leaks import register_secret

API_PREFIX = "/api/v10"
EPHEMERAL = 1 << 6
LOADING = 1 << 7

# interaction types
PING, APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 1, 2, 3, 4, 5
# interaction callback types
CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, MODAL = 4, 5, 6, 7, 9
# application command option types
SUB_COMMAND, SUB_COMMAND_GROUP, STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER = range(
    1, 11
)
ATTACHMENT = 11
# application command types
CHAT_INPUT, USER_COMMAND, MESSAGE_COMMAND = 1, 2, 3
# interaction context types
GUILD_CONTEXT, BOT_DM_CONTEXT, PRIVATE_CHANNEL_CONTEXT = 0, 1, 2

#: permission bits the fake gives members unless told otherwise (view, send, history, ...)
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)
MANAGE_GUILD = 1 << 5
ADMINISTRATOR = 1 << 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """``limit`` requests per ``per`` seconds for each major parameter; routes with one ``name`` share it."""

    name: str
    limit: int
    per: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.per <= 0:
            raise ValueError(f"bucket {self.name}: needs limit >= 1 and per > 0, not {self.limit}/{self.per}")

    @property
    def hash(self) -> str:
        """What ``X-RateLimit-Bucket`` says: opaque, stable per name, as Discord's hashes are."""
        return hashlib.sha1(self.name.encode()).hexdigest()[:16]


_WEBHOOK = Bucket(name="webhook", limit=5, per=2.0)
#: route templates ("METHOD /path/{param}") and their buckets, resembling Discord's; any other
#: route gets a bucket of its own of ``OTHER_ROUTES`` size
DEFAULT_BUCKETS: Mapping[str, Bucket] = {
    "POST /channels/{channel_id}/messages": Bucket(name="channel-message-create", limit=5, per=5.0),
    "PATCH /channels/{channel_id}/messages/{message_id}": Bucket(
        name="channel-message-edit", limit=5, per=5.0
    ),
    "DELETE /channels/{channel_id}/messages/{message_id}": Bucket(
        name="channel-message-delete", limit=5, per=1.0
    ),
    "POST /interactions/{webhook_id}/{webhook_token}/callback": Bucket(
        name="interaction-callback", limit=5, per=5.0
    ),
    # an interaction's follow-ups and edits go through its webhook: one bucket per token
    "POST /webhooks/{webhook_id}/{webhook_token}": _WEBHOOK,
    "GET /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}": _WEBHOOK,
    "PATCH /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}": _WEBHOOK,
    "DELETE /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}": _WEBHOOK,
    "PUT /applications/{application_id}/commands": Bucket(name="commands", limit=10, per=10.0),
    "PUT /applications/{application_id}/guilds/{guild_id}/commands": Bucket(
        name="guild-commands", limit=10, per=10.0
    ),
}
OTHER_ROUTES = (50, 1.0)
#: the parameters that key a bucket, in discord.py's ``Route.major_parameters`` order
_MAJOR = ("channel_id", "guild_id", "webhook_id", "webhook_token")


def rendered(content: str) -> str:
    """A message's text as Discord shows it: a backslash before a symbol only keeps it literal."""
    return re.sub(r"\\([^\sA-Za-z0-9])", r"\1", content)


def _template_regex(template: str) -> tuple[str, re.Pattern[str]]:
    method, path = template.split(" ", 1)
    return method.upper(), re.compile(re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path)))


@dataclass(slots=True)
class _Window:
    start: float
    used: int = 0


def _offered(command: Mapping[str, Any], context: int) -> bool:
    """Whether the Discord client offers a synced command in this interaction context."""
    contexts = command.get("contexts")
    if contexts is not None:
        return context in contexts
    return context == GUILD_CONTEXT or command.get("dm_permission") is not False


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # discord.py parses a body only when Content-Type is exactly "application/json" (no charset)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(status=status, body=json.dumps(data).encode(), headers=all_headers)


def _error(status: int, code: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json_response({"code": code, "message": message}, status, headers)


@dataclass(frozen=True, slots=True)
class RecordedFile:
    """One uploaded file of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class RecordedRequest:
    """One REST request as the fake saw it (the bot token is never kept, only whether it matched)."""

    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    json: Any
    files: list[RecordedFile]
    authorized: bool
    at: float  # loop time
    status: int = 0
    response: Any = None
    injected: bool = False  # the status came from an injected error
    unknown_route: bool = False
    bucket: str | None = None  # the rate-limit bucket's name
    rate_limited: bool = False  # refused with 429 by the fake's buckets (not an injected error)
    headers: dict[str, str] = field(default_factory=dict)  # the rate-limit headers answered
    channel_id: int | None = None  # the channel it reads or writes (webhooks: their interaction's)
    dropped: bool = False  # held, then lost in flight (``Hold.drop``): never applied


@dataclass(frozen=True, slots=True)
class FakeUser:
    """A Discord user (and guild member) the tests act as."""

    id: int
    name: str
    bot: bool = False
    permissions: int = MEMBER_PERMISSIONS

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def user_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name.title(),
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }

    def member_json(self, *, with_user: bool = True, permissions: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,  # discord.py reads member flags unconditionally
            "pending": False,
            "nick": None,
            "avatar": None,
            "premium_since": None,
            "communication_disabled_until": None,
            "permissions": str(self.permissions if permissions is None else permissions),
        }
        if with_user:
            data["user"] = self.user_json()
        return data


@dataclass(slots=True)
class FakeChannel:
    """A guild text channel, or with a ``recipient`` the bot's DM with that user (no guild);
    ``deleted`` and ``forbidden`` make REST calls to it fail like Discord."""

    id: int
    name: str
    guild_id: int | None
    nsfw: bool = False
    deleted: bool = False
    forbidden: bool = False
    recipient: FakeUser | None = None

    def to_json(self) -> dict[str, Any]:
        if self.recipient is not None:
            return {
                "id": str(self.id), "type": 1, "last_message_id": None, "flags": 0,
                "recipients": [self.recipient.user_json()],
            }  # fmt: skip
        return {
            "id": str(self.id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": 0,
            "nsfw": self.nsfw,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "permission_overwrites": [],
            "flags": 0,
        }


@dataclass(slots=True)
class FakeGuild:
    """Another server the bot was invited to (the fake's own is ``FakeDiscord.guild_id``), and the
    permission bits of each member there: a member not listed has ``MEMBER_PERMISSIONS``."""

    id: int
    name: str
    owner_id: int
    permissions: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class FakeInteraction:
    """An interaction the fake sent through the gateway, and what the bot answered."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]
    user: FakeUser
    channel_id: int
    created: float
    callback: dict[str, Any] | None = None  # the callback body (type, data)
    callback_files: list[RecordedFile] = field(default_factory=list)
    callback_status: int | None = None
    original_message_id: int | None = None
    expired: bool = False

    @property
    def callback_type(self) -> int | None:
        return None if self.callback is None else int(self.callback["type"])

    @property
    def callback_data(self) -> dict[str, Any]:
        return {} if self.callback is None else dict(self.callback.get("data") or {})


@dataclass(slots=True)
class _Injected:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Any
    headers: dict[str, str]
    times: int
    where: Callable[[RecordedRequest], bool] | None


class Hold:
    """The next request matching it waits in the fake until the test lets it go (``FakeDiscord.hold``).

    Held ``before`` Discord acts on it, ``drop()`` loses it the way a crash loses a send in flight
    (never applied, never answered); held ``after``, Discord has acted on it and only the answer
    waits, which ``release()`` sends (to nobody, once the bot is gone).
    """

    def __init__(
        self, method: str, pattern: re.Pattern[str], where: Callable[[RecordedRequest], bool] | None,
        *, applied: bool,
    ) -> None:  # fmt: skip
        self.method = method
        self.pattern = pattern
        self.where = where
        self.applied = applied
        self.request: RecordedRequest | None = None
        self.arrived = asyncio.Event()
        self._let_go = asyncio.Event()
        self.dropped = False

    def matches(self, r: RecordedRequest) -> bool:
        return (
            self.request is None
            and r.method == self.method
            and self.pattern.fullmatch(r.path) is not None
            and (self.where is None or self.where(r))
        )

    async def wait(self, r: RecordedRequest) -> None:
        self.request = r
        self.arrived.set()
        await self._let_go.wait()

    def release(self) -> None:
        self._let_go.set()

    def drop(self) -> None:
        self.dropped = True
        self._let_go.set()


class _GatewayConnection:
    """One bot connected to the gateway."""

    def __init__(self, ws: web.WebSocketResponse, *, zlib_stream: bool) -> None:
        self.ws = ws
        self.seq = 0
        self.identified = asyncio.Event()
        self.zlib_stream = zlib_stream
        self._compressor = zlib.compressobj() if zlib_stream else None
        self._lock = asyncio.Lock()

    async def send(self, payload: dict[str, Any]) -> None:
        async with self._lock:
            if payload.get("op") == 0:
                self.seq += 1
                payload = {**payload, "s": self.seq}
            text = json.dumps(payload)
            if self._compressor is not None:
                # one shared zlib context per connection, each message ending in a sync flush
                data = self._compressor.compress(text.encode()) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_str(text)


class FakeDiscord:
    """A fake Discord for one bot application with one guild (``guild_id``), and any others it joins.

    Use as ``async with FakeDiscord() as fake:`` or call ``start()``/``close()``. ``url`` is the
    REST base (``…/api/v10``) and ``gateway_url`` the websocket URL.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        attachment_size_limit: int = 10 * 1024 * 1024,
        token_lifetime: float = 15 * 60,
        ack_deadline: float = 3.0,
        heartbeat_interval_ms: int = 41_250,
        buckets: Mapping[str, Bucket] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``buckets`` overrides ``DEFAULT_BUCKETS`` route by route; ``clock`` (monotonic seconds,
        default the loop's) drives the rate-limit windows so a test can move time by hand.
        """
        self._token = register_secret(token, "FakeDiscord bot token")
        self.buckets: dict[str, Bucket] = {**DEFAULT_BUCKETS, **(buckets or {})}
        self._routes = [(*_template_regex(t), t, b) for t, b in self.buckets.items()]
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        #: requests the buckets refused with 429 (injected errors are not here)
        self.rate_limited: list[RecordedRequest] = []
        self.attachment_size_limit = attachment_size_limit
        self.token_lifetime = token_lifetime
        self.ack_deadline = ack_deadline
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._ids = itertools.count(1_200_000_000_000_000_000)
        self.application_id = self.new_id()
        self.guild_id = self.new_id()
        self.bot = FakeUser(id=self.application_id, name="brushbot", bot=True)
        self.users: dict[int, FakeUser] = {}
        self.channels: dict[int, FakeChannel] = {}
        #: the other guilds the bot is in, by id (``add_guild``)
        self.guilds: dict[int, FakeGuild] = {}
        self.owner = self.add_user("owner", permissions=MEMBER_PERMISSIONS | ADMINISTRATOR | MANAGE_GUILD)
        self.general = self.add_channel("general")
        #: exceptions raised inside the fake's handlers (a test can assert there are none)
        self.errors: list[BaseException] = []
        self.requests: list[RecordedRequest] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.deleted_messages: dict[int, dict[str, Any]] = {}
        self.attachments: dict[int, bytes] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        #: synced commands: None = global, else the guild id
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.identifies: list[dict[str, Any]] = []
        self.bad_logins = 0
        self._injected: list[_Injected] = []
        self._holds: list[Hold] = []
        self._connections: list[_GatewayConnection] = []
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{filename}", self._attachment)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Close every gateway connection and stop the server (a held request is dropped)."""
        for hold in self._holds:
            if not hold.applied:
                hold.drop()
            hold.release()
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"fake shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The REST base URL, for ``DISCORD_API_BASE_URL`` / ``discord.http.Route.BASE``."""
        return f"http://127.0.0.1:{self._port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        """The websocket URL, for ``DISCORD_GATEWAY_URL`` / ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://127.0.0.1:{self._port}/gateway"

    @property
    def token(self) -> str:
        """The bot token this fake accepts."""
        return self._token

    # ------------------------------------------------------------------ world

    def new_id(self) -> int:
        """A fresh snowflake."""
        return next(self._ids)

    def add_user(self, name: str, *, permissions: int = MEMBER_PERMISSIONS) -> FakeUser:
        """A new guild member."""
        user = FakeUser(id=self.new_id(), name=name, permissions=permissions)
        self.users[user.id] = user
        return user

    def add_channel(self, name: str, *, nsfw: bool = False, guild: FakeGuild | None = None) -> FakeChannel:
        """A new text channel in the guild, or in another one (visible to a bot that connects afterwards)."""
        where = self.guild_id if guild is None else guild.id
        channel = FakeChannel(id=self.new_id(), name=name, guild_id=where, nsfw=nsfw)
        self.channels[channel.id] = channel
        return channel

    def add_guild(self, name: str, *, owner: FakeUser) -> FakeGuild:
        """Another server that invited the bot (a bot connecting afterwards is in it too): its owner
        holds every permission there, whatever they may do in the fake's own guild."""
        guild = FakeGuild(id=self.new_id(), name=name, owner_id=owner.id)
        guild.permissions[owner.id] = MEMBER_PERMISSIONS | ADMINISTRATOR | MANAGE_GUILD
        self.guilds[guild.id] = guild
        self.users.setdefault(owner.id, owner)
        return guild

    def join(self, guild: FakeGuild, user: FakeUser, *, permissions: int = MEMBER_PERMISSIONS) -> None:
        """``user`` is a member of another guild with these permission bits there."""
        self.users.setdefault(user.id, user)
        guild.permissions[user.id] = permissions

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The bot's direct-message channel with ``user`` (one per user)."""
        for channel in self.channels.values():
            if channel.recipient is not None and channel.recipient.id == user.id:
                return channel
        channel = FakeChannel(id=self.new_id(), name=f"dm-{user.name}", guild_id=None, recipient=user)
        self.channels[channel.id] = channel
        self.users.setdefault(user.id, user)
        return channel

    def expire(self, token: str) -> None:
        """Make an interaction token invalid now (as Discord does after 15 minutes)."""
        self.interactions[token].expired = True

    def expire_all(self) -> None:
        for interaction in self.interactions.values():
            interaction.expired = True

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        times: int = 1,
        where: Callable[[RecordedRequest], bool] | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path fully matches the regex ``path`` with an error.

        ``where`` narrows it further, e.g. ``lambda r: bool(r.files)`` for uploads only.
        """
        if body is None:
            body = {"code": 0, "message": f"{status}: injected error"}
        self._injected.append(
            _Injected(method.upper(), re.compile(path), status, body, dict(headers or {}), times, where)
        )

    def hold(
        self, method: str, path: str, *, where: Callable[[RecordedRequest], bool] | None = None,
        applied: bool = False,
    ) -> Hold:  # fmt: skip
        """Hold the next request whose path fully matches the regex ``path`` (and ``where``).

        With ``applied`` the fake acts on it first (a message is posted or edited) and holds only
        its answer. ``await hold.arrived.wait()`` to see it come in.
        """
        hold = Hold(method.upper(), re.compile(path), where, applied=applied)
        self._holds.append(hold)
        return hold

    def rate_limit(self, method: str, path: str, *, retry_after: float = 0.05, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with a 429 that discord.py retries."""
        self.fail(
            method,
            path,
            status=429,
            body={"message": "You are being rate limited.", "retry_after": retry_after, "global": False},
            headers={
                "Via": "1.1 google",  # discord.py treats a 429 without Via as a Cloudflare ban
                "Retry-After": str(retry_after),
                "X-RateLimit-Scope": "user",
            },
            times=times,
        )

    # ------------------------------------------------------------------ looking

    def message(self, message_id: int) -> dict[str, Any]:
        """A live message (KeyError when deleted or unknown)."""
        return self.messages[message_id]

    def channel_messages(self, channel_id: int) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if int(m["channel_id"]) == channel_id]

    def files_of(self, message: Mapping[str, Any]) -> list[tuple[str, bytes]]:
        """(filename, bytes) of each attachment of a message."""
        return [(a["filename"], self.attachments[int(a["id"])]) for a in message.get("attachments", [])]

    @staticmethod
    def custom_ids(message: Mapping[str, Any]) -> list[str]:
        """The custom ids of every button or menu of a message."""
        out: list[str] = []

        def walk(components: list[dict[str, Any]]) -> None:
            for c in components:
                if "custom_id" in c:
                    out.append(c["custom_id"])
                walk(c.get("components", []))

        walk(list(message.get("components", [])))
        return out

    def find_requests(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests whose path fully matches the regex ``path``."""
        rx = re.compile(path)
        return [r for r in self.requests if r.method == method.upper() and rx.fullmatch(r.path)]

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after every request and event); return it."""
        assert self._changed is not None, "start() the fake first"
        result: Any = None

        def check() -> bool:
            nonlocal result
            result = predicate()
            return bool(result)

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(check)
        return result

    async def wait_for_request(
        self, method: str, path: str, *, where: Callable[[RecordedRequest], bool] | None = None, after: int = 0,
        timeout: float = 15.0,
    ) -> RecordedRequest:  # fmt: skip
        """The first recorded request from index ``after`` on matching method, path regex and ``where``."""
        rx = re.compile(path)

        def find() -> RecordedRequest | None:
            for r in self.requests[after:]:
                if (
                    r.method == method.upper()
                    and rx.fullmatch(r.path)
                    and r.status
                    and (where is None or where(r))
                ):
                    return r
            return None

        found: RecordedRequest = await self.wait_until(find, timeout)
        return found

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ injecting interactions

    def _command(
        self, name: str, kind: int = CHAT_INPUT, *, channel: FakeChannel | None = None, forged: bool = False
    ) -> tuple[dict[str, Any], int | None]:
        """The synced command and its scope (a guild id, None: global) as the client offers it in
        ``channel`` (default: the fake's guild): that guild's commands, then the global ones, where
        their contexts allow (a guild-only command is not offered in a DM). ``forged`` takes any
        synced command of that name anywhere, as a forged interaction could name it."""
        guild = self.guild_id if channel is None else channel.guild_id
        context = GUILD_CONTEXT if guild is not None else BOT_DM_CONTEXT
        scopes = [guild, None] if guild is not None else [None]
        matching = [
            (cmd, scope)
            for scope in [*scopes, *(s for s in self.commands if s not in scopes)]
            for cmd in self.commands.get(scope, [])
            if cmd["name"] == name and cmd.get("type", 1) == kind
        ]
        for cmd, scope in matching:
            if scope in scopes and _offered(cmd, context):
                return cmd, scope
        if forged and matching:
            return matching[0]
        where = "here" if matching else "at all"
        raise KeyError(f"command /{name} was not synced {where} (forged=True sends it anyway)")

    def upload(self, filename: str, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
        """An attachment as a user's client uploads it (served at its ``url``), for attachment options."""
        aid = self.new_id()
        self.attachments[aid] = data
        url = f"http://127.0.0.1:{self._port}/attachments/{aid}/{filename}"
        return {"id": str(aid), "filename": filename, "size": len(data), "url": url, "proxy_url": url,
                "content_type": content_type}  # fmt: skip

    def post_as(
        self, user: FakeUser, channel: FakeChannel, content: str, files: Sequence[tuple[str, bytes]] = ()
    ) -> dict[str, Any]:
        """A message a member posted in a channel (with attachments), e.g. for a message command."""
        recorded = [
            RecordedFile(field="files", filename=n, content_type="image/png", data=d) for n, d in files
        ]
        msg = self._new_message(channel.id, {"content": content}, recorded)
        msg["author"] = user.user_json()
        return msg

    async def message_command(self, name: str, user: FakeUser, message: Mapping[str, Any]) -> FakeInteraction:
        """Run a message command (the "Apps" menu of a message) on ``message``."""
        channel = self.channels[int(message["channel_id"])]
        cmd, scope = self._command(name, MESSAGE_COMMAND, channel=channel)
        data: dict[str, Any] = {
            "id": cmd["id"], "name": name, "type": MESSAGE_COMMAND, "target_id": str(message["id"]),
            "resolved": {"messages": {str(message["id"]): dict(message)}},
        }  # fmt: skip
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._interact(APPLICATION_COMMAND, data, user, channel)

    def _option_values(
        self, schema: list[dict[str, Any]], values: Mapping[str, Any], resolved: dict[str, Any],
        *, members: bool = True,
    ) -> list[dict[str, Any]]:  # fmt: skip
        by_name = {o["name"]: o for o in schema}
        out = []
        for opt in schema:
            if opt.get("required") and opt["name"] not in values:
                raise ValueError(f"option {opt['name']} is required")
        for name, value in values.items():
            if name not in by_name:
                raise ValueError(f"unknown option {name!r}; known: {sorted(by_name)}")
            opt = by_name[name]
            kind = opt["type"]
            # what the Discord client enforces before sending
            if opt.get("choices") and value not in [c["value"] for c in opt["choices"]]:
                raise ValueError(f"{name}={value!r} is not one of the choices")
            if kind in (INTEGER, NUMBER):
                if "min_value" in opt and value < opt["min_value"]:
                    raise ValueError(f"{name}={value} is below {opt['min_value']}")
                if "max_value" in opt and value > opt["max_value"]:
                    raise ValueError(f"{name}={value} is above {opt['max_value']}")
            if kind == STRING and "max_length" in opt and len(value) > opt["max_length"]:
                raise ValueError(f"{name} is longer than {opt['max_length']}")
            if kind == USER:
                user: FakeUser = value
                resolved.setdefault("users", {})[str(user.id)] = user.user_json()
                if members:  # a DM resolves users only
                    resolved.setdefault("members", {})[str(user.id)] = user.member_json(with_user=False)
                value = str(user.id)
            if kind == ATTACHMENT:  # an upload from ``upload()``: the client sends its id, resolved
                resolved.setdefault("attachments", {})[str(value["id"])] = dict(value)
                value = str(value["id"])
            out.append({"name": name, "type": kind, "value": value})
        return out

    async def slash(
        self, command: str, user: FakeUser, /, *, channel: FakeChannel | None = None, forged: bool = False,
        **options: Any,
    ) -> FakeInteraction:  # fmt: skip
        """Send a slash command typed like the Discord client would, e.g. ``slash("brush quota set", u, ...)``.

        Options are checked against the synced schema (types, choices, ranges, required).
        ``channel`` may be in another guild or a DM, where the command must be offered (synced
        there or globally, its contexts allowing it); ``forged`` sends it where it is not, as a
        forged interaction would arrive.
        """
        names = command.split()
        where = channel or self.general
        cmd, scope = self._command(names[0], channel=where, forged=forged)
        schema: list[dict[str, Any]] = list(cmd.get("options", []))
        resolved: dict[str, Any] = {}
        path: list[tuple[str, int]] = []
        for sub in names[1:]:
            match = next((o for o in schema if o["name"] == sub and o["type"] in (1, 2)), None)
            if match is None:
                raise KeyError(f"/{command}: no subcommand {sub}")
            path.append((sub, match["type"]))
            schema = list(match.get("options", []))
        leaf = self._option_values(schema, options, resolved, members=where.guild_id is not None)
        for sub, kind in reversed(path):
            leaf = [{"name": sub, "type": kind, "options": leaf}]
        data: dict[str, Any] = {"id": cmd["id"], "name": names[0], "type": 1, "options": leaf}
        if resolved:
            data["resolved"] = resolved
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._interact(APPLICATION_COMMAND, data, user, where)

    async def click(
        self, message: Mapping[str, Any] | int, custom_id: str, user: FakeUser
    ) -> FakeInteraction:
        """Press a button of a message."""
        msg = self.messages[message] if isinstance(message, int) else self.messages[int(message["id"])]
        if custom_id not in self.custom_ids(msg):
            raise KeyError(f"message {msg['id']} has no component {custom_id!r}: {self.custom_ids(msg)}")
        data = {"custom_id": custom_id, "component_type": 2}
        channel = self.channels[int(msg["channel_id"])]
        return await self._interact(MESSAGE_COMPONENT, data, user, channel, message=msg)

    async def forge_click(
        self, message: Mapping[str, Any] | int, custom_id: str, user: FakeUser
    ) -> FakeInteraction:
        """A component interaction with any ``custom_id`` under ``message``, as a modified client
        (or a stale one) can send: Discord does not check it against the message's buttons."""
        msg = self.messages[message] if isinstance(message, int) else self.messages[int(message["id"])]
        data = {"custom_id": custom_id, "component_type": 2}
        channel = self.channels[int(msg["channel_id"])]
        return await self._interact(MESSAGE_COMPONENT, data, user, channel, message=msg)

    async def submit_modal(
        self,
        opened_by: FakeInteraction,
        values: Mapping[str, str],
        user: FakeUser | None = None,
    ) -> FakeInteraction:
        """Submit the modal that the bot showed in answer to ``opened_by``; ``values`` by input custom id."""
        if opened_by.callback_type != MODAL:
            raise ValueError("the bot did not answer that interaction with a modal")
        modal = opened_by.callback_data

        def answer(component: dict[str, Any]) -> dict[str, Any]:
            # Discord echoes the layout with each input's value instead of its settings
            if component.get("type") == 18:  # a label wrapping one input
                return {"type": 18, "component": answer(component["component"])}
            if "components" in component:
                return {"type": component["type"], "components": [answer(c) for c in component["components"]]}
            cid = component.get("custom_id", "")
            return {"type": component.get("type"), "custom_id": cid, "value": values.get(cid, "")}

        rows = [answer(c) for c in modal.get("components", [])]
        data = {"custom_id": modal["custom_id"], "components": rows}
        message = None
        if opened_by.payload.get("message") is not None:
            message = self.messages.get(int(opened_by.payload["message"]["id"]))
        channel = self.channels[opened_by.channel_id]
        return await self._interact(MODAL_SUBMIT, data, user or opened_by.user, channel, message=message)

    async def _interact(
        self,
        kind: int,
        data: dict[str, Any],
        user: FakeUser,
        channel: FakeChannel,
        *,
        message: Mapping[str, Any] | None = None,
    ) -> FakeInteraction:
        self.users.setdefault(user.id, user)
        iid = self.new_id()
        token = register_secret("itok_" + secrets.token_urlsafe(24), "FakeDiscord interaction token")
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel.id),
            "channel": channel.to_json(),
            "token": token,
            "version": 1,
            "app_permissions": str(MEMBER_PERMISSIONS),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        if channel.guild_id is None:  # a DM: the user, no member, no guild
            payload.update(
                user=user.user_json(), context=BOT_DM_CONTEXT, authorizing_integration_owners={"0": "0"}
            )
        else:
            other = self.guilds.get(channel.guild_id)
            permissions = None if other is None else other.permissions.get(user.id, MEMBER_PERMISSIONS)
            payload.update(
                guild_id=str(channel.guild_id), member=user.member_json(permissions=permissions),
                guild_locale="en-US", context=GUILD_CONTEXT,
                authorizing_integration_owners={"0": str(channel.guild_id)},
            )  # fmt: skip
        if message is not None:
            payload["message"] = dict(message)
        assert self._loop is not None
        interaction = FakeInteraction(
            id=iid, token=token, type=kind, payload=payload, user=user, channel_id=channel.id,
            created=self._loop.time(),
            original_message_id=int(message["id"]) if message is not None else None,
        )  # fmt: skip
        self.interactions[token] = interaction
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event to every identified bot (waits until one has identified)."""
        await self.wait_until(lambda: any(c.identified.is_set() for c in self._connections), timeout=15)
        for conn in list(self._connections):
            if conn.identified.is_set():
                await conn.send({"op": 0, "t": event, "d": data})

    async def wait_response(self, interaction: FakeInteraction, timeout: float = 15.0) -> FakeInteraction:
        """Wait until the bot answered the interaction's callback."""
        await self.wait_until(lambda: interaction.callback_status is not None, timeout)
        return interaction

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _GatewayConnection(ws, zlib_stream=request.query.get("compress") == "zlib-stream")
        self._connections.append(conn)
        try:
            await conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                if op == 1:  # heartbeat
                    await conn.send({"op": 11})
                elif op == 2:
                    await self._identify(conn, frame["d"])
                elif op == 6:  # resume: sessions are not kept, so make the bot identify again
                    await conn.send({"op": 9, "d": False})
        finally:
            self._connections.remove(conn)
            await self._notify()
        return ws

    async def _identify(self, conn: _GatewayConnection, data: dict[str, Any]) -> None:
        ok = data.get("token") == self._token
        self.identifies.append(
            {
                "token_ok": ok,
                "intents": data.get("intents"),
                "shard": data.get("shard"),
                "zlib_stream": conn.zlib_stream,
            }
        )
        if not ok:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        guild_stubs = [{"id": str(g), "unavailable": True} for g in (self.guild_id, *self.guilds)]
        await conn.send(
            {
                "op": 0,
                "t": "READY",
                "d": {
                    "v": 10,
                    "user": self.bot.user_json(),
                    "guilds": guild_stubs,
                    "session_id": secrets.token_hex(16),
                    "resume_gateway_url": self.gateway_url,
                    "shard": [0, 1],
                    "application": {"id": str(self.application_id), "flags": 0},
                    "private_channels": [],
                    "relationships": [],
                },
            }
        )
        await conn.send({"op": 0, "t": "GUILD_CREATE", "d": self._guild_json()})
        for guild in self.guilds.values():
            await conn.send({"op": 0, "t": "GUILD_CREATE", "d": self._guild_json(guild)})
        conn.identified.set()
        await self._notify()

    def _guild_json(self, other: FakeGuild | None = None) -> dict[str, Any]:
        gid, name, owner = (
            (self.guild_id, "Fake Guild", self.owner.id)
            if other is None
            else (other.id, other.name, other.owner_id)
        )
        everyone = {
            "id": str(gid), "name": "@everyone", "permissions": str(MEMBER_PERMISSIONS),
            "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
        }  # fmt: skip
        return {
            "id": str(gid),
            "name": name,
            "owner_id": str(owner),
            "unavailable": False,
            "large": False,
            "member_count": len(self.users) + 1 if other is None else len(other.permissions) + 1,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "roles": [everyone],
            "channels": [c.to_json() for c in self.channels.values() if not c.deleted and c.guild_id == gid],
            "members": [self.bot.member_json()],
            "threads": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_tier": 0,
        }

    # ------------------------------------------------------------------ REST plumbing

    async def _attachment(self, request: web.Request) -> web.Response:
        data = self.attachments.get(int(request.match_info["aid"]))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _read_body(self, request: web.Request) -> tuple[Any, list[RecordedFile]]:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            payload: Any = None
            files: list[RecordedFile] = []
            while True:
                part = await reader.next()
                if part is None:
                    break
                assert isinstance(part, BodyPartReader), "nested multipart is not something Discord takes"
                raw = await part.read(decode=False)
                name = part.name or ""
                if name == "payload_json":
                    payload = json.loads(raw)
                else:
                    files.append(
                        RecordedFile(
                            field=name,
                            filename=part.filename or "",
                            content_type=part.headers.get("Content-Type", ""),
                            data=bytes(raw),
                        )
                    )
            return payload, files
        body = await request.read()
        if not body:
            return None, []
        try:
            return json.loads(body), []
        except ValueError:
            return body.decode(errors="replace"), []

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        assert self._loop is not None
        path = "/" + request.match_info["tail"]
        payload, files = await self._read_body(request)
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            json=payload,
            files=files,
            authorized=request.headers.get("Authorization") == f"Bot {self._token}",
            at=self._loop.time(),
        )
        self.requests.append(record)
        record.channel_id = self._channel_of(record)
        hold = next((h for h in self._holds if h.matches(record)), None)
        if hold is not None and not hold.applied:
            await hold.wait(record)
            if hold.dropped:  # lost on the way: Discord never saw it
                record.dropped = True
                await self._notify()
                return _error(503, 0, "dropped in flight")
        try:
            response = self._injected_response(record)
            if response is None:
                refused, headers = self._take_slot(record)
                record.headers = headers
                response = refused or await self._route(record)
                response.headers.update(headers)
        except Exception as exc:  # a bug in the fake shows up as a 500 and in ``errors``, not as a hang
            self.errors.append(exc)
            response = _error(500, 0, f"fake error: {type(exc).__name__}: {exc}")
        record.status = response.status
        if (
            isinstance(response, web.Response)
            and response.body
            and response.content_type == "application/json"
        ):
            record.response = json.loads(response.body)  # type: ignore[arg-type]
        await self._notify()
        if hold is not None and hold.applied:
            await hold.wait(record)
        return response

    # ------------------------------------------------------------------ rate limits

    def _now(self) -> float:
        assert self._loop is not None
        return self._clock() if self._clock is not None else self._loop.time()

    def bucket_of(self, method: str, path: str) -> tuple[Bucket, str]:
        """The bucket of a request and its major parameter (``channel_id``, ``webhook_id+token``, ...)."""
        for route_method, rx, _template, bucket in self._routes:
            match = rx.fullmatch(path) if route_method == method.upper() else None
            if match is not None:
                groups = match.groupdict()
                return bucket, "+".join(groups[k] for k in _MAJOR if k in groups)
        # any other route: a bucket of its own per route (ids left out of its name, as in
        # discord.py's route keys), counted per channel or guild when the path starts with one
        limit, per = OTHER_ROUTES
        major = re.match(r"/(?:channels|guilds)/(\d+)", path)
        name = method.upper() + " " + re.sub(r"/\d+", "/{id}", path)
        return Bucket(name=name, limit=limit, per=per), major.group(1) if major else ""

    def _take_slot(self, r: RecordedRequest) -> tuple[web.Response | None, dict[str, str]]:
        """Count the request in its bucket's window: its rate-limit headers, and a 429 when it is over."""
        bucket, major = self.bucket_of(r.method, r.path)
        r.bucket = bucket.name
        now = self._now()
        window = self._windows.get((bucket.name, major))
        if window is None or now >= window.start + bucket.per:  # a window starts with its first request
            window = self._windows[(bucket.name, major)] = _Window(start=now)
        # rounded up, so that a client waiting this long finds the window over
        reset_after = math.ceil((window.start + bucket.per - now) * 1000) / 1000
        refused = window.used >= bucket.limit
        if not refused:
            window.used += 1
        headers = {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(bucket.limit - window.used),
            "X-RateLimit-Reset": f"{math.ceil((time.time() + reset_after) * 1000) / 1000:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket.hash,
        }
        if not refused:
            return None, headers
        r.rate_limited = True
        self.rate_limited.append(r)
        headers.update(
            {
                "Retry-After": str(max(1, math.ceil(reset_after))),
                "X-RateLimit-Scope": "user",
                "Via": "1.1 google",  # discord.py treats a 429 without Via as a Cloudflare ban
            }
        )
        body = {"message": "You are being rate limited.", "retry_after": reset_after, "global": False}
        return _json_response(body, 429), headers

    def _channel_of(self, r: RecordedRequest) -> int | None:
        channel = re.match(r"/channels/(\d+)", r.path)
        if channel is not None:
            return int(channel.group(1))
        token = re.match(r"/(?:webhooks|interactions)/\d+/([^/]+)", r.path)
        interaction = self.interactions.get(token.group(1)) if token is not None else None
        return interaction.channel_id if interaction is not None else None

    def writes(self, channel_id: int) -> list[RecordedRequest]:
        """Successful requests that posted or edited a message in the channel (callbacks, follow-ups,
        webhook edits, channel messages), oldest first; what a busy channel sees of the bot."""
        return [
            r
            for r in self.requests
            if r.channel_id == channel_id and r.method in ("POST", "PATCH") and 200 <= r.status < 300
        ]

    def _injected_response(self, record: RecordedRequest) -> web.Response | None:
        for inj in self._injected:
            if (
                inj.times > 0
                and inj.method == record.method
                and inj.pattern.fullmatch(record.path)
                and (inj.where is None or inj.where(record))
            ):
                inj.times -= 1
                record.injected = True
                return _json_response(inj.body, inj.status, inj.headers)
        return None

    async def _route(self, r: RecordedRequest) -> web.Response:
        m, p = r.method, r.path
        app = str(self.application_id)
        webhook = re.fullmatch(r"/webhooks/(\d+)/([^/]+)(/messages/(@original|\d+))?", p)
        if webhook is not None:
            return self._webhook(r, webhook.group(1), webhook.group(2), webhook.group(4))
        callback = re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", p)
        if callback is not None and m == "POST":
            return self._callback(r, int(callback.group(1)), callback.group(2))
        if not r.authorized:
            return _error(401, 0, "401: Unauthorized")
        if p == "/users/@me" and m == "GET":
            return _json_response(self.bot.user_json())
        if p in ("/oauth2/applications/@me", "/applications/@me") and m == "GET":
            return _json_response(self._application_json())
        if p in ("/gateway", "/gateway/bot") and m == "GET":
            return _json_response(
                {
                    "url": self.gateway_url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 999,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            )
        commands = re.fullmatch(rf"/applications/{app}(?:/guilds/(\d+))?/commands", p)
        if commands is not None:
            return self._commands(r, int(commands.group(1)) if commands.group(1) else None)
        channel = re.fullmatch(r"/channels/(\d+)(/messages(?:/(\d+))?)?", p)
        if channel is not None:
            return self._channel(r, int(channel.group(1)), channel.group(2) is not None, channel.group(3))
        r.unknown_route = True
        return _error(404, 0, f"404: Not Found (the fake has no route {m} {p})")

    def _application_json(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": "brushbot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.user_json(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot.user_json(),
        }

    def _commands(self, r: RecordedRequest, guild_id: int | None) -> web.Response:
        if guild_id is not None and guild_id != self.guild_id and guild_id not in self.guilds:
            return _error(403, 50001, "Missing Access")
        if r.method == "GET":
            return _json_response(self.commands.get(guild_id, []))
        if r.method != "PUT" or not isinstance(r.json, list):
            return _error(405, 0, "405: Method Not Allowed")
        synced = []
        for cmd in r.json:
            full = {
                "type": 1, "default_member_permissions": None, "nsfw": False, "options": [], "description": "",
                "name_localizations": None, "description_localizations": None, **cmd,
            }  # fmt: skip
            full.update(
                id=str(self.new_id()), application_id=str(self.application_id), version=str(self.new_id())
            )
            if full["default_member_permissions"] is not None:  # Discord answers permissions as strings
                full["default_member_permissions"] = str(full["default_member_permissions"])
            if guild_id is not None:
                full["guild_id"] = str(guild_id)
            synced.append(full)
        self.commands[guild_id] = synced
        return _json_response(synced)

    # ------------------------------------------------------------------ messages

    def _too_large(self, files: list[RecordedFile]) -> web.Response | None:
        if any(len(f.data) > self.attachment_size_limit for f in files):
            return _error(413, 40005, "Request entity too large")
        return None

    def _new_message(
        self, channel_id: int, body: Mapping[str, Any], files: list[RecordedFile], *, flags: int = 0,
        interaction: FakeInteraction | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        mid = self.new_id()
        channel = self.channels.get(channel_id)
        guild_id = self.guild_id if channel is None else channel.guild_id
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": self.bot.user_json(),
            "content": "",
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 0,
            "flags": flags,
        }
        if guild_id is not None:  # a DM's messages name no guild
            msg["guild_id"] = str(guild_id)
        if interaction is not None:
            msg["webhook_id"] = str(self.application_id)
            msg["application_id"] = str(self.application_id)
            msg["type"] = 20 if interaction.type == APPLICATION_COMMAND else 19
            msg["interaction_metadata"] = {
                "id": str(interaction.id), "type": interaction.type, "user": interaction.user.user_json(),
                "authorizing_integration_owners": interaction.payload["authorizing_integration_owners"],
            }  # fmt: skip
        self._apply(msg, body, files, new=True)
        self.messages[mid] = msg
        return msg

    def _apply(
        self, msg: dict[str, Any], body: Mapping[str, Any] | None, files: list[RecordedFile], *, new: bool
    ) -> None:
        body = body or {}
        for key in ("content", "embeds", "components", "allowed_mentions", "message_reference"):
            if key in body and body[key] is not None:
                msg[key] = body[key]
        if "flags" in body and body["flags"] is not None:
            # EPHEMERAL can only be set when the message is created
            keep = msg["flags"] & EPHEMERAL
            msg["flags"] = (int(body["flags"]) & ~EPHEMERAL) | keep
        if "content" in body and body["content"] is not None:
            msg["mentions"] = [
                self.users[int(uid)].user_json()
                for uid in re.findall(r"<@!?(\d+)>", body["content"])
                if int(uid) in self.users
            ]
        kept = msg["attachments"]
        if not new and "attachments" in body and body["attachments"] is not None:
            wanted = {str(a.get("id")) for a in body["attachments"]}
            kept = [a for a in msg["attachments"] if a["id"] in wanted]
        added = []
        for f in files:
            aid = self.new_id()
            self.attachments[aid] = f.data
            added.append(
                {
                    "id": str(aid),
                    "filename": f.filename,
                    "size": len(f.data),
                    "url": f"http://127.0.0.1:{self._port}/attachments/{aid}/{f.filename}",
                    "proxy_url": f"http://127.0.0.1:{self._port}/attachments/{aid}/{f.filename}",
                    "content_type": f.content_type,
                }
            )
        msg["attachments"] = kept + added
        if not new:
            msg["edited_timestamp"] = _now_iso()

    def _channel(
        self, r: RecordedRequest, channel_id: int, messages: bool, message_id: str | None
    ) -> web.Response:
        channel = self.channels.get(channel_id)
        if channel is None or channel.deleted:
            return _error(404, 10003, "Unknown Channel")
        if channel.forbidden:
            return _error(403, 50001, "Missing Access")
        if not messages:
            return _json_response(channel.to_json()) if r.method == "GET" else _error(405, 0, "405")
        if message_id is None:
            if r.method != "POST":
                return _error(405, 0, "405: Method Not Allowed")
            if (err := self._too_large(r.files)) is not None:
                return err
            return _json_response(self._new_message(channel_id, r.json or {}, r.files))
        msg = self.messages.get(int(message_id))
        if msg is None or int(msg["channel_id"]) != channel_id or msg["flags"] & EPHEMERAL:
            return _error(404, 10008, "Unknown Message")
        if r.method == "GET":
            return _json_response(msg)
        if r.method == "PATCH":
            if (err := self._too_large(r.files)) is not None:
                return err
            self._apply(msg, r.json, r.files, new=False)
            return _json_response(msg)
        if r.method == "DELETE":
            self.deleted_messages[int(message_id)] = self.messages.pop(int(message_id))
            return web.Response(status=204)
        return _error(405, 0, "405: Method Not Allowed")

    # ------------------------------------------------------------------ interactions

    def _callback(self, r: RecordedRequest, interaction_id: int, token: str) -> web.Response:
        assert self._loop is not None
        interaction = self.interactions.get(token)
        if interaction is None or interaction.id != interaction_id:
            return _error(404, 10062, "Unknown interaction")
        if interaction.callback is not None:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        if self._loop.time() - interaction.created > self.ack_deadline:
            return _error(404, 10062, "Unknown interaction")
        body = r.json or {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        if (err := self._too_large(r.files)) is not None:
            return err
        resource: dict[str, Any] = {"type": kind}
        loading = ephemeral = False
        if kind in (CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE):
            flags = int(data.get("flags") or 0)
            ephemeral = bool(flags & EPHEMERAL)
            loading = kind == DEFERRED_CHANNEL_MESSAGE
            msg_flags = (flags & EPHEMERAL) | (LOADING if loading else 0)
            content = data if kind == CHANNEL_MESSAGE else {}
            msg = self._new_message(
                interaction.channel_id, content, r.files, flags=msg_flags, interaction=interaction
            )
            interaction.original_message_id = int(msg["id"])
            resource["message"] = msg
        elif kind == UPDATE_MESSAGE:
            if (
                interaction.original_message_id is None
                or interaction.original_message_id not in self.messages
            ):
                return _error(404, 10008, "Unknown Message")
            msg = self.messages[interaction.original_message_id]
            self._apply(msg, data, r.files, new=False)
            resource["message"] = msg
        elif kind == MODAL:
            if interaction.type == MODAL_SUBMIT:
                return _error(400, 50035, "Invalid Form Body: cannot answer a modal with a modal")
        elif kind != DEFERRED_UPDATE:
            return _error(400, 50035, f"Invalid Form Body: callback type {kind}")
        interaction.callback = body
        interaction.callback_files = list(r.files)
        interaction.callback_status = 200
        return _json_response(
            {
                "interaction": {
                    "id": str(interaction.id),
                    "type": interaction.type,
                    "response_message_id": (
                        str(interaction.original_message_id) if interaction.original_message_id else None
                    ),
                    "response_message_loading": loading,
                    "response_message_ephemeral": ephemeral,
                },
                "resource": resource,
            }
        )

    def _webhook(self, r: RecordedRequest, webhook_id: str, token: str, message: str | None) -> web.Response:
        assert self._loop is not None
        interaction = self.interactions.get(token)
        if interaction is None or webhook_id != str(self.application_id):
            return _error(404, 10015, "Unknown Webhook")
        if interaction.expired or self._loop.time() - interaction.created > self.token_lifetime:
            return _error(401, 50027, "Invalid Webhook Token")
        channel = self.channels[interaction.channel_id]
        if channel.deleted:
            return _error(404, 10003, "Unknown Channel")
        if message is None:
            if r.method != "POST":
                return _error(405, 0, "405: Method Not Allowed")
            if interaction.callback is None:
                return _error(404, 10015, "Unknown Webhook")
            if (err := self._too_large(r.files)) is not None:
                return err
            original = self.messages.get(interaction.original_message_id or 0)
            if original is not None and original["flags"] & LOADING:
                # the first follow-up of a deferred response replaces the "thinking" message
                original["flags"] &= ~LOADING
                self._apply(original, r.json, r.files, new=False)
                return _json_response(original)
            body = r.json or {}
            flags = int(body.get("flags") or 0) & EPHEMERAL
            created = self._new_message(
                interaction.channel_id, body, r.files, flags=flags, interaction=interaction
            )
            return _json_response(created)
        mid = interaction.original_message_id if message == "@original" else int(message)
        msg = self.messages.get(mid or 0)
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        if r.method == "GET":
            return _json_response(msg)
        if r.method == "PATCH":
            if (err := self._too_large(r.files)) is not None:
                return err
            msg["flags"] &= ~LOADING
            self._apply(msg, r.json, r.files, new=False)
            return _json_response(msg)
        if r.method == "DELETE":
            self.deleted_messages[int(msg["id"])] = self.messages.pop(int(msg["id"]))
            return web.Response(status=204)
        return _error(405, 0, "405: Method Not Allowed")
