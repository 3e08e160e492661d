"""`train { NAME ["PATTERN"] = VALUE ... }`: the settings as written, their values evaluated.

The front end knows the form of a setting, not its meaning: each value is evaluated like any constant
expression (numbers, constants, arithmetic, tuples, true/false), a quoted string is a string, and a
bare word that names no constant is kept as a word (`optimizer = sgd`). What the names mean, and which
values they take, is `netdsl.train.recipe`'s business.
"""

from __future__ import annotations

from netdsl.errors import NetError, Span
from netdsl.ir.graph import Setting
from netdsl.lang import expressions
from netdsl.lang import syntax as s
from netdsl.lang.scope import Context, Symbol


def train_settings(stmt: s.TrainStmt, ctx: Context) -> list[Setting]:
    """The settings of one `train` block, in order; a setting written twice in it is an error."""
    if ctx.block or ctx.tower or ctx.repeat:
        where = "a block" if ctx.block else "a towers block" if ctx.tower else "`repeat`"
        raise NetError(
            f"`train` settings belong at the top level, not inside {where}",
            keyword_span(stmt),
            trace=ctx.trace,
            hint="move the `train { ... }` block out, to the top of the net or of an included file",
        )
    seen: dict[tuple[str, str | None], Span] = {}
    result = []
    for item in stmt.settings:
        pattern = item.pattern.value if item.pattern else None
        key = (item.name.name, pattern)
        if key in seen:
            written = f'{item.name.name} "{pattern}"' if pattern is not None else item.name.name
            raise NetError(
                f"`{written}` is set twice in this train block",
                item.span,
                notes=[(seen[key], "first set here")],
                hint="keep one; a later train block (or a flag) may replace a value",
            )
        seen[key] = item.span
        value, word = _value(item.value, ctx)
        pattern_span = item.pattern.span if item.pattern else None
        result.append(Setting(item.name.name, pattern, value, item.span, item.value.span, pattern_span, word))
    return result


def keyword_span(stmt: s.TrainStmt) -> Span:
    """The span of the word `train` that opens the block (the block itself spans many lines)."""
    span = stmt.span
    return Span(span.file, span.line, span.col, span.line, span.col + len("train"))


def _value(expr: s.Expr | s.String, ctx: Context) -> tuple[object, bool]:
    """A setting's value, and whether it was written as a bare word."""
    if isinstance(expr, s.String):
        return expr.value, False
    if isinstance(expr, s.Name) and ctx.scope.lookup(expr.name) is None:
        return expr.name, True
    value = expressions.evaluate(expr, ctx)
    if isinstance(value, Symbol):  # `same`, `valid`, or a constant bound to one
        return value.word, True
    return value, False
