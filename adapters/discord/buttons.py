"""Discord buttons and the Edit form: custom ids that carry only the job id, the views, and what a press does.

Button custom ids are ``bb:<action>:<job id>`` and the Edit form's is ``bb:editform:<job id>``;
every press reads the job from the service, never from memory, so buttons and forms opened
before a restart keep working after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import discord

from adapters.discord.delivery import Interaction, defer_then, nsfw_allowed, user_ref
from adapters.discord.errors import ErrorHook
from adapters.discord.text import inert
from bot import messages
from bot.domain import VARY_STRONG, VARY_SUBTLE, Job
from bot.grammar import RawOptions, split_flags
from bot.service import Service

CUSTOM_ID = r"bb:(?P<action>reroll|edit|info|delete|cancel|subtle|strong):(?P<job>[0-9a-f]{1,32})"
CUSTOM_ID_RE = re.compile(CUSTOM_ID)
EDIT_FORM = re.compile(r"bb:editform:(?P<job>[0-9a-f]{1,32})")
RESULT_ACTIONS = ("reroll", "edit", "subtle", "strong", "info", "delete")
#: the Vary buttons' strengths
VARY = {"subtle": VARY_SUBTLE, "strong": VARY_STRONG}
_STYLES: Mapping[str, discord.ButtonStyle] = {
    "reroll": discord.ButtonStyle.primary,
    "edit": discord.ButtonStyle.secondary,
    "info": discord.ButtonStyle.secondary,
    "delete": discord.ButtonStyle.danger,
    "cancel": discord.ButtonStyle.danger,
    "subtle": discord.ButtonStyle.secondary,
    "strong": discord.ButtonStyle.secondary,
}


class JobButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=CUSTOM_ID):
    """A job button whose custom id carries the action and the job id, so it survives restarts."""

    def __init__(self, action: str, job_id: str, *, label: str | None = None) -> None:
        super().__init__(
            discord.ui.Button(
                label=label or messages.BUTTONS[action],
                style=_STYLES[action],
                custom_id=f"bb:{action}:{job_id}",
            )
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        return cls(match["action"], match["job"])

    async def callback(self, interaction: Interaction) -> None:
        """Nothing: every press is handled once, by its custom id, in ``BrushClient.on_interaction``
        (views discord.py keeps for the messages it sent must not handle it a second time)."""


def view_of(*buttons: JobButton) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(button)
    return view


def status_view(job_id: str) -> discord.ui.View:
    """The status message's buttons while a job is queued or running."""
    return view_of(JobButton("cancel", job_id))


def result_view(job_id: str) -> discord.ui.View:
    """The buttons under a delivered result."""
    return view_of(*(JobButton(action, job_id) for action in RESULT_ACTIONS))


def cancel_buttons(jobs: list[Job]) -> discord.ui.View | None:
    """One Cancel button per unfinished job (``/jobs``), at most 25."""
    buttons = [JobButton("cancel", j.id, label=messages.cancel_button_text(j)) for j in jobs[:25]]
    return view_of(*buttons) if buttons else None


class EditModal(discord.ui.Modal):
    """Change a job's prompt and draw again; the submit is handled from its custom id (restart-safe)."""

    def __init__(self, job: Job, max_chars: int) -> None:
        form = messages.EDIT_FORM
        super().__init__(title=form["title"], custom_id=f"bb:editform:{job.id}", timeout=15 * 60)
        limit = min(4000, max_chars + 200)  # room for --flags after the prompt
        self.add_item(
            discord.ui.TextInput(
                label=form["prompt"], style=discord.TextStyle.paragraph, custom_id="prompt",
                default=job.request.prompt[:limit], max_length=limit, required=True,
            )
        )  # fmt: skip
        self.add_item(
            discord.ui.TextInput(
                label=form["negative"], style=discord.TextStyle.short, custom_id="negative",
                default=job.request.negative_prompt[:1000] or None, max_length=1000, required=False,
            )
        )  # fmt: skip


def modal_values(data: object) -> dict[str, str]:
    """Text input values of a modal submit, by custom id (rows or labels, any nesting)."""
    values: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "custom_id" in node and "value" in node:
                values[str(node["custom_id"])] = str(node["value"] or "")
            for key in ("components", "component"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data.get("components") if isinstance(data, dict) else None)
    return values


