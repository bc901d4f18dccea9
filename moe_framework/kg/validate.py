"""Checks of what a store file holds beyond its header: the SQL schema and the JSON values.

The schema must be exactly the one :mod:`moe_framework.kg.schema` creates: a hostile file could
otherwise carry a trigger that deletes rows on every insert, or a view in place of a table. JSON
values must be objects nested at most :data:`MAX_JSON_DEPTH` levels and hold only valid Unicode
text, so every reader (``json``, GraphML, networkx) can handle them without a ``RecursionError``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any, Optional

from .errors import KnowledgeGraphError

__all__ = [
    "MAX_JSON_DEPTH",
    "check_schema",
    "check_node_metadata",
    "dumps_object",
    "dumps_objects",
    "loads_object",
]

# The top-level object counts as level 1. Real metadata is a few levels deep; the cap keeps
# every JSON reader far from Python's recursion limit (about 1000 nested levels).
MAX_JSON_DEPTH = 100

# Tables SQLite itself adds when someone runs ANALYZE or PRAGMA optimize on the file with another
# client: statistics for the query planner, never executed, so a store may carry them.
_SQLITE_STAT_TABLES = ("sqlite_stat1", "sqlite_stat4")

_expected: Optional[dict] = None


def _normalize_sql(sql: Optional[str]) -> Optional[str]:
    return None if sql is None else " ".join(sql.split())


def expected_schema() -> dict:
    """``{(type, name): (tbl_name, sql)}`` of a freshly created store (sql with whitespace
    normalised), computed once from the schema text itself."""
    global _expected
    if _expected is None:
        from .schema import SCHEMA

        conn = sqlite3.connect(":memory:")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        finally:
            conn.close()
        _expected = {(t, n): (tbl, _normalize_sql(sql)) for t, n, tbl, sql in rows}
    return _expected


def check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a file whose tables, columns, indexes differ from the store's, or that has any
    trigger or view. Reads ``sqlite_master`` only (cheap; runs at every ``verify`` level)."""
    want = expected_schema()
    found = {}
    for t, n, tbl, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        found[(t, n)] = (tbl, _normalize_sql(sql))
    problems = []
    for (t, n), (tbl, sql) in sorted(found.items()):
        if (t, n) in want:
            if (tbl, sql) != want[(t, n)]:
                problems.append(f"{t} {n!r} is defined as {sql!r}")
        elif t == "table" and n in _SQLITE_STAT_TABLES:
            continue
        elif t in ("trigger", "index"):
            problems.append(f"unexpected {t} {n!r} on table {tbl!r}")
        else:
            problems.append(f"unexpected {t} {n!r}")
    for t, n in sorted(set(want) - set(found)):
        problems.append(f"missing {t} {n!r}")
    if problems:
        raise KnowledgeGraphError(
            f"{path}: not the knowledge-graph schema: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". A store holds only the tables and indexes this library creates (no triggers, "
            "no views); refusing to open it"
        )


# ------------------------------------------------------------------------------ JSON values

# Tokens of JSON text that change or report the nesting: strings (keys), brackets, commas.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]')


def json_text_depth(text: str, limit: int = MAX_JSON_DEPTH) -> tuple:
    """``(depth, field)`` of JSON ``text`` without recursion: the nesting depth (stops counting
    once it passes ``limit``) and the top-level key under which the deepest level was reached."""
    depth = deepest = 0
    field = key = None
    last_string = None
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            last_string = tok
        elif tok == ":":
            if depth == 1 and last_string is not None:
                key = json.loads(last_string)
        elif tok in "[{":
            depth += 1
            if depth > deepest:
                deepest, field = depth, key
                if deepest > limit:
                    break
        elif tok in "]}":
            depth -= 1
    return deepest, field


def _python_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (dicts/lists/tuples) nests deeper than ``limit``, iteratively."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        children: Any
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def _too_deep(what: str, field: Any) -> ValueError:
    return ValueError(
        f"KnowledgeGraph: {what} field {field!r} is nested more than {MAX_JSON_DEPTH} levels deep "
        f"(the limit is {MAX_JSON_DEPTH}, counting the {what} object itself)"
    )


def dumps_object(value: Any, what: str) -> str:
    """Strict JSON text of the dict ``value`` (no NaN/Inf, sorted keys): ``ValueError`` naming
    ``what`` and the field when it is not a dict, not serialisable, nested more than
    :data:`MAX_JSON_DEPTH` levels, or holds a lone surrogate (not valid Unicode text)."""
    if not isinstance(value, dict):
        raise ValueError(f"KnowledgeGraph: {what} must be a dict, got {type(value).__name__}")
    try:
        # ensure_ascii=False keeps a lone surrogate as a character, so encoding finds it below.
        text = json.dumps(
            value, sort_keys=True, allow_nan=False, separators=(",", ":"), ensure_ascii=False
        )
    except RecursionError:
        for k, v in value.items():
            if _python_depth_exceeds(v, MAX_JSON_DEPTH - 1):
                raise _too_deep(what, k) from None
        raise ValueError(f"KnowledgeGraph: {what} is nested too deeply to serialise") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"KnowledgeGraph: {what} must be JSON-serialisable (no NaN/Inf): {exc}"
        ) from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # cheap bound before the exact scan
        depth, field = json_text_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what, field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        field = next(
            (
                k
                for k, v in value.items()
                if not _encodable(json.dumps({k: v}, ensure_ascii=False, sort_keys=True))
            ),
            None,
        )
        raise ValueError(
            f"KnowledgeGraph: {what} field {field!r} holds a lone surrogate "
            f"(U+{ord(bad):04X}), which is not valid Unicode text"
        ) from None
    return text


