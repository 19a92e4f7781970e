"""Folding for search: Traditional and Simplified Chinese, full- and half-width forms, and
letter case become one, so 台湾 finds 台灣, 發票 finds 发票 and ＡＢＣ１２３ finds ABC123.

The page text is stored as recognised; its folded twin feeds the indexes, and a query is folded
the same way. Folding is character by character and never changes the length of a text, so a
match found in the folded text is at the same place in the stored one (the snippet shows the
page as stored). Per character: NFKC (full-width Latin and digits, compatibility forms), then
lower case, then OpenCC's Traditional-to-Simplified table (`t2s`: Taiwan and Hong Kong forms
such as 臺 included); a step whose result is not exactly one character is skipped for that
character (ß, ligatures, ㍿ keep their form). Out of context a character may fold further than
a phrase would (乾 to 干 also in 乾隆): both sides fold alike, so nothing is missed, at the
price of the odd extra match.
"""

from __future__ import annotations

import unicodedata

from daemon.conversion import convert


def _t2s(char: str) -> str:
    return convert(char, "t2s")


def fold_char(char: str) -> str:
    folded = unicodedata.normalize("NFKC", char)
    if len(folded) != 1:
        folded = char
    lower = folded.lower()
    if len(lower) == 1:
        folded = lower
    if folded >= "\u2e80":  # CJK radicals and beyond: where the Chinese tables apply
        simplified = _t2s(folded)
        if len(simplified) == 1:
            folded = simplified
    return folded


class _Table(dict[int, str]):
    """`str.translate`'s table, filled on first sight of each character."""

    def __missing__(self, code: int) -> str:
        folded = fold_char(chr(code))
        self[code] = folded
        return folded


_TABLE = _Table()


def fold(text: str) -> str:
    """`text` folded for matching; as long as `text`."""
    if text.isascii():
        return text.lower()
    return text.translate(_TABLE)
