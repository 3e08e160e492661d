"""Text -> syntax tree. The grammar is `grammars/net.lark`; this module turns Lark's tree into the
records of `netdsl.lang.syntax` and Lark's exceptions into `NetError`s that point at the file."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from netdsl.errors import NetError, Sources, Span, os_hint
from netdsl.lang import syntax as s

# How terminals are named in "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted string ("...")',
    "_NL": "end of line",
    "PIPE": "`|`",
    "$END": "end of file",
}
_OPERATORS = frozenset({"`+`", "`-`", "`*`", "`/`", "`%`", "`**`", "`//`"})

# What one file may hold, so that a mistaken or hostile file fails in a second instead of running for
# minutes and ending out of memory. AlexNet's file is 1 KB and a generated net of 10,000 layers 0.6 MB.
MAX_FILE_BYTES = 8 * 2**20
MAX_STATEMENTS = 200_000  # per file
MAX_STATEMENT_TOKENS = 20_000  # names, numbers and operators in one statement: an expression of 10,000 terms


class _TooLongError(Exception):
    """Raised from the token stream; `parse_text` turns it into a NetError at the token."""

    def __init__(self, token: Token, message: str, hint: str) -> None:
        super().__init__(message)
        self.token, self.message, self.hint = token, message, hint


class _Continuations:
    """Drops newlines that do not end a statement: inside (...) and right after `|`.

    (A newline followed by a line that starts with `|` is swallowed by the PIPE terminal itself.)
    """

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        after_pipe = False
        statements = tokens = 0
        for token in stream:
            if token.type == "_NL" and (depth > 0 or after_pipe):
                continue
            tokens += 1
            if token.type == "_NL":
                statements, tokens = statements + 1, 0
                if statements > MAX_STATEMENTS:
                    raise _TooLongError(token, f"the file has more than {MAX_STATEMENTS:,} statements", "split it up")
            elif tokens > MAX_STATEMENT_TOKENS:
                raise _TooLongError(
                    token,
                    f"a statement longer than {MAX_STATEMENT_TOKENS:,} names, numbers and operators",
                    "name parts of a long expression with `const`",
                )
            if token.type == "LPAR":
                depth += 1
            elif token.type == "RPAR":
                depth = max(0, depth - 1)
            after_pipe = token.type == "PIPE"
            yield token


def grammar_text() -> str:
    """The grammar, read from the installed package (or from the source tree when run in place)."""
    try:
        return resources.files("netdsl.grammars").joinpath("net.lark").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        source_tree = Path(__file__).resolve().parents[2] / "grammars" / "net.lark"
        return source_tree.read_text(encoding="utf-8")


@functools.cache
def _parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_Continuations(),
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse_text(text: str, file: str = "<string>") -> s.Module:
    """Parse one file's text into a `syntax.Module`; raises `NetError` on a syntax error."""
    if len(text) > MAX_FILE_BYTES:
        raise _too_big(file, len(text.encode("utf-8")))
    Sources.remember(file, text)
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, file, text) from None
    except _TooLongError as error:
        token = error.token
        span = Span(file, token.line or 1, token.column or 1, token.end_line or 0, token.end_column or 0)
        raise NetError(error.message, span, hint=error.hint) from None
    try:
        statements = _ToSyntax(file).transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, NetError):
            raise error.orig_exc from None
        if isinstance(error.orig_exc, RecursionError):
            raise _too_deep(file) from None
        raise
    except RecursionError:  # Lark's transformer recurses once per level of the tree
        raise _too_deep(file) from None
    return s.Module(file, tuple(statements))


def _too_big(file: str, size: int) -> NetError:
    return NetError(
        f"the file is {size / 2**20:,.1f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB a .net file may be",
        where=file,
        hint="a net this large is better built with `repeat` and `block`",
    )


def _too_deep(file: str) -> NetError:
    return NetError(
        "the file nests too deeply (an expression or `{ }` blocks hundreds of levels deep)",
        where=file,
        hint="split long expressions with `const`",
    )


def parse_file(path: str | Path) -> s.Module:
    """Read and parse a `.net` file; unreadable files are reported as `NetError`s too."""
    return parse_text(read_source(Path(path)), str(path))


