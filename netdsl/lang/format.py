"""`.net` text in one canonical layout (`netdsl fmt`), as gofmt lays out Go: the same tokens on the same lines,
with the spaces between them, the indentation and the blank lines decided by the formatter alone.

- Line breaks stay where they are written (a statement is never joined to or split from another); blank
  lines collapse to one, and none open or close a file or a `{ }` body.
- A statement is indented four spaces per `{ }` around it. A line that continues a statement is indented
  four more, or, inside parentheses that a line leaves open after an argument, aligned under that argument.
- One space between tokens, except none inside `( )`, before `,`, `;` and `:`, around `@`, around the `=`
  of a parameter (`size=3`), after a sign (`-1`), and between a layer type and its `(`.
- In consecutive one-line statements `NAME = ...` (or `const NAME = ...`) the `=` signs line up when the
  names differ by at most MAX_NAME_PADDING characters, and the first `|` of chains that start with the same
  layer lines up when the chains' heads differ by at most MAX_PIPE_PADDING characters.
- Comments are kept word for word (trailing spaces dropped); comments that end consecutive lines line up,
  COMMENT_GAP spaces after the longest of those lines.

Only spaces and line breaks change, so the tokens, and with them the meaning, stay the same;
`format_text` checks it, parsing its result again.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from lark import Token

from netdsl.errors import NetError, Span
from netdsl.lang.parse import _parser, parse_text
from netdsl.lang.syntax import Module

INDENT = 4
MAX_NAME_PADDING = 3
MAX_PIPE_PADDING = 12
COMMENT_GAP = 2

# What lies between two tokens: only comments, line breaks, `\` line joins and spaces.
_BETWEEN = re.compile(
    r"(?P<comment>#[^\n]*)|(?P<join>\\[\t ]*\n)|(?P<newline>\n)|(?P<space>[\t \f]+)",
)
_LINE_BREAKS = re.compile(r"\r\n|\r")
_OPERAND_ENDS = frozenset({"NAME", "NUMBER", "STRING", "RPAR"})  # a sign after one of these is an operator
_SIGNS = frozenset({"-", "+"})
_CLOSERS = frozenset({")", ",", ";", ":"})  # written right after what comes before them


@dataclass
class _Line:
    """One line of the output."""

    tokens: list[Token] = field(default_factory=list)
    comment: str | None = None  # a comment ending the line, or the whole line when it has no tokens
    continues: bool = False  # the line continues the statement of the line above
    joined: bool = False  # the line ends with `\`
    indent: int = 0
    spaces: list[int] = field(default_factory=list)  # spaces before each token
    opens_statement: bool = False  # (set by the layout) the statement's first line

    @property
    def blank(self) -> bool:
        return not self.tokens and self.comment is None and not self.joined

    def width(self, upto: int | None = None) -> int:
        """Columns taken by the indentation and the tokens before index `upto` (all of them by default)."""
        tokens = self.tokens if upto is None else self.tokens[:upto]
        return self.indent + sum(self.spaces[i] + len(t.value) for i, t in enumerate(tokens))

    def code(self) -> str:
        text = " " * self.indent + "".join(" " * self.spaces[i] + t.value for i, t in enumerate(self.tokens))
        if self.joined:
            text += " \\" if self.tokens else "\\"
        return text


def format_text(text: str, file: str = "<string>") -> str:
    """`text` in the canonical layout; a NetError (with the place) where the text does not parse."""
    newline = "\r\n" if "\r\n" in text.split("\n", 1)[0] + "\n" else "\n"
    text = _LINE_BREAKS.sub("\n", text)
    before = parse_text(text, file)
    lines = _read_lines(text if text.endswith("\n") else text + "\n")
    _lay_out(lines)
    _align_statements(lines)
    formatted = _render(lines)
    _check_same_meaning(before, formatted, file)
    return formatted.replace("\n", newline)


def _check_same_meaning(before: Module, formatted: str, file: str) -> None:
    """Black's safety check: the formatted text parses to the same syntax tree, places apart."""
    try:
        after = parse_text(formatted, f"{file} (formatted)")
    except NetError as error:
        raise AssertionError(f"netdsl fmt made {file} unreadable, a bug: {error}") from None
    if _without_places(after.statements) != _without_places(before.statements):
        raise AssertionError(f"netdsl fmt would change what {file} means, a bug")


