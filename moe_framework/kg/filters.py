"""Filters on nodes by type and metadata, shared by filtered search and listing.

A node passes a :class:`NodeFilter` when its type is one of ``types`` (when given) and, for each
``key: value`` of ``where``, its metadata holds ``key`` with a value equal to ``value`` as JSON
values: numbers by value (``1 == 1.0``), booleans only to booleans (``True`` is not ``1``),
``None`` only to JSON null (a missing key never matches), strings exactly, arrays and objects
element by element under the same rules. ``where`` goes through the same JSON encoding as stored
metadata, so a tuple matches the list it was stored as.

SQLite narrows the candidates (:meth:`NodeFilter.sql` is a superset: every node that passes is
among the rows it selects) and :meth:`NodeFilter.matches` decides, so SQLite's reading of JSON
can change how many rows reach Python, never an answer.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from . import validate as _v

__all__ = ["NodeFilter"]

# Bound variables the SQL condition may use at most, leaving room for a chunk of ids under
# SQLite's historical limit of 999 (conditions past it are checked in Python only).
MAX_SQL_ARGS = 400
# Numbers this large are compared in Python only: SQLite reads integers beyond int64 as reals,
# and float/int equality is exact only below 2**53.
_EXACT_NUMBERS = 2**53

# Rows whose metadata SQLite could read differently from Python's json module go to Python
# whole: not text, not valid JSON, not an object (the reader then names the broken node), or
# holding a \u escape (SQLite drops escaped NUL characters from keys and strings).
_SQL_READS_AS_PYTHON = (
    "CASE WHEN typeof(nodes.metadata) != 'text' THEN 0 "
    "WHEN NOT json_valid(nodes.metadata) THEN 0 "
    "WHEN json_type(nodes.metadata) != 'object' THEN 0 "
    "WHEN instr(nodes.metadata, '\\u') > 0 THEN 0 ELSE 1 END"
)


class NodeFilter:
    """Keep nodes whose type is in ``types`` (None: any) and whose metadata matches ``where``
    (a dict of JSON values, already normalised by :meth:`build`)."""

    def __init__(self, types: Optional[frozenset], where: dict) -> None:
        self.types = types
        self.where = where

    @classmethod
    def build(cls, types: Any, where: Any, op: str) -> Optional[NodeFilter]:
        """Check the ``types`` and ``where`` arguments of ``KnowledgeGraph.<op>``; None when
        neither filters anything (``types=None`` and ``where`` None or empty).

        ``types``: a str (one type) or an iterable of non-empty str. ``where``: a dict of str keys
        to JSON-serialisable values. ``ValueError`` naming ``op`` and the argument otherwise.
        """
        type_set = None if types is None else _check_types(types, op)
        if where is None:
            where = {}
        if not isinstance(where, dict):
            raise ValueError(
                f"KnowledgeGraph.{op}: where must be a dict of metadata key -> JSON value, got "
                f"{type(where).__name__}"
            )
        for key in where:
            if not isinstance(key, str):
                raise ValueError(
                    f"KnowledgeGraph.{op}: where keys must be str (metadata keys are JSON "
                    f"strings), got {key!r}"
                )
        try:
            text = _v.dumps_object(where, "where")
        except ValueError as exc:
            raise ValueError(
                f"KnowledgeGraph.{op}: {str(exc).replace('KnowledgeGraph: ', '', 1)}"
            ) from None
        if type_set is None and not where:
            return None
        return cls(type_set, json.loads(text))

    @property
    def matches_nothing(self) -> bool:
        """True for ``types=[]``: no node can pass."""
        return self.types is not None and not self.types

    def matches(self, node_type: str, metadata: dict) -> bool:
        """Whether a node of ``node_type`` with ``metadata`` passes."""
        if self.types is not None and node_type not in self.types:
            return False
        return all(k in metadata and _json_equal(metadata[k], v) for k, v in self.where.items())

    def sql(self) -> tuple:
        """``(condition, args)``: an SQL condition on table ``nodes`` true for every node that
        passes (and for some that do not; check those with :meth:`matches`)."""
        conds, args = [], []
        if self.types is not None and len(self.types) <= MAX_SQL_ARGS // 4:
            conds.append(f"nodes.type IN ({','.join('?' * len(self.types))})")
            args += sorted(self.types)
        members = []
        for key, value in self.where.items():
            cond, value_args = _value_sql(value)
            if len(args) + 1 + len(value_args) > MAX_SQL_ARGS:
                break
            members.append(
                f"EXISTS (SELECT 1 FROM json_each(nodes.metadata) AS j WHERE j.key = ? AND ({cond}))"
            )
            args += [key, *value_args]
        if members:
            # CASE evaluates in order: json_each only ever sees a valid JSON object.
            conds.append(
                f"CASE WHEN {_SQL_READS_AS_PYTHON} THEN ({' AND '.join(members)}) ELSE 1 END"
            )
        return (" AND ".join(conds) or "1"), args


def _check_types(types: Any, op: str) -> frozenset:
    if isinstance(types, str):
        types = (types,)
    try:
        items = list(types)
    except TypeError:
        raise ValueError(
            f"KnowledgeGraph.{op}: types must be a str or a sequence of str, got "
            f"{type(types).__name__}"
        ) from None
    for t in items:
        if not isinstance(t, str) or not t:
            raise ValueError(
                f"KnowledgeGraph.{op}: types must hold non-empty str node types, got {t!r}"
            )
        _v.check_text(t, f"{op} types entry")
    return frozenset(items)


def _value_sql(value: Any) -> tuple:
    """A condition on ``j`` (a ``json_each`` row) true whenever its value may equal ``value``."""
    if value is None:
        return "j.type = 'null'", []
    if isinstance(value, bool):
        return ("j.type = 'true'" if value else "j.type = 'false'"), []
    if isinstance(value, str):
        return "j.type = 'text' AND j.atom = ?", [value]
    if isinstance(value, list):
        return "j.type = 'array'", []
    if isinstance(value, dict):
        return "j.type = 'object'", []
    if abs(value) >= _EXACT_NUMBERS:
        return "j.type IN ('integer', 'real')", []
    # A stored real may be parsed by SQLite a few ulps away from Python's reading: a window.
    f = float(value)
    slack = abs(f) * 1e-9 + 1e-300
    real = "(j.type = 'real' AND j.atom BETWEEN ? AND ?)"
    if f.is_integer():
        return f"(j.type = 'integer' AND j.atom = ?) OR {real}", [int(f), f - slack, f + slack]
    return real, [f - slack, f + slack]


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of two parsed JSON values (see the module docstring)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return a is None and b is None
