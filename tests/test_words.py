"""Blocked and NSFW words cannot be slipped past with Unicode: a bypass corpus, and what must still pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import RequestError
from bot.words import find_blocked, fold
from tests.test_service import ALICE, Harness

WORDS = ["gore", "血腥"]

#: each hides "gore" (or 血腥) from a plain case-insensitive search
BYPASSES = [
    "GORE",
    "GoRe",
    "go\u200bre",  # zero-width space
    "g\u200co\u200dre",  # zero-width non-joiner, joiner
    "go\u2060re",  # word joiner
    "\ufeffgore",  # byte-order mark
    "go\u00adre",  # soft hyphen
    "\u202egore\u202c",  # bidi override
    "go\u200ere",  # left-to-right mark
    "ｇｏｒｅ",  # fullwidth
    "𝐠𝐨𝐫𝐞",  # mathematical bold
    "𝔤𝔬𝔯𝔢",  # fraktur
    "ⓖⓞⓡⓔ",  # circled
    "gᵒre",  # modifier letter
    "gőre",  # an accent
    "go\u0301re",  # a combining accent
    "g\u034fore",  # combining grapheme joiner
    "gore\ufe0f",  # variation selector
    "a\u200bgore",  # zero-width space as a word separator
    "_gore_",
    "血\u200b腥",
    "血\u2060腥的",
]

#: must not be refused
CLEAN = ["gorgeous sunset", "ignore the rain", "a gored… no: a goreless", "gorex", "血液", "ﬁsh"]


@pytest.mark.parametrize("text", BYPASSES)
def test_bypass_corpus_is_caught(text: str) -> None:
    assert find_blocked(f"a picture of {text} tonight", WORDS) in WORDS


@pytest.mark.parametrize("text", CLEAN)
def test_innocent_words_pass(text: str) -> None:
    assert find_blocked(text, WORDS) is None


def test_the_operators_words_are_folded_too() -> None:
    assert find_blocked("some gore", ["ＧＯＲＥ"]) == "ＧＯＲＥ"
    assert find_blocked("some gore", ["go\u200bre"]) == "go\u200bre"
    assert find_blocked("anything", ["", "  "]) is None


def test_fold() -> None:
    assert fold("ＡＢ\u200bC") == "abc"
    assert fold("a\u200bb", joiner=" ") == "a b"


async def test_service_refuses_a_disguised_word_and_queues_nothing(tmp_path: Path) -> None:
    harness = Harness(tmp_path, blocked_words="gore", nsfw_words="nude")
    await harness.open()
    try:
        with pytest.raises(RequestError, match="blocked word"):
            await harness.draw(ALICE, "some g\u200bＯre here")
        with pytest.raises(RequestError, match="NSFW"):
            await harness.draw(ALICE, "a ｎｕ\u00adde statue", nsfw_allowed=False)
        assert await harness.store.user_jobs(ALICE) == []
        assert (await harness.service.credits(ALICE)).available == 10
    finally:
        await harness.close()