def edited_options(old: Job, values: Mapping[str, str]) -> RawOptions:
    """The edited prompt with the old job's settings and first seed, unless its flags say otherwise."""
    text = split_flags(values.get("prompt", ""))
    negative = values.get("negative", "").strip() or None
    r = old.request
    return RawOptions(
        prompt=text.prompt,
        negative=text.negative if text.negative is not None else negative,
        size=text.size if text.size is not None or text.ar is not None else f"{r.width}x{r.height}",
        ar=text.ar,
        steps=text.steps if text.steps is not None else r.steps,
        seed=text.seed if text.seed is not None else (old.seeds[0] if old.seeds else r.seed),
        count=text.count if text.count is not None else r.count,
        guidance=text.guidance if text.guidance is not None else r.guidance,
    )


@dataclass(slots=True)
class Buttons:
    """What a press of one of our buttons (or a submit of the Edit form) does."""

    service: Service
    errors: ErrorHook
    vouched: Callable[[Interaction], bool]
    expires: Callable[[], float]  # when a new interaction token should no longer be used
    max_prompt_chars: int

    async def pressed(self, interaction: Interaction, action: str, job_id: str) -> None:
        await self.errors.guard(interaction, self._press(interaction, action, job_id))

    async def edit_submitted(self, interaction: Interaction, job_id: str) -> None:
        await self.errors.guard(interaction, self._edit_submit(interaction, job_id))

    async def answer(self, interaction: Interaction, text: str, view: discord.ui.View | None = None) -> None:
        """An ephemeral answer (or follow-up when the interaction was deferred)."""
        text = inert(text)[:2000]
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, view=view or discord.utils.MISSING)
        else:
            await interaction.response.send_message(text, ephemeral=True, view=view or discord.utils.MISSING)

    async def cancel(self, interaction: Interaction, job_id: str | None) -> None:
        """Cancel a job (the caller's newest without an id) and say so, privately."""
        if not interaction.response.is_done():  # a button press; the command was deferred already
            await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.service.cancel(user_ref(interaction.user), job_id, vouched=self.vouched(interaction))
        await interaction.followup.send(inert(messages.cancel_text(job)), ephemeral=True)

    async def _press(self, interaction: Interaction, action: str, job_id: str) -> None:
        service, user = self.service, interaction.user
        actor = user_ref(user)
        # a forged custom id naming a job of another channel must not show or redraw it there;
        # cancel is exempt: /jobs lists your own jobs (with cancel buttons) in any channel
        if action != "cancel" and not self._same_channel(await service.job(job_id), interaction):
            await self.answer(interaction, messages.NOT_THIS_CHAT)
            return
        if action == "info":
            await self.answer(interaction, messages.info_text(await service.job(job_id)))
        elif action == "cancel":
            await self.cancel(interaction, job_id)
        elif action == "delete":
            await service.authorize_delete(actor, job_id, vouched=self.vouched(interaction))
            await interaction.response.defer()  # acknowledges the click without a new message
            await interaction.delete_original_response()  # the message the button is on
        elif action in VARY:
            await defer_then(
                interaction,
                lambda delivery: service.vary(
                    actor, job_id, VARY[action], delivery=delivery, user_name=user.display_name,
                    nsfw_allowed=nsfw_allowed(interaction),
                ),
                expires=self.expires(),
            )  # fmt: skip
        elif action == "reroll":
            await defer_then(
                interaction,
                lambda delivery: service.reroll(
                    actor, job_id, delivery=delivery, user_name=user.display_name,
                    nsfw_allowed=nsfw_allowed(interaction),
                ),
                expires=self.expires(),
            )  # fmt: skip
        elif action == "edit":
            job = await service.job(job_id)
            await interaction.response.send_modal(EditModal(job, self.max_prompt_chars))

    @staticmethod
    def _same_channel(job: Job, interaction: Interaction) -> bool:
        return str(job.delivery.get("channel_id")) == str(interaction.channel_id)

    async def _edit_submit(self, interaction: Interaction, job_id: str) -> None:
        old = await self.service.job(job_id)
        if not self._same_channel(old, interaction):
            await self.answer(interaction, messages.NOT_THIS_CHAT)
            return
        request = self.service.build(edited_options(old, modal_values(interaction.data)))
        user = interaction.user
        await defer_then(
            interaction,
            lambda delivery: self.service.submit(
                user_ref(user), request, delivery=delivery, user_name=user.display_name,
                nsfw_allowed=nsfw_allowed(interaction),
            ),
            expires=self.expires(),
        )  # fmt: skip


__all__ = [
    "CUSTOM_ID", "CUSTOM_ID_RE", "EDIT_FORM", "VARY", "Buttons", "EditModal", "JobButton", "cancel_buttons", "edited_options",
    "modal_values", "result_view", "status_view", "view_of",
]  # fmt: skip
