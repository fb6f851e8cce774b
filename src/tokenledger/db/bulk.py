"""Set-based statements that stay small however many rows they carry.

A 1,000-row ``executemany`` or ``IN (...)`` list becomes one statement with thousands of
parameters, which psycopg parses afresh every time. Here each statement sends one array
per column instead (``= ANY(:arr)``, ``INSERT ... SELECT FROM unnest(...)``, ``UPDATE ...
FROM unnest(...)``), so it stays short and its plan is reused; large inserts use COPY.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Integer,
    Numeric,
    Table,
    any_,
    bindparam,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement


def any_of(column: Column[Any] | Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``column = ANY(array)``: one parameter however many values."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))


def _pg_type(column: Column[Any]) -> str:
    kind = column.type
    if isinstance(kind, JSON):
        return "jsonb"
    if isinstance(kind, DateTime):
        return "timestamptz"
    if isinstance(kind, Boolean):
        return "boolean"
    if isinstance(kind, Numeric):
        return "numeric"
    if isinstance(kind, Integer):  # BigInteger is an Integer
        return "bigint"
    return "text"


def insert_rows(session: Session, table: Table, rows: list[dict[str, Any]],
                returning: Sequence[str] = ()) -> list[Any]:
    """Insert ``rows`` (all with the same keys) in one statement; optional RETURNING rows."""
    if not rows:
        return []
    names = list(rows[0])
    params: dict[str, Any] = {}
    arrays, selects = [], []
    for i, name in enumerate(names):
        pg_type = _pg_type(table.c[name])
        values = [row[name] for row in rows]
        if pg_type == "jsonb":
            values = [None if v is None else json.dumps(v) for v in values]
            arrays.append(f"CAST(:c{i} AS text[])")
            selects.append(f"CAST(t.c{i} AS jsonb)")
        else:
            arrays.append(f"CAST(:c{i} AS {pg_type}[])")
            selects.append(f"t.c{i}")
        params[f"c{i}"] = values
    columns = ", ".join(f'"{n}"' for n in names)
    aliases = ", ".join(f"c{i}" for i in range(len(names)))
    sql = (f'INSERT INTO "{table.name}" ({columns}) SELECT {", ".join(selects)} '
           f'FROM unnest({", ".join(arrays)}) AS t({aliases})')
    if returning:
        sql += " RETURNING " + ", ".join(f'"{c}"' for c in returning)
        return list(session.execute(text(sql), params))
    session.execute(text(sql), params)
    return []


COPY_THRESHOLD = 64


def copy_rows(session: Session, table: Table, rows: list[dict[str, Any]],
              id_sequence: str | None = None) -> list[int]:
    """Insert ``rows``: with COPY when there are many, else one INSERT.

    COPY formats rows in psycopg's C code and is the fastest way in; it has no RETURNING,
    so when ids are needed they are drawn from ``id_sequence`` first and written
    explicitly. Returns the ids in row order (empty when no sequence is named).
    """
    if not rows:
        return []
    if len(rows) < COPY_THRESHOLD:
        # Few rows: one INSERT ... RETURNING beats a sequence round trip plus COPY.
        if id_sequence:
            return [r.id for r in insert_rows(session, table, rows, ("id",))]
        insert_rows(session, table, rows)
        return []
    names = list(rows[0])
    ids: list[int] = []
    if id_sequence:
        ids = list(session.execute(
            text("SELECT nextval(CAST(:seq AS regclass)) FROM generate_series(1, :n)"),
            {"seq": id_sequence, "n": len(rows)}).scalars())
    json_cols = {n for n in names if isinstance(table.c[n].type, JSON)}
    columns = ", ".join(f'"{n}"' for n in (["id", *names] if ids else names))
    raw = session.connection().connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(
            f'COPY "{table.name}" ({columns}) FROM STDIN') as copy:
        for i, row in enumerate(rows):
            values = [json.dumps(row[n]) if n in json_cols and row[n] is not None
                      else row[n] for n in names]
            copy.write_row([ids[i], *values] if ids else values)
    return ids


def set_balances(session: Session, table: Table, balances: list[tuple[int, int]]) -> None:
    """``UPDATE table SET balance = new WHERE id = id`` for each (id, new) pair."""
    if not balances:
        return
    session.execute(text(
        f'UPDATE "{table.name}" AS w SET balance = v.balance FROM unnest('
        "CAST(:ids AS bigint[]), CAST(:balances AS bigint[])) AS v(id, balance)"
        " WHERE w.id = v.id"),
        {"ids": [b[0] for b in balances], "balances": [b[1] for b in balances]})
