"""docs/language.md stays true: every example in it is run, and its layer tables match netdsl/ir/ops.py.

Conventions of the examples (fenced code blocks):

- ```net        a complete file; it must build without error. A first line `# file: NAME.net` makes
                it a file for other examples to include: it is written to the test's folder as NAME.net
                and not built on its own. Lines `#> LAYER: C x H x W on DEVICE` (shape and device each
                optional) state facts about the built graph that are checked too.
- ```net-error  a snippet that must fail: the first line is `# error: TEXT`, and the `NetError` raised
                must contain TEXT.

Every example is built as `<test folder>/main.net`, after all `# file:` examples were written there.
To print the layer tables after changing ops.py: `python tests/test_docs.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import netdsl
from netdsl.cli.main import main
from netdsl.ir.ops import OPS, REQUIRED, OpSpec, Param

DOC = Path(__file__).resolve().parent.parent / "docs" / "language.md"
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_FACT = re.compile(r"^#>\s*(?P<layer>\S+):\s*(?P<shape>[\d x]*?)\s*(?:on\s+(?P<device>\w+))?\s*$")


# --- the layer tables ------------------------------------------------------------------------------

_KINDS = {
    "int": "whole number",
    "float": "number",
    "bool": "`true` or `false`",
    "pair": "n or (h, w)",
    "pad": "n, (h, w), (top, left, bottom, right), `same`, `same_lower` or `valid`",
}


def _number(value: float) -> str:
    return f"{value:g}"


def _default(param: Param) -> str:
    if param.default is REQUIRED:
        return "required"
    if param.default is None:
        return "see meaning"
    if isinstance(param.default, bool):
        return "`true`" if param.default else "`false`"
    return f"`{_number(param.default)}`"


def _range(param: Param) -> str:
    if param.kind == "bool":
        return ""
    low, high = param.minimum, param.maximum
    if low is not None and high is not None:
        return f"{_number(low)} ≤ v {'<' if param.below_maximum else '≤'} {_number(high)}"
    if low is not None:
        return f"≥ {_number(low)}"
    if high is not None:
        return f"{'<' if param.below_maximum else '≤'} {_number(high)}"
    return "any"


def layer_table(spec: OpSpec) -> str:
    """The Markdown table of one layer type's parameters, as docs/language.md shows it."""
    if not spec.params:
        return "No parameters."
    lines = [
        "| parameter | by position | type | default | range | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for param in spec.params:
        position = str(spec.positional.index(param.name) + 1) if param.name in spec.positional else ""
        cells = [f"`{param.name}`", position, _KINDS[param.kind], _default(param), _range(param), param.doc]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_section_head(spec: OpSpec) -> str:
    inputs = "two or more" if spec.inputs == "many" else "one (several are joined on channels)"
    return f"### `{spec.name}`\n\n{spec.doc}.\n\nInputs: {inputs}."


# --- the examples ------------------------------------------------------------------------------------


def _blocks() -> list[tuple[str, str, int]]:
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    found = []
    for match in _FENCE.finditer(text):
        info, body = match.group(1), match.group(2)
        if info in ("net", "net-error"):
            line = text.count("\n", 0, match.start()) + 1
            found.append((info, body, line))
    return found


BLOCKS = _blocks()
INCLUDED = [(body, line) for info, body, line in BLOCKS if info == "net" and body.startswith("# file:")]
EXAMPLES = [(info, body, line) for info, body, line in BLOCKS if not body.startswith("# file:")]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for body, _line in INCLUDED:
        name = body.splitlines()[0].removeprefix("# file:").strip()
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body, encoding="utf-8")
    return tmp_path


def test_the_reference_has_examples():
    assert len(EXAMPLES) >= 40
    assert sum(1 for info, _, _ in EXAMPLES if info == "net-error") >= 20
    assert INCLUDED


@pytest.mark.parametrize(("info", "body", "line"), EXAMPLES, ids=[f"{i}-line{n}" for i, _, n in EXAMPLES])
def test_example(info: str, body: str, line: int, folder: Path):
    main_file = str(folder / "main.net")
    if info == "net":
        graph = netdsl.graph_from_text(body, file=main_file)
        assert graph.number_of_nodes() > 0
        for fact_line in body.splitlines():
            fact = _FACT.match(fact_line.strip())
            if not fact:
                assert not fact_line.strip().startswith("#>"), f"unreadable fact: {fact_line}"
                continue
            name = fact.group("layer")
            assert name in graph.nodes, f"doc line {line}: no layer {name!r}; layers: {sorted(graph.nodes)}"
            layer = graph.nodes[name]["layer"]
            if fact.group("shape").strip():
                shape = tuple(int(d) for d in fact.group("shape").split("x"))
                assert layer.shape == shape, f"doc line {line}: {name} is {layer.shape}"
            if fact.group("device"):
                assert layer.device == fact.group("device"), f"doc line {line}: {name} is on {layer.device}"
    else:
        first = body.splitlines()[0]
        assert first.startswith("# error:"), f"doc line {line}: a net-error block starts with `# error: ...`"
        expected = first.removeprefix("# error:").strip()
        with pytest.raises(netdsl.NetError) as error:
            netdsl.graph_from_text(body, file=main_file)
        assert expected in str(error.value), f"doc line {line}: got\n{error.value}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_layer_tables_match_the_registry(name: str):
    text = DOC.read_text(encoding="utf-8")
    spec = OPS[name]
    assert layer_section_head(spec) in text, f"the heading of `{name}` in the doc differs from ops.py"
    section = text.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
    assert layer_table(spec) in section, f"the table of `{name}` differs from ops.py; see `python {__file__}`"


