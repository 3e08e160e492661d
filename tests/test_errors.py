"""Every class of mistake: the message, the line:col it points at, the hint, and through the CLI
exit status 1 with the message on stderr and no Python traceback anywhere."""

import argparse
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netdsl import NetError, graph_from_text, load_graph
from netdsl.cli.main import main
from netdsl.ir.ops import OPS, ShapeError

ROOT = Path(__file__).resolve().parent.parent
ALEXNET = ROOT / "nets" / "alexnet.net"
X = "input x: 3 x 8 x 8\n"  # most cases start with this line, so their mistakes are on line 2


def error_of(text: str, file: str = "t.net", **options) -> NetError:
    with pytest.raises(NetError) as info:
        graph_from_text(textwrap.dedent(text), file=file, **options)
    return info.value


def run_cli(argv, capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out and "Traceback" not in err
    return status, out, err


# (id, source, message, line, col, hint): `message` and `hint` are substrings; hint None = not checked.
CASES = [
    # --- syntax ---------------------------------------------------------------------------------------
    ("unclosed-paren", X + "y = conv(x, 4, size=3\nz = relu(y)\n", "unexpected `z`", 3, 1, "expected `)`, `,`"),
    ("unexpected-char", X + "y = relu(x) $\n", "unexpected character '$'", 2, 13, None),
    ("square-brackets", X + "y = conv(x, 4, size=[3, 3])\n", "unexpected character '['", 2, 21, "parentheses"),
    ("arrow", X + "y = relu(x) -> relu\n", "unexpected `-`", 2, 13, "expected `;`, `on`, `|`, end of line"),
    ("single-quotes", "include 'a.net'\n", 'unexpected character "\'"', 1, 9, "double quotes"),
    ("unterminated-string", X + 'include "abc\n', "unterminated or misplaced string", 2, 9, "include"),
    ("missing-colon", "input x 3 x 8 x 8\n", "unexpected `3`", 1, 9, "expected `:`"),
    ("dangling-pipe", X + "y = relu(x) |\n", "unexpected end of file", 2, 13, "expected `all`, a name"),
    ("double-pipe", X + "y = relu(x) | | relu\n", "unexpected `|`", 2, 15, "expected `all`, a name"),
    ("on-without-device", X + "y = relu(x) on\n", "unexpected end of line", 2, 15, "expected a name"),
    ("two-placements", X + "y = relu(x) on a on b\n", "unexpected `on`", 2, 18, "expected `;`, end of line"),
    ("unclosed-brace", X + "towers a, b { y = relu(x)\n", "unexpected end of file", 2, 26, "expected `}`"),
    ("block-default-arg", "block b(v, n=2) { return v }\n", "unexpected `=`", 1, 13, "expected `)`, `,`"),
    ("unfinished-expr", "const a = 3 +\n", "unexpected end of line", 1, 14, "expected `(`, a name, a number"),
    # --- reserved words -------------------------------------------------------------------------------
    (
        "reserved-repeat",
        X + "repeat = relu(x)\n",
        "`repeat` is a reserved word and cannot be used as a name",
        2,
        1,
        None,
    ),
    ("reserved-input", X + "input = relu(x)\n", "`input` is a reserved word", 2, 1, "choose another name"),
    ("reserved-after-semicolon", X + "y = relu(x); block = relu(y)\n", "`block` is a reserved word", 2, 14, None),
    ("reserved-all", X + "all = relu(x)\n", "`all` is a reserved word and cannot be used as a name", 2, 1, None),
    ("reserved-all-input", "input all: 3 x 8 x 8\n", "`all` is a reserved word", 1, 1, None),
    # a statement's word is reserved wherever a name is made, not only where a statement could start
    ("reserved-const", X + "const net = 4\n", "`net` is a reserved word", 2, 1, "choose another name"),
    ("reserved-input-name", "input include: 3 x 8 x 8\n", "`include` is a reserved word", 1, 1, None),
    ("reserved-block-name", X + "block train(v) { return v }\n", "`train` is a reserved word", 2, 1, None),
    ("reserved-block-param", X + "block f(v, output) { return v }\n", "`output` is a reserved word", 2, 12, None),
    ("reserved-counter", X + "repeat 2 as towers { y = relu(x) }\n", "`towers` is a reserved word", 2, 13, None),
    ("reserved-device", "device gpu0, return\n" + X, "`return` is a reserved word", 1, 14, None),
    ("layer-type-as-value", X + "const act = relu\n", "`relu` is a layer type, not a value", 2, 13, "relu()"),
    # values by position come first
    ("position-after-name", X + "y = conv(x, size=3, 8)\n", "a value by position after `size=`", 2, 21, "first"),
    ("position-after-name-chain", X + "y = x | conv(size=3, 8)\n", "after `size=`", 2, 22, "by position first"),
    ("builtin-true", X + "const true = 2\n", "`true` is a built-in word and cannot be redefined", 2, 1, None),
    (
        "op-as-block",
        X + "block conv(v) { return v }\n",
        "`conv` is a built-in layer type and cannot name a block",
        2,
        1,
        None,
    ),
    # --- layer types and parameters ---------------------------------------------------------------------
    ("unknown-layer", X + "y = cnov(x, 4, 3)\n", "unknown layer type `cnov`", 2, 5, "did you mean `conv`?"),
    ("unknown-layer-list", X + "y = qqq(x)\n", "unknown layer type `qqq`", 2, 5, "layer types: add,"),
    ("constant-as-layer", X + "const c = 3\ny = c(x)\n", "`c` is a constant, not a layer type", 3, 5, None),
    ("layer-as-layer-type", X + "y = relu(x)\nz = y(x)\n", "`y` is a layer's output, not a layer type", 3, 5, None),
    ("unknown-param", X + "y = conv(x, 4, 3, strde=2)\n", "conv has no parameter `strde`", 2, 19, "`stride`?"),
    ("unknown-param-none", X + "y = relu(x, slope=2)\n", "relu has no parameter `slope`", 2, 13, "no parameters"),
    ("missing-required", X + "y = conv(x, 4)\n", "conv needs `size` (kernel size", 2, 5, "e.g. conv(x, 64"),
    ("missing-units", X + "y = fc(x)\n", "fc needs `units` (output features)", 2, 5, "e.g. fc(x, 4096)"),
    ("missing-input", X + "y = relu()\n", "relu needs an input", 2, 5, "relu(x"),
    ("concat-one-input", X + "y = concat(x)\n", "concat needs at least two inputs", 2, 5, "concat(a, b)"),
    ("duplicate-param", X + "y = conv(x, 4, 3, stride=1, stride=2)\n", "`stride` is given twice", 2, 29, None),
    ("positional-and-named", X + "y = conv(x, 4, 3, size=5)\n", "`size` is given twice", 2, 19, None),
    ("bool-for-number", X + "y = conv(x, true, 3)\n", "conv `filters` must be a number, got true/false", 2, 13, None),
    ("number-for-bool", X + "y = conv(x, 4, 3, bias=1)\n", "conv `bias` must be true or false", 2, 24, None),
    ("tuple-of-3", X + "y = conv(x, 4, (3, 3, 3))\n", "conv `size` takes one number or two (h, w), not 3", 2, 16, None),
    ("tuple-for-int", X + "y = conv(x, (4, 4), 3)\n", "conv `filters` must be a number, got a tuple", 2, 13, None),
    (
        "word-for-number",
        X + "y = conv(x, same, 3)\n",
        "conv `filters` must be a number, got the word `same`",
        2,
        13,
        None,
    ),
    ("fraction-for-int", X + "y = conv(x, 2.5, 3)\n", "conv `filters` must be a whole number, got 2.5", 2, 13, None),
    ("filters-zero", X + "y = conv(x, 0, 3)\n", "conv `filters` must be at least 1, got 0", 2, 13, None),
    ("dropout-one", X + "y = dropout(x, 1.0)\n", "dropout `rate` must be at least 0 and below 1, got 1", 2, 16, None),
    ("negative-pad", X + "y = conv(x, 4, 3, pad=-1)\n", "conv `pad` must be at least 0, got -1", 2, 23, None),
    (
        "stride-zero",
        X + "y = maxpool(x, 2, stride=(1, 0))\n",
        "maxpool `stride` must be at least 1, got 0",
        2,
        26,
        None,
    ),
    ("pool-pad", X + "y = maxpool(x, 2, pad=2)\n", "padding 2 must be smaller than the 2x2 window", 2, 23, None),
    (
        "pool-pad-bottom",
        X + "y = avgpool(x, 3, pad=(0, 1, 3, 1))\n",
        "pooling padding (0, 1, 3, 1) (top, left, bottom, right) must be smaller than the 3x3 window",
        2,
        23,
        "size - 1",
    ),
    (
        "pad-three",
        X + "y = conv(x, 4, 3, stride=2, pad=(1, 1, 1))\n",
        "conv `pad` takes one number, two (h, w) or four (top, left, bottom, right), not 3",
        2,
        33,
        None,
    ),
    ("negative-side", X + "y = conv(x, 4, 2, pad=(0, 0, -1, 1))\n", "`pad` must be at least 0, got -1", 2, 23, None),
    (
        "pad-word",
        X + "y = maxpool(x, 2, pad=same_upper)\n",
        "`same_upper` is not defined",
        2,
        23,
        None,
    ),
    (
        "pool-window-in-padding",
        X.replace("8 x 8", "2 x 2") + "y = maxpool(x, 2, stride=2, dilation=3, pad=1)\n",
        "the window at output row 0 reads only padding",
        2,
        5,
        "smaller dilation",
    ),
    ("filters-groups", X + "y = conv(x, 3, 1, groups=2)\n", "3 filters cannot be split into 2 groups", 2, 26, None),
    ("too-many-positional", X + "y = conv(x, 4, 3, 1)\n", "too many arguments to conv", 2, 19, "filters, size"),
    ("too-many-relu", X + "y = relu(x, 3)\n", "too many arguments to relu", 2, 13, "relu takes only its input"),
    ("number-as-input", X + "y = relu(3)\n", "expected a layer's output here, not a number", 2, 10, None),
    (
        "layer-as-number",
        X + "a = relu(x)\ny = conv(x, a, 3)\n",
        "`a` is a layer's output, but a number is expected",
        3,
        13,
        None,
    ),
    (
        "preset-reads-layer",
        X + "const c = relu(x)\n",
        "a preset (`const`) only fills in parameters",
        2,
        16,
        "c = relu(",
    ),
    (
        "const-of-layer",
        X + "a = relu(x)\nconst c = a\n",
        "`a` is a layer's output, but a number is expected",
        3,
        11,
        None,
    ),
    ("bad-preset-value", X + "const c = conv(size=3, bias=2)\n", "conv `bias` must be true or false", 2, 29, None),
    ("preset-missing-at-use", X + "const c = conv(size=3)\ny = x | c\n", "conv needs `filters`", 3, 9, None),
    # --- names --------------------------------------------------------------------------------------
    ("duplicate-layer", X + "y = relu(x)\ny = relu(x)\n", "`y` is already defined", 3, 5, "its own name"),
    ("duplicate-const", "const a = 1\nconst a = 2\n" + X, "`a` is already defined", 2, 1, None),
    ("duplicate-input", X + X, "`x` is already defined", 2, 1, None),
    ("undefined", X + "y = relu(xx)\n", "`xx` is not defined", 2, 10, "did you mean `x`?"),
    ("undefined-far", X + "y = relu(zebra)\n", "`zebra` is not defined", 2, 10, "define it with `name = ...`"),
    ("undefined-output", X + "y = relu(x)\noutput yy\n", "`yy` is not defined", 3, 8, "did you mean `y`?"),
    ("undefined-const", "const a = b + 1\n" + X, "`b` is not defined", 1, 11, None),
    ("cycle", X + "a = relu(b)\nb = relu(a)\n", "layers form a cycle: a -> b -> a", 2, 5, "its own output"),
    ("self-cycle", X + "a = relu(a)\n", "layers form a cycle: a -> a", 2, 5, None),
    ("alias-cycle", X + "a = b\nb = a\nc = relu(a)\n", "`b` is defined in terms of itself", 2, 5, None),
    ("no-inputs", "const a = 3\n", "the net has no inputs", 1, 1, "input image: 3 x 227 x 227"),
    ("net-twice", "net a\nnet b\n" + X, "the net is named twice", 2, 1, None),
    ("input-dims", "input x: 3 x 8\n", "an input is C x H x W or a flat N, not 2 dimensions", 1, 1, None),
    ("input-dim-zero", "input x: 3 x 0 x 8\n", "an input dimension must be between 1 and", 1, 14, None),
    # --- shapes -------------------------------------------------------------------------------------
    (
        "kernel-too-large",
        X + "y = conv(x, 4, 9)\n",
        "conv `y`: the 9x9 window (with padding 0x0) does not fit the 3 x 8 x 8 input",
        2,
        5,
        "smaller kernel",
    ),
    (
        "dilated-kernel-too-large",
        X + "y = conv(x, 4, 3, dilation=4)\n",
        "the 9x9 window (with padding 0x0) does not fit",
        2,
        5,
        None,
    ),
    ("pool-too-large", X + "y = x | maxpool(9) | fc(10)\n", "maxpool `y`: the 9x9 window", 2, 9, None),
    ("pool-in-chain", X + "y = conv(x, 4, 3) | maxpool(7)\n", "maxpool `y.maxpool`", 2, 21, None),
    ("conv-on-vector", "input v: 10\ny = conv(v, 4, 3)\n", "conv needs a C x H x W feature map", 2, 5, "before fc"),
    ("pool-after-fc", X + "y = fc(x, 10) | maxpool(2)\n", "maxpool needs a C x H x W feature map", 2, 17, None),
    (
        "concat-spatial",
        X + "a = conv(x, 4, 3) | maxpool(2)\nb = concat(x, a)\n",
        "concat needs inputs of the same spatial size, got 3 x 8 x 8, 4 x 3 x 3",
        3,
        5,
        "pool or pad",
    ),
    (
        "concat-map-and-vector",
        X + "v = fc(x, 4)\nb = concat(x, v)\n",
        "concat needs inputs of the same spatial",
        3,
        5,
        None,
    ),
    (
        "join-spatial",
        "input x: 3 x 8 x 8\ntowers a, b { p = maxpool(x, 2) }\ny = concat(x, p@a)\nz = conv(all p, 2, 1)\n",
        "concat needs inputs of the same spatial size",
        3,
        5,
        None,
    ),
    (
        "add-shapes",
        X + "a = conv(x, 4, 3, pad=1)\nb = add(x, a)\n",
        "add needs inputs of one shape, got 3 x 8 x 8, 4 x 8 x 8",
        3,
        5,
        "1x1 conv",
    ),
    (
        "groups-channels",
        X + "y = conv(x, 4, 3, groups=2)\n",
        "conv `y`: 3 input channels cannot be split into 2 groups",
        2,
        5,
        "multiple of groups",
    ),
    # --- towers and devices ---------------------------------------------------------------------------
    (
        "towered-plain-outside",
        X + "towers g0, g1 { a = relu(x) }\nb = relu(a)\n",
        "`a` has one copy per tower (g0, g1); say which to read",
        3,
        10,
        "`all a` reads every tower's copy; `a@g0` reads one",
    ),
    ("towered-output", X + "towers g0, g1 { a = relu(x) }\noutput a\n", "`a` has one copy per tower", 3, 8, None),
    (
        "all-untowered",
        X + "b = relu(all x)\n",
        "`all x` needs a name defined inside a towers block",
        2,
        10,
        "read it as `x`",
    ),
    ("at-untowered", X + "b = relu(x@gpu0)\n", "`x` is not defined inside a towers block", 2, 10, "plain `x`"),
    (
        "at-unknown-tower",
        X + "towers g0, g1 { a = relu(x) }\nb = relu(a@nope)\n",
        "no copy on tower `nope`",
        3,
        10,
        "g0, g1",
    ),
    (
        "at-misspelt-tower",
        X + "towers left, right { a = relu(x) }\nb = relu(a@rigth)\n",
        "no copy on tower",
        3,
        10,
        "`right`?",
    ),
    (
        "nested-towers",
        X + "towers g0, g1 {\n  towers g2 { a = relu(x) }\n}\n",
        "towers blocks cannot be nested",
        3,
        3,
        None,
    ),
    (
        "on-in-towers",
        X + "towers g0, g1 { a = relu(x) on g0 }\n",
        "inside a towers block every layer runs on",
        2,
        32,
        None,
    ),
    ("tower-twice", X + "towers g0, g0 { a = relu(x) }\n", "tower `g0` is listed twice", 2, 12, None),
    ("input-in-towers", X + "towers g0, g1 { input y: 3 }\n", "inputs are declared at the top level", 2, 17, None),
    (
        "towers-in-block",
        X + "block b(v) {\n  towers g0 { a = relu(v) }\n  return a\n}\ny = b(x)\n",
        "towers blocks belong at the top",
        3,
        3,
        None,
    ),
    (
        "undeclared-on",
        "device g0, g1\n" + X + "a = relu(x) on g2\n",
        "device `g2` is not declared",
        3,
        16,
        "the declared devices are g0, g1",
    ),
    (
        "undeclared-far",
        "device g0, g1\n" + X + "a = relu(x) on tpu\n",
        "device `tpu` is not declared",
        3,
        16,
        "add `device tpu`",
    ),
    (
        "undeclared-misspelt",
        "device gpu0, gpu1\n" + X + "a = relu(x) on gpu2\n",
        "device `gpu2`",
        3,
        16,
        "did you mean",
    ),
    ("undeclared-tower", "device g0, g1\n" + X + "towers g0, gpu1 { a = relu(x) }\n", "device `gpu1`", 3, 12, None),
    ("undeclared-input", "device g0\ninput x: 3 x 8 x 8 on g7\n", "device `g7` is not declared", 2, 23, None),
    ("device-twice", "device g0\ndevice g1, g0\n" + X, "device `g0` is declared twice", 2, 12, None),
    ("memory-unit", "device g0 memory 3 Gib\n" + X, "unknown memory unit `Gib`", 1, 20, "did you mean `GiB`?"),
    ("memory-zero", "device g0 memory 0 GiB\n" + X, "a memory size must be positive", 1, 18, None),
    (
        "memory-limit",
        "device g memory 1 MiB\ninput x: 3 x 256 x 256\na = conv(x, 64, 3, pad=1)\n",
        "device `g` would need 16.8 MiB but has 1.0 MiB: weights 7.0 KiB + activations 16.8 MiB at batch 1 in fp32",
        1,
        8,
        "smaller batch",
    ),
    # --- blocks -------------------------------------------------------------------------------------
    (
        "recursive-block",
        X + "block b(v) { return b(v) }\ny = b(x)\n",
        "block `b` uses itself",
        2,
        21,
        "not be recursive",
    ),
    (
        "mutual-recursion",
        X + "block p(v) { return q(v) }\nblock q(v) { return p(v) }\ny = p(x)\n",
        "block `p` uses itself",
        3,
        21,
        "use `repeat`",
    ),
    (
        "block-too-many",
        X + "block b(v, n) { return conv(v, n, 1) }\ny = b(x, 4, 5)\n",
        "takes 2 argument(s) (v, n), got 3",
        3,
        5,
        None,
    ),
    (
        "block-missing",
        X + "block b(v, n) { return conv(v, n, 1) }\ny = b(x)\n",
        "block `b` is missing argument(s): n",
        3,
        5,
        None,
    ),
    (
        "block-bad-kwarg",
        X + "block b(v, width) { return conv(v, width, 1) }\ny = b(x, wdith=3)\n",
        "no parameter `wdith`",
        3,
        10,
        "`width`?",
    ),
    (
        "block-kwarg-twice",
        X + "block b(v, n) { return conv(v, n, 1) }\ny = b(x, 4, n=3)\n",
        "`n` is given twice",
        3,
        13,
        None,
    ),
    ("block-no-input", X + "block b() { return relu(x) }\ny = x | b\n", "block `b` takes no input", 3, 9, None),
    ("block-param-twice", "block b(v, v) { return v }\n" + X, "block parameter `v` is listed twice", 1, 12, None),
    (
        "block-no-return",
        X + "block b(v) { y = relu(v) }\ny = b(x)\n",
        "block `b` has no `return`",
        3,
        5,
        "return <chain>",
    ),
    (
        "block-as-number",
        X + "block b(v) { return v }\ny = conv(x, b, 3)\n",
        "`b` is a block, but a number",
        3,
        13,
        None,
    ),
    (
        "block-in-block",
        X + "block a(v) {\n  block c(w) { return w }\n  return v\n}\ny = a(x)\n",
        "blocks are defined at the top level",
        3,
        3,
        None,
    ),
    ("return-outside", X + "return relu(x)\n", "`return` is only allowed at the end of a block", 2, 1, None),
    (
        "after-return",
        X + "block b(v) {\n  return relu(v)\n  y = relu(v)\n}\n",
        "statements after `return` would never run",
        4,
        3,
        "move it to the end",
    ),
    (
        "forward-in-block",
        X + "block b(v) { return relu(later) }\ny = b(x)\nlater = relu(x)\n",
        "`later` is not defined",
        2,
        26,
        None,
    ),
    (
        "input-in-block",
        X + "block b(v) {\n  input z: 3\n  return v\n}\ny = b(x)\n",
        "inputs are declared at the top level",
        3,
        3,
        None,
    ),
    ("net-in-block", X + "block b(v) {\n  net n\n  return v\n}\ny = b(x)\n", "`net` names the whole net", 3, 3, None),
    (
        "output-in-block",
        X + "block b(v) {\n  output v\n  return v\n}\ny = b(x)\n",
        "outputs are declared at the top",
        3,
        3,
        None,
    ),
    # --- constants ----------------------------------------------------------------------------------
    ("div-zero", X + "const a = 1 / 0\n", "division by zero", 2, 15, None),
    ("floordiv-zero", X + "const z = 0\nconst a = 7 // (z * 3)\n", "division by zero", 3, 17, None),
    ("mod-zero", X + "const a = 7 % 0\n", "division by zero", 2, 15, None),
    ("zero-to-negative", X + "const a = 0 ** -1\n", "division by zero", 2, 11, None),
    ("complex", X + "const a = (-8) ** 0.5\n", "the result is not a real number", 2, 11, None),
    ("power-tower", X + "const a = 10 ** 10 ** 10\n", "number too large", 2, 11, None),
    ("product-too-large", X + "const a = 10 ** 12 * 10 ** 12\n", "number too large", 2, 11, None),
    ("literal-too-large", X + "const a = 1" + "0" * 5000 + "\n", "number too large", 2, 11, None),
    ("float-literal-inf", X + "const a = 1e999\n", "number too large", 2, 11, None),
    ("float-overflow", X + "const a = 1e300 * 1e300\n", "number too large", 2, 11, None),
    ("tuple-in-arithmetic", X + "const a = (1, 2) + 1\n", "unexpected `,`", 2, 13, None),
    (
        "word-in-arithmetic",
        X + "const a = same + 1\n",
        "an operand of + must be a number, got the word `same`",
        2,
        11,
        None,
    ),
    (
        "repeat-too-large",
        X + "repeat 1000000 { y = relu(x) }\n",
        "a repeat count must be between 0 and 100000, got 1000000",
        2,
        8,
        None,
    ),
    ("repeat-negative", X + "repeat -1 { y = relu(x) }\n", "a repeat count must be between 0 and", 2, 8, None),
    (
        "repeat-fraction",
        X + "repeat 2.5 { y = relu(x) }\n",
        "a repeat count must be a whole number, got 2.5",
        2,
        8,
        None,
    ),
    (
        "duplicate-in-repeat-block",
        X + "y = relu(x)\nrepeat 2 { z = relu(x) }\nz = relu(x)\n",
        "`z` is already defined",
        4,
        1,
        None,
    ),
]


@pytest.mark.parametrize("source, message, line, col, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_message_location_and_hint(source, message, line, col, hint):
    error = error_of(source)
    assert message in error.message
    assert error.span is not None
    assert (error.span.file, error.span.line, error.span.col) == ("t.net", line, col)
    if hint is not None:
        assert error.hint is not None and hint in error.hint
    text = error.format()
    assert text.startswith(f"t.net:{line}:{col}: error: ")
    quoted = source.splitlines()[line - 1].expandtabs(4)
    assert f"{line:>5} | {quoted}" in text  # the source line, with a caret under the column
    caret = text.splitlines()[text.splitlines().index(f"{line:>5} | {quoted}") + 1]
    assert caret.index("^") - caret.index("|") - 2 == col - 1


@pytest.mark.parametrize("source, message, line, col, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_reports_the_error_with_status_1(source, message, line, col, hint, tmp_path, capsys):
    path = tmp_path / "bad.net"
    path.write_text(source)
    status, out, err = run_cli(["check", path], capsys)
    assert status == 1
    assert out == ""
    assert err.startswith(f"{path}:{line}:{col}: error: ")
    assert message in err


def test_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "source, hint",
    [
        ("block b(v, n=2) { return v }\n", "expected `)`, `,`"),  # LALR alone would add `memory`, `{`, ...
        (X + "y = relu(all)\n", "expected a name"),
        (X + "y = relu(x) on gpu0 on gpu1\n", "expected `;`, end of line"),
        (X + "y = conv(x, 4, size=3\nz = relu(y)\n", "expected `)`, `,`"),
        ("net = 3\n", None),
    ],
)
def test_syntax_error_hints_list_exactly_what_could_come_next(source, hint):
    error = error_of(source)
    if hint is None:
        assert error.message == "`net` is a reserved word and cannot be used as a name"
    else:
        assert error.hint == hint


# --- notes, traces and positions ------------------------------------------------------------------------


def test_duplicate_name_shows_both_definitions():
    error = error_of(X + "y = relu(x)\nz = relu(x)\ny = conv(x, 4, 1)\n")
    assert error.span.line == 4
    assert [(span.line, span.col, note) for span, note in error.notes] == [(2, 5, "first defined here")]
    text = error.format()
    assert "t.net:4:5: error: `y` is already defined" in text
    assert "t.net:2:5: note: first defined here" in text


def test_duplicate_parameter_points_at_both():
    error = error_of(X + "y = conv(x, 4, 3, stride=1, stride=2)\n")
    assert error.notes[0][0].col == 26 and error.notes[0][1] == "first given here"


def test_cycle_notes_every_layer_in_it():
    error = error_of(X + "a = relu(c)\nb = relu(a)\nc = relu(b)\n")
    assert error.message == "layers form a cycle: a -> b -> c -> a"
    assert [span.line for span, _ in error.notes] == [3, 4]


def test_shape_error_notes_the_input_shapes():
    error = error_of(X + "a = conv(x, 4, 3) | maxpool(2)\nb = concat(x, a)\n")
    notes = [note for _, note in error.notes]
    assert notes == ["`x` is 3 x 8 x 8", "`a.maxpool` is 4 x 3 x 3"]


BLOCK_ERROR = """\
input img: 3 x 8 x 8
block stage(v, n) {
    a = conv(v, n, size=9)
    return relu(a)
}
s1 = stage(img, 4)
"""


def test_error_inside_a_block_shows_the_definition_and_the_use(tmp_path, capsys):
    error = error_of(BLOCK_ERROR)
    assert (error.span.line, error.span.col) == (3, 9)  # the conv inside the block
    assert [(f.block, f.call.line, f.call.col) for f in error.trace] == [("stage", 6, 6)]
    text = error.format()
    assert "t.net:3:9: error: conv `s1/a`: the 9x9 window" in text
    assert "in block `stage`, used at t.net:6:6" in text
    assert "    6 | s1 = stage(img, 4)" in text

    path = tmp_path / "stage.net"
    path.write_text(BLOCK_ERROR)
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1
    assert f"in block `stage`, used at {path}:6:6" in err


def test_parameter_error_inside_nested_blocks_lists_every_use():
    error = error_of(
        """\
        input img: 3 x 8 x 8
        block inner(v) { return conv(v, 4, size=3, stride=0) }
        block outer(v) {
            t = inner(v)
            return t
        }
        y = outer(img)
        """
    )
    assert (error.span.line, error.span.col) == (2, 51)
    text = error.format()
    assert "in block `inner`, used at t.net:4:9" in text
    assert "in block `outer`, used at t.net:7:5" in text
    assert text.index("in block `inner`") < text.index("in block `outer`")  # innermost first


def test_undefined_name_inside_a_block_shows_the_use():
    error = error_of(X + "block b(v) { return relu(vv) }\ny = b(x)\n")
    assert "did you mean `v`?" in error.hint
    assert "in block `b`, used at t.net:3:5" in error.format()


def test_error_in_an_included_file_points_into_it(tmp_path, capsys):
    (tmp_path / "lib.net").write_text("const a = 1\nblock b(v) { return conv(v, 4, size=99) }\n")
    main_file = tmp_path / "main.net"
    main_file.write_text('include "lib.net"\ninput x: 3 x 8 x 8\ny = b(x)\n')
    with pytest.raises(NetError) as info:
        load_graph(main_file)
    assert info.value.span.file == str(tmp_path / "lib.net")
    assert "in block `b`, used at " + str(main_file) + ":3:5" in info.value.format()
    (tmp_path / "lib.net").write_text("const a = (1\n")
    status, _, err = run_cli(["check", main_file], capsys)
    assert status == 1
    assert err.startswith(f"{tmp_path / 'lib.net'}:")
    assert f"{main_file}:1:1: note: included from here" in err


# --- includes and files --------------------------------------------------------------------------------


def test_include_not_found(tmp_path, capsys):
    main_file = tmp_path / "main.net"
    main_file.write_text('input x: 3 x 8 x 8\ninclude "missing.net"\n')
    with pytest.raises(NetError) as info:
        load_graph(main_file)
    error = info.value
    assert error.message == f'cannot include "missing.net": no such file ({tmp_path / "missing.net"})'
    assert (error.span.line, error.span.col) == (2, 1)
    assert "relative to the file that includes them" in error.hint
    status, _, err = run_cli(["check", main_file], capsys)
    assert status == 1 and err.startswith(f"{main_file}:2:1: error: cannot include")


def test_include_of_a_directory(tmp_path):
    (tmp_path / "dir.net").mkdir()
    main_file = tmp_path / "main.net"
    main_file.write_text('include "dir.net"\ninput x: 3 x 8 x 8\n')
    with pytest.raises(NetError, match="cannot include"):
        load_graph(main_file)


def test_include_cycle(tmp_path, capsys):
    (tmp_path / "a.net").write_text('include "b.net"\ninput x: 3 x 8 x 8\n')
    (tmp_path / "b.net").write_text('const k = 1\ninclude "a.net"\n')
    with pytest.raises(NetError) as info:
        load_graph(tmp_path / "a.net")
    error = info.value
    assert error.message == "include cycle: a.net -> b.net -> a.net"
    assert (Path(error.span.file).name, error.span.line, error.span.col) == ("b.net", 2, 1)
    status, _, err = run_cli(["check", tmp_path / "a.net"], capsys)
    assert status == 1 and "include cycle" in err


def test_include_of_a_name_the_file_system_rejects(tmp_path):
    long_name = "n" * 300 + ".net"  # longer than a file name may be
    error = error_of(X + f'include "{long_name}"\n', file=str(tmp_path / "main.net"))
    assert error.message == f'cannot include "{long_name}": File name too long'
    assert (error.span.line, error.span.col) == (2, 1)
    error = error_of(X + 'include "a\x00b.net"\n', file=str(tmp_path / "main.net"))
    assert error.message == 'cannot include "a\x00b.net": embedded null byte'


def test_file_including_itself(tmp_path):
    (tmp_path / "self.net").write_text('input x: 3 x 8 x 8\ninclude "self.net"\n')
    with pytest.raises(NetError, match=r"include cycle: self.net -> self.net"):
        load_graph(tmp_path / "self.net")


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.net"
    with pytest.raises(NetError, match="no such file"):
        load_graph(path)
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1
    assert err.startswith(f"{path}: error: no such file: {path}")


def test_directory_instead_of_a_file(tmp_path, capsys):
    status, _, err = run_cli(["info", tmp_path], capsys)
    assert status == 1
    assert f"{tmp_path} is a directory, not a .net file" in err


def test_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.net"
    path.write_bytes("# caf\xe9\ninput x: 3 x 8 x 8\n".encode("latin-1"))
    with pytest.raises(NetError) as info:
        load_graph(path)
    assert info.value.message == f"{path} is not UTF-8 text (byte 5)"
    assert "plain UTF-8" in info.value.hint
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1 and "is not UTF-8 text" in err


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.net"
    path.write_text("")
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1 and "the net has no inputs" in err


# --- memory ----------------------------------------------------------------------------------------


def test_memory_limit_option_of_the_api():
    error = error_of(X + "y = conv(x, 4, 3)\n", memory_limit=100)
    assert error.span is None and error.where == "--memory-limit"
    assert error.message.startswith("device `gpu0` would need ")
    assert "but has 100 B" in error.message


def test_memory_limit_flag_on_alexnet(capsys):
    status, out, err = run_cli(["check", ALEXNET, "--memory-limit", "1KiB"], capsys)
    assert status == 1 and out == ""
    assert err.startswith("--memory-limit: error: device `gpu0` would need ")
    assert "but has 1.0 KiB" in err
    assert "hint: use a smaller batch" in err


def test_huge_batch_on_alexnet(capsys):
    status, _, err = run_cli(["check", ALEXNET, "--batch", "100000"], capsys)
    assert status == 1
    assert err.startswith(f"{ALEXNET}:6:8: error: device `gpu0` would need ")
    assert "has 3.0 GiB" in err and "at batch 100000 in fp32" in err


def test_alexnet_fits_its_gpus_at_the_papers_batch(capsys):
    status, out, err = run_cli(["check", ALEXNET, "--batch", "128"], capsys)
    assert (status, out, err) == (0, "", "")


# --- speed: mistakes that could hang must fail fast ----------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        X + "const a = 10 ** 10 ** 10\n",
        X + "const a = 9 ** 9 ** 9 ** 9\n",
        X + "const a = 2 ** 64 ** 64\n",
        X + "const a = 1" + "0" * 100_000 + "\n",
        X + "repeat 100000 {\n  repeat 100000 { y = relu(x) }\n}\n",
    ],
    ids=["power-tower", "power-tower-4", "power-64", "long-literal", "nested-repeat"],
)
def test_runaway_inputs_fail_fast(source):
    def hang(signum, frame):
        raise AssertionError("still running after 60 s: finishing this input would take days")

    previous = signal.signal(signal.SIGALRM, hang)  # a hang guard, not a timing: the limit is generous
    signal.alarm(60)
    try:
        error = error_of(source)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if "repeat" in source:
        assert error.message == "the net has more than 100000 layers"
        assert (error.span.line, error.span.col) == (3, 23)
        assert "nested `repeat`s multiply" in error.hint
    else:
        assert error.message == "number too large"


