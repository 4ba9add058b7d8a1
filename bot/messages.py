"""User-facing text, shared by every adapter: tickets, progress bars, captions, balances, queues.

Plain text with no platform markup, so each adapter can send it as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from bot.domain import Balance, Job, JobState, LedgerEntry, Progress, QueueEntry, QueueView, Ticket, UserView
from bot.errors import NoCreditsError

HELP = """brushbot draws pictures on the operator's GPU.

/draw <prompt> [flags]  draw a picture; flags go after the prompt:
  --ar 16:9         aspect ratio (or --size 768x1024, or square / portrait / landscape / wide)
  --seed 42         reproduce an image (each image of a batch gets seed, seed+1, ...)
  --steps 8         denoising steps
  --n 2             number of images
  --no blurry, text negative prompt (needs --cfg above 0 on Z-Image)
  --cfg 1.5         guidance scale (above 0 doubles the GPU time)
  --strength 0.6    with a picture: how far from it to go (0.05 close to it … 1 almost new)
/credits  your credits    /jobs  your jobs    /queue  who is waiting    /cancel <job>  cancel a job
Credits: 1 credit = one image at the default size and steps; bigger or longer images cost more."""


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``."""
    total = max(0, math.ceil(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def bar(fraction: float, width: int = 12) -> str:
    """A text progress bar: ``[██████░░░░░░] 50%``."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return f"[{'█' * filled}{'░' * (width - filled)}] {round(fraction * 100)}%"


def settings_line(job: Job) -> str:
    r = job.request
    seeds = ", ".join(str(s) for s in job.seeds)
    line = f"{r.width}x{r.height} · {r.steps} steps · cfg {r.guidance:g} · seed {seeds} · {job.model}"
    if r.strength is not None:  # drawn from a picture
        line += f" · strength {r.strength:g}"
    return line


def credits_text(cost: int, left: int | None) -> str:
    if left is None:
        return f"cost {cost} credit(s) (unlimited)" if cost else "free"
    return f"cost {cost} credit(s), {left} left"


def ticket_text(ticket: Ticket) -> str:
    """The status shown right after a submit."""
    job = ticket.job
    where = "next in line" if ticket.position == 0 else f"position {ticket.position + 1} in the queue"
    lines = [
        f"Queued job {job.id}: {where}, about {duration(ticket.eta_seconds + job.gpu_seconds)} to go",
        f"{settings_line(job)} · {credits_text(ticket.credits_cost, ticket.credits_left)}",
    ]
    lines.extend(f"Note: {note}" for note in job.request.notes)
    return "\n".join(lines)


def progress_text(job: Job, progress: Progress) -> str:
    return f"Drawing job {job.id} {bar(progress.fraction)} step {progress.step}/{progress.total}"


def caption(job: Job, seconds: float | None = None, *, limit: int = 1024) -> str:
    """Caption for a delivered image: prompt, seeds, settings, model and time, within ``limit`` chars."""
    took = f" · {seconds:.1f}s" if seconds is not None else ""
    tail = f"\n{settings_line(job)}{took}"
    if job.request.negative_prompt:
        tail = f"\nNegative: {job.request.negative_prompt[:200]}" + tail
    room = limit - len(tail)
    prompt = job.request.prompt
    if len(prompt) > room:
        prompt = prompt[: max(0, room - 1)] + "…"
    return (prompt + tail)[:limit]


def job_seconds(job: Job, now: float | None = None) -> float | None:
    """Seconds from start to finish (or to ``now`` while delivering)."""
    if job.started_at is None:
        return None
    end = job.finished_at if job.finished_at is not None else now
    return None if end is None else max(0.0, end - job.started_at)


def cancel_text(job: Job) -> str:
    """The answer to a cancel: done at once for a queued job, refunded when a running one stops.

    A cancel answered "stopping" is always honoured: a result drawn after it is thrown away.
    """
    if job.state is JobState.CANCELLED:
        return f"Cancelled job {job.id}." + ("" if job.free else f" {job.credits} credit(s) refunded.")
    if job.free:
        return f"Stopping job {job.id}."
    return f"Stopping job {job.id}; its credits are refunded when it stops."


def too_late_text(job: Job) -> str:
    """The answer to a cancel that came after the result was drawn and already on its way (or sent)."""
    charged = "" if job.free else f"; its {job.credits} credit(s) stay charged"
    if job.state is JobState.DELIVERED:
        return f"too late to cancel job {job.id}: it was already delivered{charged}"
    if job.state is JobState.DELIVERING:
        return f"too late to cancel job {job.id}: it is already done and being delivered{charged}"
    return f"job {job.id} has already finished ({job.state.value})"


def no_longer_fits_text(reason: str) -> str:
    """A stored request (a reroll's, a variation's, a resumed job's) over today's limits or model."""
    return f"its settings no longer fit this bot ({reason.rstrip('.')})"


def not_again_text(job: Job, reason: str) -> str:
    """A reroll or variation refused because the old job's settings no longer fit."""
    return f"job {job.id} cannot be drawn again: {reason}"


def model_changed_text(job: Job, model: str) -> str:
    """A job resumed after a restart that was asked of another model."""
    return f"it was asked of the model {job.model}, and the bot now runs {model}"


def balance_text(balance: Balance, refill: str) -> str:
    if balance.unlimited:
        return "You are an admin: drawing is free and unlimited for you."
    left = balance.available
    text = f"You have {left} credit(s) left: {max(0, balance.allowance - balance.used)} of your {balance.allowance} for this period"
    if balance.bonus:
        text += f" + {balance.bonus} bonus"
    return text + f". Refills at {refill}."


def jobs_text(entries: Sequence[QueueEntry]) -> str:
    if not entries:
        return "You have no jobs yet. Try /draw a red fox in snow"
    lines = []
    for e in entries:
        job = e.job
        if e.running:
            state = "drawing" + (f" {bar(e.progress.fraction, 8)}" if e.progress else "")
        elif job.state.value == "queued":
            state = f"queued, position {e.position + 1}, about {duration(e.eta_seconds)}"
        else:
            state = job.state.value
        lines.append(f"{job.id} · {state} · {job.request.prompt[:60]}")
    return "\n".join(lines)


def queue_text(view: QueueView) -> str:
    if not view.entries:
        return "The queue is empty: the GPU is waiting for you."
    lines = [f"{view.total_queued} job(s) waiting from {view.users_waiting} user(s)"]
    for e in view.entries:
        who = e.job.user_name or e.job.user.key
        if e.running:
            prog = f" {bar(e.progress.fraction, 8)}" if e.progress else ""
            lines.append(f"▶ {who} · {e.job.request.count} image(s){prog}")
        else:
            lines.append(
                f"{e.position}. {who} · {e.job.request.count} image(s) · in about {duration(e.eta_seconds)}"
            )
    return "\n".join(lines)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%m-%d %H:%M")


def ledger_line(entry: LedgerEntry) -> str:
    parts = [_when(entry.at), entry.kind.value, f"{entry.amount:+d}"]
    if entry.job_id:
        parts.append(f"job {entry.job_id}")
    if entry.actor:
        parts.append(f"by {entry.actor}")
    if entry.note:
        parts.append(entry.note)
    return " · ".join(parts)


def user_view_text(view: UserView) -> str:
    r, b = view.record, view.balance
    flags = []
    if r.banned:
        flags.append("BANNED")
    if r.weight != 1:
        flags.append(f"weight {r.weight:g}")
    allowance = "default" if r.allowance is None else str(r.allowance)
    head = (
        f"{r.display_name or r.user.key} ({r.user.key}){' · ' + ', '.join(flags) if flags else ''}\n"
        f"{b.available} available · used {b.used}/{b.allowance} this period ({allowance}) · bonus {b.bonus}"
    )
    history = "\n".join(ledger_line(e) for e in view.history) or "no history"
    return f"{head}\n{history}"


def worker_line(state: str, job_id: str | None, images: int, seconds: float) -> str:
    """One worker in the stats: ``drawing job 1a2b3c · 12 images · 1.40 s/image``."""
    doing = f"drawing job {job_id}" if job_id is not None and state == "drawing" else state
    speed = f" · {seconds / images:.2f} s/image" if images else ""
    return f"{doing} · {images} image{'s' if images != 1 else ''}{speed}"


def stats_text(stats: dict[str, object]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in stats.items())


def info_text(job: Job) -> str:
    r = job.request
    lines = [
        f"Job {job.id} by {job.user_name or job.user.key} · {job.state.value}",
        f"Prompt: {r.prompt}",
    ]
    if r.negative_prompt:
        lines.append(f"Negative: {r.negative_prompt}")
    lines.append(settings_line(job))
    lines.append(f"{r.count} image(s) · {job.credits} credit(s)" + (" (free)" if job.free else ""))
    took = job_seconds(job)
    if took is not None:
        lines.append(f"Took {took:.1f}s")
    if job.error:
        lines.append(f"Error: {job.error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- a job's end, the board

RESUMED = "Resumed after a restart."
SHUTTING_DOWN = "the bot is restarting, so nothing was queued; try again in a minute"
SAVE_FAILED = "the bot could not save the picture (its disk is full or not writable); try again later"
RECORD_FAILED = "the bot could not record the finished picture in its database; try again later"
NOTHING_TO_CANCEL = "you have no queued or running job; /jobs lists your jobs"
NO_WORKERS = "no image generator is running (every GPU worker failed to start); nothing was queued"
WORKERS_GONE = "no image generator is left to draw this (every GPU worker failed to start)"
POISON_JOB = "this request stopped the image generator twice, so it was not tried again"


def ended_text(job: Job, error: str) -> str:
    """How an undelivered job ended, with its refund: the same sentence on every platform."""
    what = "was cancelled" if job.state is JobState.CANCELLED else "failed"
    refund = "" if job.free else f" Your {job.credits} credit(s) were refunded."
    return f"Job {job.id} {what}: {error.rstrip('.')}.{refund}"


def short(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: max(0, limit - 1)] + "…"


def board_text(
    drawing: Sequence[tuple[Job, Progress | None]],
    waiting: Sequence[tuple[Job, int, float]],
    *,
    shown: int = 10,
) -> str:
    """A busy chat's live queue board: what is drawing and who waits; results come as replies."""
    total = len(drawing) + len(waiting)
    lines = [f"🎨 brushbot · {total} job(s) for this chat"]
    for job, progress in drawing:
        prog = f" {bar(progress.fraction, 8)}" if progress is not None else ""
        lines.append(f"▶ {job.user_name or job.user.id}: {short(job.request.prompt, 40)}{prog}")
    for n, (job, position, eta) in enumerate(waiting):
        if n >= shown:
            lines.append(f"… and {len(waiting) - shown} more")
            break
        lines.append(
            f"{position + 1}. {job.user_name or job.user.id}: {short(job.request.prompt, 40)}"
            f" · in about {duration(eta)}"
        )
    lines.append("Each picture arrives as a reply to its /draw. /cancel stops your newest job.")
    return "\n".join(lines)


# ---------------------------------------------------------------------- errors

GENERIC_ERROR = "Something went wrong on our side; the operator can find the details in the log."
NOT_ENABLED_HERE = "brushbot is not enabled in this chat"
OUT_OF_DATE_COMMAND = "That command is out of date; try again in a minute."
SERVER_ONLY = "That command only works in a server."
NOT_ALLOWED_HERE = "You may not use that command here."


def sentence(text: str) -> str:
    """One line for the chat, starting with a capital letter."""
    line = " ".join(text.split())
    return line[:1].upper() + line[1:]


def error_text(error: Exception, refill: str) -> str:
    """The one line a user reads for a core error (a refusal names when credits refill)."""
    text = sentence(str(error)) or "Something went wrong."
    if isinstance(error, NoCreditsError):
        text = f"{text.rstrip('.')}. Credits refill at {refill}."
    return text


def bad_value_text(kind: str) -> str:
    return f"That value is not valid for {kind} options."


# ---------------------------------------------------------------------- answers to commands and buttons

START = "Hi! I draw pictures on the operator's GPU."
CONSOLE_GREETING = "brushbot console — type /help, or /draw a red fox in snow"
#: button labels, by action
BUTTONS = {
    "cancel": "✖ Cancel",
    "reroll": "🎲 Reroll",
    "png": "🖼 Original PNG",
    "delete": "🗑 Delete",
    "edit": "✏️ Edit",
    "info": "ℹ️ Info",
    "subtle": "🌱 Vary (subtle)",
    "strong": "🌀 Vary (strong)",
}
#: the Discord message command that draws from a message's picture
VARY_MENU = "Vary this image"
NO_PICTURE_IN_MESSAGE = "that message has no PNG, JPEG or WebP picture to draw from"
NO_PROMPT_FOR_PICTURE = (
    "that message has no text to use as the prompt: use /draw with its picture as the image option"
)
#: the command menu a platform shows (name, description); admins see the admin part too
COMMAND_MENU: tuple[tuple[str, str], ...] = (
    ("draw", "Draw a picture: /draw a red fox in snow --ar 16:9"),
    ("credits", "Your credits and when they refill"),
    ("jobs", "Your queued, running and recent jobs"),
    ("queue", "Who is waiting for the GPU"),
    ("cancel", "Cancel a job: /cancel [job id]"),
    ("help", "How to draw, flags and credits"),
)
ADMIN_MENU: tuple[tuple[str, str], ...] = (
    ("quota", "Admin: /quota show|set|grant|reset <user> [credits]"),
    ("ban", "Admin: /ban <user>"),
    ("unban", "Admin: /unban <user>"),
    ("weight", "Admin: /weight <user> <weight>"),
    ("stats", "Admin: jobs, queue and speed"),
)
UNKNOWN_COMMAND = "unknown command {command}: try /help"
#: the form a Discord Edit button opens
EDIT_FORM = {
    "title": "Edit and draw again",
    "prompt": "Prompt (--flags allowed)",
    "negative": "Negative prompt",
}
#: what Discord shows for each /draw option, by option name
DRAW_OPTIONS = {
    "prompt": "what to draw; --flags such as --ar 16:9 --seed 42 work here too",
    "negative": "what to avoid (needs guidance above 0 on some models)",
    "size": "picture shape",
    "steps": "denoising steps (default {steps})",
    "seed": "reproduce an image: each image of a batch gets seed, seed+1, ...",
    "count": "number of images",
    "guidance": "guidance scale (default {guidance:g}; above 0 doubles the GPU time)",
    "image": "a picture to start from (PNG, JPEG or WebP)",
    "strength": "with a picture: how far from it to go (0.05 close to it … 1 almost new)",
    "job": "the job id shown in its status (default: your newest job)",
}
#: Discord's admin group (/brush ...): name, description, and option descriptions
DISCORD_ADMIN = {
    "brush": "brushbot administration",
    "quota": "Users' credits",
    "show": "A user's credits and history",
    "set": "Set a user's allowance per period (leave credits empty for the default)",
    "grant": "Give (or take) bonus credits",
    "reset": "Reset this period's usage",
    "ban": "Stop a user from drawing",
    "unban": "Let a banned user draw again",
    "weight": "A user's share of the GPU when several wait (default 1)",
    "stats": "Jobs, queue and speed",
    "user": "the member",
    "credits": "credits per period",
    "bonus": "bonus credits, may be negative",
    "weight_value": "0.01 to 100",
}
PNG_SENT = "Original PNG sent"
NOT_THIS_CHAT = "That button belongs to a job of another chat"
DELETED = "Deleted"
CANCELLED = "Cancelled"
STOPPING = "Stopping…"


def cancel_button_text(job: Job) -> str:
    """A Cancel button that names its job (``/jobs`` on Discord lists several)."""
    return f"{BUTTONS['cancel']} {job.id}"


def rerolling_text(job: Job) -> str:
    return f"Rerolling as job {job.id}"


def varying_text(job: Job) -> str:
    return f"Varying as job {job.id} (strength {job.request.strength:g})"


def original_caption(job: Job) -> str:
    return f"Original PNG of job {job.id} · seed {job.seeds[0]}"


def album_keyboard_text(job: Job, count: int) -> str:
    return f"Job {job.id}: {count} images for {job.user_name or 'you'}"


def reencoded_note(formats: Sequence[str]) -> str:
    return f"\n(sent as {'/'.join(formats)} to fit the upload limit; the PNG is kept on the server)"


def moved_text(job: Job, link: str) -> str:
    return f"Job {job.id} is done: {link}"


def no_images_yet(job: Job) -> str:
    return f"job {job.id} has no images yet"


def originals_gone(job: Job) -> str:
    return f"the original files of job {job.id} are no longer on the server"


# ---------------------------------------------------------------------- admin answers


def who_text(name: str, key: str) -> str:
    return f"{name} ({key})" if name and name != key else key


def admin_balance_text(who: str, balance: Balance) -> str:
    return (
        f"{who}: {balance.available} credit(s) available · used {balance.used} of {balance.allowance} "
        f"this period · bonus {balance.bonus}"
    )


def allowance_set_text(who: str, amount: int | None, balance: Balance) -> str:
    shown = "the default" if amount is None else str(amount)
    return f"Allowance set to {shown}. " + admin_balance_text(who, balance)


def granted_text(who: str, amount: int, balance: Balance) -> str:
    return f"Granted {amount:+d}. " + admin_balance_text(who, balance)


def usage_reset_text(who: str, balance: Balance) -> str:
    return "Usage reset. " + admin_balance_text(who, balance)


def ban_text(who: str, banned: bool) -> str:
    return f"{who} is banned from drawing." if banned else f"{who} may draw again."


def weight_text(who: str, weight: float) -> str:
    return f"{who} now has weight {weight:g} in the fair queue."


def not_seen_text(token: str) -> str:
    return f"I have not seen {token} yet: use their numeric id or reply to one of their messages"


def not_a_user_text(token: str, usage: str) -> str:
    return f"{token[:40]} is not a user: use a numeric id or @username. Usage: {usage}"


def usage_text(usage: str) -> str:
    return f"usage: {usage}"


REPLY_TO_A_PERSON = "reply to a message of a person, not of a bot"


def not_a_number_text(raw: str, what: str) -> str:
    examples = {"credits": "a whole number of credits", "weight": "a number: a weight is like 0.5, 1 or 2"}
    return f"{raw[:20]} is not {examples.get(what, what)}"


# ---------------------------------------------------------------------- help

ADMIN_HELP = {
    "telegram": """Admin commands (a user is a numeric id, an @username the bot has seen, or a replied-to message):
/quota show <user>    /quota set <user> <credits|default>    /quota grant <user> <credits>
/quota reset <user>    /ban <user>    /unban <user>    /weight <user> <weight>    /stats""",
    "discord": "Admin: /brush quota show|set|grant|reset, /brush ban|unban, /brush weight, /brush stats",
    "console": "Admin: /stats",
}

PLATFORM_HELP = {
    "discord": (
        "On Discord the /draw options do the same as the flags (size: {sizes}). Under each picture: "
        "Reroll (same settings, new seed), Edit (change the prompt), Vary (subtle or strong), Info, Delete. "
        "Draw from a picture with /draw's image option, or with Apps → Vary this image on any message. "
        "A job that finishes after 15 minutes is posted in the channel with a mention."
    ),
    "telegram": (
        "Under each picture: Reroll (same settings, new seed), Original PNG, Delete. "
        "In a busy group one queue board shows who waits, and each picture arrives as a reply to its /draw."
    ),
    "console": "/quit  leave the console",
}


def help_text(platform: str, *, admin: bool, sizes: Sequence[str] = ()) -> str:
    """``/help`` for a platform: the shared part, the platform's notes, and the admin part for admins."""
    parts = [HELP]
    extra = PLATFORM_HELP.get(platform)
    if extra:
        parts.append(extra.format(sizes=", ".join(sizes) or "WxH"))
    if admin and platform in ADMIN_HELP:
        parts.append(ADMIN_HELP[platform])
    return "\n\n".join(parts)


def saved_text(job: Job, paths_and_seeds: Sequence[tuple[str, int]], seconds: float | None) -> str:
    """The console's result: where each image was saved."""
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    lines = [f"Job {job.id} done{took}:"]
    lines += [f"  {path}  (seed {seed})" for path, seed in paths_and_seeds]
    return "\n".join(lines)
