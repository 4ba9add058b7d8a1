"""Telegram admin commands: /quota, /ban, /unban, /weight, /stats (the service checks the rights)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from telegram import Message, Update
from telegram.ext import ContextTypes

from adapters.telegram.commands import Commands
from adapters.telegram.delivery import PLATFORM, display_name, user_ref
from bot import messages
from bot.domain import UserRef
from bot.errors import NotFoundError, RequestError

ADMIN_COMMANDS = messages.ADMIN_MENU

NUMERIC_ID = re.compile(r"\d{1,20}")
_USERNAME = re.compile(r"@?[A-Za-z][A-Za-z0-9_]{2,31}")
_Context = ContextTypes.DEFAULT_TYPE


class AdminCommands(Commands):
    """The admin commands; refused before any lookup, so non-admins learn nothing."""

    def _admin(self, update: Update) -> UserRef:
        assert update.effective_user is not None
        actor = user_ref(update.effective_user)
        self.service.require_admin(actor)
        return actor

    async def _target(
        self, message: Message, args: Sequence[str], values: int, usage: str
    ) -> tuple[UserRef, str, list[str]]:
        """The target user, how to name them, and the remaining values: ``<user> values...`` or a reply."""
        if len(args) == values + 1:
            token, rest = args[0], list(args[1:])
            if NUMERIC_ID.fullmatch(token):
                target = UserRef(platform=PLATFORM, id=token)
                return target, target.key, rest
            if _USERNAME.fullmatch(token):
                found = await self.service.find_user(PLATFORM, token)
                if found is None:
                    raise NotFoundError(messages.not_seen_text(token))
                return found, messages.who_text(token, found.key), rest
            raise RequestError(messages.not_a_user_text(token, usage))
        replied = message.reply_to_message
        if len(args) == values and replied is not None and replied.from_user is not None:
            person = replied.from_user
            if person.is_bot:
                raise RequestError(messages.REPLY_TO_A_PERSON)
            target = user_ref(person)
            return target, messages.who_text(display_name(person), target.key), list(args)
        raise RequestError(messages.usage_text(usage))

    async def quota(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        args = list(context.args or [])
        usage = "/quota show|set|grant|reset <user> [credits]"
        sub = args[0].lower() if args else ""
        needs = {"show": 0, "reset": 0, "set": 1, "grant": 1}
        if sub not in needs:
            raise RequestError(messages.usage_text(usage))
        target, who, values = await self._target(
            message, args[1:], needs[sub], f"/quota {sub} <user>" + (" <credits>" if needs[sub] else "")
        )
        svc = self.service
        if sub == "show":
            self.answer(update, messages.user_view_text(await svc.admin_show(actor, target)))
            return
        if sub == "reset":
            self.answer(update, messages.usage_reset_text(who, await svc.admin_reset(actor, target)))
            return
        raw = values[0]
        amount: int | None
        if sub == "set" and raw.lower() in ("default", "none"):
            amount = None
        elif re.fullmatch(r"[+-]?\d{1,9}", raw):
            amount = int(raw)
        else:
            raise RequestError(messages.not_a_number_text(raw, "credits"))
        if sub == "set":
            self.answer(
                update, messages.allowance_set_text(who, amount, await svc.admin_set(actor, target, amount))
            )
        else:
            assert amount is not None
            self.answer(
                update, messages.granted_text(who, amount, await svc.admin_grant(actor, target, amount))
            )

    async def _ban_or_unban(self, update: Update, context: _Context, banned: bool) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        verb = "ban" if banned else "unban"
        target, who, _ = await self._target(message, list(context.args or []), 0, f"/{verb} <user>")
        await self.service.admin_ban(actor, target, banned)
        self.answer(update, messages.ban_text(who, banned))

    async def ban(self, update: Update, context: _Context) -> None:
        await self._ban_or_unban(update, context, True)

    async def unban(self, update: Update, context: _Context) -> None:
        await self._ban_or_unban(update, context, False)

    async def weight(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        target, who, values = await self._target(
            message, list(context.args or []), 1, "/weight <user> <weight>"
        )
        try:
            weight = float(values[0])
        except ValueError:
            raise RequestError(messages.not_a_number_text(values[0], "weight")) from None
        record = await self.service.admin_weight(actor, target, weight)
        self.answer(update, messages.weight_text(who, record.weight))

    async def stats(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        self.answer(update, messages.stats_text(await self.service.stats(actor)))