def read_source(path: Path, keep_line_ends: bool = False) -> str:
    """A `.net` file's text (`keep_line_ends`: CRLF stays CRLF, as `netdsl fmt` needs; else universal newlines);
    a file too large, missing, a folder, not UTF-8 or unreadable is a NetError naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # refused before it is read
            raise _too_big(str(path), size)
        # utf-8-sig: a byte-order mark, which some Windows editors put first, is not part of the text
        with open(path, encoding="utf-8-sig", newline="" if keep_line_ends else None) as file:
            return file.read()
    except FileNotFoundError:
        raise NetError(f"no such file: {path}", where=str(path), hint="check the path") from None
    except IsADirectoryError:
        raise NetError(
            f"{path} is a directory, not a .net file", where=str(path), hint="name the .net file inside it"
        ) from None
    except UnicodeDecodeError as error:
        hint = "a .net file is plain UTF-8 text"
        if Path(path).suffix.lower() == ".onnx":
            hint = (
                "an ONNX model: the netdsl commands take one where a net goes; in Python, import it first: "
                "text, weights = netdsl.interop.onnx_import.import_onnx(path) (docs/onnx.md)"
            )
        raise NetError(f"{path} is not UTF-8 text (byte {error.start})", where=str(path), hint=hint) from None
    except OSError as error:
        raise NetError(f"cannot read {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)) from None


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    return f"`{pattern.value}`" if pattern.type == "str" else terminal.lower()


def _expected(names: set[str]) -> str:
    words = {_describe(n) for n in names if not n.startswith("__")}
    if words - _OPERATORS:  # an operator is seldom what is missing; name the other choices
        words -= _OPERATORS
    words = sorted(words, key=lambda word: (word not in ("`)`", "`}`"), word))  # closers first
    if len(words) > 8:
        words = [*words[:8], "..."]
    return ", ".join(words)


def _syntax_error(error: UnexpectedInput, file: str, text: str = "") -> NetError:
    line, col = max(error.line, 1), max(error.column, 1)
    if isinstance(error, UnexpectedCharacters):
        char = error.char
        span = Span(file, line, col, line, col + 1)
        if char == '"':
            return NetError(
                "unterminated or misplaced string",
                span,
                hint='strings are used in include "file.net" and in train settings: data = "digits"',
            )
        return NetError(f"unexpected character {char!r}", span, hint=_hint_for_char(char))
    if isinstance(error, UnexpectedEOF):
        return NetError("unexpected end of file", Span(file, line, col), hint=f"expected {_expected(error.expected)}")
    assert isinstance(error, UnexpectedToken)
    token = error.token
    before, expected = _context(text, token, error.expected)
    end_col = (token.end_column or col + 1) if token.end_line == token.line else col + 1
    span = Span(file, line, col, line, end_col)
    if token.type == "$END":
        return NetError("unexpected end of file", span, hint=f"expected {_expected(expected)}")
    what = "end of line" if token.type == "_NL" else f"`{token.value.strip()}`"
    if token.type == "PIPE":
        what = "`|`"
    message = f"unexpected {what}"
    if token.type == "NAME" and token.value in _keywords():
        message = f"`{token.value}` is a reserved word and cannot be used here"
    keyword = before[-1] if before and before[-1].type != "NAME" and before[-1].value in _keywords() else None
    starts = len(before) == 1 or (len(before) > 1 and (before[-2].type == "_NL" or before[-2].value in (";", "{")))
    if token.value == "=" and keyword is not None and starts:  # `repeat = ...`: a keyword where a name was meant
        return NetError(
            f"`{keyword.value}` is a reserved word and cannot be used as a name",
            _token_span(file, keyword),
            hint=f"choose another name, e.g. `{keyword.value}_1`",
        )
    hint = f"expected {_expected(expected)}"
    if _in_train_block(before):
        hint += '; a train block holds settings, one `NAME = VALUE` or `NAME "PATTERN" = VALUE` a line'
    return NetError(message, span, hint=hint)


def _in_train_block(before: list[Token]) -> bool:
    """Whether the innermost `{ }` still open after `before` is a `train` block's."""
    depth = 0
    for index in range(len(before) - 1, -1, -1):
        if before[index].value == "}":
            depth += 1
        elif before[index].value == "{":
            if depth == 0:
                return index > 0 and before[index - 1].value == "train" and before[index - 1].type != "NAME"
            depth -= 1
    return False


def _context(text: str, token: Token, fallback: set[str]) -> tuple[list[Token], set[str]]:
    """The tokens before `token`, and the terminals the parser could take in its place.

    Lark's own `expected` set can be too wide (LALR shares states between rules, so it offers
    `memory` inside a block's parameter list), so the text is parsed again up to `token`.
    """
    if not text:
        return [], set(fallback)
    interactive = _parser().parse_interactive(text)
    before: list[Token] = []
    with contextlib.suppress(UnexpectedInput):  # the lexer stopped at `token`: the parser has not taken it
        for seen in interactive.iter_parse():
            if seen.type == token.type and seen.start_pos == token.start_pos:
                break
            before.append(seen)
    try:
        return before, interactive.accepts() or set(fallback)
    except UnexpectedInput:
        return before, set(fallback)


def _hint_for_char(char: str) -> str | None:
    if char in "[]":
        return "lists are written in parentheses: size=(5, 3)"
    if char == "'":
        return 'strings use double quotes: include "file.net"'
    if char == "-" or char == ">":
        return "chains are written with `|`: conv(x, 64, size=3) | relu"
    if not char.isprintable():
        return "remove it: a .net file is plain text, and this character is invisible (is the file binary?)"
    return "remove it; docs/language.md shows what a .net file is made of"


@functools.cache
def _keywords() -> frozenset[str]:
    return frozenset(
        t.pattern.value for t in _parser().terminals if t.pattern.type == "str" and t.pattern.value.isidentifier()
    )


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(file: str, token: Token) -> Span:
    return Span(file, token.line, token.column, token.end_line, token.end_column)


