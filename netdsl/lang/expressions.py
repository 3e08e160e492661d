"""Constant expressions and layer parameters: the numbers, words and tuples a `.net` file computes.

Every function here reads names through a `Context` and reports a mistake at the expression that made
it; none of them creates layers or reads a layer's output (the builder resolves those itself).
Numbers are bounded by MAX_NUMBER at every step, so a power tower or a huge literal fails at once
instead of taking memory and time.
"""

from __future__ import annotations

import math

from netdsl.errors import NetError, Span, did_you_mean
from netdsl.ir import ops as op_registry
from netdsl.ir.ops import REQUIRED, OpSpec, ParamError
from netdsl.lang import syntax as s
from netdsl.lang.scope import Block, Context, Preset, Symbol, Tensors, Towered, undefined

MAX_NUMBER = 10**18
TOO_LARGE = "a value in a net is at most 10**18 in size"
PAD_WORDS = ("same", "same_lower", "valid")  # the words `pad` takes
_NUMBER_HINT = "write a number, or an expression of numbers and constants: 64, width * 2, (3, 3) for a pair"
_WHOLE = "a count or size is whole: `//` divides rounding down (7 // 2 is 3)"
_ZERO_HINT = "the divisor is 0 here: check the constants it is computed from"
_PAD_HINT = "e.g. pad=1, pad=(1, 2), pad=(0, 0, 1, 1) or pad=same (docs/language.md: Padding)"

# --- constant expressions ------------------------------------------------------------------------


def evaluate(expr: s.Expr, ctx: Context):
    """The value of a constant expression: a number, a word (`same`), true/false or a tuple."""
    if isinstance(expr, s.Number):  # a literal is bounded like every result, so float() of it cannot overflow
        value = expr.value  # (a preset's evaluated value can also be a word or a tuple)
        return checked(value, expr, ctx) if isinstance(value, (int, float)) else value
    if isinstance(expr, s.Name):
        return _name_value(expr, ctx)
    if isinstance(expr, (s.AllRef, s.TowerRef)):
        raise NetError(
            "a layer's output cannot be used here",
            expr.span,
            trace=ctx.trace,
            hint="only a layer's first argument (its input) reads other layers",
        )
    if isinstance(expr, s.Tuple):
        return tuple(number(item, ctx, "a tuple item") for item in expr.items)
    if isinstance(expr, s.Neg):
        return checked(-number(expr.operand, ctx, "an operand of -"), expr, ctx)
    if isinstance(expr, s.BinOp):
        return _binop(expr, ctx)
    raise AssertionError(f"unknown expression {expr!r}")


def _name_value(expr: s.Name, ctx: Context):
    value = ctx.scope.lookup(expr.name)
    if isinstance(value, Towered) and ctx.tower:
        value = value.view(ctx.tower)
    if value is None:
        raise undefined(expr.name, expr.span, ctx)
    if isinstance(value, Towered):
        raise NetError(
            f"`{expr.name}` has one value per tower ({', '.join(value.towers)}), so it cannot be read here",
            expr.span,
            trace=ctx.trace,
            hint="define the constant outside the towers block",
        )
    if isinstance(value, Tensors):
        raise NetError(
            f"`{expr.name}` is a layer's output, but a number is expected here",
            expr.span,
            trace=ctx.trace,
            hint="a number is written out or named with `const width = 64`; only a layer's input reads layers",
        )
    if isinstance(value, (Preset, Block)):
        raise NetError(
            f"`{expr.name}` is a {'preset' if isinstance(value, Preset) else 'block'}, but a number is expected here",
            expr.span,
            trace=ctx.trace,
            hint=f"use it as a layer: `{expr.name}(x, ...)` or `x | {expr.name}`",
        )
    return value


def number(expr: s.Expr, ctx: Context, what: str) -> int | float:
    """The value of `expr`, which must be a number; `what` names it in the error otherwise."""
    value = evaluate(expr, ctx)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NetError(
            f"{what} must be a number, got {_describe(value)}", expr.span, trace=ctx.trace, hint=_NUMBER_HINT
        )
    return value