# --- command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--bogus"], "netdsl check: error: unknown flag --bogus"),
        (["check", "--bacth", "2"], "unknown flag --bacth\nhint: did you mean `--batch`? see `netdsl check --help`"),
        (["train", "x.net", "--learning-rate", "1"], "hint: netdsl calls it --lr; see `netdsl train --help`"),
        (["train", "x.net", "--flip", "false"], "unexpected argument `false`"),
        (["check", "--batch", "0"], "argument --batch: not a positive whole number: '0'"),
        (["check", "--batch", "-3"], "argument --batch"),
        (["check", "--batch", "two"], "not a positive whole number: 'two'"),
        (["check", "--batch"], "expected one argument"),
        (["check", "--memory-limit", "lots"], "argument --memory-limit: not a memory size: 'lots'"),
        (["check", "--memory-limit", "0GiB"], "not a memory size"),
        (["check", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["graph", str(ALEXNET)], "the following arguments are required: -o/--output"),
        (["check", "a.net", "b.net"], "netdsl check: error: unexpected argument `b.net`"),
    ],
)
def test_bad_flags_exit_1_without_traceback(argv, message, capsys):
    status, out, err = run_cli(argv, capsys)
    assert out == ""
    assert status == 1
    assert message in err
    assert "error:" in err and "see `netdsl" in err


