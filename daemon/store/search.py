"""Search: what a query means (its terms), the snippet around the first match, and the SQL
that finds the pages, each backend's own (FTS5 trigrams on SQLite; pg_trgm and a `simple`
tsvector on PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text

from daemon.store.access import Access
from daemon.store.fold import fold
from daemon.store.models import DocumentPath
from daemon.store.records import SearchHit

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


class SearchQueries(Access):
    def search(self, query: str, limit: int = 20) -> list[SearchHit]:
        """Pages containing every term of `query` (see `parse_query`), best first.

        A term matches wherever it occurs, case-insensitively, inside words too and in
        scripts written without spaces (Chinese, Japanese). Ranking: bm25 on SQLite; on
        PostgreSQL `ts_rank` (whole-word occurrences) plus trigram word similarity. Scores
        are higher-is-better but not comparable between the two backends.
        """
        terms = parse_query(query)
        if not terms or limit < 1:
            return []
        search = _postgresql_search if self._postgresql else _sqlite_search
        sql, params = search([fold(term) for term in terms])
        params["limit"] = limit
        with self._sessions() as session:
            rows = session.execute(text(sql), params).all()
            paths: dict[int, str] = {}
            for document_id, path in session.execute(
                select(DocumentPath.document_id, DocumentPath.path)
                .where(DocumentPath.document_id.in_({r[0] for r in rows}))
                .order_by(DocumentPath.id)
            ):
                paths.setdefault(document_id, path)
        return [SearchHit(paths.get(doc_id, "?"), sha, page_no, snippet(page_text, terms),
                          round(float(score), 6))
                for doc_id, page_no, page_text, sha, score in rows]

# -- the SQL of each backend ------------------------------------------------------------

TRIGRAM = 3  # shortest term the trigram indexes can look up; shorter ones are scanned

def _like_pattern(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _fts5_string(term: str) -> str:
    """An FTS5 string literal: the trigram tokenizer matches it as a plain substring."""
    return '"' + term.replace('"', '""') + '"'


_SEARCH_COLUMNS = "p.document_id, p.page_no, p.text, d.sha256"
_SEARCH_ORDER = "ORDER BY score DESC, d.id DESC, p.page_no LIMIT :limit"


def _sqlite_search(terms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """FTS5 MATCH for the terms of three characters or more (bm25 ranks); LIKE for shorter
    ones, which trigrams cannot look up."""
    long_terms = [t for t in terms if len(t) >= TRIGRAM]
    params: dict[str, Any] = {}
    where = []
    for i, term in enumerate(t for t in terms if len(t) < TRIGRAM):
        params[f"like{i}"] = _like_pattern(term)
        where.append(f"p.folded LIKE :like{i} ESCAPE '\\'")
    if long_terms:
        params["match"] = " ".join(_fts5_string(t) for t in long_terms)
        where.insert(0, "pages_fts MATCH :match")
        source = ("pages_fts JOIN pages p ON p.id = pages_fts.rowid "
                  "JOIN documents d ON d.id = p.document_id")
        score = "-bm25(pages_fts)"
    else:
        source = "pages p JOIN documents d ON d.id = p.document_id"
        score = "0.0"
    sql = (f"SELECT {_SEARCH_COLUMNS}, {score} AS score FROM {source} "
           f"WHERE {' AND '.join(where)} {_SEARCH_ORDER}")
    return sql, params


def _postgresql_search(terms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """LIKE per folded term on the folded text (served by the pg_trgm GIN index, any script);
    ranked by ts_rank on the `simple` tsvector plus how well the query's trigrams match the
    best part of the page."""
    params: dict[str, Any] = {"query": " ".join(terms)}
    where, tsqueries = [], []
    for i, term in enumerate(terms):
        params[f"like{i}"] = _like_pattern(term)
        params[f"term{i}"] = term
        where.append(f"p.folded LIKE :like{i} ESCAPE '\\'")
        tsqueries.append(f"phraseto_tsquery('simple', :term{i})")
    score = (f"ts_rank(p.text_tsv, {' || '.join(tsqueries)}) "
             "+ word_similarity(:query, p.folded)")
    sql = (f"SELECT {_SEARCH_COLUMNS}, {score} AS score "
           "FROM pages p JOIN documents d ON d.id = p.document_id "
           f"WHERE {' AND '.join(where)} {_SEARCH_ORDER}")
    return sql, params
