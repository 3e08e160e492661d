"""What a name can mean while a `.net` file is built, and where a statement runs.

A scope maps each name to a number, a word, a tuple, a layer preset, a block, a tensor (one or more
layer outputs) or, for a name defined inside a `towers` block, one value per tower. A `Context` is
the place a statement runs in: its scope, block prefix, tower, repeat indices and expansion trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netdsl.errors import Frame, NetError, Span, did_you_mean
from netdsl.ir.ops import OPS
from netdsl.lang import syntax as s


@dataclass(frozen=True)
class Symbol:
    """A bare word with a meaning of its own, such as `same` in pad=same."""

    word: str


@dataclass(frozen=True)
class Tensors:
    """One or more layer outputs (several are joined on channels by the layer that reads them)."""

    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    """`const name = op(k=v, ...)`: a layer type with some parameters filled in."""

    op: str
    values: dict[str, s.Expr]  # parameter name -> the expression written for it
    span: Span


@dataclass(frozen=True)
class Block:
    stmt: s.BlockStmt


@dataclass
class Towered:
    """A name defined inside `towers`: one value per tower."""

    towers: tuple[str, ...]
    copies: dict[str, object]
    span: Span
    outer: object = None  # what the name meant before a tower rebound it (inside `repeat`)

    def view(self, tower: str | None):
        """The value a plain name has in `tower`: its own copy, else the value it had before."""
        return self.copies.get(tower, self.outer) if tower else None


# The words that start a statement; with `all` (`all x` reads every tower's copy of x, so a layer named
# `all` could never be read), the words no name may be. The grammar's other keywords (`on`, `as`,
# `memory`, `x`) are names too, except where they mean something.
STATEMENT_KEYWORDS = ("net", "input", "output", "const", "include", "device", "towers", "block", "repeat", "return",
                      "train")  # fmt: skip
RESERVED_WORDS = frozenset({*STATEMENT_KEYWORDS, "all"})


def check_name(name: str, span: Span) -> None:
    """Raises where `name` (of a layer, constant, block, parameter, counter or device) is a reserved word."""
    if name in RESERVED_WORDS:
        hint = f"choose another name, e.g. `{name}_1`"
        raise NetError(f"`{name}` is a reserved word and cannot be used as a name", span, hint=hint)


BUILTINS = {
    "true": True,
    "false": False,
    "same": Symbol("same"),
    "same_lower": Symbol("same_lower"),
    "valid": Symbol("valid"),
}


@dataclass
class Scope:
    names: dict[str, object] = field(default_factory=dict)
    spans: dict[str, Span] = field(default_factory=dict)
    parent: Scope | None = None

    def lookup(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return BUILTINS.get(name)

    def visible(self) -> set[str]:
        names = set(BUILTINS)
        scope = self
        while scope is not None:
            names |= set(scope.names)
            scope = scope.parent
        return names


@dataclass(frozen=True)
class Context:
    """Where a statement runs: its scope, block prefix, tower, repeat indices and expansion trace."""

    scope: Scope
    file: str
    prefix: str = ""
    tower: str | None = None
    towers: tuple[str, ...] = ()
    repeat: tuple[int, ...] = ()
    trace: tuple[Frame, ...] = ()
    block: str | None = None
    top_file: bool = True  # the main file, not an include
    device: str | None = None  # `on DEV` of the statement that expanded the current block

    def qualify(self, name: str, part: str | None = None) -> str:
        index = "".join(f"[{i}]" for i in self.repeat)
        full = f"{self.prefix}{name}{index}"
        if part:
            full += f".{part}"
        if self.tower:
            full += f"@{self.tower}"
        return full


def undefined(name: str, span: Span, ctx: Context) -> NetError:
    """The error for reading a name that `ctx` does not define, suggesting a near one."""
    if name in OPS:  # a layer type where a value is read: `const act = relu`, `conv(image, relu, ...)`
        return NetError(
            f"`{name}` is a layer type, not a value",
            span,
            trace=ctx.trace,
            hint=f"a preset of it takes parentheses: const my_{name} = {name}(); in a chain, write | {name}",
        )
    known = [n for n in ctx.scope.visible() if n not in BUILTINS]
    return NetError(
        f"`{name}` is not defined",
        span,
        trace=ctx.trace,
        hint=did_you_mean(name, known) or "define it with `name = ...` or `input name: C x H x W`",
    )