def test_debug_flag_adds_the_traceback(tmp_path, capsys):
    path = tmp_path / "bad.net"
    path.write_text(X + "y = cnov(x)\n")
    assert main(["--debug", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown layer type `cnov`" in err


def test_color_always_marks_the_error(tmp_path, capsys):
    path = tmp_path / "bad.net"
    path.write_text(X + "y = cnov(x)\n")
    assert main(["--color=always", "check", str(path)]) == 1
    assert "\033[31merror:" in capsys.readouterr().err
    assert main(["--color", "always", "check", str(path)]) == 1
    assert "\033[31merror:" in capsys.readouterr().err
    assert main(["--color", "never", "check", str(path)]) == 1
    assert "\033[" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["check", "{bad}"], "error: unknown layer type `cnov`"),
        (["check", "{dir}"], "is a directory, not a .net file"),
        (["check", "--batch", "0"], "not a positive whole number"),
        (["check", str(ALEXNET), "--memory-limit", "1KiB"], "would need"),
    ],
)
def test_the_installed_command_prints_no_traceback(args, expected, tmp_path):
    bad = tmp_path / "bad.net"
    bad.write_text(X + "y = cnov(x)\n")
    argv = [a.format(bad=bad, dir=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "netdsl", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- the empty-input guard of fc, which the language itself cannot reach ----------------------------------


def test_no_layer_can_produce_an_empty_map():
    # A window larger than its input fails at that layer, so fc never sees a 0-size map.
    error = error_of(X + "y = maxpool(x, 3, stride=3) | maxpool(3, stride=3) | fc(10)\n")
    assert error.message.startswith("maxpool `y.maxpool`: the 3x3 window")
    assert (error.span.line, error.span.col) == (2, 31)


def test_fc_rule_rejects_an_empty_input():
    with pytest.raises(ShapeError, match="fc has nothing to read: its input 4 x 0 x 0 is empty"):
        OPS["fc"].shape({"units": 10, "bias": True}, [(4, 0, 0)])


def test_a_layer_too_large_for_32_bit_offsets_is_an_error():
    with pytest.raises(NetError, match="more than 2\\^31 - 1 values per image"):
        graph_from_text("input x: 3 x 8 x 8\ny = conv(x, 8, size=3, pad=10**9)\n")


def test_a_bug_is_reported_as_an_internal_error(monkeypatch, capsys):
    """An exception that is not a NetError is netdsl's fault: one line saying so, exit status 2, and the
    traceback only with --debug."""
    import netdsl.cli.main

    def broken(argv):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(netdsl.cli.main, "run", broken)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: division by zero" in err and "--debug" in err
    assert "Traceback" not in err and "second line" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "check"])


