"""The syntax tree of a `.net` file: one small record per grammar rule, each with its source span."""

from __future__ import annotations

from dataclasses import dataclass

from netdsl.errors import Span

# --- expressions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class Name:
    name: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / // % **
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Tuple:
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class AllRef:
    """`all x`: every tower's copy of x, concatenated on channels in tower order."""

    name: str
    span: Span


@dataclass(frozen=True)
class TowerRef:
    """`x@gpu1`: one tower's copy of x."""

    name: str
    tower: str
    span: Span


Expr = Number | Name | BinOp | Neg | Tuple | AllRef | TowerRef


# --- chains ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Call:
    """`name(args)` (a layer, preset or block applied to arguments) or a bare `name` (args is None)."""

    name: str
    args: tuple[Expr, ...] | None
    kwargs: tuple[Kwarg, ...]
    span: Span


Element = Call | AllRef | TowerRef


@dataclass(frozen=True)
class Chain:
    elements: tuple[Element, ...]
    span: Span


# --- statements -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetStmt:
    name: str
    span: Span


@dataclass(frozen=True)
class InputStmt:
    name: str
    shape: tuple[Expr, ...]
    device: Name | None
    span: Span


@dataclass(frozen=True)
class OutputStmt:
    refs: tuple[Name | AllRef | TowerRef, ...]
    span: Span


@dataclass(frozen=True)
class ConstStmt:
    name: str
    value: Expr | Call
    span: Span


@dataclass(frozen=True)
class AssignStmt:
    name: str
    chain: Chain
    device: Name | None
    span: Span


@dataclass(frozen=True)
class IncludeStmt:
    path: str
    span: Span


@dataclass(frozen=True)
class DeviceStmt:
    names: tuple[Name, ...]
    memory: Expr | None
    unit: Name | None
    span: Span


@dataclass(frozen=True)
class ReturnStmt:
    chain: Chain
    span: Span


@dataclass(frozen=True)
class TowersStmt:
    towers: tuple[Name, ...]
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class BlockStmt:
    name: str
    params: tuple[Name, ...]
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class RepeatStmt:
    count: Expr
    index: Name | None  # `repeat n as i`: i counts 1..n
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class String:
    """A quoted string: a setting's value or pattern (the quotes removed)."""

    value: str
    span: Span


@dataclass(frozen=True)
class Setting:
    """`NAME ["PATTERN"] = VALUE` inside `train { }`."""

    name: Name
    pattern: String | None
    value: Expr | String
    span: Span


@dataclass(frozen=True)
class TrainStmt:
    settings: tuple[Setting, ...]
    span: Span


Stmt = (
    NetStmt
    | InputStmt
    | OutputStmt
    | ConstStmt
    | AssignStmt
    | IncludeStmt
    | DeviceStmt
    | ReturnStmt
    | TowersStmt
    | BlockStmt
    | RepeatStmt
    | TrainStmt
)


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    file: str
    statements: tuple[Stmt, ...]
