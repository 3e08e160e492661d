"""Fuzzing the front end: whatever text it is given, `graph_from_text` builds a graph or raises
`NetError`, and it does not hang. Any other exception, or a run over the time limit, is a bug.

Three sources of input:
  * mutants of every `nets/*.net` file, made with a seeded `random.Random` (reproducible);
  * hypothesis, derandomized (the same examples on every run): arbitrary text, text over the language's own
    characters, and grammar-shaped statements that usually parse and so reach the builder and shape inference;
  * hand-written hostile inputs (deep nesting, huge numbers and repeat counts, long lines, NUL ...).

The time limit (a minute: it catches hangs, not slowness) uses SIGALRM, so it is enforced on Unix in the main
thread and skipped elsewhere.
Set NETDSL_FUZZ_SCALE (e.g. 10) for more mutants and examples, NETDSL_FUZZ_SEED for other mutants.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from pathlib import Path

import pytest
from fuzz_support import Hang, time_limit
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from netdsl import NetError, graph_from_text
from netdsl.ir.ops import OPS
from netdsl.lang.parse import _parser

ROOT = Path(__file__).resolve().parent.parent
NETS = sorted((ROOT / "nets").glob("*.net"))
SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))  # another value, other mutants
MUTANTS_PER_FILE = max(1, int(SCALE * max(60, 750 // max(1, len(NETS)))))  # ~750 in all, at least 60 a file
# One input: a guard against hangs, not a measure of speed. The front end needs milliseconds for most inputs and
# a few seconds for the worst (the builder's MAX_LAYERS and MAX_STEPS stop a runaway `repeat` or block nesting
# after a fixed amount of work); the margin is wide so that a loaded CI machine cannot fail a correct case.
CASE_LIMIT_S = 60.0

KEYWORDS = ["net", "input", "output", "const", "include", "device", "memory", "towers", "block", "repeat"]
KEYWORDS += ["train", "return", "on", "all", "same", "valid", "true", "false", "x", "B", "GiB"]
WORDS = [*KEYWORDS, *OPS]
NUMBERS = ["0", "-1", "1", "2", "0.5", "1.5", "-0.0", "1e300", "1e-300", "1e999", "10**10**10", "2**31", "2**63"]
NUMBERS += ["99999999999999999999999999", "9" * 5000, "1_000", "1__0", ".5", "5.", "1e+3", "(0)", "-(-1)"]
CHARS = [*"(){}|@,;:=\"'#\\*/%+-.x_ \t\n\r", "\x00", "\u00e9", "\u03bb", "\U0001f600", "\ufeff", "[", "]", "$"]
NAMES = ["a", "b", "x", "y", "image", "conv1", "fc6", "\u00e9t\u00e9", "\u03bb", "_", "A" * 300, "gpu0", "gpu1", "all"]


# --- running one case ---------------------------------------------------------------------------------


def shown(text: str, limit: int = 3000) -> str:
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit // 2]!r} ... [{len(text) - limit} chars] ... {text[-limit // 2 :]!r}"


def check(text: str, file: str = "fuzz.net", limit: float = CASE_LIMIT_S, what: str = "this input") -> str:
    """Builds `text`; returns "ok" or "error", and fails the test on anything else."""
    try:
        with time_limit(limit):
            try:
                graph_from_text(text, file=file)
                return "ok"
            except NetError as error:
                error.format(color=True)  # printing the error must not fail either
                return "error"
    except Hang:
        problem = f"no answer within {limit} s"
    except Exception as error:  # the bug this file looks for
        problem = f"{type(error).__name__}: {str(error)[:500]}"
    pytest.fail(f"{problem}\nfor {what} (file={file!r}):\n{shown(text)}", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def warm_parser():
    """Lark builds the parser once per process; keep that out of the per-case time limit and deadline."""
    _parser()


# --- (a) mutants of the example nets ------------------------------------------------------------------

_TOKEN = re.compile(r"\s+|#[^\n]*|\"[^\"\n]*\"|[A-Za-z_]\w*|\d[\d_]*(?:\.[\d_]*)?(?:[eE][+-]?\d+)?|\*\*|//|.", re.S)
_NUMBER = re.compile(r"\d")
_NAME = re.compile(r"[A-Za-z_]\w*\Z")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _pick(rng: random.Random, items: list, where=lambda item: True) -> int | None:
    candidates = [i for i, item in enumerate(items) if where(item)]
    return rng.choice(candidates) if candidates else None


def _on_tokens(edit):
    def mutate(rng: random.Random, text: str) -> str:
        tokens = _tokens(text)
        if not tokens:
            return text
        edit(rng, tokens)
        return "".join(tokens)

    return mutate


def _on_lines(edit):
    def mutate(rng: random.Random, text: str) -> str:
        lines = text.split("\n")
        edit(rng, lines)
        return "\n".join(lines)

    return mutate


@_on_tokens
def delete_token(rng, tokens):
    del tokens[rng.randrange(len(tokens))]


@_on_tokens
def duplicate_token(rng, tokens):
    i = rng.randrange(len(tokens))
    tokens.insert(i, tokens[i])


@_on_tokens
def swap_tokens(rng, tokens):
    i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
    tokens[i], tokens[j] = tokens[j], tokens[i]


@_on_tokens
def replace_number(rng, tokens):
    i = _pick(rng, tokens, lambda t: _NUMBER.match(t))
    if i is not None:
        tokens[i] = rng.choice(NUMBERS)


@_on_tokens
def rename(rng, tokens):
    """A name becomes another name of the file, a new (possibly unicode) name, a keyword or an op."""
    i = _pick(rng, tokens, lambda t: _NAME.match(t))
    if i is None:
        return
    names = [t for t in tokens if _NAME.match(t)]
    tokens[i] = rng.choice([rng.choice(names), rng.choice(NAMES), rng.choice(WORDS), tokens[i] + "_2"])


@_on_tokens
def rename_everywhere(rng, tokens):
    i = _pick(rng, tokens, lambda t: _NAME.match(t))
    if i is None:
        return
    old, new = tokens[i], rng.choice([*NAMES, *WORDS])
    tokens[:] = [new if t == old else t for t in tokens]


@_on_tokens
def insert_char(rng, tokens):
    tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(CHARS))


@_on_tokens
def insert_word(rng, tokens):
    word = rng.choice([*WORDS, *NUMBERS, "all conv1", "x@gpu1", "| relu", "on gpu1", "(1, 2)", "size=", "|"])
    tokens.insert(rng.randrange(len(tokens) + 1), f" {word} ")


@_on_lines
def delete_line(rng, lines):
    del lines[rng.randrange(len(lines))]


@_on_lines
def duplicate_line(rng, lines):
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])


@_on_lines
def swap_lines(rng, lines):
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]


@_on_lines
def wrap_in_repeat(rng, lines):
    i = rng.randrange(len(lines))
    j = rng.randrange(i, len(lines))
    lines.insert(j + 1, "}")
    lines.insert(i, f"repeat {rng.choice(['0', '1', '2', '3', '100000', 'n'])} {{")


def truncate(rng: random.Random, text: str) -> str:
    return text[: rng.randrange(len(text) + 1)]


def crlf(rng: random.Random, text: str) -> str:
    return text.replace("\n", rng.choice(["\r\n", "\r", ";", "\n\n", " \\\n"]))


MUTATIONS = [delete_token, duplicate_token, swap_tokens, replace_number, replace_number, rename, rename_everywhere]
MUTATIONS += [insert_char, insert_word, delete_line, duplicate_line, swap_lines, wrap_in_repeat, truncate, crlf]


def mutants(text: str, seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        mutant = text
        for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
            mutant = rng.choice(MUTATIONS)(rng, mutant)
        yield mutant


@pytest.mark.parametrize("path", NETS, ids=[p.name for p in NETS])
def test_mutants_build_or_raise_net_error(path: Path):
    text = path.read_text(encoding="utf-8")
    check(text, str(path))  # whether the net itself builds is tests/test_nets.py's business
    outcomes = {"ok": 0, "error": 0}
    seed = zlib.crc32(path.name.encode()) + SEED
    for index, mutant in enumerate(mutants(text, seed, MUTANTS_PER_FILE)):
        # The real path, so that `include "..."` still finds its files.
        what = f"mutant {index} of {path.name} (list(mutants(text, {seed}, {index + 1}))[-1])"
        outcomes[check(mutant, str(path), what=what)] += 1
    assert outcomes["error"] > 0  # the mutations do reach the error paths


def test_mutations_are_reproducible():
    text = NETS[0].read_text(encoding="utf-8")
    assert list(mutants(text, 7, 20)) == list(mutants(text, 7, 20))


# --- (b) hypothesis -----------------------------------------------------------------------------------

# The same examples on every run (derandomize; no example database); no deadline: time_limit guards hangs.
FUZZ = settings(
    derandomize=True, deadline=None, max_examples=int(200 * SCALE), suppress_health_check=[HealthCheck.too_slow]
)

LANGUAGE_CHARS = 'abxyz_019 \t\n\r(){}|@,;:="#\\*/%+-.eE'


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    check(text)


@FUZZ
@given(
    st.text(alphabet=LANGUAGE_CHARS, max_size=200)
    | st.lists(st.sampled_from([*WORDS, *CHARS, *NUMBERS[:-6]])).map(" ".join)
)
def test_text_over_the_language(text):
    check(text)


names = st.sampled_from(["x", "y", "z", "a", "b", "c", "image", "net", "all", "relu", "\u00e9"])
small = st.integers(-2, 12).map(str)
numbers = st.one_of(small, st.sampled_from(NUMBERS), st.floats(allow_nan=False).map(repr))
expressions = st.recursive(
    numbers | names,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), inner).map(" ".join),
        inner.map(lambda e: f"({e})"),
        inner.map(lambda e: f"-{e}"),
    ),
    max_leaves=6,
)
values = st.one_of(
    expressions,
    st.sampled_from(["same", "valid", "true", "false", "all y", "y@gpu1"]),
    st.tuples(expressions, expressions).map(lambda t: f"({t[0]}, {t[1]})"),
)
kwargs = st.tuples(
    st.sampled_from(["size", "stride", "pad", "filters", "units", "groups", "rate", "ceil", "bias", "dilation"]),
    values,
).map("=".join)


@st.composite
def calls(draw, inputs=True):
    op = draw(st.sampled_from([*OPS, "stage", "norm", "unknown"]))
    args = draw(st.lists(names, max_size=2)) if inputs else []
    args += draw(st.lists(values, max_size=2)) + draw(st.lists(kwargs, max_size=3))
    return f"{op}({', '.join(args)})" if args or draw(st.booleans()) else op


@st.composite
def chains(draw):
    head = draw(st.one_of(names, calls(), names.map(lambda n: f"all {n}"), names.map(lambda n: f"{n}@gpu1")))
    rest = draw(st.lists(calls(inputs=False), max_size=3))
    return " | ".join([head, *rest])


@st.composite
def statements(draw, depth=0):
    kinds = ["input", "assign", "assign", "assign", "const", "preset", "output", "device", "net"]
    if depth < 2:
        kinds += ["towers", "block", "repeat"]
    kind = draw(st.sampled_from(kinds))
    dims = draw(st.lists(st.one_of(st.integers(1, 16).map(str), expressions), min_size=1, max_size=4))
    if kind == "input":
        return f"input {draw(names)}: {' x '.join(dims)}"
    if kind == "assign":
        on = draw(st.sampled_from(["", "", " on gpu0", " on gpu1", " on tpu"]))
        return f"{draw(names)} = {draw(chains())}{on}"
    if kind == "const":
        return f"const {draw(names)} = {draw(expressions)}"
    if kind == "preset":
        return f"const {draw(names)} = {draw(calls(inputs=False))}"
    if kind == "output":
        return "output " + ", ".join(draw(st.lists(names, min_size=1, max_size=3)))
    if kind == "device":
        memory = draw(st.sampled_from(["", " memory 3 GiB", " memory 1 B", " memory 1e300 GiB", " memory -1 MB"]))
        return f"device {', '.join(draw(st.lists(st.sampled_from(['gpu0', 'gpu1', 'x']), min_size=1)))}{memory}"
    if kind == "net":
        return f"net {draw(names)}"
    body = "\n".join(draw(st.lists(statements(depth + 1), max_size=4)))
    if kind == "towers":
        towers = draw(st.lists(st.sampled_from(["gpu0", "gpu1", "gpu2"]), min_size=1))
        return f"towers {', '.join(towers)} {{\n{body}\n}}"
    if kind == "block":
        params = ", ".join(draw(st.lists(names, max_size=3)))
        ret = draw(st.sampled_from(["", f"\nreturn {draw(chains())}"]))
        return f"block {draw(st.sampled_from(['stage', 'norm', 'b']))}({params}) {{\n{body}{ret}\n}}"
    return f"repeat {draw(st.one_of(small, expressions))} {{\n{body}\n}}"


@st.composite
def programs(draw):
    head = draw(st.sampled_from(["", "input x: 3 x 8 x 8\n", "input x: 3 x 8 x 8\ninput y: 3 x 8 x 8\n"]))
    body = draw(st.lists(statements(), max_size=8))
    separator = draw(st.sampled_from(["\n", "\r\n", "; ", "\n\n# comment\n"]))
    return head + separator.join(body) + "\n"


@FUZZ
@given(programs())
def test_grammar_shaped_programs(text):
    event(check(text))  # pytest --hypothesis-show-statistics shows how many built


# --- hand-written hostile inputs --------------------------------------------------------------------

X = "input x: 3 x 8 x 8\n"
HOSTILE = {
    "empty": "",
    "only-newlines": "\n\n\r\n",
    "only-comments": "# one\n# two\n#\n   # three\n",
    "comment-without-newline": "# the end",
    "crlf": X.replace("\n", "\r\n") + "y = conv(x, 8, size=3, pad=same) | relu\r\n  | relu\r\noutput y\r\n",
    "lone-cr": X.replace("\n", "\r") + "y = relu(x)\r",
    "bom": "\ufeff" + X,
    "nul": X + "y = relu(x)\x00\n",
    "nul-in-string": X + 'include "a\x00b.net"\n',
    "nul-only": "\x00" * 100,
    "unicode-name": X + "\u00e9t\u00e9 = relu(x)\n",
    "unicode-input": "input \u03bb: 3 x 8 x 8\n",
    "emoji": X + "y = relu(x) # \U0001f600\n\U0001f600\n",
    "deep-parens": X + "const a = " + "(" * 1000 + "1" + ")" * 1000 + "\n",
    "deep-parens-unclosed": X + "const a = " + "(" * 1000 + "1\n",
    "deep-parens-in-call": X + "y = conv(x, " + "(" * 1000 + "8" + ")" * 1000 + ", size=3)\n",
    "deep-negation": X + "const a = " + "-" * 1000 + "1\n",
    "deep-negation-parens": X + "const a = " + "(-" * 1000 + "1" + ")" * 1000 + "\n",
    "deep-unary-plus": X + "const a = " + "+" * 1000 + "1\n",
    "deep-power": X + "const a = " + "1 ** " * 1000 + "1\n",
    "long-sum": X + "const a = 1" + " + 1" * 5000 + "\n",
    "deep-braces": X + "repeat 1 {\n" * 1000 + "}\n" * 1000,
    "power-tower": X + "const a = 10**10**10\n",
    "power-tower-dim": "input x: 10**10**10 x 8 x 8\n",
    "power-float": X + "const a = 2.0 ** 1e10\n",
    "negative-root": X + "const a = (-8) ** 0.5\n",
    "huge-literal": X + "const a = " + "9" * 10_000 + "\n",
    "huge-float": X + "const a = 1e99999\n",
    "inf-minus-inf": X + "const a = 1e308 * 10 - 1e308 * 10\n",
    "float-filters": X + "y = conv(x, 1e300, size=3)\n",
    "huge-stride": X + "y = maxpool(x, 3, stride=10**18)\n",
    "huge-pad": X + "y = conv(x, 8, size=3, pad=10**18)\n",
    "huge-dims": "input x: 2147483647 x 2147483647 x 2147483647\ny = fc(x, 2147483647)\n",
    "huge-memory": "device g memory 1e300 GiB\n" + X,
    "tiny-memory": "device g memory 1e-300 B\n" + X.replace("\n", " on g\n"),
    "repeat-1e9": X + "repeat 10**9 { y = x | relu }\n",
    "repeat-deep-const": X + "repeat 2 {" * 60 + "const c = 1" + "}" * 60 + "\n",
    "repeat-nested-empty": X + "repeat 100000 { repeat 100000 { repeat 100000 { } } }\n",
    "long-line-chain": X + "y = x" + " | relu" * 15_000 + "\n",
    "long-line-name": "input " + "n" * 100_000 + ": 3 x 8 x 8\n",
    "long-line-comment": X + "#" + "c" * 100_000 + "\n",
    "long-line-string": X + 'include "' + "s" * 100_000 + '"\n',
    "long-line-junk": X + "$" * 100_000 + "\n",
    "long-line-outputs": X + "y = relu(x)\noutput " + ", ".join(["y"] * 20_000) + "\n",
    "long-line-towers": X + "towers " + ", ".join(f"g{i}" for i in range(10_000)) + " { y = x | relu }\n",
    "many-lines": X + "".join(f"y{i} = x | relu\n" for i in range(3000)),
    "deep-blocks": X
    + "".join(f"block b{i}(v) {{ return b{i - 1}(v) }}\n" for i in range(1, 1500)).replace("b0(v)", "relu(v)")
    + "y = b1499(x)\n",
    "doubling-blocks": X  # 2**60 expansions, none of which makes a layer
    + "block b0(v) { return v }\n"
    + "".join(f"block b{i}(v) {{\n  a = b{i - 1}(v)\n  c = b{i - 1}(a)\n  return c\n}}\n" for i in range(1, 61))
    + "y = b60(x)\n",
    "forward-chain": X + "".join(f"a{i} = a{i + 1} | relu\n" for i in range(3000)) + "a3000 = x | relu\n",
    "self-reference": X + "a = a | relu\n",
    "include-directory": 'include "."\n' + X,
    "include-root": 'include "/"\n' + X,
    "include-dev-null": 'include "/dev/null"\n' + X,
    "include-missing": 'include "no/such/file.net"\n' + X,
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_inputs(text):
    check(text)


def test_hostile_includes(tmp_path):
    (tmp_path / "self.net").write_text('include "self.net"\n' + X)
    (tmp_path / "a.net").write_text('include "b.net"\n')
    (tmp_path / "b.net").write_text('include "a.net"\n')
    (tmp_path / "latin1.net").write_bytes(b"# caf\xe9\n" + X.encode())
    (tmp_path / "empty.net").write_text("")
    (tmp_path / "nul.net").write_bytes(b"\x00\x01\x02")
    (tmp_path / "dir.net").mkdir()
    for name in ["self.net", "a.net", "latin1.net", "empty.net", "nul.net", "dir.net", "missing.net"]:
        text = f'include "{name}"\n' + X
        check(text, str(tmp_path / "main.net"), what=f"a net that includes {name}")
        check(text, str(tmp_path / name), what=f"{name} that includes {name}")