# --- reading: the tokens, the comments and the line breaks of the text ----------------------------


def _read_lines(text: str) -> list[_Line]:
    """The text's lines, each with its tokens and comment. The parser's own lexer reads the tokens (so
    `x`, `on` or `memory` are keywords exactly where the parser takes them as such); the statement ends are
    the line breaks the parser sees, the others continue a statement."""
    tokens = []
    statement_ends: set[int] = set()
    for token in _parser().parse_interactive(text).iter_parse():
        if token.type == "_NL":
            statement_ends.update(token.start_pos + m.start() for m in re.finditer("\n", token.value))
        elif token.type == "PIPE" and token.value != "|":  # the line breaks and comments before a `|` line
            tokens.append(Token("PIPE", "|", start_pos=token.end_pos - 1, end_pos=token.end_pos))
        else:
            tokens.append(token)
    lines = [_Line()]
    position = 0
    for token in [*tokens, None]:
        end = len(text) if token is None else token.start_pos
        for match in _BETWEEN.finditer(text, position, end):
            kind = match.lastgroup
            if kind == "comment":
                lines[-1].comment = match.group().rstrip()
            elif kind == "join":
                lines[-1].joined = True
                lines.append(_Line(continues=True))
            elif kind == "newline":
                lines.append(_Line(continues=match.start() not in statement_ends))
            position = match.end()
        if position != end:
            raise AssertionError(f"unexpected text between tokens at offset {position}: {text[position:end]!r}")
        if token is not None:
            lines[-1].tokens.append(token)
            position = token.end_pos
    for line, below in itertools.pairwise(lines):
        # a `\` before an empty line or a `}` joins nothing: the statement ends there anyway
        if line.joined and below.comment is None and (not below.tokens or below.tokens[0].value == "}"):
            line.joined = below.continues = False
    return lines


# --- layout: indentation and spaces ----------------------------------------------------------------


def _lay_out(lines: list[_Line]) -> None:
    braces = 0  # `{` open
    parens: list[tuple[int, int | None]] = []  # for each `(` open: its line's indent, and the column of
    # the argument after it when that is on the same line (None: the `(` ends its line)
    statement_indent = 0
    before: Token | None = None  # the token before, on this line or an earlier one
    sign = False  # `before` is a sign (`-1`), not an operator
    for line in lines:
        closes = bool(line.tokens) and line.tokens[0].value == "}"
        if not line.continues:
            statement_indent = INDENT * (braces - closes)
            line.indent = statement_indent
            line.opens_statement = bool(line.tokens)
        elif parens:
            line_indent, argument = parens[-1]
            if argument is None:  # a `)` on a line of its own closes under the line that opened it
                line.indent = line_indent if line.tokens and line.tokens[0].value == ")" else line_indent + INDENT
            else:
                line.indent = argument
        else:
            line.indent = statement_indent + INDENT
        line.spaces = []
        for index, token in enumerate(line.tokens):
            line.spaces.append(0 if index == 0 else _space(before, token, len(parens) > 0, sign))
            sign = token.value in _SIGNS and (before is None or before.type not in _OPERAND_ENDS)
            if token.value == "(":
                last = index == len(line.tokens) - 1
                parens.append((line.indent, None if last else line.width(index + 1)))
            elif token.value == ")" and parens:
                parens.pop()
            elif token.value == "{":
                braces += 1
            elif token.value == "}":
                braces = max(0, braces - 1)
            before = token


def _space(before: Token, token: Token, in_parens: bool, after_sign: bool) -> int:
    if token.value in _CLOSERS or before.value == "(" or "@" in (before.value, token.value):
        return 0
    if token.value == "(" and before.type == "NAME":  # a call: conv(...)
        return 0
    if in_parens and "=" in (before.value, token.value):  # a parameter by name: size=3
        return 0
    if after_sign or (before.value == "{" and token.value == "}"):
        return 0
    return 1


# --- alignment: `=`, the first `|` of similar chains, comments -------------------------------------


