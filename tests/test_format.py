"""`netdsl fmt`: one canonical layout that keeps every comment, changes no meaning (every net and every
example of docs/language.md builds the same graph, formatted) and is idempotent; the command rewrites only
what changes, atomically, and `--check` writes nothing."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
from pathlib import Path

import pytest
from test_docs import EXAMPLES, INCLUDED

import netdsl
from netdsl.cli.main import main
from netdsl.errors import Span
from netdsl.lang import format as net_format
from netdsl.lang.format import format_text
from netdsl.lang.parse import _parser

ROOT = Path(__file__).resolve().parent.parent
NETS = sorted((ROOT / "nets").glob("*.net"))
README_NETS = re.findall(r"^```net\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)
_COMMENT_OR_STRING = re.compile(r'"[^"\n]*"|#[^\n]*')


def _comments(text: str) -> list[str]:
    return [m.group().rstrip() for m in _COMMENT_OR_STRING.finditer(text) if m.group().startswith("#")]


def _without_positions(value):
    """A graph's records as plain values, every `Span` (a place in the text) left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _without_positions(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not isinstance(getattr(value, f.name), Span)
        }
    if isinstance(value, dict):
        return {key: _without_positions(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_positions(item) for item in value]
    return value


def _meaning(graph) -> dict:
    """What a built net is, apart from where (in which file, at which place) each thing was written."""
    facts = {key: value for key, value in graph.graph.items() if key != "file"}
    return {
        "graph": _without_positions(facts),
        "layers": {name: _without_positions(data["layer"]) for name, data in graph.nodes(data=True)},
        "edges": sorted(graph.edges),
    }


def _assert_canonical(text: str, formatted: str) -> None:
    assert format_text(formatted) == formatted, "formatting twice changes the text"
    assert _comments(formatted) == _comments(text), "a comment was lost or changed"
    assert all(line == line.rstrip() for line in formatted.splitlines())
    assert formatted == "" or (formatted.endswith("\n") and not formatted.endswith("\n\n"))


# --- every net and every documented example ---------------------------------------------------------


@pytest.mark.parametrize("path", NETS, ids=[p.stem for p in NETS])
def test_every_net_keeps_its_meaning(path: Path):
    text = path.read_text(encoding="utf-8")
    formatted = format_text(text, str(path))
    _assert_canonical(text, formatted)
    original = netdsl.load_graph(path)
    assert _meaning(netdsl.graph_from_text(formatted, file=str(path))) == _meaning(original)


def test_the_readme_net_keeps_its_meaning():
    (text,) = README_NETS
    formatted = format_text(text)
    _assert_canonical(text, formatted)
    assert _meaning(netdsl.graph_from_text(formatted)) == _meaning(netdsl.graph_from_text(text))


def test_the_fuzzers_random_nets_keep_their_meaning():
    """The compiler, training and ONNX fuzzers' random nets: towers, blocks, repeats, `all`, tuples of pads and
    every layer's parameters in the forms those generators write them (a campaign of 1,200 such nets, and 700
    mutants of the bundled nets that built, found nothing; these keep it so)."""
    import test_compiler_fuzz
    import test_onnx_fuzz
    import test_train_fuzz

    texts = [test_compiler_fuzz.generate(seed).text for seed in range(10)]
    texts += [test_train_fuzz.random_net(seed, tiny).text for seed in range(10) for tiny in (True, False)]
    texts += [test_onnx_fuzz.random_net(seed) for seed in range(10)]
    for text in texts:
        formatted = format_text(text)
        _assert_canonical(text, formatted)
        assert _meaning(netdsl.graph_from_text(formatted)) == _meaning(netdsl.graph_from_text(text)), text


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """The documentation's included files as written, and formatted."""
    written, formatted = tmp_path_factory.mktemp("written"), tmp_path_factory.mktemp("formatted")
    for body, _line in INCLUDED:
        name = body.splitlines()[0].removeprefix("# file:").strip()
        for folder, text in ((written, body), (formatted, format_text(body, name))):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
    return written, formatted


def _build(text: str, folder: Path):
    """The graph `text` builds, or the message of the error it raises."""
    try:
        return _meaning(netdsl.graph_from_text(text, file=str(folder / "main.net")))
    except netdsl.NetError as error:
        return error.message.replace(str(folder), "FOLDER")


@pytest.mark.parametrize(("info", "body", "line"), EXAMPLES, ids=[f"{i}-line{n}" for i, _, n in EXAMPLES])
def test_every_doc_example_keeps_its_meaning(info: str, body: str, line: int, folders):
    written, formatted_folder = folders
    try:
        formatted = format_text(body, "main.net")
    except netdsl.NetError as error:  # a syntax error: formatting reports it as checking does
        assert info == "net-error"
        with pytest.raises(netdsl.NetError) as checked:
            netdsl.graph_from_text(body, file="main.net")
        assert str(error) == str(checked.value)
        return
    _assert_canonical(body, formatted)
    assert _build(formatted, formatted_folder) == _build(body, written), f"doc line {line}"


def _respaced(text: str, rng: random.Random) -> str:
    """`text` with other spaces between the tokens of a line (none where there were none, or more) and
    another indentation on each line: what a careless hand changes, never what a token is."""
    pieces, position = [], 0
    for token in _parser().parse_interactive(text).iter_parse():
        if token.type == "_NL" or token.end_pos is None:
            continue
        gap = text[position : token.start_pos]
        if re.fullmatch(r"[ \t]*", gap):
            gap = " " * rng.randint(0 if gap == "" else 1, 3)
        elif re.fullmatch(r"(?s).*\n[ \t]*", gap):  # a line's indentation, after its line break
            gap = gap.rstrip(" \t") + rng.choice(["", " ", "\t", "       "])
        pieces += [gap, token.value]
        position = token.end_pos
    return "".join(pieces) + rng.choice(["", "  "]) + text[position:]


TEXTS = [path.read_text(encoding="utf-8") for path in NETS]
TEXTS += [body for _, body, _ in EXAMPLES] + [body for body, _ in INCLUDED]


def test_respaced_text_formats_alike():
    """The layout depends on the tokens and the line breaks alone (seeded, three variants of each text)."""
    rng = random.Random(14)
    checked = 0
    for text in TEXTS:
        try:
            formatted = format_text(text)
        except netdsl.NetError:
            continue
        for _ in range(3):
            variant = _respaced(text, rng)
            assert format_text(variant) == formatted, f"{text!r} re-spaced as {variant!r}"
            checked += 1
    assert checked > 300


def test_included_doc_files_are_formatted_alike():
    for body, _line in INCLUDED:
        _assert_canonical(body, format_text(body))


# --- the layout --------------------------------------------------------------------------------------

LAYOUTS = {
    "spaces between tokens": (
        "input image :3 x 8 x 8 on gpu0\na=conv( image,8,size=3,pad=( 1,1 ) )|relu\n",
        "input image: 3 x 8 x 8 on gpu0\na = conv(image, 8, size=3, pad=(1, 1)) | relu\n",
    ),
    "operators and signs": (
        "const k=-(2+1)*-3**-1//2%5\nconst m = + k\n",
        "const k = -(2 + 1) * -3 ** -1 // 2 % 5\nconst m = +k\n",
    ),
    "towers, all and @": (
        "towers gpu0,gpu1{\na=relu( image )\nb = a @ gpu1|add( all  a )\n}\n",
        "towers gpu0, gpu1 {\n    a = relu(image)\n    b = a@gpu1 | add(all a)\n}\n",
    ),
    "x is a keyword in a shape and a name elsewhere": (
        "input x :3 x  8 x 8\nblock f( x ){return x|relu}\ny=f( x )\n",
        "input x: 3 x 8 x 8\nblock f(x) { return x | relu }\ny = f(x)\n",
    ),
    "indentation by braces": (
        "block b(x) {\n  repeat 2 as i {\n x = relu(x)\n         }\n        return x\n    }\n",
        "block b(x) {\n    repeat 2 as i {\n        x = relu(x)\n    }\n    return x\n}\n",
    ),
    "statements sharing a line, empty bodies": (
        "a=relu(x) ;b=relu(a)\nrepeat 0 { }\ntrain{lr=0.1;batch=2}\n",
        "a = relu(x); b = relu(a)\nrepeat 0 {}\ntrain { lr = 0.1; batch = 2 }\n",
    ),
    "blank lines": (
        "\n\n# top\n\n\n\na = relu(x)\nrepeat 2 {\n\n   a = relu(a)\n\n}\n\n\n",
        "# top\n\na = relu(x)\nrepeat 2 {\n    a = relu(a)\n}\n",
    ),
    "arguments continued under the first": (
        "a = conv(image, 16,\n   size=3,   # three\n  pad=1)\n",
        "a = conv(image, 16,\n         size=3,  # three\n         pad=1)\n",
    ),
    "arguments continued after an open parenthesis": (
        "a = conv(\nimage, 16,\n  size=3\n      )\n",
        "a = conv(\n    image, 16,\n    size=3\n)\n",
    ),
    "chains continued with |": (
        "a = conv(x, 8, size=3) |\nrelu\nb = a\n| relu\n  # note\n\n\n        | maxpool(2)\n",
        "a = conv(x, 8, size=3) |\n    relu\nb = a\n    | relu\n    # note\n\n    | maxpool(2)\n",
    ),
    "a line joined with a backslash": (
        "const w = 2 *\\\n16\n",
        "const w = 2 * \\\n    16\n",
    ),
    "= lines up in a run of similar names": (
        "conv1 = relu(x)\nfc6 = relu(x)\nconst a = 1\nconst bcd = 2\nsettings = relu(x)\nx = relu(x)\n",
        "conv1 = relu(x)\nfc6   = relu(x)\nconst a   = 1\nconst bcd = 2\nsettings = relu(x)\nx = relu(x)\n",
    ),
    "the first | lines up in chains that start with one layer": (
        "c1 = conv(image, 6, size=5) | relu\nc3 = conv(c1, 16, size=5) | relu\nf5 = fc(c3, 120) | relu\n"
        "f6 = fc(f5, 84) | relu\nf7 = fc(f6, 10)\n",
        "c1 = conv(image, 6, size=5) | relu\nc3 = conv(c1, 16, size=5)   | relu\nf5 = fc(c3, 120) | relu\n"
        "f6 = fc(f5, 84)  | relu\nf7 = fc(f6, 10)\n",
    ),
    "comments line up on consecutive lines": (
        "a = relu(x) # one\nlonger = relu(a)      # two\n\nc = relu(a)   # alone\n# a line of its own\n",
        "a = relu(x)       # one\nlonger = relu(a)  # two\n\nc = relu(a)  # alone\n# a line of its own\n",
    ),
    "comments keep their words; tabs become spaces": (
        "\ta = relu(x)\t#\tkeep   these  spaces\t\n  #no space after the hash\n",
        "a = relu(x)  #\tkeep   these  spaces\n#no space after the hash\n",
    ),
    "train settings and patterns": (
        'train {\n  lr=0.1\n  decay_mult "*.bias"=0\n  milestones=( 30,60 )\n}\n',
        'train {\n    lr = 0.1\n    decay_mult "*.bias" = 0\n    milestones = (30, 60)\n}\n',
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout(name: str):
    text, expected = LAYOUTS[name]
    assert format_text(text) == expected
    assert format_text(expected) == expected


def test_long_padding_is_not_used_to_line_up():
    text = (
        "a = relu(x)\nrather_long = relu(x)\n"
        "b = conv(x, 8, size=3) | relu\nc = conv(x, 8, size=(3, 5), stride=(1, 2), pad=(1, 2)) | relu\n"
    )
    assert format_text(text) == text


def test_crlf_stays_crlf_and_empty_text_stays_empty():
    assert format_text("a=relu(x)\r\nb = relu(a)  \r\n") == "a = relu(x)\r\nb = relu(a)\r\n"
    assert format_text("") == "" and format_text("\n\n  \n") == ""
    assert format_text("a = relu(x)") == "a = relu(x)\n"


def test_a_syntax_error_is_reported_with_its_place():
    with pytest.raises(netdsl.NetError) as error:
        format_text("input image: 3 x 8 x 8\na = relu(image))\n", "bad.net")
    assert str(error.value).startswith("bad.net:2:16: error: unexpected `)`")


def test_a_layout_that_would_change_the_meaning_is_refused(monkeypatch):
    monkeypatch.setattr(net_format, "_render", lambda lines: "input image: 3 x 8 x 9\n")
    with pytest.raises(AssertionError, match=r"would change what net\.net means"):
        format_text("input image: 3 x 8 x 8\n", "net.net")
    monkeypatch.setattr(net_format, "_render", lambda lines: "input image: 3 x\n")
    with pytest.raises(AssertionError, match="unreadable"):
        format_text("input image: 3 x 8 x 8\n", "net.net")


# --- the command --------------------------------------------------------------------------------------

MESSY = "input image :3 x 8 x 8\na=conv( image,8,size=3 )|relu   # two layers\n"
TIDY = "input image: 3 x 8 x 8\na = conv(image, 8, size=3) | relu  # two layers\n"


def _file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a time a rewrite would change
    return path


def test_fmt_rewrites_only_the_files_that_change(tmp_path, capsys):
    messy, tidy = _file(tmp_path, "messy.net", MESSY), _file(tmp_path, "tidy.net", TIDY)
    assert main(["fmt", str(messy), str(tidy)]) == 0
    assert capsys.readouterr().out == f"reformatted {messy}\n"
    assert messy.read_text() == TIDY
    assert tidy.stat().st_mtime_ns == 1_000_000_000
    assert main(["fmt", str(messy), str(tidy)]) == 0  # formatted: nothing to do
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messy.net", "tidy.net"]  # no temporary left


def test_fmt_check_lists_what_would_change_and_writes_nothing(tmp_path, capsys):
    messy, tidy = _file(tmp_path, "messy.net", MESSY), _file(tmp_path, "tidy.net", TIDY)
    assert main(["fmt", "--check", str(messy), str(tidy)]) == 1
    assert capsys.readouterr().out == f"would reformat {messy}\n"
    assert messy.read_text() == MESSY and messy.stat().st_mtime_ns == 1_000_000_000
    assert main(["fmt", "--check", str(tidy)]) == 0
    assert capsys.readouterr() == ("", "")


def test_fmt_diff_shows_the_changes(tmp_path, capsys):
    messy = _file(tmp_path, "messy.net", MESSY)
    assert main(["fmt", "--diff", str(messy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {messy}\n+++ {messy} (formatted)\n")
    assert "-a=conv( image,8,size=3 )|relu   # two layers\n" in out and f"+{TIDY.splitlines()[1]}\n" in out
    assert messy.read_text() == MESSY
    assert main(["fmt", "--diff", "--check", str(messy)]) == 1


def _stdin(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def test_fmt_reads_standard_input(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _stdin(MESSY.encode()))
    assert main(["fmt", "-"]) == 0
    assert capsys.readouterr().out == TIDY
    monkeypatch.setattr("sys.stdin", _stdin(MESSY.encode()))
    assert main(["fmt", "--check", "-"]) == 1
    assert capsys.readouterr().out == "would reformat <stdin>\n"
    monkeypatch.setattr("sys.stdin", _stdin(b"net a\n\xff\n"))  # as a file's bytes: named, exit status 1
    assert main(["fmt", "-"]) == 1
    assert "<stdin>: error: standard input is not UTF-8 text (byte 6)" in capsys.readouterr().err


def test_fmt_formats_the_net_files_of_a_folder(tmp_path, capsys):
    nested = _file(tmp_path, "a/b/deep.net", MESSY)
    other = _file(tmp_path, "a/notes.txt", MESSY)
    assert main(["fmt", str(tmp_path)]) == 0
    assert nested.read_text() == TIDY and other.read_text() == MESSY


def test_fmt_writes_nothing_when_a_file_does_not_parse(tmp_path, capsys):
    messy = _file(tmp_path, "messy.net", MESSY)
    broken = _file(tmp_path, "broken.net", "input image: 3 x 8 x 8\na = relu(image))\n")
    assert main(["--color=never", "fmt", str(messy), str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{broken}:2:16: error: unexpected `)`") and "Traceback" not in err
    assert messy.read_text() == MESSY


def test_fmt_reports_missing_and_unreadable_files(tmp_path, capsys):
    assert main(["fmt", str(tmp_path / "missing.net")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    latin = tmp_path / "latin.net"
    latin.write_bytes("# caf\xe9\n".encode("latin-1"))
    assert main(["fmt", str(latin)]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_fmt_keeps_line_ends_permissions_and_links(tmp_path, capsys):
    crlf = _file(tmp_path, "crlf.net", MESSY.replace("\n", "\r\n"))
    crlf.chmod(0o640)
    link = tmp_path / "link.net"
    link.symlink_to(crlf)
    assert main(["fmt", str(link)]) == 0
    assert link.is_symlink() and crlf.read_bytes() == TIDY.replace("\n", "\r\n").encode()
    assert crlf.stat().st_mode & 0o777 == 0o640


def test_fmt_refuses_to_write_what_it_cannot_read_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(net_format, "_render", lambda lines: "input image: 3 x 8 x 9\n")
    messy = _file(tmp_path, "messy.net", MESSY)
    assert main(["fmt", str(messy)]) == 2  # a bug in netdsl, said as such
    assert "internal error" in capsys.readouterr().err
    assert messy.read_text() == MESSY


def test_the_bundled_nets_are_formatted(capsys):
    assert main(["fmt", "--check", str(ROOT / "nets")]) == 0, capsys.readouterr().out


def test_the_documented_example_is_what_fmt_writes():
    section = (ROOT / "docs" / "language.md").read_text(encoding="utf-8").split("\n## Formatting\n", 1)[1]
    before, after = re.search(r"```text\n(.*?)```\n\ncomes out as\n\n```net\n(.*?)```", section, re.S).groups()
    assert format_text(before) == after != before
