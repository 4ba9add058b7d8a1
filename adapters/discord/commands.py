"""Discord slash commands for everyone: /draw, /credits, /jobs, /queue, /cancel, /help.

Each command turns the interaction into a core call; answers are private (ephemeral) lines from
``bot.messages``. ``/draw`` defers publicly first: the "thinking…" response is the job's
acknowledgement, later its status and finally its result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import discord
from discord import app_commands

from adapters.discord.buttons import Buttons, cancel_buttons
from adapters.discord.delivery import Interaction, defer_then, nsfw_allowed, user_ref
from adapters.discord.pictures import Vary, fetch
from bot import messages
from bot.config import Settings
from bot.domain import Ticket
from bot.errors import RequestError
from bot.grammar import (
    MAX_SEED,
    MAX_STRENGTH,
    MIN_STRENGTH,
    RawOptions,
    precheck_picture_request,
    split_flags,
)
from bot.service import Service

#: Discord's longest string option (the prompt option also holds --flags)
MAX_OPTION_STRING = 6000
#: typed /draw options and the grammar flag each one stands for
TYPED_FLAGS: Mapping[str, str] = {
    "negative": "no",
    "size": "size",
    "steps": "steps",
    "seed": "seed",
    "count": "n",
    "guidance": "cfg",
    "strength": "strength",
}
AnyCommand = app_commands.Command[Any, ..., None]


def merge_options(text: RawOptions, **typed: object) -> RawOptions:
    """Typed slash-command options on top of ``--flags`` written in the prompt; both for one is refused."""
    given = {name: value for name, value in typed.items() if value is not None}
    for name in given:
        if getattr(text, name) is not None:
            raise RequestError(
                f"--{TYPED_FLAGS[name]} is given twice: as the {name} option and in the prompt"
            )
    return replace(text, **given)  # type: ignore[arg-type]


def _description(name: str) -> str:
    return dict(messages.COMMAND_MENU)[name][:100]


class Commands:
    """Builds the public commands; each callback calls the service and answers privately."""

    def __init__(
        self, service: Service, settings: Settings, buttons: Buttons, vouched: Callable[[Interaction], bool]
    ) -> None:
        self.service = service
        self.settings = settings
        self.buttons = buttons
        self.vouched = vouched

    def build(self) -> list[AnyCommand]:
        # discord.py reads each callback's signature: local functions, not bound methods
        async def credits(interaction: Interaction) -> None:
            await self.credits(interaction)

        async def jobs(interaction: Interaction) -> None:
            await self.jobs(interaction)

        async def queue(interaction: Interaction) -> None:
            await self.queue(interaction)

        async def cancel(interaction: Interaction, job: str | None = None) -> None:
            await self.cancel(interaction, job)

        async def help_(interaction: Interaction) -> None:
            await self.help(interaction)

        return [
            app_commands.Command(
                name="draw", description=_description("draw"), callback=self._draw_command()
            ),
            app_commands.Command(name="credits", description=_description("credits"), callback=credits),
            app_commands.Command(name="jobs", description=_description("jobs"), callback=jobs),
            app_commands.Command(name="queue", description=_description("queue"), callback=queue),
            app_commands.Command(
                name="cancel",
                description=_description("cancel"),
                callback=app_commands.describe(job=messages.DRAW_OPTIONS["job"])(cancel),
            ),
            app_commands.Command(name="help", description=_description("help"), callback=help_),
        ]

    def vary_menu(self) -> app_commands.ContextMenu:
        """The "Vary this image" message command."""
        vary = Vary(self.service, self.buttons.expires)

        async def vary_message(interaction: Interaction, message: discord.Message) -> None:
            await vary(interaction, message)

        return app_commands.ContextMenu(name=messages.VARY_MENU, callback=vary_message)

    def _draw_command(self) -> Any:
        settings, profile = self.settings, self.service.profile

        async def draw(
            interaction: Interaction,
            prompt: str,
            negative: str | None = None,
            size: str | None = None,
            steps: int | None = None,
            seed: int | None = None,
            count: int | None = None,
            guidance: float | None = None,
            image: discord.Attachment | None = None,
            strength: float | None = None,
        ) -> None:
            await self.draw(
                interaction, prompt, image=image, negative=negative, size=size, steps=steps, seed=seed,
                count=count, guidance=guidance, strength=strength,
            )  # fmt: skip

        # Ranges and choices come from the settings and the model, so they are set at run time.
        draw.__annotations__.update(
            prompt=app_commands.Range[str, 1, MAX_OPTION_STRING],
            steps=app_commands.Range[int, 1, settings.max_steps],
            seed=app_commands.Range[int, 0, MAX_SEED],
            count=app_commands.Range[int, 1, settings.max_images],
            guidance=app_commands.Range[float, 0.0, profile.max_guidance],
            strength=app_commands.Range[float, MIN_STRENGTH, MAX_STRENGTH],
        )
        texts = {
            name: text.format(steps=profile.default_steps, guidance=profile.default_guidance)
            for name, text in messages.DRAW_OPTIONS.items()
            if name != "job"
        }
        callback: Any = app_commands.describe(**texts)(draw)
        if profile.sizes:
            choices = [
                app_commands.Choice(name=f"{name} ({w}x{h})", value=name)
                for name, (w, h) in list(profile.sizes.items())[:25]
            ]
            callback = app_commands.choices(size=choices)(callback)
        return callback

    async def draw(
        self, interaction: Interaction, prompt: str, *, image: discord.Attachment | None, **typed: object
    ) -> None:
        # Parsing is pure and fast, so a malformed request is refused before deferring, privately.
        service, user = self.service, interaction.user
        options = merge_options(split_flags(prompt), **typed)
        if image is None:
            request = service.build(options)
            await defer_then(
                interaction,
                lambda delivery: service.submit(
                    user_ref(user), request, delivery=delivery, user_name=user.display_name,
                    nsfw_allowed=nsfw_allowed(interaction),
                ),
                expires=self.buttons.expires(),
            )  # fmt: skip
            return
        precheck_picture_request(options, service.profile, service.limits)
        service.check_picture_size(image.size)

        async def submit(delivery: dict[str, Any]) -> Ticket:
            data = await fetch(service, image)  # after the deferral: a download may take seconds
            return await service.submit_picture(
                user_ref(user), options, data, delivery=delivery, user_name=user.display_name,
                nsfw_allowed=nsfw_allowed(interaction),
            )  # fmt: skip

        await defer_then(interaction, submit, expires=self.buttons.expires())

    async def credits(self, interaction: Interaction) -> None:
        balance = await self.service.credits(user_ref(interaction.user))
        await self.buttons.answer(
            interaction, messages.balance_text(balance, self.service.next_refill_text())
        )

    async def jobs(self, interaction: Interaction) -> None:
        entries = await self.service.my_jobs(user_ref(interaction.user))
        view = cancel_buttons([e.job for e in entries if e.job.state.cancellable])
        await self.buttons.answer(interaction, messages.jobs_text(entries), view)

    async def queue(self, interaction: Interaction) -> None:
        await self.buttons.answer(interaction, messages.queue_text(self.service.queue_view()))

    async def cancel(self, interaction: Interaction, job: str | None = None) -> None:
        await self.buttons.cancel(interaction, job.strip() if job else None)

    async def help(self, interaction: Interaction) -> None:
        admin = self.service.is_admin(user_ref(interaction.user), vouched=self.vouched(interaction))
        sizes = list(self.service.profile.sizes)
        await self.buttons.answer(interaction, messages.help_text("discord", admin=admin, sizes=sizes))


__all__ = ["MAX_OPTION_STRING", "TYPED_FLAGS", "Commands", "merge_options"]