def _name_end(line: _Line, next_line: _Line | None) -> tuple[str, int] | None:
    """For a one-line `NAME = ...`, `NAME "PATTERN" = ...` or `const NAME = ...`: its kind and the index of
    its `=`; None for any other line."""
    if not line.opens_statement or line.joined or (next_line is not None and next_line.continues):
        return None
    if any(t.value in (";", "{", "}") for t in line.tokens):
        return None
    kinds = [t.type for t in line.tokens[:3]]
    values = [t.value for t in line.tokens[:3]]
    if kinds[:1] == ["CONST"] and values[2:3] == ["="]:
        return "const", 2
    if kinds[:1] == ["NAME"] and values[1:2] == ["="]:
        return "assign", 1
    if kinds[:2] == ["NAME", "STRING"] and values[2:3] == ["="]:
        return "assign", 2
    return None


def _align_statements(lines: list[_Line]) -> None:
    run: list[tuple[_Line, int]] = []  # consecutive one-line statements of one kind and indent
    kind = None
    for index, line in enumerate(lines):
        found = _name_end(line, lines[index + 1] if index + 1 < len(lines) else None)
        if found is None or found[0] != kind or (run and run[0][0].indent != line.indent):
            _align_run(run)
            run = []
        kind = found[0] if found else None
        if found:
            run.append((line, found[1]))
    _align_run(run)


def _align_run(run: list[tuple[_Line, int]]) -> None:
    if len(run) > 1:
        _pad(run, MAX_NAME_PADDING)
    group: list[tuple[_Line, int]] = []
    head = None
    for line, equals in run:
        first = line.tokens[equals + 1] if equals + 1 < len(line.tokens) else None
        key = (first.type, first.value) if first is not None else None
        if key != head:
            _align_pipes(group)
            group = []
        head = key
        group.append((line, equals))
    _align_pipes(group)


def _align_pipes(group: list[tuple[_Line, int]]) -> None:
    pipes = []
    for line, _ in group:
        index = next((i for i, t in enumerate(line.tokens) if t.type == "PIPE"), None)
        if index is not None:
            pipes.append((line, index))
    if len(pipes) > 1:
        _pad(pipes, MAX_PIPE_PADDING)


def _pad(marks: list[tuple[_Line, int]], most: int) -> None:
    """Puts the token at each mark in one column, when no line would need more than `most` spaces."""
    columns = [line.width(index) for line, index in marks]
    if max(columns) - min(columns) <= most:
        for (line, index), column in zip(marks, columns):
            line.spaces[index] += max(columns) - column


# --- writing ----------------------------------------------------------------------------------------


def _render(lines: list[_Line]) -> str:
    lines = _without_extra_blanks(lines)
    texts = [line.code() for line in lines]
    start = 0
    while start < len(lines):  # comments ending consecutive lines share a column
        end = start
        while end < len(lines) and lines[end].tokens and lines[end].comment is not None:
            end += 1
        if end == start:
            line = lines[start]
            if line.comment is not None:
                texts[start] = " " * line.indent + line.comment
            start += 1
            continue
        column = max(len(texts[i]) for i in range(start, end)) + COMMENT_GAP
        for i in range(start, end):
            texts[i] = texts[i].ljust(column) + lines[i].comment
        start = end
    return "".join(text.rstrip() + "\n" for text in texts)


def _without_extra_blanks(lines: list[_Line]) -> list[_Line]:
    """No blank line at the start or the end, after a line that opens `{`, before a line that closes it,
    or after another blank line."""
    kept: list[_Line] = []
    for line in lines:
        if line.blank and (not kept or kept[-1].blank or (kept[-1].tokens and kept[-1].tokens[-1].value == "{")):
            continue
        if line.tokens and line.tokens[0].value == "}" and kept and kept[-1].blank:
            kept.pop()
        kept.append(line)
    while kept and kept[-1].blank:
        kept.pop()
    return kept


def _without_places(value):
    """A syntax tree with every `Span` left out, to compare two parses of one net."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        values = [getattr(value, f.name) for f in dataclasses.fields(value)]
        return (type(value).__name__, *(_without_places(v) for v in values if not isinstance(v, Span)))
    if isinstance(value, tuple):
        return tuple(_without_places(item) for item in value)
    return value
