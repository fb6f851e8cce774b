"""Set-based SQL kept in ``.sql`` files beside the service that runs it.

Every file uses one placeholder style, ``:name`` (as SQLAlchemy's ``text()`` and psql's
variables do), so it can be read, explained and run in psql (``\\set name value``) once a
line ``-- include: package/name`` is replaced by that file (:func:`source`). :func:`load`
reads a file once per process; :func:`numbered` gives the ``$1, $2`` form (and the names in
order) for a prepared statement.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import TextClause

# ``:name`` but not ``::type`` casts, and not a time of day ('12:30').
PLACEHOLDER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_COMMENT = re.compile(r"--[^\n]*")
# A line ``-- include: <package>/<name>`` stands for that file's text (a shared CTE).
_INCLUDE = re.compile(r"^-- include: ([\w.]+)/(\w+)\s*$", re.MULTILINE)


def source(package: str, name: str) -> str:
    """The text of ``<package>/sql/<name>.sql`` as written, includes expanded."""
    raw = resources.files(package).joinpath("sql", f"{name}.sql").read_text("utf-8")
    return _INCLUDE.sub(lambda m: source(m.group(1), m.group(2)).rstrip(), raw)


@cache
def load(package: str, name: str) -> str:
    """:func:`source` on one line, without comments (how it is sent)."""
    return " ".join(_COMMENT.sub("", source(package, name)).split())


@cache
def statement(package: str, name: str) -> TextClause:
    """:func:`load` as a SQLAlchemy statement (parsed once per process)."""
    from sqlalchemy import text

    return text(load(package, name))


@cache
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` placeholders as ``$n`` (one number per name) and the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return PLACEHOLDER.sub(number, sql), tuple(names)


@cache
def pyformat(sql: str) -> str:
    """``:name`` placeholders as psycopg's ``%(name)s`` (for a raw psycopg cursor)."""
    return PLACEHOLDER.sub(r"%(\1)s", sql.replace("%", "%%"))