@v_args(meta=True)
class _ToSyntax(Transformer):
    """One method per grammar rule; a rule without a method would leave a raw tree and fail loudly."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _sp(self, meta) -> Span:
        return _span(self.file, meta)

    def _name(self, token: Token) -> s.Name:
        return s.Name(str(token), _token_span(self.file, token))

    def __default__(self, data, children, meta):
        raise AssertionError(f"grammar rule {data!r} has no transformer method")

    # statements
    def start(self, meta, children):
        return children

    def body(self, meta, children):
        return tuple(children)

    def net_stmt(self, meta, c):
        return s.NetStmt(str(c[0]), self._sp(meta))

    def input_stmt(self, meta, c):
        device = c[2] if len(c) > 2 else None
        return s.InputStmt(str(c[0]), c[1], device, self._sp(meta))

    def shape(self, meta, c):
        return tuple(c)

    def output_stmt(self, meta, c):
        return s.OutputStmt(tuple(c), self._sp(meta))

    def const_stmt(self, meta, c):
        return s.ConstStmt(str(c[0]), c[1], self._sp(meta))

    def assign_stmt(self, meta, c):
        device = c[2] if len(c) > 2 else None
        return s.AssignStmt(str(c[0]), c[1], device, self._sp(meta))

    def include_stmt(self, meta, c):
        return s.IncludeStmt(str(c[0])[1:-1], self._sp(meta))

    def device_stmt(self, meta, c):
        first_expr = next((i for i, x in enumerate(c) if not isinstance(x, Token)), len(c))
        names = tuple(self._name(t) for t in c[:first_expr])
        memory, unit = (c[first_expr], self._name(c[first_expr + 1])) if first_expr < len(c) else (None, None)
        return s.DeviceStmt(names, memory, unit, self._sp(meta))

    def return_stmt(self, meta, c):
        return s.ReturnStmt(c[0], self._sp(meta))

    def towers_stmt(self, meta, c):
        return s.TowersStmt(tuple(self._name(t) for t in c[:-1]), c[-1], self._sp(meta))

    def block_stmt(self, meta, c):
        return s.BlockStmt(str(c[0]), tuple(self._name(t) for t in c[1:-1]), c[-1], self._sp(meta))

    def repeat_stmt(self, meta, c):
        index = self._name(c[1]) if len(c) == 3 else None
        return s.RepeatStmt(c[0], index, c[-1], self._sp(meta))

    def train_stmt(self, meta, c):
        return s.TrainStmt(tuple(c), self._sp(meta))

    def setting(self, meta, c):
        pattern = c[1] if len(c) == 3 else None
        return s.Setting(self._name(c[0]), pattern, c[-1], self._sp(meta))

    def string(self, meta, c):
        return s.String(str(c[0])[1:-1], self._sp(meta))

    def placement(self, meta, c):
        return self._name(c[0])

    # chains
    def chain(self, meta, c):
        return s.Chain(tuple(e for e in c if not isinstance(e, Token)), self._sp(meta))

    def call(self, meta, c):
        for before, arg in itertools.pairwise(c[1:]):
            if isinstance(before, s.Kwarg) and not isinstance(arg, s.Kwarg):
                raise NetError(
                    f"a value by position after `{before.name}=`, which is given by name",
                    getattr(arg, "span", None) or self._sp(meta),
                    hint="give values by position first, then by name: conv(image, 64, size=3)",
                )
        args = tuple(a for a in c[1:] if not isinstance(a, s.Kwarg))
        kwargs = tuple(a for a in c[1:] if isinstance(a, s.Kwarg))
        return s.Call(str(c[0]), args, kwargs, self._sp(meta))

    def bare(self, meta, c):
        return s.Call(str(c[0]), None, (), self._sp(meta))

    def kwarg(self, meta, c):
        return s.Kwarg(str(c[0]), c[1], self._sp(meta))

    def tuple(self, meta, c):
        return s.Tuple(tuple(c), self._sp(meta))

    def name_ref(self, meta, c):
        return s.Name(str(c[0]), self._sp(meta))

    def all_ref(self, meta, c):
        return s.AllRef(str(c[0]), self._sp(meta))

    def tower_ref(self, meta, c):
        return s.TowerRef(str(c[0]), str(c[1]), self._sp(meta))

    # expressions
    def number(self, meta, c):
        text = str(c[0]).replace("_", "")
        try:
            value = float(text) if any(ch in text for ch in ".eE") else int(text)
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            value = math.inf
        if isinstance(value, float) and not math.isfinite(value):  # (isfinite would overflow on a huge int)
            raise NetError("number too large", self._sp(meta), hint="a number is at most about 1.8e308")
        return s.Number(value, self._sp(meta))

    def name(self, meta, c):
        return s.Name(str(c[0]), self._sp(meta))

    def _binop(op):  # noqa: N805 - a helper that builds methods
        def method(self, meta, c):
            return s.BinOp(op, c[0], c[1], self._sp(meta))

        return method

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")
    floordiv, mod, pow = _binop("//"), _binop("%"), _binop("**")

    def neg(self, meta, c):
        return s.Neg(c[0], self._sp(meta))

    def unary(self, meta, c):  # unary plus
        return c[0]
