"""Colours for `.net` text: the Pygments lexer (found through its entry point, as `pygmentize`, Sphinx and
MkDocs find it) reads every net and every documented example without an error token, and the TextMate
grammar under editors/ colours them the same way. To write editors/sublime/netdsl.tmLanguage again after
changing the JSON grammar: `python tests/test_highlight.py`."""

from __future__ import annotations

import json
import plistlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import BLOCKS

from netdsl.ir.ops import OPS
from netdsl.lang.parse import _keywords
from netdsl.lang.scope import BUILTINS

pygments = pytest.importorskip("pygments")
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename  # noqa: E402
from pygments.token import Comment, Error, Keyword, Name, Number, Operator, String  # noqa: E402

from netdsl.lang import highlight  # noqa: E402
from netdsl.lang.highlight import NetLexer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDITORS = ROOT / "editors"
GRAMMAR = EDITORS / "vscode" / "syntaxes" / "netdsl.tmLanguage.json"
PLIST = EDITORS / "sublime" / "netdsl.tmLanguage"
README = (ROOT / "README.md").read_text(encoding="utf-8")

TEXTS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "nets").glob("*.net"))}
TEXTS.update({f"language.md:{line}": body for info, body, line in BLOCKS if info == "net"})
TEXTS.update({f"README.md:{i}": body for i, body in enumerate(re.findall(r"^```net\n(.*?)^```", README, re.S | re.M))})


def _pygments_tokens(text: str) -> list[tuple[object, str]]:
    return list(NetLexer().get_tokens(text))


# --- Pygments -----------------------------------------------------------------------------------------


def test_pygments_finds_the_lexer_by_name_and_file_name():
    assert isinstance(get_lexer_by_name("netdsl"), NetLexer)
    assert isinstance(get_lexer_for_filename("alexnet.net"), NetLexer)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_every_net_and_example_has_no_error_token(name: str):
    tokens = _pygments_tokens(TEXTS[name])
    errors = [value for kind, value in tokens if kind in Error]
    assert errors == [], f"{name}: error tokens {errors}"
    assert "".join(value for _, value in tokens) == TEXTS[name] + ("" if TEXTS[name].endswith("\n") else "\n")


def test_the_lexers_words_are_the_languages():
    statement_words = set(highlight.STATEMENT_KEYWORDS) | set(highlight.PLACE_KEYWORDS) | set(highlight.RESERVED)
    assert statement_words | {highlight.SHAPE_KEYWORD} == set(_keywords())


def test_what_each_word_is():
    text = (
        'net n\ninput x: 3 x size x 4 on gpu0  # the shape\ndevice gpu0 memory 3 GiB\n'
        "const norm = lrn(k=2)\nblock stage(x, w) { return conv(x, w, size=3, pad=same) | norm }\n"
        'a = stage(all x, 1_000) | relu on gpu1\nrepeat 2 as i { b = x@gpu0 }\ntrain { lr = 1e-4; data = "digits" }\n'
    )
    kinds = {}
    for kind, value in _pygments_tokens(text):
        kinds.setdefault(value, set()).add(kind)
    assert kinds["net"] == kinds["block"] == kinds["repeat"] == {Keyword}
    assert kinds["input"] == {Keyword.Declaration}
    assert kinds["on"] == kinds["as"] == kinds["memory"] == kinds["all"] == {Keyword}
    assert Operator.Word in kinds["x"] and Name in kinds["x"]  # the shape's `x`, and the block's parameter
    assert kinds["conv"] == kinds["lrn"] == kinds["relu"] == {Name.Builtin}
    assert kinds["stage"] == {Name.Function}
    assert kinds["same"] == {Keyword.Constant}
    assert kinds["1_000"] == {Number.Integer} and kinds["1e-4"] == {Number.Float}
    assert kinds['"digits"'] == {String.Double}
    assert kinds["# the shape"] == {Comment.Single}
    assert kinds["|"] == kinds["@"] == {Operator}


