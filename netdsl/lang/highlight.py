"""A Pygments lexer for `.net` files, so `pygmentize -l netdsl`, Sphinx and MkDocs colour them.

Pygments finds it through the `pygments.lexers` entry point in pyproject.toml. The words it colours come
from the language itself: the keywords of `grammars/net.lark` (tests/test_highlight.py checks the list),
the layer types of `netdsl.ir.ops` and the built-in words of `netdsl.lang.scope`. Pygments is needed only
here: `pip install pygments` (it comes with netdsl's `test` and `dev` extras).
"""

from __future__ import annotations

from typing import ClassVar

from pygments.lexer import RegexLexer, bygroups, default, include, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

from netdsl.ir.ops import OPS
from netdsl.lang.scope import BUILTINS, STATEMENT_KEYWORDS

# the grammar's other keywords (`on`, `as`, `memory`, `x`) are names too, except where they mean something
PLACE_KEYWORDS = ("on", "as", "memory")
SHAPE_KEYWORD = "x"
RESERVED = ("all",)
_NAME = r"[A-Za-z_][A-Za-z_0-9]*"


class NetLexer(RegexLexer):
    """The `.net` language of netdsl: layers, chains, towers, blocks and training settings."""

    name = "netdsl"
    aliases: ClassVar[list[str]] = ["netdsl", "net"]
    filenames: ClassVar[list[str]] = ["*.net"]
    mimetypes: ClassVar[list[str]] = ["text/x-netdsl"]

    tokens: ClassVar[dict[str, list]] = {
        "root": [
            include("common"),
            (r"(input)(\s+)(" + _NAME + ")", bygroups(Keyword.Declaration, Whitespace, Name.Variable), "shape"),
            (words(STATEMENT_KEYWORDS, suffix=r"\b"), Keyword),
            include("values"),
        ],
        # `input NAME: C x H x W [on DEV]`: here `x` separates the dimensions.
        "shape": [
            (r"\n", Whitespace, "#pop"),
            (r";", Punctuation, "#pop"),
            include("common"),
            (SHAPE_KEYWORD + r"\b", Operator.Word),
            include("values"),
            default("#pop"),
        ],
        "common": [
            (r"[^\S\n]+", Whitespace),
            (r"\n", Whitespace),
            (r"\\(?=[\t ]*\r?\n)", Punctuation),  # a `\` that joins the next line
            (r"#.*$", Comment.Single),
            (r'"[^"\n]*"', String.Double),
        ],
        "values": [
            # `on gpu0`, `as i`, `memory 3 GiB`: keywords before what they introduce, names elsewhere
            (words(PLACE_KEYWORDS, suffix=r"\b(?=[^\S\n]+[\w.(+-])"), Keyword),
            (words(RESERVED, suffix=r"\b"), Keyword),
            (words(tuple(sorted(BUILTINS)), suffix=r"\b"), Keyword.Constant),
            (words(tuple(OPS), suffix=r"\b"), Name.Builtin),
            (_NAME + r"(?=\s*\()", Name.Function),
            (_NAME, Name),
            (r"(\d[\d_]*\.[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?", Number.Float),
            (r"\d[\d_]*[eE][+-]?\d+", Number.Float),
            (r"\d[\d_]*", Number.Integer),
            (r"\*\*|//|[-+*/%]", Operator),
            (r"\||@", Operator),
            (r"=", Operator),
            (r"[(){},;:]", Punctuation),
            (r"\r", Whitespace),
        ],
    }
