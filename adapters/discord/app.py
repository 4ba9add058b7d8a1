"""The Discord adapter's lifecycle: log in, sync the commands, connect to the gateway, stop.

``DiscordAdapter(service, settings)`` is an async context manager. It registers its transport
with the service, syncs the application commands (globally, or to ``DISCORD_GUILD_ID`` for fast
iteration) and turns interactions into core calls through ``commands``, ``admin`` and
``buttons``; the transport carries what the core says back.

``DISCORD_API_BASE_URL`` and ``DISCORD_GATEWAY_URL`` override discord.py's REST base and gateway
URL. discord.py keeps both as process-wide class attributes, so the adapter sets them in
``start()`` and puts the previous values back in ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import discord
import yarl
from discord import app_commands

from adapters.discord.admin import admin_group
from adapters.discord.buttons import CUSTOM_ID_RE, EDIT_FORM, Buttons
from adapters.discord.commands import Commands
from adapters.discord.delivery import TOKEN_LIFETIME, Interaction
from adapters.discord.errors import FIELD_TOKEN, REDACTED_LOGGERS, URL_TOKEN, ErrorHook
from adapters.discord.transport import DiscordTransport
from bot import messages
from bot.config import ADMIN_PERMISSION_NEEDS_GUILD, Settings
from bot.errors import ConfigError
from bot.logs import guard_logs
from bot.service import Service

_log = logging.getLogger(__name__)


class DeferringTree(app_commands.CommandTree["BrushClient"]):
    """Every command that answers privately is deferred (privately) before its callback runs, so
    no database read or service call can make it miss Discord's 3-second deadline. ``/draw`` and
    "Vary this image" defer publicly themselves, after their quick checks."""

    PUBLIC = frozenset({"draw", messages.VARY_MENU})

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        command = interaction.command
        if command is not None and command.name not in self.PUBLIC and not interaction.response.is_done():
            await interaction.response.defer(ephemeral=True, thinking=True)
        return True


class BrushClient(discord.Client):
    """discord.Client with the command tree, the button handler and a set-up callback."""

    def __init__(
        self, *, buttons: Buttons, setup: Callable[[BrushClient], Awaitable[None]], intents: discord.Intents,
        guild_ready_timeout: float, http_trace: aiohttp.TraceConfig,
    ) -> None:  # fmt: skip
        super().__init__(
            intents=intents, guild_ready_timeout=guild_ready_timeout, http_trace=http_trace,
            allowed_mentions=discord.AllowedMentions.none(),  # prompts may contain @everyone
            max_messages=None, chunk_guilds_at_startup=False,
        )  # fmt: skip
        self.buttons = buttons
        self.tree: app_commands.CommandTree[BrushClient] = DeferringTree(self)
        self._setup = setup

    async def setup_hook(self) -> None:
        await self._setup(self)

    async def on_interaction(self, interaction: Interaction) -> None:
        # Modal submits are matched by custom id here rather than by the in-memory Modal object,
        # so an Edit form opened before a restart still works after it.
        data = interaction.data
        if interaction.type is discord.InteractionType.component:
            # Every press is handled here, by its custom id alone: a button from before a
            # restart works, and one whose id is not on the message (a stale or forged client)
            # is still answered — discord.py's own dispatch would drop it, and the user would
            # read "This interaction failed". An id that is not ours is acknowledged silently.
            custom_id = str(data.get("custom_id", "")) if data is not None else ""
            match = CUSTOM_ID_RE.fullmatch(custom_id)
            if match is not None:
                await self.buttons.pressed(interaction, match["action"], match["job"])
            elif not interaction.response.is_done():
                with contextlib.suppress(discord.HTTPException):
                    await interaction.response.defer()
            return
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        form = EDIT_FORM.fullmatch(str(data.get("custom_id", "")) if data is not None else "")
        if form is not None:
            await self.buttons.edit_submitted(interaction, form["job"])


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
        self._admin_permission = settings.discord_admin_permission or None
        if (
            self._admin_permission is not None
            and self._admin_permission not in discord.Permissions.VALID_FLAGS
        ):
            raise ConfigError(
                f"invalid setting DISCORD_ADMIN_PERMISSION (got {self._admin_permission!r}): "
                "expected a Discord permission name such as manage_guild or administrator"
            )
        self._admin_guild = settings.discord_guild_id or None
        if self._admin_permission is not None and self._admin_guild is None:
            # load_settings refuses this already; settings built another way must not slip through
            raise ConfigError(f"invalid setting {ADMIN_PERMISSION_NEEDS_GUILD}")
        self.transport = DiscordTransport(service, spoiler=settings.discord_spoiler, clock=clock)
        self.errors = ErrorHook(service)
        self.buttons = Buttons(
            service=service, errors=self.errors, vouched=self.vouched, expires=self._expires,
            max_prompt_chars=settings.max_prompt_chars,
        )  # fmt: skip
        self._client: BrushClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._saved_endpoints: tuple[str, yarl.URL] | None = None
        self._unguard: Callable[[], None] | None = None
        self.synced: list[app_commands.AppCommand] = []

    def __repr__(self) -> str:
        return f"DiscordAdapter(running={self._client is not None})"

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

    def _expires(self) -> float:
        return self._clock() + self.token_lifetime

    def vouched(self, interaction: Interaction) -> bool:
        """Whether the member holds DISCORD_ADMIN_PERMISSION (when it is set) in the operator's own
        server, DISCORD_GUILD_ID. Credits and bans are global, so the same permission in any other
        server the bot is in (whose owner may be anyone) or in a DM vouches for nobody; ``ADMIN_IDS``
        admins are admins everywhere, and the service checks those itself."""
        if self._admin_permission is None or interaction.guild_id != self._admin_guild:
            return False
        return bool(getattr(interaction.permissions, self._admin_permission, False))

    async def start(self) -> None:
        """Log in, sync the commands, connect to the gateway and wait until the guilds are ready."""
        secret = self.settings.discord_token.get_secret_value().strip() if self.settings.discord_token else ""
        if not secret:
            raise ConfigError("DISCORD_TOKEN is not set")
        # The bot token and interaction tokens, on the root handlers and on discord.py's and our
        # loggers; aiosqlite logs SQL parameters at DEBUG, and job deliveries hold interaction tokens.
        self._unguard = guard_logs([secret], (URL_TOKEN, FIELD_TOKEN), REDACTED_LOGGERS)
        self._apply_endpoints()
        intents = discord.Intents.none()
        intents.guilds = True  # channels (and whether they are NSFW); no privileged intents
        client = self._client = BrushClient(
            buttons=self.buttons, setup=self._setup, intents=intents,
            guild_ready_timeout=self._guild_ready_timeout, http_trace=self.transport.trace(),
        )  # fmt: skip
        self.transport.attach(client)
        self.service.register(self.transport)
        try:
            await client.login(secret)
        except discord.LoginFailure:
            await self.close()
            raise ConfigError("Discord refused DISCORD_TOKEN: check the bot token") from None
        except BaseException:
            await self.close()
            raise
        self._runner = asyncio.create_task(client.connect(reconnect=True), name="discord-gateway")
        ready = asyncio.create_task(client.wait_until_ready(), name="discord-ready")
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
        user = client.user
        _log.info(
            "Discord: connected as %s (%s), %d guild(s)", user, user.id if user else "?", len(client.guilds)
        )

    async def close(self) -> None:
        """Disconnect and restore discord.py's endpoints and loggers; unfinished jobs stay in the store."""
        self.transport.attach(None)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._runner is not None:
            with contextlib.suppress(BaseException):
                await self._runner
            self._runner = None
        self._client = None
        self._restore_endpoints()
        if self._unguard is not None:
            self._unguard()
            self._unguard = None

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

    async def _setup(self, client: BrushClient) -> None:
        """Called by discord.py after login: register buttons and commands, then sync them."""
        tree = client.tree
        commands = Commands(self.service, self.settings, self.buttons, self.vouched)
        for command in commands.build():
            tree.add_command(command)
        tree.add_command(commands.vary_menu())
        tree.add_command(admin_group(self.service, self.buttons, self.vouched))
        tree.error(self.errors.on_app_command_error)
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


__all__ = ["BrushClient", "DiscordAdapter"]