def test_files_beyond_the_limits_are_refused_early(tmp_path, monkeypatch):
    """A file too big is refused before it is read; too many statements or a statement too long, at the
    statement (the limits lowered here so the test is quick; docs/language.md states the real ones)."""
    from netdsl.lang import parse

    big = tmp_path / "big.net"
    big.write_bytes(b"# " + b"x" * (parse.MAX_FILE_BYTES + 10) + b"\n")
    with pytest.raises(NetError, match=r"the file is 8.0 MiB, more than the 8 MiB a .net file may be"):
        load_graph(big)
    monkeypatch.setattr(parse, "MAX_STATEMENTS", 50)
    text = "net n\n" + "".join(f"const a{i} = {i}\n" for i in range(60)) + "input x: 1 x 4 x 4\noutput x\n"
    with pytest.raises(NetError, match="more than 50 statements") as caught:
        graph_from_text(text, "many.net")
    assert str(caught.value.span) == "many.net:51:15"
    monkeypatch.setattr(parse, "MAX_STATEMENT_TOKENS", 100)
    text = "net n\nconst a = " + " + ".join(["1"] * 2_000_000) + "\ninput x: 1 x 4 x 4\noutput x\n"
    with pytest.raises(NetError, match="a statement longer than 100 names") as caught:
        graph_from_text(text, "long.net")
    assert (caught.value.span.line, caught.value.span.col) == (2, 205)  # the 101st token: the rest is never read