def integer(expr: s.Expr, ctx: Context, what: str, low: int, high: int, hint: str) -> int:
    """The value of `expr`, which must be a whole number from `low` to `high` (`hint` says why, if not)."""
    value = number(expr, ctx, what)
    if isinstance(value, float):
        if not value.is_integer():
            raise NetError(f"{what} must be a whole number, got {value:g}", expr.span, trace=ctx.trace, hint=_WHOLE)
        value = int(value)
    if not low <= value <= high:
        raise NetError(f"{what} must be between {low} and {high}, got {value}", expr.span, trace=ctx.trace, hint=hint)
    return value


def _binop(expr: s.BinOp, ctx: Context):
    a = number(expr.left, ctx, f"an operand of {expr.op}")
    b = number(expr.right, ctx, f"an operand of {expr.op}")
    if expr.op in ("/", "//", "%") and b == 0:
        raise NetError("division by zero", expr.right.span, trace=ctx.trace, hint=_ZERO_HINT)
    if expr.op == "**":
        if abs(b) > 64 and abs(a) > 1:
            raise NetError("number too large", expr.span, trace=ctx.trace, hint=TOO_LARGE)
        if a == 0 and b < 0:
            raise NetError(
                "division by zero",
                expr.span,
                trace=ctx.trace,
                hint="0 to a negative power is 1 / 0: check the exponent",
            )
        try:
            value = a**b
        except OverflowError:
            raise NetError("number too large", expr.span, trace=ctx.trace, hint=TOO_LARGE) from None
        if isinstance(value, complex):
            raise NetError(
                "the result is not a real number",
                expr.span,
                trace=ctx.trace,
                hint="a negative number to a fractional power, as (-8) ** 0.5, has no real value: check the base",
            )
    elif expr.op == "+":
        value = a + b
    elif expr.op == "-":
        value = a - b
    elif expr.op == "*":
        value = a * b
    elif expr.op == "/":
        value = a / b
    elif expr.op == "//":
        value = a // b
    else:
        value = a % b
    return checked(value, expr, ctx)


def checked(value, expr: s.Expr, ctx: Context):
    """`value`, unless it is not finite or beyond MAX_NUMBER (then an error at `expr`)."""
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_NUMBER:
        raise NetError("number too large", expr.span, trace=ctx.trace, hint=TOO_LARGE)
    return value


def _describe(value) -> str:
    """What a value is, for an error that expected something else."""
    if isinstance(value, Symbol):
        return f"the word `{value.word}`"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, Tensors):
        return "a layer's output"
    return type(value).__name__


# --- layer parameters ----------------------------------------------------------------------------


def arguments(spec: OpSpec, args, kwargs, ctx: Context) -> dict[str, s.Expr]:
    """Matches positional and named arguments to `spec`'s parameters (values are checked later)."""
    if len(args) > len(spec.positional):
        extra = args[len(spec.positional)]
        others = [p.name for p in spec.params if p.name not in spec.positional]
        hint = f"after its input, {spec.name} takes these by position: {', '.join(spec.positional) or 'none'}"
        if not spec.params:
            hint = f"{spec.name} takes only its input"
        elif others:
            hint += f"; name the others: {others[0]}=..."
        raise NetError(f"too many arguments to {spec.name}", extra.span, trace=ctx.trace, hint=hint)
    values = dict(zip(spec.positional, args, strict=False))
    for kwarg in kwargs:
        if spec.param(kwarg.name) is None:
            known = [p.name for p in spec.params]
            hint = did_you_mean(kwarg.name, known) or (
                f"{spec.name} takes: {', '.join(known)}" if known else f"{spec.name} takes no parameters"
            )
            raise NetError(f"{spec.name} has no parameter `{kwarg.name}`", kwarg.span, hint=hint, trace=ctx.trace)
        if kwarg.name in values:
            raise NetError(
                f"`{kwarg.name}` is given twice",
                kwarg.span,
                trace=ctx.trace,
                hint="give each parameter once, by position or by name",
                notes=[(values[kwarg.name].span, "first given here")],
            )
        values[kwarg.name] = kwarg.value
    return values


