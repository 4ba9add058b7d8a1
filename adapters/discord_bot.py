"""brushbot on Discord: slash commands, persistent job buttons and job replies with discord.py.

``DiscordAdapter(service, settings)`` logs in, syncs the application commands (globally, or to
``DISCORD_GUILD_ID`` for fast iteration), connects to the gateway and turns interactions into
service calls. Each job's chat reference (interaction token, channel, status message) is stored
in ``job.delivery``, so replies and buttons keep working after a restart: button custom ids are
``bb:<action>:<job id>`` and every button reads the job from the service, never from memory.

A job's status message is the deferred interaction response, edited in place (ticket, progress
bar, then the images). Interaction tokens last 15 minutes; after that, or when Discord says the
token is gone, results go to the channel as a new message that mentions the requester. A
channel that is gone or forbids the bot raises ``UnreachableError``, so the job ends failed and
refunded.

``DISCORD_API_BASE_URL`` and ``DISCORD_GATEWAY_URL`` override discord.py's REST base and gateway
URL. discord.py keeps both as process-wide class attributes, so the adapter sets them in
``start()`` and puts the previous values back in ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import aiohttp
import discord
import yarl
from discord import app_commands

from bot import messages
from bot.config import Settings
from bot.domain import Balance, Job, JobState, Progress, SavedImage, Ticket, UploadFile, UserRef
from bot.errors import BotError, ConfigError, DeliveryError, NoCreditsError, RequestError, UnreachableError
from bot.grammar import MAX_SEED, RawOptions, split_flags
from bot.logs import guard_logs
from bot.ports import Reply
from bot.service import Service

_log = logging.getLogger(__name__)

PLATFORM = "discord"
#: Discord's interaction tokens live 15 minutes; stop using one a little before that
TOKEN_LIFETIME = 15 * 60 - 30
#: used when an old delivery reference has no limit stored (Discord's default for bots)
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
MAX_FILES = 10
MAX_CONTENT = 2000
#: Discord's longest string option (the prompt option also holds --flags)
MAX_OPTION_STRING = 6000

_CUSTOM_ID = r"bb:(?P<action>reroll|edit|info|delete|cancel):(?P<job>[0-9a-f]{1,32})"
_EDIT_FORM = re.compile(r"bb:editform:(?P<job>[0-9a-f]{1,32})")
# interaction tokens appear in webhook URLs and in the gateway payloads discord.py logs at DEBUG
_URL_TOKEN = re.compile(r"(/(?:webhooks|interactions)/\d+/)[A-Za-z0-9_.\-]+")
_FIELD_TOKEN = re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+""")
#: loggers (and their children) whose records get the tokens redacted at the source
_REDACTED_LOGGERS = ("discord", "aiosqlite", "adapters", "bot", "data", "generation", "asyncio")

# network trouble worth retrying later
_TRANSIENT = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
#: typed /draw options and the grammar flag each one stands for
_TYPED_FLAGS: Mapping[str, str] = {
    "negative": "no",
    "size": "size",
    "steps": "steps",
    "seed": "seed",
    "count": "n",
    "guidance": "cfg",
}


class _TooLarge(Exception):
    """Discord refused the upload as too large (413): try a smaller encoding."""


def _user_ref(user: discord.abc.User) -> UserRef:
    return UserRef(platform=PLATFORM, id=str(user.id))


def _webhook_gone(exc: discord.HTTPException) -> bool:
    """The interaction token expired or is unknown: use the channel instead."""
    return exc.status == 401 or exc.code in (10015, 50027, 10062)


def _message_gone(exc: discord.HTTPException) -> bool:
    return exc.status == 404 and exc.code == 10008


def _chat_gone(exc: discord.HTTPException) -> bool:
    """The channel is deleted or the bot may not use it: retrying will not help."""
    return isinstance(exc, discord.Forbidden) or (exc.status == 404 and not _message_gone(exc))


def _delivery_error(exc: BaseException) -> DeliveryError:
    if isinstance(exc, discord.HTTPException):
        return DeliveryError(f"Discord answered {exc.status} ({exc.code or 'no code'})")
    return DeliveryError(f"could not reach Discord ({type(exc).__name__})")


def merge_options(text: RawOptions, **typed: Any) -> RawOptions:
    """Typed slash-command options on top of ``--flags`` written in the prompt; both for one is refused."""
    given = {name: value for name, value in typed.items() if value is not None}
    for name in given:
        if getattr(text, name) is not None:
            flag = _TYPED_FLAGS[name]
            raise RequestError(f"--{flag} is given twice: as the {name} option and in the prompt")
    return replace(text, **given)


