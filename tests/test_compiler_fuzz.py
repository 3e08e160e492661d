"""Differential fuzzing of the forward compiler: random small nets through the whole pipeline (parse, graph, fold,
merge_towers, fuse, place, space_to_depth, layout, split_k, memory plan, the emitted Triton kernels run under the
interpreter) against an independent reference written here.

`generate(seed)` writes a random valid `.net` program: convs (groups, stride, dilation, every form of padding, few
channels for the NCHW kernel and 16 or more per group for the channels-last one, strided convs over few channels
for space-to-depth), ReLU and leaky ReLU, LRN (odd and even windows, groups), max and average pooling (ceil mode,
padding, dilation, count_pad), global pooling, batch norm (folded into a conv or not), dropout, channel shuffles
(folded into a conv or an fc, or a kernel of their own), softmax, flatten, fc, concat and add of branches, the
conv + ReLU + LRN + max-pool stage, a second (flat) input, towers with `all x` and `x@gpu1` (and towers written as
nets/alexnet.net writes them, which merge_towers merges), layers placed with `on`. Its own shape model (the
formulas of docs/language.md) keeps every choice valid, and the reference checks the compiler's shapes against it.

`reference(graph, weights, inputs)` runs the layer records of `netdsl.load_graph` one by one with
torch.nn.functional in float64, from the weights given to the net (random, through the weights API's names), each
map rounded to the net's dtype as the net stores it: neither netdsl's torch backend nor codegen/reference.py is
used. Each case runs `netdsl.load(..., backend="triton")` at two batch sizes, with the dtype (fp32, tf32, fp16,
bf16), compile options (layout, space-to-depth, merged towers, split-k, tf32x3) and the launchers' tiles (their
own interpreter tiles, or small ones that put tile edges inside the maps, as on a GPU) drawn from its seed, and
compares every output: the largest difference over the reference's largest magnitude must be within the dtype's
TOLERANCE. Anything else is a failure: a NetError for a net the generator made valid, a crash, a NaN, a wrong
number. REGRESSIONS holds what the campaigns found, reduced.

The default run is DEFAULT_NETS small nets (about 12 s of CPU in all). NETDSL_FUZZ_SCALE=40 runs forty times as many,
NETDSL_FUZZ_SEED=S other ones, NETDSL_FUZZ_BIG=1 larger maps and kernels (slower: for campaigns). A failing case
prints its seed, options and net; `python tests/test_compiler_fuzz.py SEED...` runs those cases alone (with the
same NETDSL_FUZZ_BIG).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run by hand: as tests/conftest.py does

import netdsl
from netdsl.ir import layers
from netdsl.ir.graph import output_names
from netdsl.runtime.weights import weight_specs

SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
DEFAULT_NETS = 6
# max |triton - reference| / max |reference|, per output. The reference rounds each map to the dtype as the net
# stores it, so what is left is the order of sums, a rounding that falls the other way, and where a sum cancels
# (an fc(1) after a 16-bit map) that difference magnified: fp32 and tf32x3 products are exact to fp32's rounding;
# tf32 rounds products' operands to 10 bits on a GPU (exactly under the interpreter).
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 1e-2, "bf16": 5e-2}
BIG = os.environ.get("NETDSL_FUZZ_BIG") == "1"  # larger maps and kernels (for campaigns: slower)
MAX_ELEMENTS = 6000 if BIG else 1500  # per image and map
# The interpreter's time for a net is about its convs' and fcs' programs times their loops' rounds: a budget per net.
# A conv + LRN + max-pool stage costs more than its conv: it computes the conv again where pooling windows overlap.
WORK_BUDGET = 1000 if BIG else 16
STAGE_WORK = 12
Shape = tuple[int, ...]


# --- the shape model (docs/language.md: padding and output sizes) -------------------------------------------------


def four_pads(pad, n: tuple[int, int], k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]) -> tuple:
    """(top, left, bottom, right) of a `pad` value over an input of (h, w)."""
    if pad in ("same", "same_lower"):
        begins, ends = [], []
        for length, size, stride, dil in zip(n, k, s, d, strict=True):
            total = max((-(-length // stride) - 1) * stride + dil * (size - 1) + 1 - length, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if pad == "same" else large)
            ends.append(large if pad == "same" else small)
        return (begins[0], begins[1], ends[0], ends[1])
    if pad == "valid":
        return (0, 0, 0, 0)
    if isinstance(pad, int):
        return (pad,) * 4
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    return tuple(pad)


def out_length(n: int, k: int, s: int, begin: int, end: int, d: int, ceil: bool) -> int:
    span = n + begin + end - d * (k - 1) - 1
    if span < 0:
        return 0
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + begin:  # the last window would start in the bottom padding
        out -= 1
    return out


def window_reads_input(n: int, k: int, s: int, begin: int, d: int, out: int) -> bool:
    """Whether every pooling window along an axis reads at least one input value."""
    return all(any(0 <= i * s - begin + j * d < n for j in range(k)) for i in range(out))


def pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple) else (value, value)


# --- the generator -----------------------------------------------------------------------------------------------


def fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "(" + ", ".join(fmt(v) for v in value) + ")"
    return str(value)


def call(op: str, positional: list, named: dict) -> str:
    args = [fmt(v) for v in positional] + [f"{key}={fmt(v)}" for key, v in named.items()]
    return f"{op}({', '.join(args)})" if args else op


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Value:
    ref: str  # how the text reads it: `v3`, `image`, inside towers a tower's own copy `t2`
    shape: Shape
    tower: bool = False  # defined in the towers block being written (`all`/`@` read it across towers)


@dataclass
class Generated:
    text: str
    towers: int  # 0: no towers block
    second_input: bool


class Generator:
    """Writes one random net. Every element is chosen against the shape model, so the net is valid by
    construction; `graph_from_text` confirms it (a NetError there is a finding)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0
        self.conv_groups = 1  # of the last conv made
        self.paper = False  # a towers block as the paper's: what netdsl.compiler.merge_towers can merge
        self.budget = WORK_BUDGET

    # Elements of a chain: each takes the current shape and returns (text, shape) or None when it does not fit.

    def conv(self, shape: Shape, keep_size: bool = False, ungrouped: bool = False):
        rng = self.rng
        if len(shape) != 3:
            return None
        c, h, w = shape
        groups = 1 if ungrouped or rng.random() < 0.6 else rng.choice([g for g in divisors(c) if g <= 8 or g == c])
        per_group = rng.choice([1, 2, 3, 4, 5, 8, 16, 16, 24, 32, 48, 64, 128])
        filters = max(groups, groups * per_group if groups * per_group <= 192 else groups)
        if keep_size:
            size = pair(rng.choice([1, 3, 5]))
            stride, dilation, pad = (1, 1), pair(rng.choice([1, 1, 2])), rng.choice(["same", "same_lower"])
        else:
            size = pair(rng.choice([1, 2, 3, 3, 5])) if rng.random() < 0.8 else (rng.randint(1, 5), rng.randint(1, 5))
            if c * 16 <= 64 and rng.random() < 0.3:  # few channels, strided: space-to-depth's convs
                stride = pair(rng.choice([2, 4]))
                size = pair(rng.choice([stride[0], stride[0] + 1, 2 * stride[0] + 3]))
            else:
                stride = pair(rng.choice([1, 1, 1, 2, 3])) if rng.random() < 0.85 else (rng.randint(1, 3), 1)
            dilation = (1, 1) if rng.random() < 0.8 else pair(rng.choice([2, 3, (1, 2)]))
            pad = self.pad_value(size, pool=False)
        pads = four_pads(pad, (h, w), size, stride, dilation)
        oh = out_length(h, size[0], stride[0], pads[0], pads[2], dilation[0], False)
        ow = out_length(w, size[1], stride[1], pads[1], pads[3], dilation[1], False)
        if oh < 1 or ow < 1 or filters * oh * ow > MAX_ELEMENTS:
            return None
        tiles = groups * -(-3 * oh * ow // 256) * -(-filters // groups // 64)  # at batch 3
        if not self.spend(tiles * size[0] * size[1] * -(-c // groups // 64)):
            return None
        named = {"size": size if size[0] != size[1] else size[0]}
        if stride != (1, 1):
            named["stride"] = stride if stride[0] != stride[1] else stride[0]
        if pad != 0:
            named["pad"] = pad
        if dilation != (1, 1):
            named["dilation"] = dilation if dilation[0] != dilation[1] else dilation[0]
        if groups > 1:
            named["groups"] = groups
        if rng.random() < 0.2:
            named["bias"] = False
        self.conv_groups = groups
        return call("conv", [filters], named), (filters, oh, ow)

    def pad_value(self, size: tuple[int, int], pool: bool):
        rng = self.rng
        limit = (size[0] - 1, size[1] - 1) if pool else (size[0] + 1, size[1] + 1)
        form = rng.choice(["zero", "int", "pair", "four", "same", "same_lower", "valid"])
        if form == "int" and min(limit) > 0:
            return rng.randint(1, min(limit))
        if form == "pair":
            return (rng.randint(0, limit[0]), rng.randint(0, limit[1]))
        if form == "four":
            return (
                rng.randint(0, limit[0]),
                rng.randint(0, limit[1]),
                rng.randint(0, limit[0]),
                rng.randint(0, limit[1]),
            )
        if form in ("same", "same_lower", "valid"):
            return form
        return 0

    def pool(self, shape: Shape, keep_size: bool = False):
        rng = self.rng
        if len(shape) != 3:
            return None
        c, h, w = shape
        op = rng.choice(["maxpool", "avgpool"])
        size = pair(rng.choice([1, 2, 2, 3, 3])) if rng.random() < 0.85 else (rng.randint(1, 3), rng.randint(1, 3))
        if keep_size:
            stride, dilation, pad, ceil = (1, 1), (1, 1), "same", False
        else:
            stride = None if rng.random() < 0.3 else pair(rng.choice([1, 2, 2, 3]))
            dilation = (1, 1) if rng.random() < 0.85 else pair(2)
            pad = self.pad_value(size, pool=True)
            ceil = rng.random() < 0.35
        stride_pair = size if stride is None else stride
        pads = four_pads(pad, (h, w), size, stride_pair, dilation)
        if any(p >= k for p, k in zip(pads, (*size, *size), strict=True)):
            return None
        oh = out_length(h, size[0], stride_pair[0], pads[0], pads[2], dilation[0], ceil)
        ow = out_length(w, size[1], stride_pair[1], pads[1], pads[3], dilation[1], ceil)
        if oh < 1 or ow < 1:
            return None
        if not window_reads_input(h, size[0], stride_pair[0], pads[0], dilation[0], oh):
            return None
        if not window_reads_input(w, size[1], stride_pair[1], pads[1], dilation[1], ow):
            return None
        named = {}
        if stride is not None:
            named["stride"] = stride if stride[0] != stride[1] else stride[0]
        if pad != 0:
            named["pad"] = pad
        if dilation != (1, 1):
            named["dilation"] = dilation[0]
        if ceil:
            named["ceil"] = True
        if op == "avgpool" and rng.random() < 0.5:
            named["count_pad"] = False
        return call(op, [size if size[0] != size[1] else size[0]], named), (c, oh, ow)

    def lrn(self, shape: Shape):
        rng = self.rng
        if len(shape) != 3:
            return None
        groups = rng.choice([g for g in divisors(shape[0]) if g <= 4]) if rng.random() < 0.3 else 1
        named = {"size": rng.randint(1, 7)}
        if rng.random() < 0.7:
            named["alpha"] = rng.choice([1e-4, 0.01, 0.1, 0.5])
        if rng.random() < 0.5:
            named["beta"] = rng.choice([0.5, 0.75, 1])
        if rng.random() < 0.5:
            named["k"] = rng.choice([0.5, 1, 2])
        if groups > 1:
            named["groups"] = groups
        return call("lrn", [], named), shape

    def shuffle(self, shape: Shape):
        if len(shape) != 3 or shape[0] < 2:
            return None
        return call("shuffle", [self.rng.choice(divisors(shape[0])[1:])], {}), shape

    def spend(self, work: int) -> bool:
        """Whether `work` (programs x rounds) fits in what is left of the net's budget, which it then takes."""
        if work > self.budget:
            return False
        self.budget -= work
        return True

    def fc(self, shape: Shape):
        units = self.rng.choice([1, 3, 10, 16, 33, 64, 130])
        if not self.spend(-(-units // 32) * -(-math.prod(shape) // 64)):
            units = 3
        named = {"bias": False} if self.rng.random() < 0.2 else {}
        return call("fc", [units], named), (units,)

    def simple(self, shape: Shape):
        rng = self.rng
        choice = rng.choice(
            ["relu", "relu", "leaky_relu", "batchnorm", "dropout", *([] if self.paper else ["softmax"])]
        )
        if choice == "leaky_relu":
            return call("leaky_relu", [rng.choice([0.01, 0.1, 0.3])], {}), shape
        if choice == "batchnorm":
            return call("batchnorm", [], {"eps": 1e-3} if rng.random() < 0.3 else {}), shape
        if choice == "dropout":
            return call("dropout", [rng.choice([0.1, 0.5])], {}), shape
        return choice, shape

    def element(self, shape: Shape, keep_size: bool = False):
        rng = self.rng
        if len(shape) == 1:
            return self.fc(shape) if not self.paper and rng.random() < 0.5 else self.simple(shape)
        if self.paper:  # what merges: channel by channel, or grouped by tower
            kinds = ["conv", "conv", "conv_bn", "pool", "lrn", "simple", "global"]
        elif keep_size:
            kinds = ["conv", "conv", "conv_bn", "pool", "lrn", "simple", "shuffle"]
        else:
            kinds = ["conv", "conv", "conv", "conv_bn", "pool", "pool", "lrn", "simple", "simple", "shuffle", "global"]
            kinds += ["fc", "relu_lrn_pool"] + (["flatten"] if rng.random() < 0.2 else [])
        kind = rng.choice(kinds)
        if kind == "conv":
            return self.conv(shape, keep_size)
        if kind == "conv_bn":  # the batch norm folds into the conv
            made = self.conv(shape, keep_size)
            return made and (f"{made[0]} | batchnorm", made[1])
        if kind == "relu_lrn_pool":  # LRN + max-pool with the ReLU first, not a conv's epilogue
            made = self.pool(shape)
            if made is None or not made[0].startswith("maxpool"):
                return None
            return f"relu | {self.lrn(shape)[0]} | {made[0]}", made[1]
        if kind == "pool":
            return self.pool(shape, keep_size)
        if kind == "lrn":
            return self.lrn(shape)
        if kind == "shuffle":
            return self.shuffle(shape)
        if kind == "global":
            return "global_avgpool", (shape[0], 1, 1)
        if kind == "fc":
            return self.fc(shape)
        if kind == "flatten":
            return "flatten", (math.prod(shape),)
        return self.simple(shape)

    def chain(self, shape: Shape, length: int, keep_size: bool = False) -> tuple[list[str], Shape]:
        texts = []
        for _ in range(length):
            for _attempt in range(20):
                made = self.element(shape, keep_size)
                if made is not None:
                    break
            else:
                continue
            texts.append(made[0])
            shape = made[1]
        return texts, shape

    def stage(self, shape: Shape):
        """conv | relu | lrn | maxpool: the conv + LRN + max-pool stage (groups alike in the conv and the LRN)."""
        rng = self.rng
        for _attempt in range(20):
            conv = self.conv(shape)
            if conv is None:
                continue
            c, groups = conv[1][0], self.conv_groups
            norm_named = {"alpha": 0.05, "k": 1} | ({"groups": groups} if groups > 1 else {})
            norm = call("lrn", [rng.choice([3, 4, 5])], norm_named)
            size = rng.choice([2, 3])
            pool_named = {"stride": 2} | ({"ceil": True} if rng.random() < 0.4 else {})
            pads = rng.choice([0, 0, 1]) if size == 3 else 0
            if pads:
                pool_named["pad"] = pads
            oh = out_length(conv[1][1], size, 2, pads, pads, 1, pool_named.get("ceil", False))
            ow = out_length(conv[1][2], size, 2, pads, pads, 1, pool_named.get("ceil", False))
            if oh >= 1 and ow >= 1 and self.spend(STAGE_WORK):
                return [conv[0], "relu", norm, call("maxpool", [size], pool_named)], (c, oh, ow)
        return None

    def name(self) -> str:
        self.count += 1
        return f"v{self.count}"


def generate(seed: int) -> Generated:
    gen = Generator(seed)
    rng = gen.rng
    c = rng.choice([1, 2, 3, 3, 4, 5, 8, 16, 17, 24, 32, 48])
    h, w = rng.randint(4, 20), rng.randint(4, 20)
    while c * h * w > MAX_ELEMENTS:
        h, w = max(4, h // 2), max(4, w // 2)
    towers = rng.choice([0, 0, 0, 2, 2, 3])
    devices = [f"gpu{i}" for i in range(max(towers, 2))]
    lines = [f"net fuzz{seed}"]
    if towers or rng.random() < 0.3:
        lines.append(f"device {', '.join(devices)}")
    lines.append(f"input image: {c} x {h} x {w}")
    values = [Value("image", (c, h, w))]
    second = rng.random() < 0.15
    if second:
        lines.append(f"input meta: {rng.randint(2, 24)}")
    outputs: list[str] = []

    def pick(pool: list[Value]) -> Value:
        return pool[-1] if rng.random() < 0.5 else rng.choice(pool)

    def statement(pool: list[Value], indent: str, in_towers: bool) -> None:
        kind = rng.choice(["chain", "chain", "chain", "stage", "branch", "join"])
        source = pick(pool)
        name = gen.name()
        place = ""
        if not in_towers and rng.random() < 0.2:
            place = f" on {rng.choice(devices)}"
        if kind == "stage" and len(source.shape) == 3:
            made = gen.stage(source.shape)
            if made is not None:
                texts, shape = made
                lines.append(f"{indent}{name} = {source.ref} | {' | '.join(texts)}{place}")
                pool.append(Value(name, shape, in_towers))
                return
        if kind == "branch" and len(source.shape) == 3:
            left, left_shape = gen.chain(source.shape, rng.randint(1, 2), keep_size=True)
            right, right_shape = gen.chain(source.shape, rng.randint(1, 2), keep_size=True)
            if left and right:
                a, b = name, gen.name()
                joined = gen.name()
                lines.append(f"{indent}{a} = {source.ref} | {' | '.join(left)}")
                lines.append(f"{indent}{b} = {source.ref} | {' | '.join(right)}")
                if left_shape == right_shape and rng.random() < 0.5:
                    lines.append(f"{indent}{joined} = add({a}, {b}){place}")
                    shape = left_shape
                else:
                    extra = f", {source.ref}" if rng.random() < 0.3 else ""
                    lines.append(f"{indent}{joined} = concat({a}, {b}{extra}){place}")
                    shape = (left_shape[0] + right_shape[0] + (source.shape[0] if extra else 0), *left_shape[1:])
                pool.extend([Value(a, left_shape, in_towers), Value(joined, shape, in_towers)])
                return
        if kind == "join":
            same = [v for v in pool if v.shape[1:] == source.shape[1:] and len(v.shape) == len(source.shape)]
            if len(same) >= 2:
                a, b = rng.sample(same, 2)
                one_each = not (a.ref.startswith("all ") or b.ref.startswith("all "))  # `all x`: an input per tower
                if a.shape == b.shape and one_each and rng.random() < 0.5:
                    lines.append(f"{indent}{name} = add({a.ref}, {b.ref}){place}")
                    shape = a.shape
                else:
                    lines.append(f"{indent}{name} = concat({a.ref}, {b.ref}){place}")
                    shape = (a.shape[0] + b.shape[0], *a.shape[1:])
                pool.append(Value(name, shape, in_towers))
                return
        texts, shape = gen.chain(source.shape, rng.randint(1, 4))
        if not texts:
            texts, shape = ["relu"], source.shape
        lines.append(f"{indent}{name} = {source.ref} | {' | '.join(texts)}{place}")
        pool.append(Value(name, shape, in_towers))

    if second:
        values.append(Value("meta", (int(lines[-1].split(": ")[1]),)))
    for _ in range(rng.randint(1, 3)):
        statement(values, "", False)
    if towers and rng.random() < 0.5:
        paper_towers(gen, lines, values, towers, devices)
    elif towers:
        lines.append(f"towers {', '.join(devices[:towers])} {{")
        inside = list(values)
        for _ in range(rng.randint(1, 4)):
            tower_values = [v for v in inside if v.tower]
            if tower_values and rng.random() < 0.4:  # read every tower's copy, or one tower's
                chosen = pick(tower_values)
                if rng.random() < 0.75:
                    inside.append(Value(f"all {chosen.ref}", (chosen.shape[0] * towers, *chosen.shape[1:])))
                else:
                    inside.append(Value(f"{chosen.ref}@{rng.choice(devices[:towers])}", chosen.shape))
            statement(inside, "    ", True)
        lines.append("}")
        made = [v for v in inside if v.tower and not v.ref.startswith("all ") and "@" not in v.ref]
        last = made[-1]
        values.append(Value(f"all {last.ref}", (last.shape[0] * towers, *last.shape[1:])))
        if rng.random() < 0.3:
            other = rng.choice(made)
            values.append(Value(f"{other.ref}@{devices[towers - 1]}", other.shape))
    for _ in range(rng.randint(1, 3)):
        statement(values, "", False)
    if second and rng.random() < 0.7:  # the flat input joins a flat value
        flat = [v for v in values if len(v.shape) == 1 and v.ref != "meta"]
        name = gen.name()
        if flat:
            lines.append(f"{name} = concat({rng.choice(flat).ref}, meta) | fc(7)")
        else:
            lines.append(f"{name} = fc(meta, 5) | relu")
        values.append(Value(name, (7,)))
    if rng.random() < 0.3:  # several outputs, named
        chosen = rng.sample([v for v in values[1:] if v.ref != "meta"], min(2, len(values) - 1))
        outputs = [v.ref for v in chosen if not v.ref.startswith("all ")]
        if outputs:
            lines.append(f"output {', '.join(dict.fromkeys(outputs))}")
    return Generated("\n".join(lines) + "\n", towers, second)


def paper_towers(gen: Generator, lines: list[str], values: list[Value], towers: int, devices: list[str]) -> None:
    """A towers block as nets/alexnet.net writes it, which merge_towers can run as one grouped net: each copy reads
    the shared input or its own tower's maps, or every tower's (`all x`) with an ungrouped conv or an fc."""
    rng = gen.rng
    gen.paper = True
    lines.append(f"towers {', '.join(devices[:towers])} {{")
    own: Value | None = None
    for _ in range(rng.randint(1, 4)):
        if own is None:
            source = rng.choice([v for v in values if len(v.shape) == 3])
            ref, shape, shared = source.ref, source.shape, True
        elif len(own.shape) == 1 or rng.random() < 0.3:
            ref, shape, shared = f"all {own.ref}", (own.shape[0] * towers, *own.shape[1:]), True
        else:
            ref, shape, shared = own.ref, own.shape, False
        texts = []
        if len(shape) == 1 or (shared and rng.random() < 0.25):
            made = gen.fc(shape)
            texts, shape = [made[0]], made[1]
        elif shared:
            for _attempt in range(20):
                made = gen.conv(shape, ungrouped=True)
                if made is not None:
                    texts, shape = [made[0]], made[1]
                    break
        more, shape = gen.chain(shape, rng.randint(0 if texts else 1, 3))
        texts = texts + more or ["relu"]
        name = gen.name()
        lines.append(f"    {name} = {ref} | {' | '.join(texts)}")
        own = Value(name, shape, True)
    lines.append("}")
    gen.paper = False
    values.append(Value(f"all {own.ref}", (own.shape[0] * towers, *own.shape[1:])))


# --- the reference -----------------------------------------------------------------------------------------------


def reference_weights(graph, seed: int) -> dict[str, np.ndarray]:
    """Random weights for every tensor the net stores (netdsl.runtime.weights.weight_specs): He-scaled filters,
    biases and batch norms far from the identity, so that folding them shows."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_specs(graph).items():
        tensor = name.rsplit(".", 1)[1]
        if tensor == "weight" and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            weights[name] = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        elif tensor == "weight":  # batch norm's gamma
            weights[name] = rng.uniform(0.5, 1.5, shape)
        elif tensor == "running_var":
            weights[name] = rng.uniform(0.5, 2.0, shape)
        else:  # biases, running means
            weights[name] = rng.standard_normal(shape) * 0.2
    return {name: value.astype(np.float32) for name, value in weights.items()}


def _windows(x: torch.Tensor, params: dict, pad_fill: float, beyond_fill: float) -> torch.Tensor:
    """x's pooling windows, N x C x taps x out_h x out_w: `pad_fill` in the padding, `beyond_fill` past it (where
    a ceil-mode window hangs over the bottom or right padding)."""
    n, c, h, w = x.shape
    size, stride, dilation = params["size"], params["stride"], params["dilation"]
    top, left, bottom, right = four_pads(params["pad"], (h, w), size, stride, dilation)
    ceil = params["ceil"]
    oh = out_length(h, size[0], stride[0], top, bottom, dilation[0], ceil)
    ow = out_length(w, size[1], stride[1], left, right, dilation[1], ceil)
    reach_h = (oh - 1) * stride[0] + dilation[0] * (size[0] - 1) + 1
    reach_w = (ow - 1) * stride[1] + dilation[1] * (size[1] - 1) + 1
    padded_h, padded_w = top + h + bottom, left + w + right
    canvas = torch.full((n, c, max(reach_h, padded_h), max(reach_w, padded_w)), beyond_fill, dtype=x.dtype)
    canvas[:, :, :padded_h, :padded_w] = pad_fill
    canvas[:, :, top : top + h, left : left + w] = x
    canvas = canvas[:, :, :reach_h, :reach_w].reshape(n * c, 1, reach_h, reach_w)
    return F.unfold(canvas, size, dilation=dilation, stride=stride).reshape(n, c, size[0] * size[1], oh, ow)


def pool(x: torch.Tensor, op: str, params: dict) -> torch.Tensor:
    if op == "maxpool":
        return _windows(x, params, -math.inf, -math.inf).amax(dim=2)
    total = _windows(x, params, 0.0, 0.0).sum(dim=2)
    # The divisor: taps inside the padded map (count_pad, not what hangs past it in ceil mode), or inside the input.
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    counted = _windows(ones, params, 1.0 if params["count_pad"] else 0.0, 0.0).sum(dim=2)
    return total / counted


def lrn(x: torch.Tensor, params: dict) -> torch.Tensor:
    """b_c = a_c / (k + alpha * sum of a_j^2 over the window around c, clipped at its group's edges) ^ beta."""
    c = x.shape[1]
    per_group = c // params["groups"]
    n = params["size"]
    squares = x * x
    sums = torch.zeros_like(x)
    for channel in range(c):
        first = channel // per_group * per_group
        lo, hi = max(first, channel - (n - 1) // 2), min(first + per_group - 1, channel + n // 2)
        sums[:, channel] = squares[:, lo : hi + 1].sum(dim=1)
    return x / (params["k"] + params["alpha"] * sums) ** params["beta"]


def reference(
    graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], stored: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Every layer's output, N x shape, computed from the layer records alone in float64, each rounded to `stored`
    as the net stores its maps (so that a sum that cancels does not turn the rounding of its inputs into an error)."""
    values: dict[str, torch.Tensor] = {}
    for item in layers(graph):
        p = item.params
        ins = [values[name] for name in item.inputs]
        if item.op == "input":
            y = inputs[item.name]
        elif item.op == "concat":
            y = torch.cat(ins, dim=1)
        elif item.op == "add":
            y = sum(ins[1:], ins[0])
        else:
            x = ins[0] if len(ins) == 1 else torch.cat(ins, dim=1)
            w = weights.get(f"{item.name}.weight")
            b = weights.get(f"{item.name}.bias")
            if item.op == "conv":
                size, stride, dilation = p["size"], p["stride"], p["dilation"]
                top, left, bottom, right = four_pads(p["pad"], tuple(x.shape[2:]), size, stride, dilation)
                y = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, p["groups"])
            elif item.op == "fc":
                y = F.linear(x.reshape(x.shape[0], -1), w, b)
            elif item.op == "relu":
                y = torch.clamp(x, min=0)
            elif item.op == "leaky_relu":
                y = torch.where(x > 0, x, x * p["slope"])
            elif item.op == "lrn":
                y = lrn(x, p)
            elif item.op in ("maxpool", "avgpool"):
                y = pool(x, item.op, p)
            elif item.op == "global_avgpool":
                y = x.mean(dim=(2, 3), keepdim=True)
            elif item.op in ("dropout",):
                y = x
            elif item.op == "flatten":
                y = x.reshape(x.shape[0], -1)
            elif item.op == "softmax":
                y = torch.softmax(x, dim=1)
            elif item.op == "batchnorm":
                view = (1, -1) + (1,) * (x.dim() - 2)
                mean, var = weights[f"{item.name}.running_mean"], weights[f"{item.name}.running_var"]
                y = (x - mean.view(view)) / torch.sqrt(var.view(view) + p["eps"]) * w.view(view) + b.view(view)
            elif item.op == "shuffle":
                groups, channels = p["groups"], x.shape[1]
                y = x.reshape(x.shape[0], groups, channels // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
            else:
                raise AssertionError(f"the reference has no op {item.op}")
        assert tuple(y.shape[1:]) == tuple(item.shape), f"{item.name}: shape {tuple(y.shape[1:])} vs {item.shape}"
        values[item.name] = y.to(stored).double()
    return values


# --- running a case ----------------------------------------------------------------------------------------------

DTYPES = ["fp32", "bf16", "fp16", "fp32", "tf32", "bf16", "fp16"]


@dataclass(frozen=True)
class Case:
    seed: int
    dtype: str
    batches: tuple[int, int]
    options: dict
    small_tiles: bool  # the launchers' interpreter tiles made small: many programs, as on a GPU, masks at tile edges


# Tiles for `small_tiles`: module of netdsl.codegen -> its INTERPRETER_CONFIG (the interpreter's own are few and
# large, so that one program covers a small map and no tile edge falls inside it).
SMALL_TILES = {
    "conv": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "conv_nhwc": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "fc": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    "pool": {"BLOCK": 256, "num_warps": 4},
    "lrn": {"BLOCK_C": 8, "BLOCK_P": 32, "num_warps": 4},
    "space_to_depth": {"BLOCK_P": 32, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
    "conv_lrn_pool": {"BLOCK_P": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},  # BLOCK_N: a group's channels
}


@contextlib.contextmanager
def interpreter_tiles(small: bool):
    """Runs the launchers with SMALL_TILES under the interpreter (when `small`), and puts their own back."""
    modules = {name: importlib.import_module(f"netdsl.codegen.{name}") for name in SMALL_TILES} if small else {}
    saved = {name: module.INTERPRETER_CONFIG for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.INTERPRETER_CONFIG = SMALL_TILES[name]
        yield
    finally:
        for name, module in modules.items():
            module.INTERPRETER_CONFIG = saved[name]


def draw_case(seed: int) -> Case:
    """The dtype, batch sizes and compile options of the net of `seed` (drawn apart from the net itself)."""
    rng = random.Random(f"case-{seed}")
    dtype = DTYPES[seed % len(DTYPES)]
    options = {}
    if rng.random() < 0.2:
        options["layout"] = "nchw"
    elif rng.random() < 0.4:
        options["space_to_depth"] = True
    if rng.random() < 0.4:
        options["merge_towers"] = True
    if rng.random() < 0.4:
        options["split_k"] = True
    if dtype == "fp32" and rng.random() < 0.3:
        options["precision"] = "tf32x3"
    batches = (rng.choice([1, 2]), rng.choice([3, 5, 17])) if BIG else rng.choice([(1, 2), (1, 3), (2, 3)])
    return Case(seed, dtype, batches, options, rng.random() < 0.5)


def check_case(case: Case, folder: Path) -> dict[str, float]:
    """Runs the net of `case` (see `check_net`)."""
    with interpreter_tiles(case.small_tiles):
        label = f"{' NETDSL_FUZZ_BIG=1' if BIG else ''}{', small tiles' if case.small_tiles else ''}"
        return check_net(generate(case.seed).text, case.dtype, case.batches, case.options, case.seed, folder, label)


def check_net(
    text: str, dtype: str, batches: tuple[int, ...], options: dict, seed: int, folder: Path, label: str = ""
) -> dict[str, float]:
    """Runs `text` with the triton backend at each batch size; returns each output's error (the largest difference
    over the reference's largest magnitude) and fails with the net's text when one is off."""
    path = folder / f"fuzz{seed}.net"
    path.write_text(text)
    about = f"seed {seed}{label}, {dtype}, batches {batches}, options {options}\n{text}"
    try:
        graph = netdsl.load_graph(path)
    except netdsl.NetError as error:
        pytest.fail(f"a net the generator made valid is refused: {error}\n{about}")
    weights = reference_weights(graph, seed)
    net = netdsl.load(path, backend="triton", dtype=dtype, weights=weights, batch=batches[0], **options)
    held = {name: torch.from_numpy(value).to(net.torch_dtype).double() for name, value in weights.items()}
    shapes = {name: graph.nodes[name]["layer"].shape for name in graph.graph["inputs"]}
    names = output_names(graph)
    errors: dict[str, float] = {}
    for batch in batches:
        generator = torch.Generator().manual_seed(seed * 1000 + batch)
        inputs = {
            name: torch.randn((batch, *shape), generator=generator).to(net.torch_dtype)
            for name, shape in shapes.items()
        }
        got = net(inputs if len(inputs) > 1 else next(iter(inputs.values())))
        got = got if isinstance(got, dict) else {next(iter(names.values())): got}
        expected = reference(graph, held, {name: x.double() for name, x in inputs.items()}, net.torch_dtype)
        for layer_name, name in names.items():
            want, have = expected[layer_name], got[name].double()
            assert have.shape == want.shape, f"{name}: shape {tuple(have.shape)}, expected {tuple(want.shape)}\n{about}"
            assert torch.isfinite(have).all(), f"{name}: non-finite values at batch {batch}\n{about}"
            error = float((have - want).abs().max() / max(float(want.abs().max()), 1e-3))
            errors[f"{name}@{batch}"] = error
            assert error <= TOLERANCE[dtype], (
                f"{name}: error {error:.3g} at batch {batch} over {dtype}'s {TOLERANCE[dtype]}\n{about}"
            )
    return errors


# --- the tests ---------------------------------------------------------------------------------------------------

SEEDS = [SEED * 100_000 + i for i in range(max(1, int(DEFAULT_NETS * SCALE)))]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_net(seed: int, tmp_path: Path, interpreter_bf16_dot) -> None:
    check_case(draw_case(seed), tmp_path)


# Nets the campaign found wrong, each reduced to what shows the fault: (what was wrong, net, dtype, options).
REGRESSIONS = {
    "flatten_of_towers": (  # a flatten of several inputs was a view of the first alone: the arena view crashed
        """
        device gpu0, gpu1
        input image: 3 x 5 x 4
        towers gpu0, gpu1 { a = conv(image, 2, size=3, pad=1) }
        b = all a | flatten | fc(3)
        c = all a | flatten | softmax
        """,
        "fp32",
        {},
    ),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression(name: str, tmp_path: Path, interpreter_bf16_dot) -> None:
    text, dtype, options = REGRESSIONS[name]
    check_net(textwrap.dedent(text), dtype, (1, 2), options, 0, tmp_path)


def test_pool_launcher_takes_one_window_over_a_small_input(interpreter_bf16_dot) -> None:
    """Taps at -2, 0, 2 over one column: one window, which reads the input. The launcher refused it, as if a
    second window (which the output does not have) read only padding (codegen/windows.empty_window ignored the
    window count)."""
    from netdsl.codegen.pool import pool2d

    x = torch.randn((2, 3, 4, 1), generator=torch.Generator().manual_seed(0))
    params = {"size": (3, 3), "stride": (1, 1), "pad": (2, 2), "dilation": (2, 2), "ceil": False}
    for kind, op, count_pad in (("max", "maxpool", True), ("avg", "avgpool", True), ("avg", "avgpool", False)):
        got = pool2d(x, kind, 3, 1, (2, 2, 2, 2), count_include_pad=count_pad, dilation=2)
        want = pool(x.double(), op, params | {"count_pad": count_pad})
        assert got.shape == want.shape == (2, 3, 4, 1)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_net_takes_one_window_over_a_small_input(tmp_path: Path, interpreter_bf16_dot) -> None:
    text = "input image: 2 x 4 x 1\np = maxpool(image, 3, stride=1, pad=same, dilation=2)\n"
    check_net(text, "fp32", (1, 2), {}, 0, tmp_path)


def test_generator_is_deterministic_and_valid() -> None:
    """The same seed writes the same net, and every net the generator writes builds (shapes as its model says)."""
    assert generate(7).text == generate(7).text
    for seed in range(40):
        text = generate(seed).text
        try:
            netdsl.graph_from_text(text)
        except netdsl.NetError as error:
            pytest.fail(f"seed {seed}: {error}\n{text}")


if __name__ == "__main__":
    import tempfile

    for arg in sys.argv[1:]:
        case = draw_case(int(arg))
        print(case, generate(case.seed).text, sep="\n")
        with tempfile.TemporaryDirectory() as tmp:
            print(check_case(case, Path(tmp)))