def layer_params(spec: OpSpec, values: dict[str, s.Expr], ctx: Context, span: Span) -> dict:
    """Evaluates and checks a layer's parameters, filling in defaults."""
    params: dict[str, object] = {}
    for param in spec.params:
        if param.name in values:
            params[param.name] = param_value(spec, param, values[param.name], ctx)
        elif param.default is REQUIRED:
            raise NetError(
                f"{spec.name} needs `{param.name}` ({param.doc})", span, trace=ctx.trace, hint=_example(spec)
            )
        else:
            params[param.name] = param.default
    try:
        return spec.normalize(params)
    except ParamError as error:
        where = values[error.param].span if error.param in values else span
        raise NetError(f"{spec.name}: {error}", where, hint=error.hint, trace=ctx.trace) from None


def param_value(spec: OpSpec, param: op_registry.Param, expr: s.Expr, ctx: Context):
    """The value of one parameter, checked against its kind and range."""
    where = f"{spec.name} `{param.name}`"
    value = evaluate(expr, ctx)
    kind = param.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise NetError(
                f"{where} must be true or false", expr.span, trace=ctx.trace, hint=f"e.g. {param.name}=false"
            )
        return value
    if kind == "pad" and isinstance(value, Symbol):
        if value.word not in PAD_WORDS:
            raise NetError(
                f"{where} must be a number, (h, w), (top, left, bottom, right), same, same_lower or valid",
                expr.span,
                trace=ctx.trace,
                hint=did_you_mean(value.word, PAD_WORDS) or _PAD_HINT,
            )
        return value.word
    if kind in ("pair", "pad") and isinstance(value, tuple):
        if kind == "pad" and len(value) not in (2, 4):
            raise NetError(
                f"{where} takes one number, two (h, w) or four (top, left, bottom, right), not {len(value)}",
                expr.span,
                trace=ctx.trace,
                hint=_PAD_HINT,
            )
        if kind == "pair" and len(value) != 2:
            raise NetError(
                f"{where} takes one number or two (h, w), not {len(value)}",
                expr.span,
                trace=ctx.trace,
                hint=f"e.g. {param.name}=3 or {param.name}=(3, 1)",
            )
        return tuple(_check_number(param, item, "int", expr, ctx, where) for item in value)
    number_kind = "float" if kind == "float" else "int"
    return _check_number(param, value, number_kind, expr, ctx, where)


def _check_number(param: op_registry.Param, value, kind: str, expr: s.Expr, ctx: Context, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "true/false" if isinstance(value, bool) else _describe(value)
        raise NetError(f"{where} must be a number, got {what}", expr.span, trace=ctx.trace, hint=_param_hint(param))
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise NetError(f"{where} must be a whole number, got {value:g}", expr.span, trace=ctx.trace, hint=_WHOLE)
        value = int(value)
    else:
        value = float(value)
    low, high = param.minimum, param.maximum
    if (low is not None and value < low) or (
        high is not None and (value >= high if param.below_maximum else value > high)
    ):
        bound = f"at least {low:g}" if low is not None else ""
        if high is not None:
            bound = (bound + " and " if bound else "") + ("below " if param.below_maximum else "at most ") + f"{high:g}"
        raise NetError(f"{where} must be {bound}, got {value:g}", expr.span, trace=ctx.trace, hint=_param_hint(param))
    return value


def _param_hint(param: op_registry.Param) -> str:
    """What a parameter is, and its default: the hint for a value of the wrong kind or out of range."""
    text = f"`{param.name}` is the {param.doc}" if param.doc else f"`{param.name}` is a number"
    if param.default is not REQUIRED and param.default is not None and not isinstance(param.default, bool):
        text += f"; its default is {param.default}"
    return text


def _example(spec: OpSpec) -> str:
    examples = {
        "conv": "conv(x, 64, size=3, pad=1)",
        "fc": "fc(x, 4096)",
        "maxpool": "maxpool(x, 3, stride=2)",
        "avgpool": "avgpool(x, 2)",
        "shuffle": "shuffle(x, 4)",
    }
    return "e.g. " + examples.get(spec.name, f"{spec.name}(x)")
