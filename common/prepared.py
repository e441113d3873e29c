"""The queue's hottest statements, run straight on the database driver's cursor.

SQLAlchemy's Core compiles a statement once and caches its SQL, but every
execution still walks the whole execution context: parameters processed
one by one, events fired, a result object built.  On this project's
machines that is 30-40 µs a statement, two to three times the statement's
own time in SQLite, and the queue runs about ten statements per message
(the MTA's accept, the queue manager's claim and settle).

`Prepared` keeps what SQLAlchemy compiled for a statement on the database in
use (its SQL text, the order of its parameters, the conversion each
parameter and each result column needs, such as a datetime to SQLite's text
form) and runs it on the DB-API cursor of the caller's connection, inside
the caller's transaction.  What the statement means is still written once,
as Core, in the module that owns it; only the execution is shorter.  The
driver's errors come out as SQLAlchemy's own (IntegrityError,
OperationalError ...), so callers catch the same exceptions either way.

It takes what a plain cursor can run: no expanding IN lists (use `=` and
run it per value, or executemany), and an INSERT must name every column that
has a default computed in Python (`insert_all`).  Either mistake is refused
when the statement is first run, so a test finds it.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, bindparam, exc, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Select
from sqlalchemy.sql.compiler import SQLCompiler

Params = Mapping[str, Any]


@dataclass(frozen=True)
class _Form:
    """A statement as compiled for one dialect."""

    sql: str
    names: tuple[str, ...]  # the parameters, in the order the SQL takes them
    positional: bool  # SQLite's "?" or psycopg's "%(name)s"
    fixed: dict[str, Any]  # values written into the statement itself (already converted)
    convert: dict[str, Callable[[Any], Any]]  # parameter name -> the driver's form of its value
    columns: tuple[Callable[[Any], Any] | None, ...]  # per result column: the driver's value -> Python's
    row: type | None  # a named tuple of the result columns (None: not a SELECT)


class Prepared:
    """One Core statement, executed on the DB-API cursor of a Connection in a transaction."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._forms: dict[tuple[str, str], _Form] = {}

    def rows(self, conn: Connection, params: Params) -> list[Any]:
        """The SELECT's rows, as named tuples (`row.id`, like Core's rows)."""
        form, cursor = self._execute(conn, params)
        try:
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        assert form.row is not None, "rows() of a statement that is not a SELECT"
        make = form.row._make  # type: ignore[attr-defined]
        if not any(form.columns):
            return [make(r) for r in fetched]
        return [make(v if f is None else f(v) for f, v in zip(form.columns, r, strict=True)) for r in fetched]

    def scalars(self, conn: Connection, params: Params) -> list[Any]:
        """The first column of every row."""
        return [r[0] for r in self.rows(conn, params)]

    def run(self, conn: Connection, params: Params | Sequence[Params]) -> int:
        """An INSERT, UPDATE or DELETE, once or (a list of parameter sets) executemany;
        the number of rows it touched."""
        _, cursor = self._execute(conn, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def _execute(self, conn: Connection, params: Params | Sequence[Params]) -> tuple[_Form, Any]:
        # Only inside the caller's transaction: on its own, the driver would
        # run the statement outside SQLAlchemy's BEGIN (our BEGIN IMMEDIATE).
        assert conn.in_transaction(), "Prepared statements run inside the caller's transaction"
        dialect = conn.dialect
        form = self._forms.get((dialect.name, dialect.driver))
        if form is None:
            form = self._forms[(dialect.name, dialect.driver)] = _compile(self.statement, dialect)
        many = not isinstance(params, Mapping)
        args = _args(form, params) if isinstance(params, Mapping) else [_args(form, p) for p in params]
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            if many:
                cursor.executemany(form.sql, args)
            else:
                cursor.execute(form.sql, args)
        except dialect.loaded_dbapi.Error as error:
            cursor.close()
            raise exc.DBAPIError.instance(
                form.sql, args, error, dialect.loaded_dbapi.Error, dialect=dialect, ismulti=many
            ) from error
        return form, cursor


def insert_all(model: type[Any], *, leave_out: tuple[str, ...] = ()) -> Insert:
    """An INSERT into `model`'s table naming each column as a parameter of the same
    name, but those left out (an autoincrement id): what `Prepared` takes."""
    columns = model.__table__.columns
    return insert(model).values({c.name: bindparam(c.name) for c in columns if c.name not in leave_out})


def _args(form: _Form, params: Params) -> Any:
    values = {**form.fixed, **params}  # the fixed values are converted already
    for name, convert in form.convert.items():
        value = params.get(name)
        if value is not None:
            values[name] = convert(value)
    if form.positional:
        return tuple(values[n] for n in form.names)
    return values


def _compile(statement: ClauseElement, dialect: Dialect) -> _Form:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    binds = compiled.binds
    given = [name for name, bind in binds.items() if bind.required]  # the caller's parameters
    if any(binds[name].expanding for name in given):
        raise ValueError(f"a Prepared statement takes no IN list of the caller's: {compiled}")
    if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
        raise ValueError(f"a Prepared statement must name every column with a Python default: {compiled}")
    if compiled.escaped_bind_names:
        raise ValueError(f"a Prepared statement needs plain parameter names: {compiled}")
    # The SQL with an IN list written in the statement (state NOT IN the final
    # states) spelled out as one parameter per value, and those values.
    expanded = compiled.construct_expanded_state({name: None for name in given})
    names = tuple(expanded.positiontup or ()) if dialect.positional else tuple(expanded.parameters)
    # Each parameter's conversion to the driver's form, if it needs one.
    processors = {name: b.type.dialect_impl(dialect).bind_processor(dialect) for name, b in binds.items()}
    convert: dict[str, Callable[[Any], Any]] = {name: p for name in given if (p := processors[name]) is not None}
    fixed: dict[str, Any] = {}
    for name, value in expanded.parameters.items():
        if name not in given:
            process = processors.get(name)
            fixed[name] = process(value) if process is not None and value is not None else value
    if not isinstance(statement, Select):
        return _Form(expanded.statement, names, dialect.positional, fixed, convert, (), None)
    selected = list(statement.selected_columns)
    columns = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in selected)
    row = namedtuple("Row", [c.key for c in selected])  # type: ignore[misc]
    return _Form(expanded.statement, names, dialect.positional, fixed, convert, columns, row)