def _modal_values(data: Any) -> dict[str, str]:
    """Text input values of a modal submit, by custom id (rows or labels, any nesting)."""
    values: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "custom_id" in node and "value" in node:
                values[str(node["custom_id"])] = str(node["value"] or "")
            for key in ("components", "component"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk((data or {}).get("components"))
    return values


@dataclass(slots=True)
class _JobChat:
    """In-memory helpers for one job's status message (throttling and ordering only, never state)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_progress: float = float("-inf")
    final: bool = False


class _JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=_CUSTOM_ID):
    """A job button whose custom id carries the action and the job id, so it survives restarts."""

    STYLES: ClassVar[Mapping[str, tuple[str, discord.ButtonStyle, str]]] = {
        "reroll": ("Reroll", discord.ButtonStyle.primary, "🎲"),
        "edit": ("Edit", discord.ButtonStyle.secondary, "✏️"),
        "info": ("Info", discord.ButtonStyle.secondary, "ℹ️"),
        "delete": ("Delete", discord.ButtonStyle.danger, "🗑️"),
        "cancel": ("Cancel", discord.ButtonStyle.danger, "✖️"),
    }

    def __init__(self, action: str, job_id: str, *, label: str | None = None) -> None:
        text, style, emoji = self.STYLES[action]
        super().__init__(
            discord.ui.Button(
                label=label or text, style=style, emoji=emoji, custom_id=f"bb:{action}:{job_id}"
            )
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> _JobButton:
        return cls(match["action"], match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        if isinstance(client, _BrushClient):
            await client.adapter._run(
                interaction, client.adapter._on_button(interaction, self.action, self.job_id)
            )


def _view(*buttons: _JobButton) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(button)
    return view


def _status_view(job_id: str) -> discord.ui.View:
    return _view(_JobButton("cancel", job_id))


def _result_view(job_id: str) -> discord.ui.View:
    return _view(*(_JobButton(action, job_id) for action in ("reroll", "edit", "info", "delete")))


class _EditModal(discord.ui.Modal):
    """Change a job's prompt and draw again; the submit is handled from its custom id (restart-safe)."""

    def __init__(self, job: Job, max_chars: int) -> None:
        super().__init__(title="Edit and draw again", custom_id=f"bb:editform:{job.id}", timeout=15 * 60)
        limit = min(4000, max_chars + 200)  # room for --flags after the prompt
        self.add_item(
            discord.ui.TextInput(
                label="Prompt (--flags allowed)", style=discord.TextStyle.paragraph, custom_id="prompt",
                default=job.request.prompt[:limit], max_length=limit, required=True,
            )
        )  # fmt: skip
        self.add_item(
            discord.ui.TextInput(
                label="Negative prompt", style=discord.TextStyle.short, custom_id="negative",
                default=job.request.negative_prompt[:1000] or None, max_length=1000, required=False,
            )
        )  # fmt: skip


class _BrushClient(discord.Client):
    """discord.Client with the command tree and a way back to the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        await self.adapter._setup()

    async def on_interaction(self, interaction: discord.Interaction[Any]) -> None:
        # Modal submits are matched by custom id here rather than by the in-memory Modal object,
        # so an Edit form opened before a restart still works after it.
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        data: dict[str, Any] = dict(interaction.data or {})
        match = _EDIT_FORM.fullmatch(str(data.get("custom_id", "")))
        if match is not None:
            await self.adapter._run(interaction, self.adapter._on_edit_submit(interaction, match["job"]))


class _DiscordReply:
    """The Reply port for one job, rebuilt from ``job.delivery`` alone."""

    def __init__(self, adapter: DiscordAdapter) -> None:
        self._adapter = adapter

    async def queued(self, job: Job, ticket: Ticket) -> None:
        await self._adapter._show_status(job, messages.ticket_text(ticket), _status_view(job.id))

    async def progress(self, job: Job, progress: Progress) -> None:
        await self._adapter._show_progress(job, progress)

    async def delivered(self, job: Job, images: Sequence[SavedImage]) -> None:
        await self._adapter._deliver(job, images)

    async def failed(self, job: Job, message: str) -> None:
        await self._adapter._fail(job, message)


class DiscordAdapter:
    """Runs brushbot's Discord bot; an async context manager (``start()`` / ``close()``).

    ``token_lifetime`` is how long an interaction token is used before replies go to the
    channel instead (Discord's is 15 minutes); ``guild_ready_timeout`` is discord.py's wait
    for guilds after READY (tests lower it); ``ready_timeout`` bounds ``start()``.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        *,
        token_lifetime: float = TOKEN_LIFETIME,
        guild_ready_timeout: float = 2.0,
        ready_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.settings = settings
        self.token_lifetime = token_lifetime
        self._guild_ready_timeout = guild_ready_timeout
        self._ready_timeout = ready_timeout
        self._clock = clock
        self._client: _BrushClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._saved_endpoints: tuple[str, yarl.URL] | None = None
        self._unguard: Callable[[], None] | None = None
        self._chats: dict[str, _JobChat] = {}
        self._admin_permission = settings.discord_admin_permission or None
        if (
            self._admin_permission is not None
            and self._admin_permission not in discord.Permissions.VALID_FLAGS
        ):
            raise ConfigError(
                f"invalid setting DISCORD_ADMIN_PERMISSION (got {self._admin_permission!r}): "
                "expected a Discord permission name such as manage_guild or administrator"
            )
        self.synced: list[app_commands.AppCommand] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> DiscordAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> discord.Client:
        """The running discord.py client."""
        if self._client is None:
            raise RuntimeError("the Discord adapter is not started")
        return self._client

    async def start(self) -> None:
        """Log in, sync the commands, connect to the gateway and wait until the guilds are ready."""
        secret = self.settings.discord_token.get_secret_value().strip() if self.settings.discord_token else ""
        if not secret:
            raise ConfigError("DISCORD_TOKEN is not set")
        self._install_filter(secret)
        self._apply_endpoints()
        intents = discord.Intents.none()
        intents.guilds = True  # channels (and whether they are NSFW); no privileged intents
        self._client = _BrushClient(
            self,
            intents=intents,
            guild_ready_timeout=self._guild_ready_timeout,
            allowed_mentions=discord.AllowedMentions.none(),  # prompts may contain @everyone
            max_messages=None,
            chunk_guilds_at_startup=False,
        )
        self.service.register(PLATFORM, self._reply_for)
        try:
            await self._client.login(secret)
        except discord.LoginFailure:
            await self.close()
            raise ConfigError("Discord refused DISCORD_TOKEN: check the bot token") from None
        except BaseException:
            await self.close()
            raise
        self._runner = asyncio.create_task(self._client.connect(reconnect=True), name="discord-gateway")
        ready = asyncio.create_task(self._client.wait_until_ready(), name="discord-ready")
        done, _ = await asyncio.wait(
            {ready, self._runner}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            runner = self._runner
            failure = runner.exception() if runner in done and not runner.cancelled() else None
            await self.close()
            if isinstance(failure, discord.LoginFailure | discord.PrivilegedIntentsRequired):
                raise ConfigError(f"Discord refused the gateway connection ({type(failure).__name__})")
            raise ConfigError(
                f"could not connect to the Discord gateway within {self._ready_timeout:g} s "
                "(check DISCORD_GATEWAY_URL and the network)"
            ) from failure
        user = self._client.user
        _log.info(
            "Discord: connected as %s (%s), %d guild(s)",
            user,
            user.id if user else "?",
            len(self._client.guilds),
        )

    async def close(self) -> None:
        """Disconnect and restore discord.py's endpoints and loggers."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._runner is not None:
            with contextlib.suppress(BaseException):
                await self._runner
            self._runner = None
        self._client = None
        self._restore_endpoints()
        self._remove_filter()

    def _apply_endpoints(self) -> None:
        self._saved_endpoints = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        if self.settings.discord_api_base_url:
            discord.http.Route.BASE = self.settings.discord_api_base_url.rstrip("/")
        if self.settings.discord_gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.discord_gateway_url)

    def _restore_endpoints(self) -> None:
        if self._saved_endpoints is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved_endpoints
            self._saved_endpoints = None

    def _install_filter(self, secret: str) -> None:
        # The bot token and interaction tokens, on the root handlers and on discord.py's and our
        # loggers; aiosqlite logs SQL parameters at DEBUG, and job deliveries hold interaction tokens.
        self._remove_filter()
        self._unguard = guard_logs([secret], (_URL_TOKEN, _FIELD_TOKEN), _REDACTED_LOGGERS)

    def _remove_filter(self) -> None:
        if self._unguard is not None:
            self._unguard()
            self._unguard = None

    # ------------------------------------------------------------------ commands

    async def _setup(self) -> None:
        """Called by discord.py after login: register buttons and commands, then sync them."""
        client = self.client
        assert isinstance(client, _BrushClient)
        client.add_dynamic_items(_JobButton)
        tree = client.tree
        for command in self._commands():
            tree.add_command(command)
        tree.error(self._on_app_command_error)
        try:
            if self.settings.discord_guild_id:
                guild = discord.Object(id=self.settings.discord_guild_id)
                tree.copy_global_to(guild=guild)
                self.synced = await tree.sync(guild=guild)
                _log.info("Discord: synced %d command(s) to guild %s", len(self.synced), guild.id)
            else:
                self.synced = await tree.sync()
                _log.info("Discord: synced %d global command(s) (may take a while to show)", len(self.synced))
        except discord.HTTPException as exc:
            # Commands from an earlier sync keep working; the operator sees why this one failed.
            _log.error("Discord: command sync failed (%s %s)", exc.status, exc.text[:200])

    def _commands(self) -> list[app_commands.Command[Any, ..., Any] | app_commands.Group]:
        settings, profile = self.settings, self.service.profile

        async def draw(
            interaction: discord.Interaction,
            prompt: str,
            negative: str | None = None,
            size: str | None = None,
            steps: int | None = None,
            seed: int | None = None,
            count: int | None = None,
            guidance: float | None = None,
        ) -> None:
            await self._draw(
                interaction, prompt, negative=negative, size=size, steps=steps, seed=seed, count=count,
                guidance=guidance,
            )  # fmt: skip

        # Ranges and choices come from the settings and the model, so they are set at run time.
        draw.__annotations__.update(
            prompt=app_commands.Range[str, 1, MAX_OPTION_STRING],
            steps=app_commands.Range[int, 1, settings.max_steps],
            seed=app_commands.Range[int, 0, MAX_SEED],
            count=app_commands.Range[int, 1, settings.max_images],
            guidance=app_commands.Range[float, 0.0, profile.max_guidance],
        )
        draw_cb: Any = app_commands.describe(
            prompt="what to draw; --flags such as --ar 16:9 --seed 42 work here too",
            negative="what to avoid (needs guidance above 0 on some models)",
            size="picture shape",
            steps=f"denoising steps (default {profile.default_steps})",
            seed="reproduce an image: each image of a batch gets seed, seed+1, ...",
            count="number of images",
            guidance=f"guidance scale (default {profile.default_guidance:g}; above 0 doubles the GPU time)",
        )(draw)
        if profile.sizes:
            choices = [
                app_commands.Choice(name=f"{name} ({w}x{h})", value=name)
                for name, (w, h) in list(profile.sizes.items())[:25]
            ]
            draw_cb = app_commands.choices(size=choices)(draw_cb)

        async def credits(interaction: discord.Interaction) -> None:
            balance = await self.service.credits(_user_ref(interaction.user))
            await self._say(interaction, messages.balance_text(balance, self.service.next_refill_text()))

        async def jobs(interaction: discord.Interaction) -> None:
            entries = await self.service.my_jobs(_user_ref(interaction.user))
            buttons = [
                _JobButton("cancel", e.job.id, label=f"Cancel {e.job.id}")
                for e in entries
                if e.job.state.cancellable
            ][:25]
            await self._say(
                interaction, messages.jobs_text(entries), view=_view(*buttons) if buttons else None
            )

        async def queue(interaction: discord.Interaction) -> None:
            await self._say(interaction, messages.queue_text(self.service.queue_view()))

        async def cancel(interaction: discord.Interaction, job: str) -> None:
            await self._cancel(interaction, job.strip())

        async def help_(interaction: discord.Interaction) -> None:
            await self._say(
                interaction, self._help_text(_user_ref(interaction.user), self._vouched(interaction))
            )

        commands: list[app_commands.Command[Any, ..., Any] | app_commands.Group] = [
            app_commands.Command(name="draw", description="Draw a picture", callback=draw_cb),
            app_commands.Command(name="credits", description="Your credits", callback=credits),
            app_commands.Command(
                name="jobs", description="Your queued, running and recent jobs", callback=jobs
            ),
            app_commands.Command(name="queue", description="Who is waiting for the GPU", callback=queue),
            app_commands.Command(
                name="cancel",
                description="Cancel one of your jobs",
                callback=app_commands.describe(job="the job id shown in its status")(cancel),
            ),
            app_commands.Command(name="help", description="How to use brushbot", callback=help_),
            self._admin_group(),
        ]
        return commands

    def _admin_group(self) -> app_commands.Group:
        service = self.service
        # Hidden from members without Manage Server by Discord; the service checks again: ADMIN_IDS,
        # or DISCORD_ADMIN_PERMISSION held in this server when the operator set it.
        brush = app_commands.Group(
            name="brush",
            description="brushbot administration",
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        quota = app_commands.Group(name="quota", description="Users' credits", parent=brush)

        def who(member: discord.abc.User) -> str:
            return f"{member.display_name} ({PLATFORM}:{member.id})"

        def balance_line(member: discord.abc.User, b: Balance) -> str:
            return (
                f"{who(member)}: {b.available} credit(s) available · used {b.used} of {b.allowance} "
                f"this period · bonus {b.bonus}"
            )

        async def show(interaction: discord.Interaction, user: discord.User) -> None:
            view = await service.admin_show(
                _user_ref(interaction.user), _user_ref(user), vouched=self._vouched(interaction)
            )
            text = messages.user_view_text(view)
            if not view.record.display_name:  # the store has not seen them draw yet
                text = f"{who(user)}\n{text}"
            await self._say(interaction, text)

        async def set_(
            interaction: discord.Interaction, user: discord.User, credits: int | None = None
        ) -> None:
            b = await service.admin_set(
                _user_ref(interaction.user), _user_ref(user), credits, vouched=self._vouched(interaction)
            )
            await self._say(interaction, balance_line(user, b))

        async def grant(interaction: discord.Interaction, user: discord.User, credits: int) -> None:
            b = await service.admin_grant(
                _user_ref(interaction.user), _user_ref(user), credits, vouched=self._vouched(interaction)
            )
            await self._say(interaction, balance_line(user, b))

        async def reset(interaction: discord.Interaction, user: discord.User) -> None:
            b = await service.admin_reset(
                _user_ref(interaction.user), _user_ref(user), vouched=self._vouched(interaction)
            )
            await self._say(interaction, balance_line(user, b))

        async def ban(interaction: discord.Interaction, user: discord.User) -> None:
            await service.admin_ban(
                _user_ref(interaction.user), _user_ref(user), True, vouched=self._vouched(interaction)
            )
            await self._say(interaction, f"{who(user)} is banned from drawing.")

        async def unban(interaction: discord.Interaction, user: discord.User) -> None:
            await service.admin_ban(
                _user_ref(interaction.user), _user_ref(user), False, vouched=self._vouched(interaction)
            )
            await self._say(interaction, f"{who(user)} may draw again.")

        async def weight(interaction: discord.Interaction, user: discord.User, weight: float) -> None:
            record = await service.admin_weight(
                _user_ref(interaction.user), _user_ref(user), weight, vouched=self._vouched(interaction)
            )
            await self._say(interaction, f"{who(user)} now has queue weight {record.weight:g}.")

        async def stats(interaction: discord.Interaction) -> None:
            data = await service.stats(_user_ref(interaction.user), vouched=self._vouched(interaction))
            await self._say(interaction, "```\n" + messages.stats_text(data)[:1900] + "\n```")

        set_.__annotations__["credits"] = app_commands.Range[int, 0, 1_000_000]
        grant.__annotations__["credits"] = app_commands.Range[int, -1_000_000, 1_000_000]
        weight.__annotations__["weight"] = app_commands.Range[float, 0.01, 100.0]
        user_doc = app_commands.describe(user="the member")
        quota.add_command(
            app_commands.Command(
                name="show", description="A user's credits and history", callback=user_doc(show)
            )
        )
        quota.add_command(
            app_commands.Command(
                name="set",
                description="Set a user's allowance per period (leave credits empty for the default)",
                callback=app_commands.describe(user="the member", credits="credits per period")(set_),
            )
        )
        quota.add_command(
            app_commands.Command(
                name="grant",
                description="Give (or take) bonus credits",
                callback=app_commands.describe(user="the member", credits="bonus credits, may be negative")(
                    grant
                ),
            )
        )
        quota.add_command(
            app_commands.Command(
                name="reset", description="Reset this period's usage", callback=user_doc(reset)
            )
        )
        for name, description, callback in (
            ("ban", "Stop a user from drawing", ban),
            ("unban", "Let a banned user draw again", unban),
        ):
            brush.add_command(
                app_commands.Command(name=name, description=description, callback=user_doc(callback))
            )
        brush.add_command(
            app_commands.Command(
                name="weight",
                description="A user's share of the GPU when several wait (default 1)",
                callback=app_commands.describe(user="the member", weight="0.01 to 100")(weight),
            )
        )
        brush.add_command(
            app_commands.Command(name="stats", description="Jobs, queue and speed", callback=stats)
        )
        return brush

    def _vouched(self, interaction: discord.Interaction[Any]) -> bool:
        """Whether the member holds DISCORD_ADMIN_PERMISSION in this server (when it is set)."""
        if self._admin_permission is None or interaction.guild is None:
            return False
        return bool(getattr(interaction.permissions, self._admin_permission, False))

    def _help_text(self, user: UserRef, vouched: bool = False) -> str:
        sizes = ", ".join(self.service.profile.sizes) or "WxH"
        text = (
            f"{messages.HELP}\n\n"
            f"On Discord the /draw options do the same as the flags (size: {sizes}). Under each picture: "
            "Reroll (same settings, new seed), Edit (change the prompt), Info, Delete. "
            "A job that finishes after 15 minutes is posted in the channel with a mention."
        )
        if self.service.is_admin(user, vouched=vouched):
            text += (
                "\nAdmin: /brush quota show|set|grant|reset, /brush ban|unban, /brush weight, /brush stats"
            )
        return text

    # ------------------------------------------------------------------ interactions

    async def _run(self, interaction: discord.Interaction[Any], handler: Awaitable[None]) -> None:
        """Run a button or form handler with the same error mapping as the command tree."""
        try:
            await handler
        except Exception as exc:
            await self._on_error(interaction, exc)

    async def _on_app_command_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        await self._on_error(interaction, original)

    async def _on_error(self, interaction: discord.Interaction[Any], error: BaseException) -> None:
        """The one error hook: a core error becomes its one line, anything else is logged."""
        if isinstance(error, NoCreditsError):
            text = f"{error}. Credits refill at {self.service.next_refill_text()}."
        elif isinstance(error, BotError):
            text = str(error)
        elif isinstance(error, app_commands.CommandNotFound):
            text = "That command is out of date; try again in a minute."
        elif isinstance(error, app_commands.NoPrivateMessage):
            text = "That command only works in a server."
        elif isinstance(error, app_commands.MissingPermissions | app_commands.CheckFailure):
            text = "You may not use that command here."
        elif isinstance(error, app_commands.TransformerError):
            text = f"That value is not valid for {error.type.name.lower()} options."
        else:
            _log.error(
                "Discord interaction %s by %s failed", interaction.id, interaction.user.id,
                exc_info=(type(error), error, error.__traceback__),
            )  # fmt: skip
            text = "Something went wrong; the operator can find the details in the log."
        text = text.splitlines()[0][:MAX_CONTENT] if text else "Something went wrong."
        try:
            await self._say_error(interaction, text)
        except Exception as exc:
            _log.warning("Discord: could not show an error to %s: %s", interaction.user.id, exc)

    async def _say_error(self, interaction: discord.Interaction[Any], text: str) -> None:
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=True)
            return
        if interaction.extras.get("bb_thinking") and not interaction.extras.get("bb_submitted"):
            # The public "thinking…" message would otherwise stay; the error is for the user only.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        await interaction.followup.send(text, ephemeral=True)

    async def _say(
        self, interaction: discord.Interaction[Any], text: str, *, view: discord.ui.View | None = None
    ) -> None:
        """An ephemeral answer (or follow-up when the interaction was deferred)."""
        text = text[:MAX_CONTENT]
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, view=view or discord.utils.MISSING)
        else:
            await interaction.response.send_message(text, ephemeral=True, view=view or discord.utils.MISSING)

    @staticmethod
    def _nsfw_allowed(interaction: discord.Interaction[Any]) -> bool:
        channel = interaction.channel
        is_nsfw = getattr(channel, "is_nsfw", None)
        return bool(callable(is_nsfw) and is_nsfw())

    async def _draw(self, interaction: discord.Interaction[Any], prompt: str, **typed: Any) -> None:
        # Parsing is pure and fast, so a malformed request is refused before deferring, privately.
        request = self.service.build(merge_options(split_flags(prompt), **typed))
        user = interaction.user
        await self._submit(
            interaction,
            lambda delivery: self.service.submit(
                _user_ref(user), request, delivery=delivery, user_name=user.display_name,
                nsfw_allowed=self._nsfw_allowed(interaction),
            ),
        )  # fmt: skip

    async def _submit(
        self, interaction: discord.Interaction[Any], submit: Callable[[dict[str, Any]], Awaitable[Ticket]]
    ) -> None:
        """Defer publicly (the 3-second rule), then submit with this interaction as the job's chat."""
        response = await interaction.response.defer(thinking=True)
        interaction.extras["bb_thinking"] = True
        message_id = response.message_id if response is not None else None
        if message_id is None:
            message_id = (await interaction.original_response()).id
        delivery = {
            "app_id": str(interaction.application_id),
            "token": interaction.token,
            "token_expires": self._clock() + self.token_lifetime,
            "channel_id": str(interaction.channel_id),
            "guild_id": str(interaction.guild_id) if interaction.guild_id else None,
            "user_id": str(interaction.user.id),
            "message_id": str(message_id),
            "filesize_limit": int(interaction.filesize_limit or DEFAULT_FILESIZE_LIMIT),
        }
        await submit(delivery)
        interaction.extras["bb_submitted"] = True

    async def _cancel(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.service.cancel(
            _user_ref(interaction.user), job_id, vouched=self._vouched(interaction)
        )
        await interaction.followup.send(messages.cancel_text(job), ephemeral=True)

    async def _on_button(self, interaction: discord.Interaction[Any], action: str, job_id: str) -> None:
        actor = _user_ref(interaction.user)
        if action == "info":
            job = await self.service.job(job_id)
            await self._say(interaction, messages.info_text(job))
        elif action == "cancel":
            await self._cancel(interaction, job_id)
        elif action == "delete":
            await self.service.authorize_delete(actor, job_id, vouched=self._vouched(interaction))
            await interaction.response.defer()  # acknowledges the click without a new message
            await interaction.delete_original_response()  # the message the button is on
        elif action == "reroll":
            user = interaction.user
            await self._submit(
                interaction,
                lambda delivery: self.service.reroll(
                    actor, job_id, delivery=delivery, user_name=user.display_name,
                    nsfw_allowed=self._nsfw_allowed(interaction),
                ),
            )  # fmt: skip
        elif action == "edit":
            job = await self.service.job(job_id)
            await interaction.response.send_modal(_EditModal(job, self.settings.max_prompt_chars))

    async def _on_edit_submit(self, interaction: discord.Interaction[Any], job_id: str) -> None:
        old = await self.service.job(job_id)
        values = _modal_values(interaction.data)
        text = split_flags(values.get("prompt", ""))
        negative = values.get("negative", "").strip() or None
        r = old.request
        # The edited prompt keeps the old job's settings and first seed unless its flags say otherwise.
        options = RawOptions(
            prompt=text.prompt,
            negative=text.negative if text.negative is not None else negative,
            size=text.size if text.size is not None or text.ar is not None else f"{r.width}x{r.height}",
            ar=text.ar,
            steps=text.steps if text.steps is not None else r.steps,
            seed=text.seed if text.seed is not None else (old.seeds[0] if old.seeds else r.seed),
            count=text.count if text.count is not None else r.count,
            guidance=text.guidance if text.guidance is not None else r.guidance,
        )
        request = self.service.build(options)
        user = interaction.user
        await self._submit(
            interaction,
            lambda delivery: self.service.submit(
                _user_ref(user), request, delivery=delivery, user_name=user.display_name,
                nsfw_allowed=self._nsfw_allowed(interaction),
            ),
        )  # fmt: skip

    # ------------------------------------------------------------------ replies

    def _reply_for(self, job: Job) -> Reply:
        """The Reply of a job, from ``job.delivery`` only (works after a restart)."""
        return _DiscordReply(self)

    def _chat(self, job_id: str) -> _JobChat:
        chat = self._chats.get(job_id)
        if chat is None:
            chat = self._chats[job_id] = _JobChat()
        return chat

    def _connected(self) -> discord.Client:
        """The client, for replies; a closed connection is a retryable delivery failure."""
        if self._client is None or self._client.is_closed():
            raise DeliveryError("the Discord connection is closed")
        return self._client

    def _token_valid(self, job: Job) -> bool:
        return bool(job.delivery.get("token")) and float(job.delivery.get("token_expires", 0)) > self._clock()

    def _webhook(self, job: Job) -> discord.Webhook:
        return discord.Webhook.partial(
            int(job.delivery["app_id"]), str(job.delivery["token"]), client=self._connected()
        )

    def _channel(self, job: Job) -> discord.PartialMessageable:
        guild = job.delivery.get("guild_id")
        return self._connected().get_partial_messageable(
            int(job.delivery["channel_id"]), guild_id=int(guild) if guild else None
        )

    async def _token_gone(self, job: Job) -> None:
        """Remember (in the store) that this job's interaction token no longer works."""
        await self.service.update_delivery(job.id, token_expires=0)

    async def _edit_status(self, job: Job, content: str, view: discord.ui.View | None) -> None:
        """Edit the job's status message: through the interaction while its token lives, else the channel."""
        message_id = int(job.delivery["message_id"])
        try:
            if self._token_valid(job):
                try:
                    await self._webhook(job).edit_message(message_id, content=content, view=view)
                    return
                except discord.HTTPException as exc:
                    if _message_gone(exc):
                        return  # someone deleted the status message: nothing left to update
                    if not _webhook_gone(exc):
                        raise
                    await self._token_gone(job)
            await self._channel(job).get_partial_message(message_id).edit(content=content, view=view)
        except discord.HTTPException as exc:
            if _message_gone(exc):
                return
            if _chat_gone(exc):
                raise UnreachableError(f"the channel is gone or closed to the bot ({exc.status})") from None
            raise _delivery_error(exc) from None
        except _TRANSIENT as exc:
            raise _delivery_error(exc) from None

    async def _show_status(self, job: Job, content: str, view: discord.ui.View | None) -> None:
        chat = self._chat(job.id)
        async with chat.lock:
            if not chat.final:
                await self._edit_status(job, content[:MAX_CONTENT], view)

    async def _show_progress(self, job: Job, progress: Progress) -> None:
        chat = self._chat(job.id)
        now = time.monotonic()
        # at most one edit per PROGRESS_INTERVAL (Discord rate-limits edits); the service throttles too
        if now - chat.last_progress < self.settings.progress_interval or chat.lock.locked():
            return
        chat.last_progress = now
        async with chat.lock:
            if not chat.final:
                await self._edit_status(job, messages.progress_text(job, progress), _status_view(job.id))

    async def _fail(self, job: Job, message: str) -> None:
        what = "was cancelled" if job.state is JobState.CANCELLED else "failed"
        text = f"Job {job.id} {what}: {message}"[:MAX_CONTENT]
        chat = self._chat(job.id)
        try:
            async with chat.lock:
                chat.final = True
                if self._token_valid(job):
                    await self._edit_status(job, text, None)
                    return
                # The requester may have stopped watching: tell them with a mention.
                with contextlib.suppress(BotError):
                    await self._edit_status(job, text, None)
                user_id = int(job.delivery["user_id"])
                try:
                    await self._channel(job).send(
                        f"<@{user_id}> {text}"[:MAX_CONTENT],
                        allowed_mentions=discord.AllowedMentions(users=[discord.Object(id=user_id)]),
                    )
                except discord.HTTPException as exc:
                    raise (UnreachableError if _chat_gone(exc) else DeliveryError)(
                        f"could not post in the channel ({exc.status})"
                    ) from None
        finally:
            self._chats.pop(job.id, None)

    def _files(self, uploads: Sequence[UploadFile], images: Sequence[SavedImage]) -> list[discord.File]:
        return [
            discord.File(
                io.BytesIO(upload.data),
                filename=upload.filename,
                spoiler=self.settings.discord_spoiler,
                description=f"seed {image.seed}",
            )
            for upload, image in zip(uploads, images, strict=False)
        ]

    def _result_text(self, job: Job, uploads: Sequence[UploadFile], *, room: int) -> str:
        seconds = messages.job_seconds(job, self._clock())
        text = messages.caption(job, seconds, limit=room)
        reencoded = sorted({u.format.upper() for u in uploads if u.reencoded})
        if reencoded:
            note = f"\n(sent as {'/'.join(reencoded)} to fit Discord's upload limit; the PNG is kept on the server)"
            text = messages.caption(job, seconds, limit=room - len(note)) + note
        return text

    async def _deliver(self, job: Job, images: Sequence[SavedImage]) -> None:
        chat = self._chat(job.id)
        try:
            async with chat.lock:
                chat.final = True  # no progress edit may overwrite the result
                limit = int(job.delivery.get("filesize_limit") or DEFAULT_FILESIZE_LIMIT)
                shown = list(images[:MAX_FILES])
                for _attempt in range(4):
                    uploads = [await self.service.upload_file(image.path, limit) for image in shown]
                    try:
                        await self._send_result(job, shown, uploads)
                        return
                    except _TooLarge:
                        # Discord measures the whole request too: fit each file into a smaller share.
                        limit //= 2
                        _log.info(
                            "job %s: upload refused as too large; trying %d bytes per file", job.id, limit
                        )
                raise DeliveryError("the images are too large for Discord even when re-encoded")
        finally:
            self._chats.pop(job.id, None)

    async def _send_result(
        self, job: Job, images: Sequence[SavedImage], uploads: Sequence[UploadFile]
    ) -> None:
        d = job.delivery
        user_id = int(d["user_id"])
        message: discord.Message | None = None
        try:
            if self._token_valid(job):
                message = await self._send_by_interaction(job, images, uploads)
            if message is None:
                mention = f"<@{user_id}> "
                message = await self._channel(job).send(
                    mention + self._result_text(job, uploads, room=MAX_CONTENT - len(mention)),
                    files=self._files(uploads, images),
                    view=_result_view(job.id),
                    allowed_mentions=discord.AllowedMentions(users=[discord.Object(id=user_id)]),
                )
                # the old status message now points at the result (best effort)
                with contextlib.suppress(discord.HTTPException, *_TRANSIENT):
                    await (
                        self._channel(job)
                        .get_partial_message(int(d["message_id"]))
                        .edit(content=f"Job {job.id} is done: {message.jump_url}", view=None)
                    )
        except discord.HTTPException as exc:
            if exc.status == 413 or exc.code == 40005:
                raise _TooLarge from None
            if _chat_gone(exc):
                raise UnreachableError(f"the channel is gone or closed to the bot ({exc.status})") from None
            raise _delivery_error(exc) from None
        except _TRANSIENT as exc:
            raise _delivery_error(exc) from None
        await self.service.update_delivery(job.id, result_message_id=str(message.id))

    async def _send_by_interaction(
        self, job: Job, images: Sequence[SavedImage], uploads: Sequence[UploadFile]
    ) -> discord.Message | None:
        """Turn the status message into the result; None when the token no longer works."""
        webhook = self._webhook(job)
        content = self._result_text(job, uploads, room=MAX_CONTENT)
        try:
            return await webhook.edit_message(
                int(job.delivery["message_id"]),
                content=content,
                attachments=self._files(uploads, images),
                view=_result_view(job.id),
            )
        except discord.HTTPException as exc:
            if _webhook_gone(exc):
                await self._token_gone(job)
                return None
            if not _message_gone(exc):
                raise
        # the status message was deleted: post the result as a follow-up instead
        try:
            return await webhook.send(
                content, files=self._files(uploads, images), view=_result_view(job.id), wait=True
            )
        except discord.HTTPException as exc:
            if _webhook_gone(exc):
                await self._token_gone(job)
                return None
            raise