def test_json_nested_past_pythons_recursion_is_a_file_error(tmp_path, capsys):
    """A tuning file or a build's plan.json of 100,000 nested lists: json raises RecursionError, reported
    as the file that cannot be read, not as netdsl's internal error."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "tuning.json").write_text(deep)
    status, _, err = run_cli(["compile", ROOT / "nets/lenet5.net", "--tuning", tmp_path / "tuning.json"], capsys)
    assert status == 1 and "tuning.json: error: cannot read the tuning file" in err
    build = tmp_path / "build"
    assert run_cli(["compile", ROOT / "nets/lenet5.net", "-o", build], capsys)[0] == 0
    (build / "plan.json").write_text(deep)
    status, _, err = run_cli(["run", build, "--backend", "torch"], capsys)
    assert status == 1 and "plan.json: error: cannot read" in err and "internal error" not in err


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path, capsys):
    """Some Windows editors start UTF-8 files with a byte-order mark: read as nothing, and the columns of
    errors on line 1 are counted without it."""
    path = tmp_path / "bom.net"
    path.write_bytes("\ufeffinput x: 3 x 8 x 8\r\ny = conv(x, 4, size=3, strid=1)\r\n".encode())
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1 and f"{path}:2:24: error: conv has no parameter `strid`" in err
    path.write_bytes("\ufeffinput x: 3 x 8 x 8 $\n".encode())
    status, _, err = run_cli(["check", path], capsys)
    assert status == 1 and f"{path}:1:20: error: unexpected character '$'" in err


@pytest.mark.parametrize(
    "text, built",
    [
        (X + "repeat 2 { y = relu(x) }; z = relu(x)\n", ["x", "y[1]", "y[2]", "z"]),
        ("device a, b\n" + X + "towers a, b { y = relu(x) }; z = relu(all y)\n", ["x", "y@a", "y@b", "z"]),
        ("block f(v) { return relu(v) }; " + X + "y = f(x)\n", ["x", "y"]),
        (X + "repeat 2 { repeat 1 { y = relu(x) } }\n", ["x", "y[1][1]", "y[2][1]"]),
        (X + "train { lr = 0.1 }; y = relu(x)\n", ["x", "y"]),
    ],
    ids=["repeat", "towers", "block", "nested", "train"],
)
def test_a_braced_statement_ends_at_a_semicolon_too(text, built):
    """Both statements are read: the layers of the braced one and of the one after the `;`."""
    graph = graph_from_text(text)
    assert sorted(graph.nodes) == built
    if text.startswith(X + "train"):
        assert [(setting.name, setting.value) for setting in graph.graph["recipe"]] == [("lr", 0.1)]


@pytest.mark.parametrize("keyword", ["repeat 2", "towers a, b", "train"])
def test_a_braced_statement_does_not_run_into_the_next(keyword):
    """`repeat 2 { ... } z = ...` on one line: a missing `;`, as between any two statements."""
    body = "lr = 0.1" if keyword == "train" else "y = relu(x)"
    error = error_of("device a, b\n" + X + f"{keyword} {{ {body} }} z = relu(x)\n")
    assert error.message == "unexpected `z`" and "expected `;`, end of line" in error.hint


@pytest.mark.parametrize("mistake", ["const x = 1 +\n", "const x = nope\n"], ids=["syntax", "meaning"])
def test_an_error_two_includes_deep_notes_each_include(tmp_path, mistake):
    """a.net includes b.net includes c.net: an error in c.net notes b.net's include line, then a.net's."""
    (tmp_path / "a.net").write_text('include "b.net"\ninput x: 3 x 8 x 8\n')
    (tmp_path / "b.net").write_text('\ninclude "c.net"\n')
    (tmp_path / "c.net").write_text(mistake)
    with pytest.raises(NetError) as info:
        load_graph(tmp_path / "a.net")
    error = info.value
    assert error.span.file == str(tmp_path / "c.net")
    assert [(span.file, span.line, text) for span, text in error.notes] == [
        (str(tmp_path / "b.net"), 2, "included from here"),
        (str(tmp_path / "a.net"), 1, "included from here"),
    ]


def test_every_command_takes_debug_after_it():
    """The internal-error hint says to run the same command with --debug: every command accepts it after its
    name as well as before."""
    from netdsl.cli.main import _parser

    parser = _parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    lacking = sorted(name for name, sub in commands.choices.items() if "--debug" not in sub._option_string_actions)
    assert commands.choices and lacking == []


def test_a_file_the_system_refuses_is_an_error_with_a_hint_from_its_errno(tmp_path, capsys):
    """Each OSError a command can meet becomes a NetError with a hint that fits what the system said."""
    import errno

    from netdsl.errors import os_hint

    hints = {code: os_hint(OSError(code, "x")) for code in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES)}
    assert len(set(hints.values())) == 4 and all(hints.values())
    assert "folder" in hints[errno.EISDIR] and "permissions" in hints[errno.EACCES]
    assert os_hint(OSError(errno.EIO, "x"))  # any other: a hint still
    folder = tmp_path / "a.net"
    folder.mkdir()
    assert main(["check", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "is a directory, not a .net file" in err and "hint: name the .net file inside it" in err
    assert main(["train", str(ROOT / "nets/lenet5.net"), "--data", "digits", "--steps", "0"]) == 1
    err = capsys.readouterr().err
    assert "`steps` must be at least 1, got 0" in err and "hint: `steps`: optimizer steps to train for" in err


def test_every_error_has_a_hint(tmp_path, capsys):
    """Every `NetError(...)` netdsl makes passes a hint, and so does every ShapeError/ParamError (they become
    NetErrors with their hint); a few such errors print it through the CLI."""
    import ast

    lacking = []
    for path in sorted((ROOT / "netdsl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node.func, "id", None) if isinstance(node, ast.Call) else None
            if name not in ("NetError", "ShapeError", "ParamError"):
                continue
            keywords = {k.arg for k in node.keywords}
            by_position = len(node.args) >= (3 if name == "NetError" else 2)  # NetError(message, span, hint)
            if "hint" not in keywords and None not in keywords and not by_position:
                lacking.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert lacking == []

    cases = {  # each error is a NetError that lacked a hint before
        "return image\n": ("`return` is only allowed at the end of a block", "hint: a block ends with `return"),
        "const n = 4 // (2 - 2)\n": ("division by zero", "hint: the divisor is 0 here"),
        "const same = 1\n": ("`same` is a built-in word", "hint: choose another name, e.g. `same_1`"),
        "a = b\nb = a\n": ("`b` is defined in terms of itself", "hint: names that only rename each other"),
        "a = dropout(image, rate=1)\n": ("dropout `rate` must be at least 0 and below 1", "hint: `rate` is the drop"),
        "const n = (-8) ** 0.5\n": ("the result is not a real number", "hint: a negative number to a fractional"),
        "a = conv(image, 8, size=3, bias=1)\n": ("conv `bias` must be true or false", "hint: e.g. bias=false"),
        "repeat -1 { a = relu(image) }\n": ("a repeat count must be between 0 and", "hint: `repeat 0 { ... }` skips"),
        "device gpu0\ndevice gpu0\n": ("device `gpu0` is declared twice", "hint: declare each device once"),
    }
    for source, (message, hint) in cases.items():
        net = tmp_path / "t.net"
        net.write_text("input image: 3 x 8 x 8\n" + source)
        status, _, err = run_cli(["check", net], capsys)
        assert status == 1 and message in err and hint in err, (source, err)

    import numpy as np

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array((np.arange(54, dtype=np.float32) / 54 - 0.4).reshape(2, 3, 3, 3), "w")
    for attrs, message, hint in [
        ({"pads": [0, 0, -1, 1]}, "negative pads [0, 0, -1, 1] are not supported", "hint: negative pads crop"),
        ({"auto_pad": "SAME_UPPPER"}, "unknown auto_pad `SAME_UPPPER`", "hint: did you mean `SAME_UPPER`?"),
    ]:
        conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
        graph = helper.make_graph(
            [conv],
            "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [weight],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model.graph.output[0].type.tensor_type.shape.SetInParent()  # a shape of unknown rank: the checker wants one
        onnx.save(model, tmp_path / "m.onnx")
        status, _, err = run_cli(["import", tmp_path / "m.onnx", "-o", tmp_path / "m.net"], capsys)
        assert status == 1 and message in err and hint in err, (attrs, err)
