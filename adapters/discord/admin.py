"""Discord admin commands: the ``/brush`` group (quota show|set|grant|reset, ban, unban, weight, stats).

Discord hides the group from members without Manage Server; the service checks again (``ADMIN_IDS``,
or ``DISCORD_ADMIN_PERMISSION`` held in the operator's server ``DISCORD_GUILD_ID`` when it is set),
before any lookup.
"""

from __future__ import annotations

from collections.abc import Callable

import discord
from discord import app_commands

from adapters.discord.buttons import Buttons
from adapters.discord.delivery import Interaction, user_ref
from bot import messages
from bot.service import Service

_TEXT = messages.DISCORD_ADMIN


def _who(member: discord.abc.User) -> str:
    return messages.who_text(member.display_name, user_ref(member).key)


def admin_group(
    service: Service, buttons: Buttons, vouched: Callable[[Interaction], bool]
) -> app_commands.Group:
    """The ``/brush`` group, its callbacks answering privately with ``bot.messages`` lines."""
    answer = buttons.answer
    brush = app_commands.Group(
        name="brush", description=_TEXT["brush"], default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )  # fmt: skip
    quota = app_commands.Group(name="quota", description=_TEXT["quota"], parent=brush)

    async def show(interaction: Interaction, user: discord.User) -> None:
        view = await service.admin_show(
            user_ref(interaction.user), user_ref(user), vouched=vouched(interaction)
        )
        text = messages.user_view_text(view)
        if not view.record.display_name:  # the store has not seen them draw yet
            text = f"{_who(user)}\n{text}"
        await answer(interaction, text)

    async def set_(interaction: Interaction, user: discord.User, credits: int | None = None) -> None:
        balance = await service.admin_set(
            user_ref(interaction.user), user_ref(user), credits, vouched=vouched(interaction)
        )
        await answer(interaction, messages.allowance_set_text(_who(user), credits, balance))

    async def grant(interaction: Interaction, user: discord.User, credits: int) -> None:
        balance = await service.admin_grant(
            user_ref(interaction.user), user_ref(user), credits, vouched=vouched(interaction)
        )
        await answer(interaction, messages.granted_text(_who(user), credits, balance))

    async def reset(interaction: Interaction, user: discord.User) -> None:
        balance = await service.admin_reset(
            user_ref(interaction.user), user_ref(user), vouched=vouched(interaction)
        )
        await answer(interaction, messages.usage_reset_text(_who(user), balance))

    async def ban(interaction: Interaction, user: discord.User) -> None:
        await service.admin_ban(
            user_ref(interaction.user), user_ref(user), True, vouched=vouched(interaction)
        )
        await answer(interaction, messages.ban_text(_who(user), True))

    async def unban(interaction: Interaction, user: discord.User) -> None:
        await service.admin_ban(
            user_ref(interaction.user), user_ref(user), False, vouched=vouched(interaction)
        )
        await answer(interaction, messages.ban_text(_who(user), False))

    async def weight(interaction: Interaction, user: discord.User, weight: float) -> None:
        record = await service.admin_weight(
            user_ref(interaction.user), user_ref(user), weight, vouched=vouched(interaction)
        )
        await answer(interaction, messages.weight_text(_who(user), record.weight))

    async def stats(interaction: Interaction) -> None:
        data = await service.stats(user_ref(interaction.user), vouched=vouched(interaction))
        await answer(interaction, "```\n" + messages.stats_text(data)[:1900] + "\n```")

    set_.__annotations__["credits"] = app_commands.Range[int, 0, 1_000_000]
    grant.__annotations__["credits"] = app_commands.Range[int, -1_000_000, 1_000_000]
    weight.__annotations__["weight"] = app_commands.Range[float, 0.01, 100.0]
    member = app_commands.describe(user=_TEXT["user"])
    quota.add_command(app_commands.Command(name="show", description=_TEXT["show"], callback=member(show)))
    quota.add_command(
        app_commands.Command(
            name="set", description=_TEXT["set"],
            callback=app_commands.describe(user=_TEXT["user"], credits=_TEXT["credits"])(set_),
        )
    )  # fmt: skip
    quota.add_command(
        app_commands.Command(
            name="grant", description=_TEXT["grant"],
            callback=app_commands.describe(user=_TEXT["user"], credits=_TEXT["bonus"])(grant),
        )
    )  # fmt: skip
    quota.add_command(app_commands.Command(name="reset", description=_TEXT["reset"], callback=member(reset)))
    brush.add_command(app_commands.Command(name="ban", description=_TEXT["ban"], callback=member(ban)))
    brush.add_command(app_commands.Command(name="unban", description=_TEXT["unban"], callback=member(unban)))
    brush.add_command(
        app_commands.Command(
            name="weight", description=_TEXT["weight"],
            callback=app_commands.describe(user=_TEXT["user"], weight=_TEXT["weight_value"])(weight),
        )
    )  # fmt: skip
    brush.add_command(app_commands.Command(name="stats", description=_TEXT["stats"], callback=stats))
    return brush


__all__ = ["admin_group"]