# The settings of ``dumps_object`` in one encoder built once: ``json.dumps`` with keyword arguments
# builds a new encoder on every call, which dominated filing 10k-row batches.
_ENCODER = json.JSONEncoder(
    sort_keys=True, allow_nan=False, separators=(",", ":"), ensure_ascii=False
)


def dumps_objects(values: list, what: str) -> list:
    """``[dumps_object(v, what) for v in values]``, the same texts and the same errors, with the
    checks done once over the batch: any value the fast path does not accept (not a dict, not
    serialisable, too deep, a lone surrogate) sends the whole batch through ``dumps_object``,
    which raises its exact error."""
    out = []
    encode = _ENCODER.encode
    try:
        for v in values:
            if type(v) is not dict:
                raise TypeError
            out.append(encode(v) if v else "{}")
    except Exception:
        return [dumps_object(v, what) for v in values]
    joined = "".join(out)
    if joined.count("[") + joined.count("{") > MAX_JSON_DEPTH and any(
        t.count("[") + t.count("{") > MAX_JSON_DEPTH for t in out
    ):
        return [dumps_object(v, what) for v in values]
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return [dumps_object(v, what) for v in values]
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str, what: str) -> None:
    """``ValueError`` when the str ``value`` holds a lone surrogate (it cannot be stored as UTF-8
    nor written to any export)."""
    if not _encodable(value):
        raise ValueError(
            f"KnowledgeGraph: {what} {value!r} holds a lone surrogate, which is not valid "
            "Unicode text"
        )


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def loads_object(text: Any, where: str) -> dict:
    """Parse a stored JSON object; :class:`KnowledgeGraphError` naming ``where`` when it is not
    JSON, not an object, or nested too deeply to parse."""
    if not isinstance(text, str):
        raise KnowledgeGraphError(f"{where} is stored as {type(text).__name__}, not JSON text")
    try:
        value = json.loads(text)
    except RecursionError:
        depth, field = json_text_depth(text)
        raise KnowledgeGraphError(
            f"{where} field {field!r} is nested more than {MAX_JSON_DEPTH} levels deep"
        ) from None
    except ValueError as exc:
        raise KnowledgeGraphError(f"{where} is invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
        if isinstance(value, bool):
            kind = "a boolean"
        raise KnowledgeGraphError(f"{where} is {kind}, expected a JSON object")
    return value


def check_node_metadata(conn: sqlite3.Connection, path: str) -> None:
    """Every node's metadata is a JSON object nested at most :data:`MAX_JSON_DEPTH` levels.

    One scan in SQLite; only suspicious rows (not valid JSON, not an object, or with more
    opening brackets than the depth limit) are examined in Python.
    """
    rows = conn.execute(
        "SELECT id, metadata FROM nodes WHERE typeof(metadata) != 'text' "
        "OR NOT json_valid(metadata) "
        "OR CASE WHEN json_valid(metadata) THEN json_type(metadata) != 'object' ELSE 1 END "
        "OR length(metadata) - length(replace(replace(metadata, '[', ''), '{', '')) > ? "
        "ORDER BY id",
        (MAX_JSON_DEPTH,),
    )
    for node_id, text in rows:
        where = f"{path}: node {node_id} metadata"
        if isinstance(text, str):
            depth, field = json_text_depth(text)
            if depth > MAX_JSON_DEPTH:
                raise KnowledgeGraphError(
                    f"{where} field {field!r} is nested more than {MAX_JSON_DEPTH} levels deep"
                )
        loads_object(text, where)
