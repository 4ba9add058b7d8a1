"""Blocked and NSFW word matching that survives Unicode tricks.

Both the operator's words and the prompt are folded the same way before they are compared:
NFKC (fullwidth, mathematical and circled letters, ligatures become plain ones), case
folding, and removal of format characters (Unicode category Cf: zero-width spaces and
joiners, soft hyphens, bidi marks, the BOM). Latin words match as whole words, also with
their accents and other combining marks stripped; other scripts match as substrings.
Homoglyphs from other scripts (a Cyrillic "о" in a Latin word) are not folded.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

#: non-spacing and enclosing marks (a spacing mark, Mc, is a vowel sign in many scripts: kept)
_MARKS = frozenset({"Mn", "Me"})


def fold(text: str, *, joiner: str = "") -> str:
    """``text`` as words are compared: NFKC, case-folded, format characters replaced by ``joiner``."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(joiner if unicodedata.category(ch) == "Cf" else ch for ch in text)
    # NFKC again: removing a joiner can bring together what composes (e + U+200B + ◌́)
    return unicodedata.normalize("NFKC", text.casefold())


def strip_marks(text: str) -> str:
    """``text`` without combining marks (accents, variation selectors, the grapheme joiner)."""
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize(
        "NFC", "".join(ch for ch in decomposed if unicodedata.category(ch) not in _MARKS)
    )


def _variants(text: str) -> set[str]:
    # a format character inside a word hides it (removed), between words it separates them (a space)
    folded = {fold(text), fold(text, joiner=" ")}
    return folded | {strip_marks(t) for t in folded}


def find_blocked(text: str, words: Iterable[str]) -> str | None:
    """The first of ``words`` found in ``text`` (whole words for Latin text, substrings otherwise)."""
    variants = _variants(text)
    for word in words:
        w = fold(word.strip())
        if not w:
            continue
        if w.isascii():
            # a word edge is anything but a letter or digit (an underscore is an edge too)
            pattern = re.compile(rf"(?<![^\W_]){re.escape(w)}(?![^\W_])")
            if any(pattern.search(v) for v in variants):
                return word.strip()
        elif any(w in v for v in variants):
            return word.strip()
    return None