def test_every_layer_type_is_documented_in_order():
    text = DOC.read_text(encoding="utf-8")
    headings = re.findall(r"^### `(\w+)`$", text, re.MULTILINE)
    assert [h for h in headings if h in OPS] == list(OPS)


def test_printed_errors_are_what_netdsl_prints():
    """A `net-error` example followed by "prints" and a text block shows the whole message."""
    text = DOC.read_text(encoding="utf-8")
    pairs = re.findall(r"```net-error\n((?:(?!```).)*)```\s*\nprints\n\n```text\n(.*?)^```", text, re.DOTALL | re.M)
    assert pairs
    for source, printed in pairs:
        with pytest.raises(netdsl.NetError) as error:
            netdsl.graph_from_text(source, file="main.net")
        assert str(error.value) == printed.rstrip("\n")


def test_grammar_summary_names_every_keyword():
    from netdsl.lang.parse import _keywords

    grammar = DOC.read_text(encoding="utf-8").split("\n## Grammar\n", 1)[1]
    for word in _keywords():
        assert f'"{word}"' in grammar, f"the grammar summary lacks `{word}`"


# --- claims about the command line ------------------------------------------------------------------


def test_error_format_and_exit_status(tmp_path: Path, capsys):
    path = tmp_path / "bad.net"
    path.write_text("input image: 3 x 32 x 32\ny = conv(image, 8, size=3, strid=2)\n", encoding="utf-8")
    assert main(["--color=never", "check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:2:28: error: conv has no parameter `strid`"
    assert err[1] == "    2 | y = conv(image, 8, size=3, strid=2)"
    assert err[2] == "      |                            ^^^^^^^"
    assert err[3] == "hint: did you mean `stride`?"
    assert main(["check", str(path), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_check_is_silent_and_flags_reach_the_memory_check(tmp_path: Path, capsys):
    path = tmp_path / "small.net"
    path.write_text("input image: 3 x 32 x 32\ny = conv(image, 8, size=3, pad=1)\n", encoding="utf-8")
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr() == ("", "")
    # weights 8*3*3*3 + 8 = 224 values; activations 3*32*32 + 8*32*32 = 11,264 values per image
    assert main(["check", str(path), "--memory-limit", "46KB"]) == 0
    assert main(["check", str(path), "--memory-limit", "45KB"]) == 1
    assert main(["check", str(path), "--memory-limit", "46KB", "--dtype", "bf16", "--batch", "2"]) == 0
    assert main(["check", str(path), "--memory-limit", "46KB", "--batch", "2"]) == 1
    assert "at batch 2 in fp32" in capsys.readouterr().err


def test_alexnet_memory_example(capsys):
    alexnet = str(DOC.parent.parent / "nets" / "alexnet.net")
    assert main(["check", alexnet, "--batch", "128", "--dtype", "bf16"]) == 0
    assert main(["--color=never", "check", alexnet, "--batch", "1024"]) == 1
    err = capsys.readouterr().err
    assert "error: device `gpu0` would need 4.4 GiB but has 3.0 GiB: weights 124.1 MiB + activations 4.3 GiB" in err


def test_info_and_graph_commands(tmp_path: Path, capsys):
    path = tmp_path / "small.net"
    path.write_text("net small\ninput image: 3 x 8 x 8\ny = conv(image, 4, size=3) | relu\n", encoding="utf-8")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("net small: 3 layers")
    assert main(["graph", str(path), "-o", str(tmp_path / "small.dot")]) == 0
    assert (tmp_path / "small.dot").read_text().startswith('digraph "small"')


if __name__ == "__main__":
    for spec in OPS.values():
        print(layer_section_head(spec), "", layer_table(spec), "", sep="\n")


def test_runtime_page_examples_run(monkeypatch):
    """The Python examples of docs/runtime.md run as written, from the repository root."""
    text = (DOC.parent / "runtime.md").read_text(encoding="utf-8")
    examples = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert examples
    monkeypatch.chdir(DOC.parent.parent)
    for example in examples:
        exec(compile(example, "docs/runtime.md", "exec"), {"__name__": "docs_example"})