def test_pygmentize_colours_a_net():
    result = subprocess.run(
        [sys.executable, "-m", "pygments", "-l", "netdsl", "-f", "html", str(ROOT / "nets" / "lenet5.net")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '<span class="nb">conv</span>' in result.stdout and '<span class="err">' not in result.stdout


# --- the TextMate grammar ------------------------------------------------------------------------------


def _grammar() -> dict:
    return json.loads(GRAMMAR.read_text(encoding="utf-8"))


def _rules(grammar: dict, patterns: list[dict]) -> list[dict]:
    """`patterns` with every include replaced by the rules it names."""
    found = []
    for rule in patterns:
        if "include" in rule:
            target = grammar["repository"][rule["include"].removeprefix("#")]
            found += _rules(grammar, target["patterns"]) if "patterns" in target and "begin" not in target else [target]
        else:
            found.append(rule)
    return found


def textmate_scopes(grammar: dict, text: str) -> list[str | None]:
    """The scope an editor gives each character of `text` (line by line, as TextMate does: at each place the
    rule matching first wins, an open rule's `end` before its patterns; captures colour their groups)."""
    scopes: list[str | None] = []
    open_rules: list[dict] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        line_scopes: list[str | None] = [None] * len(body)
        position = 0
        while position <= len(body):
            context = open_rules[-1] if open_rules else None
            candidates = []
            if context is not None:
                end = re.compile(context["end"]).search(body, position)
                if end:
                    candidates.append((end.start(), -1, None, end))
            rules = _rules(grammar, context["patterns"] if context else grammar["patterns"])
            for order, rule in enumerate(rules):
                match = re.compile(rule.get("match") or rule["begin"]).search(body, position)
                if match:
                    candidates.append((match.start(), order, rule, match))
            if not candidates:
                break
            *_, rule, match = min(candidates, key=lambda c: (c[0], c[1]))
            if rule is None:  # the open rule ends
                open_rules.pop()
            else:
                for index in range(match.start(), match.end()):
                    line_scopes[index] = rule.get("name")
                for group, capture in rule.get("beginCaptures", rule.get("captures", {})).items():
                    for index in range(match.start(int(group)), match.end(int(group))):
                        line_scopes[index] = capture["name"]
                if "begin" in rule:
                    open_rules.append(rule)
            position = match.end() if match.end() > position else position + 1
        scopes += [*line_scopes, None] if line.endswith("\n") else line_scopes
    return scopes


def _textmate_kind(scope: str | None) -> str | None:
    prefixes = [
        ("comment.", "comment"),
        ("string.", "string"),
        ("constant.language", "constant"),
        ("constant.numeric", "number"),
        ("keyword.operator.word", "keyword"),
        ("keyword.operator", "operator"),
        ("keyword.", "keyword"),
        ("support.function", "builtin"),
        ("entity.name.function", "function"),
    ]
    return next((kind for prefix, kind in prefixes if scope and scope.startswith(prefix)), None)


def _pygments_kinds(text: str) -> list[str | None]:
    order = [
        (Comment, "comment"),
        (String, "string"),
        (Keyword.Constant, "constant"),
        (Keyword, "keyword"),
        (Operator.Word, "keyword"),
        (Operator, "operator"),
        (Number, "number"),
        (Name.Builtin, "builtin"),
        (Name.Function, "function"),
    ]
    kinds: list[str | None] = []
    for token, value in _pygments_tokens(text):
        kind = next((name for parent, name in order if token in parent), None)
        kinds += [None if char.isspace() else kind for char in value]
    return kinds[: len(text)]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_the_textmate_grammar_colours_as_pygments_does(name: str):
    text = TEXTS[name]
    editor = [_textmate_kind(scope) for scope in textmate_scopes(_grammar(), text)]
    lexer = _pygments_kinds(text)
    differences = [
        f"line {text.count(chr(10), 0, i) + 1}: {text[i]!r} is {editor[i]} in TextMate, {lexer[i]} in Pygments"
        for i in range(len(text))
        if editor[i] != lexer[i] and not text[i].isspace()
    ]
    assert differences == [], "\n".join(differences[:10])


def test_the_textmate_grammar_knows_the_languages_words():
    grammar = _grammar()
    assert grammar["scopeName"] == "source.netdsl" and grammar["fileTypes"] == ["net"]
    rules = _rules(grammar, grammar["repository"]["values"]["patterns"])
    builtin = next(rule for rule in rules if rule.get("name", "").startswith("support.function"))
    assert builtin["match"] == r"\b(" + "|".join(OPS) + r")\b"
    constants = next(rule for rule in rules if rule.get("name", "").startswith("constant.language"))
    assert set(re.findall(r"\w+", constants["match"].replace(r"\b", " "))) == set(BUILTINS)
    statements = grammar["repository"]["statement-keyword"]["match"]
    assert set(re.findall(r"\w+", statements.replace(r"\b", " "))) == set(highlight.STATEMENT_KEYWORDS)


def test_the_editor_files_agree():
    assert plistlib.loads(PLIST.read_bytes()) == _grammar(), "run python tests/test_highlight.py"
    package = json.loads((EDITORS / "vscode" / "package.json").read_text(encoding="utf-8"))
    (language,) = package["contributes"]["languages"]
    (grammar,) = package["contributes"]["grammars"]
    assert language["extensions"] == [".net"] and grammar["scopeName"] == _grammar()["scopeName"]
    assert (EDITORS / "vscode" / grammar["path"]).resolve() == GRAMMAR
    json.loads((EDITORS / "vscode" / language["configuration"]).read_text(encoding="utf-8"))


if __name__ == "__main__":
    PLIST.write_bytes(plistlib.dumps(_grammar(), sort_keys=True))
    print(f"wrote {PLIST.relative_to(ROOT)}")
