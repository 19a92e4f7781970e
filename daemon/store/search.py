"""What a search query means and how a hit is shown: the terms of a query, and the snippet
around the first match. Plain text work, the same on both backends; the SQL that finds the
pages is in `daemon.store.repository`."""

from __future__ import annotations

import re
from collections.abc import Sequence

from daemon.store.fold import fold

MAX_TERMS = 32


def parse_query(query: str) -> list[str]:
    """Split a search query into terms: whitespace separates them, "double quotes" keep a
    phrase together (an unclosed quote runs to the end of the query). Nothing else has a
    meaning: AND, OR, -, *, %, _, parentheses are text like any other. Duplicates
    (ignoring case) go; past MAX_TERMS terms the rest is ignored."""
    terms: dict[str, str] = {}
    for i, part in enumerate(query.replace("\x00", "").split('"')):
        inside_quotes = i % 2 == 1
        for term in [" ".join(part.split())] if inside_quotes else part.split():
            if term:
                terms.setdefault(term.casefold(), term)
    return list(terms.values())[:MAX_TERMS]


def snippet(page_text: str, query: str | Sequence[str], width: int = 40,
            mark: tuple[str, str] = ("[", "]")) -> str:
    """The part of the page around the first match, whitespace flattened, every match in it
    marked (`[match]`). The same on both backends, since it is computed here."""
    flat = " ".join(page_text.split())
    terms = parse_query(query) if isinstance(query, str) else list(query)
    found = None
    folded = fold(flat)  # matched folded (台湾 finds 台灣), shown as stored: same length
    if terms:
        pattern = re.compile("|".join(re.escape(fold(t))
                                      for t in sorted(terms, key=len, reverse=True)))
        found = pattern.search(folded)
    if found is None:
        return flat[: 2 * width] + ("…" if len(flat) > 2 * width else "")
    start, end = max(0, found.start() - width), min(len(flat), found.end() + width)
    if start > 0 and flat[start - 1] != " ":  # begin and end on whole words where there are
        space = flat.find(" ", start, found.start())  # spaces (not in Chinese, Japanese)
        start = space + 1 if space >= 0 else start
    parts, at = [], start
    for match in pattern.finditer(folded, start):
        if match.start() >= end:
            break
        end = max(end, match.end())  # never cut a match in two
        parts += [flat[at:match.start()], mark[0], flat[match.start():match.end()], mark[1]]
        at = match.end()
    if end < len(flat) and flat[end] != " ":
        space = flat.rfind(" ", at, end)
        end = space if space >= 0 else end
    parts.append(flat[at:end])
    return ("…" if start else "") + "".join(parts) + ("…" if end < len(flat) else "")
