"""Differential fuzzing of ONNX export and import against onnxruntime (the independent reference).

1. Export: seeded random `.net` programs (conv with groups, stride, dilation and every form of padding,
   activations, lrn, pools with ceil mode and padding, global pool, fc, dropout, batchnorm, softmax, concat and
   add branches, shuffle, towers, blocks, repeat, presets) with random weights (biases and batch-norm statistics
   not zero) are exported with `export_onnx`, checked with onnx.checker (full check) and strict shape inference,
   run in onnxruntime and compared with netdsl's own run of the same net and weights (torch backend).
2. Round trip: the exported model imported again (`import_onnx`, with `towers` for a net with towers) computes
   the same outputs and holds the same layers: every conv, fc and batchnorm with the same parameters and
   bit-identical weights, the same weightless layers (dropout, and flattens an fc makes redundant, excepted).
3. Import: random ONNX graphs built with onnx.helper (Conv with auto_pad, pools with count_include_pad and
   ceil_mode, Gemm with transB/alpha/beta, MatMul + Add, Flatten, Reshape, BatchNormalization, Concat, Add,
   Sum, per-channel arithmetic, Softmax, Dropout, Pad, channel shuffles, Split patterns, ...) over opsets 11 to
   21 are imported and run by netdsl and compared with onnxruntime; a few carry one construct netdsl cannot
   express, which must be a NetError naming the node, with a hint (never a traceback or other numbers).

Tolerance: fp32 everywhere, the relative error of each output (2-norm over the whole output) at most 1e-4.
Every case is deterministic (random.Random and numpy generators seeded by the case number). Set
NETDSL_FUZZ_SCALE (e.g. 20) for a larger campaign and NETDSL_FUZZ_SEED for other cases.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import netdsl  # noqa: E402
from netdsl.cli.main import main  # noqa: E402
from netdsl.errors import NetError  # noqa: E402
from netdsl.interop.onnx_export import export_onnx  # noqa: E402
from netdsl.interop.onnx_import import import_onnx  # noqa: E402
from netdsl.ir import layers  # noqa: E402
from netdsl.ir.ops import layer_pads  # noqa: E402
from netdsl.lang.frontend import graph_from_text  # noqa: E402
from netdsl.runtime.weights import weight_specs  # noqa: E402

SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
EXPORT_CASES = max(1, int(12 * SCALE))
IMPORT_CASES = max(1, int(16 * SCALE))
TOLERANCE = 1e-4  # fp32: relative error, 2-norm over each whole output
BATCH = 2


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want.astype(np.float64)), 1e-30))


def onnxruntime_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # errors only (not its warnings about the shapes models declare)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def netdsl_run(net_path: Path, weights, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    net = netdsl.load(net_path, backend="torch", weights=weights)
    got = net(next(iter(feeds.values())) if len(feeds) == 1 else feeds)
    values = list(got.values()) if isinstance(got, dict) else [got]
    return [v.detach().cpu().numpy() for v in values]


def compare(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, the reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: output #{i} is {g.shape}, the reference's {w.shape}"
        error = relative_error(g, w)
        assert error <= TOLERANCE, f"{what}: output #{i}: relative error {error:.2e}"


def out_length(n: int, k: int, s: int, begin: int, end: int, d: int = 1, ceil: bool = False) -> int:
    """Windows along one axis, by ONNX's rule (opset 22; onnxruntime's at every opset): the floor, or with ceil
    the ceiling less a last window that would start in the end padding."""
    room = n + begin + end - (d * (k - 1) + 1)
    if room < 0:
        return 0
    if not ceil:
        return room // s + 1
    count = -(-room // s) + 1
    return count - 1 if (count - 1) * s >= n + begin else count


def same_pads(n: int, k: int, s: int, d: int, lower: bool) -> tuple[int, int]:
    total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def window_outputs(hw, k, s, d, pads, ceil: bool, pool: bool, out: list[int] | None = None) -> list[int] | None:
    """The output's size along each axis (`out` where SAME gives it), or None where a window would be empty:
    no output at all, or (pooling) a window that reads only padding."""
    if out is None:
        out = [
            out_length(n, kk, ss, pads[i], pads[i + 2], dd, ceil) for i, (n, kk, ss, dd) in enumerate(zip(hw, k, s, d))
        ]
    if min(out) < 1:
        return None
    if pool and not all(
        reads_input(n, kk, ss, pads[i], dd, o) for i, (n, kk, ss, dd, o) in enumerate(zip(hw, k, s, d, out))
    ):
        return None
    return out


def reads_input(n: int, k: int, s: int, begin: int, d: int, count: int) -> bool:
    """Whether every one of `count` windows has a tap inside the input."""
    return all(any(0 <= i * s - begin + j * d < n for j in range(k)) for i in range(count))


def divisors_of(n: int, most: int) -> list[int]:
    return [d for d in range(1, min(n, most) + 1) if n % d == 0]


# --- random .net programs ---------------------------------------------------------------------------------


@dataclass
class Value:
    ref: str  # how the text reads it: `a`, `all t`, `t@gpu1`
    shape: tuple[int, ...]


@dataclass
class NetWriter:
    """A random valid `.net` program: shapes are worked out here (by the documented rules) to choose valid
    parameters, and checked against netdsl's afterwards."""

    rnd: random.Random
    lines: list[str] = field(default_factory=list)
    pool: list[Value] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layer name -> shape, as computed here
    count: int = 0
    towers: bool = False
    preset: bool = False

    def fresh(self, base: str = "l") -> str:
        self.count += 1
        return f"{base}{self.count}"

    def pick(self, flat: bool | None = None) -> Value:
        choices = [v for v in self.pool if flat is None or (len(v.shape) == 1) == flat]
        recent = choices[-3:]
        return self.rnd.choice(recent if self.rnd.random() < 0.7 else choices)

    # chain elements: (text without the input, output shape), or None when the input does not suit them

    def element(self, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        rnd = self.rnd
        if len(shape) == 1:
            ops = ["fc", "fc", "relu", "leaky_relu", "batchnorm", "softmax", "dropout"]
        else:
            ops = ["conv"] * 5 + ["maxpool"] * 3 + ["avgpool"] * 3 + ["relu", "leaky_relu", "lrn", "lrn"]
            ops += ["global_avgpool", "batchnorm", "batchnorm", "softmax", "dropout", "shuffle", "flatten", "fc"]
            if self.preset:
                ops.append("norm")
        while True:
            result = getattr(self, "el_" + rnd.choice(ops))(shape)
            if result is not None:
                return result

    @staticmethod
    def pair(values: tuple[int, int]) -> str:
        return str(values[0]) if values[0] == values[1] else f"({values[0]}, {values[1]})"

    def window(self, shape, pool: bool, avg: bool = False):
        """Random (size, stride, dilation, pad text, four pads, ceil) for a conv or pool over `shape`."""
        rnd = self.rnd
        _c, h, w = shape
        for _ in range(50):
            k = (rnd.randint(1, 4), rnd.randint(1, 4)) if rnd.random() < 0.4 else (rnd.randint(1, 4),) * 2
            s = (rnd.randint(1, 3), rnd.randint(1, 3)) if rnd.random() < 0.3 else (rnd.randint(1, 3),) * 2
            d = (1, 1) if rnd.random() < 0.6 else (rnd.randint(1, 2), rnd.randint(1, 3))
            if pool and not avg and rnd.random() < 0.5:
                d = (1, 1)
            form = rnd.choice(["none", "n", "hw", "four", "four", "same", "same_lower", "valid"])
            limit = [kk - 1 for kk in k] if pool else [3, 3]
            if form == "n":
                p = rnd.randint(0, min(limit))
                pads, text = (p, p, p, p), str(p)
            elif form == "hw":
                ph, pw = rnd.randint(0, limit[0]), rnd.randint(0, limit[1])
                pads, text = (ph, pw, ph, pw), f"({ph}, {pw})"
            elif form == "four":
                pads = (rnd.randint(0, limit[0]), rnd.randint(0, limit[1]))
                pads += (rnd.randint(0, limit[0]), rnd.randint(0, limit[1]))
                text = f"({', '.join(map(str, pads))})"
            elif form in ("same", "same_lower"):
                (t, b), (le, r) = (
                    same_pads(n, kk, ss, dd, form == "same_lower") for n, kk, ss, dd in zip((h, w), k, s, d)
                )
                pads, text = (t, le, b, r), form
            else:
                pads, text = (0, 0, 0, 0), None if form == "none" else "valid"
            if pool and any(p >= kk for p, kk in zip(pads, k + k)):
                continue
            ceil = pool and rnd.random() < 0.4
            out = window_outputs((h, w), k, s, d, pads, ceil, bool(pool))
            if out is None:
                continue
            args = [self.pair(k)]
            if s != (k if pool else (1, 1)) or (pool and rnd.random() < 0.3):
                args.append(f"stride={self.pair(s)}")
            if text is not None:
                args.append(f"pad={text}")
            if d != (1, 1):
                args.append(f"dilation={self.pair(d)}")
            if ceil:
                args.append("ceil=true")
            return args, tuple(out)
        return None

    def el_conv(self, shape):
        rnd = self.rnd
        c = shape[0]
        groups = rnd.choice(divisors_of(c, 4)) if rnd.random() < 0.35 else 1
        filters = groups * rnd.randint(1, max(1, 8 // groups))
        found = self.window(shape, pool=False)
        if found is None:
            return None
        args, (h, w) = found
        args.insert(0, str(filters))
        if groups > 1:
            args.append(f"groups={groups}")
        if rnd.random() < 0.25:
            args.append("bias=false")
        return f"conv({', '.join(args)})", (filters, h, w)

    def pooling(self, shape, op: str):
        found = self.window(shape, pool=True, avg=op == "avgpool")
        if found is None:
            return None
        args, (h, w) = found
        if op == "avgpool" and self.rnd.random() < 0.5:
            args.append(f"count_pad={self.rnd.choice(['true', 'false'])}")
        return f"{op}({', '.join(args)})", (shape[0], h, w)

    def el_maxpool(self, shape):
        return self.pooling(shape, "maxpool")

    def el_avgpool(self, shape):
        return self.pooling(shape, "avgpool")

    def el_relu(self, shape):
        return "relu", shape

    def el_leaky_relu(self, shape):
        return f"leaky_relu({self.rnd.choice([0, 0.01, 0.2, 0.5, 1.5])})", shape

    def el_lrn(self, shape):
        rnd = self.rnd
        groups = rnd.choice(divisors_of(shape[0], 4)) if rnd.random() < 0.3 else 1
        size = rnd.choice([1, 3, 5])  # onnxruntime's CPU LRN runs odd sizes only
        alpha = rnd.choice([1e-4, 1e-3, 0.02, 0.3])
        beta, k = rnd.choice([0.5, 0.75, 1.0]), rnd.choice([0.5, 1, 2])
        extra = f", groups={groups}" if groups > 1 else ""
        return f"lrn({size}, alpha={alpha}, beta={beta}, k={k}{extra})", shape

    def el_norm(self, shape):
        return "norm", shape

    def el_global_avgpool(self, shape):
        return "global_avgpool", (shape[0], 1, 1)

    def el_batchnorm(self, shape):
        return self.rnd.choice(["batchnorm", "batchnorm(eps=0.001)", "batchnorm(eps=0.1, momentum=0.3)"]), shape

    def el_softmax(self, shape):
        return "softmax", shape

    def el_dropout(self, shape):
        return f"dropout({self.rnd.choice([0, 0.25, 0.5])})", shape

    def el_shuffle(self, shape):
        return f"shuffle({self.rnd.choice(divisors_of(shape[0], shape[0]))})", shape

    def el_flatten(self, shape):
        return "flatten", (math.prod(shape),)

    def el_fc(self, shape):
        units = self.rnd.randint(1, 12)
        return (f"fc({units})" if self.rnd.random() < 0.8 else f"fc({units}, bias=false)"), (units,)

    # statements

    def chain(self, first: Value, indent: str = "", on: str = "") -> Value:
        name = self.fresh()
        text, shape = self.element(first.shape)
        open_at = text.find("(")
        head = f"{text[:open_at]}({first.ref}, {text[open_at + 1 :]}" if open_at >= 0 else f"{text}({first.ref})"
        if text == "norm":
            head = f"norm({first.ref})"
        elements = [head]
        for _ in range(self.rnd.choice([0, 0, 1, 1, 2])):
            text, shape = self.element(shape)
            elements.append(text)
        self.lines.append(f"{indent}{name} = {' | '.join(elements)}{on}")
        return Value(name, shape)

    def join(self, indent: str = "") -> Value | None:
        """concat or add of values of one spatial size (or one shape)."""
        rnd = self.rnd
        first = self.pick()
        same = [v for v in self.pool if len(v.shape) == len(first.shape) and v.shape[1:] == first.shape[1:]]
        name = self.fresh()
        if rnd.random() < 0.5:
            others = [rnd.choice(same) for _ in range(rnd.randint(1, 2))]
            channels = first.shape[0] + sum(v.shape[0] for v in others)
            refs = ", ".join(v.ref for v in [first, *others])
            self.lines.append(f"{indent}{name} = concat({refs})")
            return Value(name, (channels, *first.shape[1:]))
        if first.ref.startswith("all "):  # add reads each copy of `all x` as an input of its own
            first = Value(first.ref[4:] + "@gpu0", (first.shape[0] // 2, *first.shape[1:]))
        alike = [v for v in same if v.shape == first.shape and not v.ref.startswith("all ")] + [first]
        if len(alike) < 2 and len(first.shape) == 3:  # make a partner of the same shape
            partner = self.fresh()
            self.lines.append(f"{indent}{partner} = conv({first.ref}, {first.shape[0]}, size=3, pad=1)")
            alike.append(Value(partner, first.shape))
        other = rnd.choice(alike)
        form = f"add({first.ref}, {other.ref})" if rnd.random() < 0.5 else f"{first.ref} | add({other.ref}) | relu"
        self.lines.append(f"{indent}{name} = {form}")
        return Value(name, first.shape)

    def tower_block(self) -> None:
        """A towers block: each tower reads outside values or its own copies, `all t` joins the copies."""
        rnd = self.rnd
        self.towers = True
        outside = list(self.pool)
        inside: list[Value] = []
        self.lines.append("towers gpu0, gpu1 {")
        for _ in range(rnd.randint(1, 3)):
            sources = [v for v in outside[-3:] if len(v.shape) == 3] or outside[-1:]
            sources += inside + [Value(f"all {v.ref}", (2 * v.shape[0], *v.shape[1:])) for v in inside]
            self.pool = sources
            value = self.chain(rnd.choice(sources), indent="    ")
            inside.append(value)
        self.lines.append("}")
        self.pool = outside
        for v in inside:
            self.pool.append(Value(f"all {v.ref}", (2 * v.shape[0], *v.shape[1:])))
            self.pool.append(Value(f"{v.ref}@{rnd.choice(['gpu0', 'gpu1'])}", v.shape))

    def block_use(self) -> Value:
        source = self.pick(flat=False)
        name = self.fresh()
        width = self.rnd.randint(1, 6)
        self.lines.append(f"{name} = unit({source.ref}, {width})")
        return Value(name, (width, *source.shape[1:]))

    def repeat(self) -> Value:
        source = self.pick(flat=False)
        name = self.fresh("r")
        self.lines.append(f"{name} = {source.ref}")
        self.lines.append(
            f"repeat {self.rnd.randint(1, 2)} {{ {name} = conv({name}, {source.shape[0]}, size=3, pad=same) | relu }}"
        )
        return Value(name, source.shape)

    def write(self) -> str:
        rnd = self.rnd
        head = []
        if rnd.random() < 0.15:
            head.append(f"input image: {rnd.randint(4, 40)}")
        else:
            head.append(f"input image: {rnd.choice([1, 2, 3, 4, 6, 8])} x {rnd.randint(4, 13)} x {rnd.randint(4, 13)}")
        self.pool.append(Value("image", tuple(int(d) for d in head[0].split(":")[1].split(" x "))))
        if len(self.pool[0].shape) == 3 and rnd.random() < 0.15:
            _c, h, w = self.pool[0].shape
            head.append(f"input extra: {rnd.randint(1, 4)} x {h} x {w}")
            self.pool.append(Value("extra", (int(head[-1].split(":")[1].split(" x ")[0]), h, w)))
        maps = len(self.pool[0].shape) == 3
        if maps and rnd.random() < 0.2:
            self.preset = True
            head.append("const norm = lrn(size=3, alpha=1e-3, k=1)")
        use_block = maps and rnd.random() < 0.2
        if use_block:
            head.append("block unit(x, w) {\n    y = conv(x, w, size=3, pad=same) | relu\n    return y | batchnorm\n}")
        towers_at = rnd.randint(0, 3) if maps and rnd.random() < 0.25 else None
        for step in range(rnd.randint(2, 6)):
            if step == towers_at:
                self.tower_block()
                continue
            roll = rnd.random()
            if roll < 0.2:
                value = self.join()
            elif roll < 0.3 and use_block and any(len(v.shape) == 3 for v in self.pool):
                value = self.block_use()
            elif roll < 0.35 and any(len(v.shape) == 3 for v in self.pool):
                value = self.repeat()
            else:
                value = self.chain(self.pick())
            self.pool.append(value)
        outputs = [self.pool[-1].ref]
        if rnd.random() < 0.3:
            other = rnd.choice(self.pool[1:-1] or self.pool[-1:]).ref
            if other not in outputs:
                outputs.append(other)
        if rnd.random() < 0.05:
            outputs.append("image")  # the input itself
        return "\n".join(["net fuzz", *head, *self.lines, f"output {', '.join(outputs)}", ""])


def random_net(case: int) -> str:
    return NetWriter(random.Random(f"net-{SEED}-{case}")).write()


def random_weights(graph, seed: int) -> dict[str, np.ndarray]:
    """Every tensor random (biases and batch-norm statistics too, so a dropped one shows), of a scale that keeps
    the activations of the order of 1."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_specs(graph).items():
        tensor = name.rsplit(".", 1)[1]
        if tensor == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        elif tensor == "weight" and len(shape) == 1:  # batchnorm's scale
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            value = rng.normal(0, 0.3, shape)
        else:
            value = rng.normal(0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
        weights[name] = value.astype(np.float32)
    return weights


def net_inputs(graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        item.name: rng.standard_normal((BATCH, *item.shape)).astype(np.float32)
        for item in layers(graph)
        if item.op == "input"
    }


# --- round trip: the layers of a net, in a form both sides share ------------------------------------------


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def layer_key(item, weights, devices: bool) -> tuple:
    """A layer as what it computes: op, shape, device, parameters (padding as the first pads and the shape it
    gives, floats to 6 digits) and its weights' bytes."""
    params = dict(item.params)
    if item.op in ("conv", "maxpool", "avgpool"):
        pads = layer_pads(item.params, item.input_shape[1:])
        params["pad"] = pads[:2]  # the end padding may differ where no window reaches it
        params.pop("count_pad", None)  # written only where padding is counted (the outputs check it)
    for name in ("init_std", "init_bias", "rate"):
        params.pop(name, None)
    if item.op == "lrn" and params.get("groups", 1) == 1:
        params["groups"] = 1
    stored = tuple(
        (key.rsplit(".", 1)[1], np.asarray(value, np.float32).tobytes())
        for key, value in sorted(weights.items())
        if key.rsplit(".", 1)[0] == item.name
    )
    device = item.device if devices else None
    return (item.op, tuple(item.shape), device, tuple(sorted((k, _rounded(v)) for k, v in params.items())), stored)


def is_identity(item, graph) -> bool:
    """Layers the ONNX model does not hold (dropout), the importer rightly leaves out (a shuffle moving nothing,
    a 1 x 1 pool moving by 1) or may write otherwise (flatten and concat: an fc flattens, a layer reading several
    inputs joins them, and concat(flatten(a), flatten(b)) is flatten(concat(a, b))). The outputs check them."""
    p = item.params
    if item.op in ("input", "dropout", "flatten", "concat"):
        return True
    if item.op == "shuffle":
        return p["groups"] in (1, item.shape[0])
    if item.op in ("maxpool", "avgpool"):
        return p["size"] == (1, 1) and p["stride"] == (1, 1) and layer_pads(p, item.input_shape[1:]) == (0, 0, 0, 0)
    return False


def needed_layers(graph) -> list:
    import networkx as nx

    outputs = graph.graph["outputs"]
    needed = set(outputs).union(*(nx.ancestors(graph, name) for name in outputs))
    return [item for item in layers(graph) if item.name in needed]


def towers_come_back(graph) -> bool:
    """Whether the ONNX model says where each layer runs: every tower copy the outputs need is there for each
    tower (an unused copy is left out of the model, and the one left is a layer of one device), and each layer
    outside the towers runs where its inputs do (`x@gpu1` outside them moves a layer to gpu1, which the model
    does not record)."""
    needed = needed_layers(graph)
    copies: dict[str, set[str]] = {}
    for item in needed:
        if "@" in item.name:
            copies.setdefault(item.name.rsplit("@", 1)[0], set()).add(item.device)
    devices = {item.device for item in layers(graph) if "@" in item.name}
    default = next(item.device for item in needed if item.op == "input")
    return all(found == devices for found in copies.values()) and all(
        item.device == default for item in needed if "@" not in item.name
    )


def layer_census(graph, weights, devices: bool) -> tuple[Counter, set]:
    """The layers the outputs need: weighted ones as a multiset, weightless ones as a set (the importer merges
    identical ones, and drops what no output needs)."""
    weighted, weightless = Counter(), set()
    for item in needed_layers(graph):
        if is_identity(item, graph):
            continue
        key = layer_key(item, weights, devices)
        if key[-1]:
            weighted[key] += 1
        else:
            weightless.add(key)
    return weighted, weightless


# --- export and round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(EXPORT_CASES))
def test_export_matches_onnxruntime_and_imports_back(case, tmp_path):
    text = random_net(case)
    net_path = tmp_path / "fuzz.net"
    net_path.write_text(text)
    graph = graph_from_text(text, str(net_path))
    weights = random_weights(graph, case)
    feeds = net_inputs(graph, case)
    onnx_path = tmp_path / "fuzz.onnx"
    model = export_onnx(graph, weights, onnx_path)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    declared = {
        o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output
    }
    want = onnxruntime_run(onnx_path, feeds)
    ours = netdsl_run(net_path, weights, feeds)
    compare(ours, want, f"case {case}: netdsl vs onnxruntime\n{text}")
    for (name, dims), value in zip(declared.items(), want):
        assert dims[1:] == list(value.shape[1:]), f"case {case}: output {name} declared {dims}, runs {value.shape}"

    # with towers, --towers gives the towers back where the model holds them (else it may split grouped convs)
    towers = any("@" in item.name for item in needed_layers(graph)) and towers_come_back(graph)
    result = import_onnx(onnx_path, towers=towers)
    back_path = tmp_path / "back.net"
    back_path.write_text(result.text)
    back = graph_from_text(result.text, str(back_path))
    got = netdsl_run(back_path, result.weights, feeds)
    compare(got, ours, f"case {case}: imported vs original\n{text}\n--- imported:\n{result.text}")
    devices = "towers" in result.text
    original, imported = layer_census(graph, weights, devices), layer_census(back, result.weights, devices)
    assert imported[0] == original[0], f"case {case}: weighted layers differ\n{text}\n--- imported:\n{result.text}"
    assert imported[1] == original[1], f"case {case}: layers differ\n{text}\n--- imported:\n{result.text}"


# --- random ONNX models -----------------------------------------------------------------------------------

OPSETS = [11, 12, 13, 17, 18, 19, 21, 22]
IR_VERSIONS = {11: 6, 12: 7, 13: 7, 17: 8, 18: 8, 19: 9, 21: 10, 22: 10}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # without the batch


@dataclass
class OnnxWriter:
    """A random ONNX model of ops netdsl imports, its shapes worked out here (by ONNX's rules). `bad`: the node
    of a construct netdsl cannot express, when one was added (the import must refuse it, naming it)."""

    rnd: random.Random
    rng: np.random.Generator
    opset: int
    nodes: list = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    pool: list[Tensor] = field(default_factory=list)
    count: int = 0
    bad: str | None = None

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        """A constant: an initializer, or now and then a Constant node, or a float64 one through a Cast, or a
        transposed one through a Transpose (all folded by the importer)."""
        name = self.fresh(base)
        roll = self.rnd.random() if value.dtype == np.float32 else 1.0
        if roll < 0.15:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif roll < 0.22:
            self.inits[name + "_f64"] = value.astype(np.float64)
            self.nodes.append(helper.make_node("Cast", [name + "_f64"], [name], to=TensorProto.FLOAT))
        elif roll < 0.27 and value.ndim == 2:
            self.inits[name + "_t"] = np.ascontiguousarray(value.T)
            self.nodes.append(helper.make_node("Transpose", [name + "_t"], [name], perm=[1, 0]))
        else:
            self.inits[name] = value
        return name

    def ints(self, values) -> str:
        return self.const("shape", np.array(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op.lower())]
        name = f"{op}_{len(self.nodes)}" if self.rnd.random() < 0.7 else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def where(self) -> str:
        """How the import names the last node: by its name, or by its index."""
        index = len(self.nodes) - 1
        return f"'{self.nodes[index].name}'" if self.nodes[index].name else f"#{index}"

    def weight(self, *shape: int) -> str:
        fan_in = math.prod(shape[1:]) or shape[0]
        return self.const("w", (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32))

    def vector(self, n: int, low: float | None = None) -> str:
        value = self.rng.uniform(low, 2.0, n) if low is not None else self.rng.normal(0, 0.3, n)
        return self.const("v", value.astype(np.float32))

    # windows

    def window(self, x: Tensor, pool: str | None):
        """Random (attrs, output h, w) of a Conv (`pool` None), MaxPool or AveragePool over `x`."""
        rnd = self.rnd
        _c, h, w = x.shape
        for _ in range(50):
            k = (rnd.randint(1, 4), rnd.randint(1, 4))
            s = (rnd.randint(1, 3), rnd.randint(1, 3)) if rnd.random() < 0.7 else (1, 1)
            dilated = pool != "AveragePool" or self.opset >= 19
            d = (rnd.randint(1, 2), rnd.randint(1, 3)) if dilated and rnd.random() < 0.35 else (1, 1)
            auto = rnd.choice(["NOTSET", "NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"])
            if auto.startswith("SAME") and (
                d != (1, 1) or any((-(-n // ss) - 1) * ss + kk < n for n, kk, ss in zip((h, w), k, s))
            ):
                continue  # onnxruntime refuses a dilated SAME conv (and sizes a dilated pool otherwise), and both
                # with SAME padding below zero (a stride above the kernel)
            ceil = pool is not None and rnd.random() < 0.4  # (no matter with SAME)
            if auto == "NOTSET":
                pads = [rnd.randint(0, (k[i % 2] - 1) if pool else 3) for i in range(4)]
            elif auto == "VALID":
                pads = [0, 0, 0, 0]
            else:
                (t, b), (le, r) = (
                    same_pads(n, kk, ss, dd, auto == "SAME_LOWER") for n, kk, ss, dd in zip((h, w), k, s, d)
                )
                pads = [t, le, b, r]
            if pool and any(p >= kk for p, kk in zip(pads, k + k)):
                continue
            same = [-(-n // ss) for n, ss in zip((h, w), s)] if auto.startswith("SAME") else None
            out = window_outputs((h, w), k, s, d, pads, ceil, bool(pool), same)
            if out is None:
                continue
            if (
                ceil
                and self.opset < 22
                and auto == "NOTSET"
                and out
                != [
                    -(-(n + pads[i] + pads[i + 2] - dd * (kk - 1) - 1) // ss) + 1
                    for i, (n, kk, ss, dd) in enumerate(zip((h, w), k, s, d))
                ]
            ):
                continue  # a last window dropped: onnxruntime's shape inference before opset 22 keeps it (and its
                # runtime, which drops it, may then fail: reshaping, reusing buffers)
            attrs = {}
            if pool or rnd.random() < 0.7:
                attrs["kernel_shape"] = list(k)
            if s != (1, 1) or rnd.random() < 0.3:
                attrs["strides"] = list(s)
            if d != (1, 1) or (dilated and rnd.random() < 0.2):
                attrs["dilations"] = list(d)
            if auto != "NOTSET" or rnd.random() < 0.1:
                attrs["auto_pad"] = auto
            if auto == "NOTSET" and (any(pads) or rnd.random() < 0.3):
                attrs["pads"] = pads
            if pool:
                if ceil or rnd.random() < 0.2:
                    attrs["ceil_mode"] = int(ceil)
                if pool == "AveragePool" and rnd.random() < 0.7:
                    attrs["count_include_pad"] = rnd.randint(0, 1)
            return attrs, k, tuple(out)
        return None

    # ops on maps (C x H x W): each returns the new tensor, or None when it does not fit

    def conv(self, x: Tensor, pre: str | None = None):
        c = x.shape[0]
        groups = self.rnd.choice(divisors_of(c, 4)) if self.rnd.random() < 0.3 else 1
        filters = groups * self.rnd.randint(1, max(1, 8 // groups))
        found = self.window(x, None)
        if found is None:
            return None
        attrs, k, (h, w) = found
        if groups > 1 or self.rnd.random() < 0.1:
            attrs["group"] = groups
        inputs = [pre or x.name, self.weight(filters, c // groups, *k)]
        if self.rnd.random() < 0.7:
            inputs.append(self.vector(filters))
        return Tensor(self.node("Conv", inputs, **attrs), (filters, h, w))

    def pooling(self, x: Tensor, op: str):
        found = self.window(x, op)
        if found is None:
            return None
        attrs, _k, (h, w) = found
        return Tensor(self.node(op, [x.name], **attrs), (x.shape[0], h, w))

    def max_pool(self, x):
        return self.pooling(x, "MaxPool")

    def average_pool(self, x):
        return self.pooling(x, "AveragePool")

    def lrn(self, x):
        rnd = self.rnd
        attrs = dict(size=rnd.choice([1, 3, 5, 7]), alpha=rnd.choice([1e-4, 5e-4, 0.01, 0.5]))
        attrs.update(beta=rnd.choice([0.5, 0.75, 1.0]), bias=rnd.choice([0.5, 1.0, 2.0]))
        return Tensor(self.node("LRN", [x.name], **attrs), x.shape)

    def global_pool(self, x):
        if self.rnd.random() < 0.3:
            return Tensor(self.node("GlobalMaxPool", [x.name]), (x.shape[0], 1, 1))
        if self.rnd.random() < 0.5:
            return Tensor(self.node("GlobalAveragePool", [x.name]), (x.shape[0], 1, 1))
        keep = self.rnd.randint(0, 1)
        axes = self.rnd.choice([[2, 3], [-1, -2], [3, 2]])
        if self.opset >= 18:
            y = self.node("ReduceMean", [x.name, self.ints(axes)], keepdims=keep)
        else:
            y = self.node("ReduceMean", [x.name], axes=axes, keepdims=keep)
        return Tensor(y, (x.shape[0], 1, 1) if keep else (x.shape[0],))

    def flatten(self, x):
        size = math.prod(x.shape)
        roll = self.rnd.random()
        if roll < 0.4:
            y = self.node("Flatten", [x.name], axis=self.rnd.choice([1, 1, -3]) if len(x.shape) == 3 else 1)
        elif roll < 0.7:
            y = self.node("Reshape", [x.name, self.ints(self.rnd.choice([[0, -1], [-1, size], [0, size]]))])
        elif roll < 0.85 and x.shape[1:] == (1, 1):
            axes = [2, 3]
            y = (
                self.node("Squeeze", [x.name, self.ints(axes)])
                if self.opset >= 13
                else self.node("Squeeze", [x.name], axes=axes)
            )
        else:  # x.view(x.size(0), -1), as older PyTorch exports write it
            shape = self.node("Shape", [x.name])
            batch = self.node("Gather", [shape, self.const("i", np.array(0, np.int64))], axis=0)
            if self.opset >= 13:
                batch = self.node("Unsqueeze", [batch, self.ints([0])])
            else:
                batch = self.node("Unsqueeze", [batch], axes=[0])
            target = self.node("Concat", [batch, self.ints([-1])], axis=0)
            y = self.node("Reshape", [x.name, target])
        return Tensor(y, (size,))

    def shuffle(self, x):
        c, h, w = x.shape
        groups = self.rnd.choice(divisors_of(c, c))
        first = [self.rnd.choice([0, -1]), groups, c // groups, h, w]
        grouped = self.node("Reshape", [x.name, self.ints(first)])
        swapped = self.node("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
        back = self.rnd.choice([[0, c, h, w], [0, -1, h, w], [-1, c, h, w]])
        return Tensor(self.node("Reshape", [swapped, self.ints(back)]), x.shape)

    def split_group(self, x):
        c = x.shape[0]
        parts = self.rnd.choice([d for d in divisors_of(c, 4) if d > 1] or [0])
        if not parts:
            return None
        names = [self.fresh("part") for _ in range(parts)]
        if self.opset >= 13:
            self.node("Split", [x.name, self.ints([c // parts] * parts)], names, axis=1)
        else:
            self.node("Split", [x.name], names, axis=1, split=[c // parts] * parts)
        if self.rnd.random() < 0.5:
            attrs = dict(size=3, alpha=0.003, beta=0.75, bias=1.5)
            done = [self.node("LRN", [p], **attrs) for p in names]
            shape = x.shape
        else:
            filters = self.rnd.randint(1, 3)
            attrs = dict(kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[1, 2])
            done = [
                self.node("Conv", [p, self.weight(filters, c // parts, 3, 3), self.vector(filters)], **attrs)
                for p in names
            ]
            shape = (filters * parts, x.shape[1], out_length(x.shape[2], 3, 2, 0, 2))
        return Tensor(self.node("Concat", done, axis=1), shape)

    def padded(self, x):
        """A zero Pad of H and W read by a Conv, an AveragePool, or a MaxPool of a Relu's output."""
        c, h, w = x.shape
        t, le, b, r = (self.rnd.randint(0, 2) for _ in range(4))
        if self.opset < 11:
            return None
        reader = self.rnd.choice(["Conv", "AveragePool", "MaxPool"])
        if reader == "MaxPool":
            x = Tensor(self.node("Relu", [x.name]), x.shape)
        if self.opset >= 18 and self.rnd.random() < 0.5:
            y = self.node("Pad", [x.name, self.ints([t, le, b, r]), "", self.ints([2, 3])])
        else:
            y = self.node("Pad", [x.name, self.ints([0, 0, t, le, 0, 0, b, r])])
        inner = Tensor(y, (c, h + t + b, w + le + r))
        if reader == "Conv":
            return self.conv(inner)
        k = (self.rnd.randint(max(t, b) + 1, max(t, b) + 3), self.rnd.randint(max(le, r) + 1, max(le, r) + 3))
        if k[0] > inner.shape[1] or k[1] > inner.shape[2]:
            return None  # (a pool's padding is below its window in netdsl, the Pad's zeros included)
        s = (self.rnd.randint(1, 2), self.rnd.randint(1, 2))
        out = (c, out_length(inner.shape[1], k[0], s[0], 0, 0), out_length(inner.shape[2], k[1], s[1], 0, 0))
        return Tensor(self.node(reader, [y], kernel_shape=list(k), strides=list(s)), out)

    # ops on maps or vectors

    def relu(self, x):
        roll = self.rnd.random()
        if roll < 0.5:
            return Tensor(self.node("Relu", [x.name]), x.shape)
        if roll < 0.8:
            return Tensor(self.node("LeakyRelu", [x.name], alpha=self.rnd.choice([0.01, 0.1, 0.3, 2.0])), x.shape)
        if self.opset >= 11:
            low = self.const("c", np.array(0, np.float32))
            return Tensor(self.node("Clip", [x.name, low] + ([""] if self.rnd.random() < 0.5 else [])), x.shape)
        return Tensor(self.node("Clip", [x.name], min=0.0), x.shape)

    def batch_norm(self, x):
        c = x.shape[0]
        inputs = [x.name, self.vector(c, 0.5), self.vector(c), self.vector(c), self.vector(c, 0.5)]
        attrs = {"epsilon": self.rnd.choice([1e-5, 1e-3, 0.1])}
        if self.rnd.random() < 0.5:
            attrs["momentum"] = self.rnd.choice([0.9, 0.99, 0.7])
        return Tensor(self.node("BatchNormalization", inputs, **attrs), x.shape)

    def softmax(self, x):
        if len(x.shape) == 1:
            axis = self.rnd.choice([1, -1])
        elif self.opset >= 13:
            axis = self.rnd.choice([1, -3])
        elif x.shape[1:] == (1, 1):
            axis = 1
        else:
            return None
        return Tensor(self.node("Softmax", [x.name], axis=axis), x.shape)

    def dropout(self, x):
        if self.rnd.random() < 0.4:
            return Tensor(self.node("Identity", [x.name]), x.shape)
        if self.opset >= 12:
            inputs = [x.name] + ([self.const("r", np.array(0.3, np.float32))] if self.rnd.random() < 0.5 else [])
            return Tensor(self.node("Dropout", inputs), x.shape)
        return Tensor(self.node("Dropout", [x.name], ratio=0.3), x.shape)

    def affine(self, x):
        """Mul, Add, Sub or Div of a constant, one number or one per channel."""
        c = x.shape[0]
        shape = self.rnd.choice([(), (1,), (c,) + (1,) * (len(x.shape) - 1), (1, c) + (1,) * (len(x.shape) - 1)])
        value = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice([-1, 1], shape)
        op = self.rnd.choice(["Mul", "Add", "Sub", "Div"])
        const = self.const("k", value.astype(np.float32))
        inputs = [x.name, const] if op == "Div" or self.rnd.random() < 0.5 else [const, x.name]
        out_shape = x.shape if len(shape) <= len(x.shape) else None
        if out_shape is None:
            return None
        return Tensor(self.node(op, inputs), x.shape)

    def join(self, x):
        alike = [t for t in self.pool if t.shape == x.shape]
        if self.rnd.random() < 0.5:
            other = self.rnd.choice(alike)
            op = self.rnd.choice(["Add", "Sum"])
            return Tensor(self.node(op, [x.name, other.name]), x.shape)
        same = [t for t in self.pool if len(t.shape) == len(x.shape) and t.shape[1:] == x.shape[1:]]
        others = [self.rnd.choice(same) for _ in range(self.rnd.randint(1, 2))]
        axis = self.rnd.choice([1, -len(x.shape)])
        shape = (x.shape[0] + sum(t.shape[0] for t in others), *x.shape[1:])
        return Tensor(self.node("Concat", [x.name] + [t.name for t in others], axis=axis), shape)

    # ops on vectors

    def gemm(self, x):
        if len(x.shape) != 1:
            x = self.flatten(x)
        rnd = self.rnd
        features, units = x.shape[0], rnd.randint(1, 12)
        if rnd.random() < 0.3:
            y = self.node("MatMul", [x.name, self.weight(features, units)])
            if rnd.random() < 0.6:
                y = self.node("Add", [y, self.vector(units)] if rnd.random() < 0.5 else [self.vector(units), y])
            return Tensor(y, (units,))
        attrs = {}
        trans = rnd.randint(0, 1)
        if trans or rnd.random() < 0.3:
            attrs["transB"] = trans
        if rnd.random() < 0.3:
            attrs["alpha"] = rnd.choice([0.5, 2.0, -1.0])
        if rnd.random() < 0.3:
            attrs["beta"] = rnd.choice([0.0, 0.5, 3.0])
        b = (
            self.weight(units, features)
            if trans
            else self.const("w", self.rng.normal(0, 0.3, (features, units)).astype(np.float32))
        )
        inputs = [x.name, b]
        bias = rnd.choice([(units,), (1, units), (1,), (), None])
        if bias is not None:
            inputs.append(self.const("c", self.rng.normal(0, 0.3, bias).astype(np.float32)))
        return Tensor(self.node("Gemm", inputs, **attrs), (units,))

    # constructs netdsl cannot express: each must be refused, naming its node

    def unsupported(self, x):
        rnd = self.rnd
        maps = len(x.shape) == 3
        choices = ["two_activations", "sigmoid", "negative_slope", "clip6"]
        if maps:
            choices += ["softmax_axis", "concat_axis", "pad_reflect", "transpose", "reshape_3d", "varying_add"]
            choices += ["pool_pads", "unequal_split", "negative_pads", "pad_before_max", "broadcast_add", "indices"]
        else:
            choices += ["trans_a", "div_zero"]
        kind = rnd.choice(choices)
        c = x.shape[0]
        if kind == "two_activations":
            y = self.node(rnd.choice(["Mul", "Sub", "Div"]), [x.name, x.name])
        elif kind == "sigmoid":
            y = self.node(rnd.choice(["Sigmoid", "Tanh", "Exp"]), [x.name])
        elif kind == "negative_slope":
            y = self.node("LeakyRelu", [x.name], alpha=-0.5)
        elif kind == "clip6":
            if self.opset < 11:
                y = self.node("Clip", [x.name], min=0.0, max=6.0)
            else:
                y = self.node(
                    "Clip", [x.name, self.const("c", np.array(0, np.float32)), self.const("c", np.array(6, np.float32))]
                )
        elif kind == "softmax_axis":
            y = self.node("Softmax", [x.name], axis=rnd.choice([2, 3, -1]))
        elif kind == "concat_axis":
            y = self.node("Concat", [x.name, x.name], axis=rnd.choice([2, 3, 0]))
        elif kind == "pad_reflect":
            pad = self.node("Pad", [x.name, self.ints([0, 0, 1, 1, 0, 0, 1, 1])], mode="reflect")
            self.bad = self.where()
            return Tensor(self.node("Conv", [pad, self.weight(2, c, 3, 3)], kernel_shape=[3, 3]), (2, *x.shape[1:]))
        elif kind == "transpose":
            y = self.node("Transpose", [x.name], perm=[0, 1, 3, 2])
        elif kind == "reshape_3d":
            y = self.node("Reshape", [x.name, self.ints([0, c, -1])])
        elif kind == "varying_add":
            y = self.node(
                "Add", [x.name, self.const("k", self.rng.normal(0, 1, (1, 1, *x.shape[1:])).astype(np.float32))]
            )
        elif kind == "pool_pads":
            y = self.node("MaxPool", [x.name], kernel_shape=[2, 2], pads=[2, 0, 0, 0])
        elif kind == "unequal_split":
            if c < 2:
                return None
            parts = [self.fresh("part"), self.fresh("part")]
            if self.opset >= 13:
                self.node("Split", [x.name, self.ints([1, c - 1])], parts, axis=1)
            else:
                self.node("Split", [x.name], parts, axis=1, split=[1, c - 1])
            index = len(self.nodes) - 1
            done = [self.node("Relu", [p]) for p in parts]
            y = self.node("Concat", done, axis=1)
            self.bad = f"'{self.nodes[index].name}'" if self.nodes[index].name else f"#{index}"
            return Tensor(y, x.shape)
        elif kind == "negative_pads":
            y = self.node("Conv", [x.name, self.weight(2, c, 1, 1)], kernel_shape=[1, 1], pads=[0, -1, 0, 0])
        elif kind == "pad_before_max":
            pad = self.node("Pad", [x.name, self.ints([0, 0, 1, 1, 0, 0, 1, 1])])
            y = self.node("MaxPool", [pad], kernel_shape=[2, 2])  # of an input that may be negative
            self.bad = self.where()
            return Tensor(y, (c, x.shape[1] + 1, x.shape[2] + 1))
        elif kind == "broadcast_add":  # netdsl's add takes inputs of one shape
            pooled = self.node("GlobalAveragePool", [x.name])
            y = self.node("Add", [x.name, pooled])
        elif kind == "indices":  # MaxPool's second output, used
            y, indices = self.fresh("maxpool"), self.fresh("indices")
            self.node("MaxPool", [x.name], [y, indices], kernel_shape=[1, 1])
            self.bad = self.where()
            cast = self.node("Cast", [indices], to=TensorProto.FLOAT)
            return Tensor(self.node("Add", [y, cast]), x.shape)
        elif kind == "trans_a":
            y = self.node("Gemm", [x.name, self.weight(BATCH, 3)], transA=1)
        else:  # div_zero
            y = self.node("Div", [x.name, self.const("k", np.array([0.0], np.float32))])
        self.bad = self.where()
        return Tensor(y, x.shape)

    def write(self, case: int):
        rnd = self.rnd
        batch = rnd.choice(["N", BATCH])
        if rnd.random() < 0.2:
            self.pool.append(Tensor("x", (rnd.randint(3, 30),)))
        else:
            self.pool.append(Tensor("x", (rnd.choice([1, 2, 3, 4, 6, 8]), rnd.randint(3, 12), rnd.randint(3, 12))))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *self.pool[0].shape])]
        map_ops = ["conv"] * 4 + ["max_pool", "max_pool", "average_pool", "average_pool", "lrn", "global_pool"]
        map_ops += ["shuffle", "split_group", "padded", "flatten"]
        any_ops = ["relu", "relu", "batch_norm", "softmax", "dropout", "affine", "join", "gemm"]
        for _ in range(rnd.randint(1, 6)):
            x = rnd.choice(self.pool[-3:]) if rnd.random() < 0.8 else rnd.choice(self.pool)
            ops = any_ops + (map_ops if len(x.shape) == 3 else [])
            y = None
            while y is None:
                y = getattr(self, rnd.choice(ops))(x)
            self.pool.append(y)
        if rnd.random() < 0.25:
            self.pool.append(self.unsupported(self.pool[-1]) or self.pool[-1])
        last = self.pool[-1]
        outputs = [last]
        if rnd.random() < 0.3 and len(self.pool) > 2:
            other = rnd.choice(self.pool[1:-1])
            if other.name != last.name:
                outputs.append(other)
        declared = [  # the shape worked out here, or only the rank
            helper.make_tensor_value_info(
                t.name,
                TensorProto.FLOAT,
                [batch, *(t.shape if rnd.random() < 0.5 else ("c", "h", "w")[: len(t.shape)])],
            )
            for t in outputs
        ]
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, f"fuzz{case}", inputs, declared, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="fuzz")
        model.ir_version = IR_VERSIONS[self.opset]
        return model, [t.shape for t in outputs]


def random_model(case: int):
    """(model, the outputs' shapes as worked out here, the refused node or None)."""
    rnd = random.Random(f"onnx-{SEED}-{case}")
    writer = OnnxWriter(rnd, np.random.default_rng(rnd.getrandbits(32)), rnd.choice(OPSETS))
    model, shapes = writer.write(case)
    return model, shapes, writer.bad


@pytest.mark.parametrize("case", range(IMPORT_CASES))
def test_import_matches_onnxruntime(case, tmp_path):
    model, shapes, bad = random_model(case)
    path = tmp_path / "fuzz.onnx"
    onnx.save(model, str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    feeds = {"x": np.random.default_rng(case).standard_normal((BATCH, *dims)).astype(np.float32)}
    described = f"case {case} (opset {model.opset_import[0].version}):\n{onnx.printer.to_text(model.graph)}"
    try:
        result = import_onnx(path)
    except NetError as error:
        text = str(error)
        assert bad is not None, f"{described}\nrefused: {text}"
        assert "internal error" not in text and "Traceback" not in text, f"{described}\n{text}"
        assert bad in text, f"{described}\nthe error does not name node {bad}: {text}"
        assert error.hint, f"{described}\nno hint: {text}"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # the command: the same message, exit 1, no traceback
            assert main(["import", str(path), "-o", str(tmp_path / "refused.net")]) == 1
        assert error.message in err.getvalue() and "Traceback" not in err.getvalue()
        return
    want = onnxruntime_run(path, feeds)  # a model netdsl takes must run, and give these numbers
    for shape, value in zip(shapes, want):
        assert value.shape[1:] == shape, f"{described}\nthe generator's shapes: {shapes}"
    net_path = tmp_path / "fuzz.net"
    net_path.write_text(result.text)
    got = netdsl_run(net_path, result.weights, feeds)
    compare(got, want, f"{described}\n--- imported:\n{result.text}")
    if "groups=" in result.text:  # --towers: one tower per group, where the net can be split so
        towered = import_onnx(path, towers=True)
        net_path.write_text(towered.text)
        got = netdsl_run(net_path, towered.weights, feeds)
        compare(got, want, f"{described}\n--- imported with --towers:\n{towered.text}")


# --- what the campaigns found (regressions) -----------------------------------------------------------------


def _model(nodes, inits=None, outputs=("y",), shape=(BATCH, 4, 6, 6), opset: int = 17):
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", "c", "h", "w"][: len(shape)])
            for name in outputs
        ],
        [numpy_helper.from_array(value, name) for name, value in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = 8
    return model


def _imports_and_matches(model, tmp_path: Path, towers: bool = False):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": np.random.default_rng(7).standard_normal(dims).astype(np.float32)}
    result = import_onnx(path, towers=towers)
    (tmp_path / "m.net").write_text(result.text)
    compare(netdsl_run(tmp_path / "m.net", result.weights, feeds), onnxruntime_run(path, feeds), result.text)
    return result


def test_outputs_that_are_the_input_or_another_output(tmp_path):
    """An output that is an Identity of the input, or of a layer another output names, was refused or dropped
    (the net had fewer outputs than the model): each is now a `dropout(x, 0)` of its own, under its name."""
    nodes = [
        helper.make_node("Identity", ["x"], ["ident"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["r2"]),
        helper.make_node("Dropout", ["r"], ["r3"]),
    ]
    result = _imports_and_matches(_model(nodes, outputs=("ident", "r", "r2", "r3")), tmp_path)
    assert "ident = dropout(x, 0)" in result.text and "r3 = dropout(r, 0)" in result.text
    assert "output ident, r, r2, r3" in result.text


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
@pytest.mark.parametrize("auto", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_after_a_pad(op, auto, tmp_path):
    """A Pad before a node with auto_pad SAME was refused: SAME is now worked out for the padded size."""
    relu = helper.make_node("Relu", ["x"], ["r"])  # (a max-pool reads a Pad's zeros as -inf: fine for x >= 0)
    pads = {"Conv": [0, 0, 1, 0, 0, 0, 2, 1], "MaxPool": [0, 0, 1, 0, 0, 0, 0, 1]}.get(op, [0, 0, 1, 1, 0, 0, 2, 2])
    pad = helper.make_node("Pad", ["r", "pads"], ["p"])
    inits = {"pads": np.array(pads, np.int64)}
    if op == "Conv":
        inits["w"] = np.random.default_rng(1).standard_normal((3, 4, 3, 2)).astype(np.float32)
        node = helper.make_node("Conv", ["p", "w"], ["y"], auto_pad=auto, strides=[2, 1])
    elif op == "MaxPool":
        node = helper.make_node(op, ["p"], ["y"], kernel_shape=[3, 3], auto_pad=auto, strides=[2, 2])
    else:  # the Pad's zeros count, SAME's own padding would not: only a SAME without padding (here 9 x 9) is read
        node = helper.make_node(op, ["p"], ["y"], kernel_shape=[3, 3], auto_pad=auto, strides=[3, 3])
    _imports_and_matches(_model([relu, pad, node], inits), tmp_path)


def test_split_pattern_with_weights_as_constant_nodes(tmp_path):
    """Split -> Conv per part -> Concat whose weights are Constant nodes after the Split (as exporters that do
    not fold constants write) failed with "the weight (W) ... is not defined": it is built at the Concat."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)]
    for part in ("a", "b"):
        value = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), f"w{part}")
        nodes.append(helper.make_node("Constant", [], [f"w{part}"], value=value))
        nodes.append(helper.make_node("Conv", [part, f"w{part}"], [f"c{part}"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Concat", ["ca", "cb"], ["y"], axis=1))
    result = _imports_and_matches(_model(nodes, {"sizes": np.array([2, 2], np.int64)}), tmp_path)
    assert "groups=2" in result.text


@pytest.mark.parametrize(
    "node, inits, shape",
    [
        (helper.make_node("Softmax", ["x"], ["y"], axis=2, name="s"), {}, (BATCH, 4, 6, 6)),
        (helper.make_node("Concat", ["x", "x"], ["y"], axis=3, name="s"), {}, (BATCH, 4, 6, 6)),
        (helper.make_node("Mul", ["x", "x"], ["y"], name="s"), {}, (BATCH, 4, 6, 6)),
        (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2], name="s"), {}, (BATCH, 4, 6, 6)),
        (helper.make_node("LeakyRelu", ["x"], ["y"], alpha=-0.5, name="s"), {}, (BATCH, 4, 6, 6)),
        (helper.make_node("Gemm", ["x", "w"], ["y"], transA=1, name="s"), {"w": np.ones((2, 3), np.float32)}, (2, 5)),
    ],
)
def test_refusals_name_the_node_and_give_a_hint(node, inits, shape, tmp_path):
    """Errors about a node had no hint: those without a better one point at the supported ops."""
    path = tmp_path / "m.onnx"
    onnx.save(_model([node], inits, shape=shape), str(path))
    with pytest.raises(NetError) as caught:
        import_onnx(path)
    assert "node 's', #0" in caught.value.message and caught.value.hint


def test_flatten_of_a_tensor_sent_to_another_device_survives(tmp_path):
    """Each tower flattens the input (gpu1's copy reads it across devices) and also computes a softmax of it:
    `all l1` held, in gpu1's half, the softmax's values instead of the input's (both backends; the memory plan,
    fixed in 8612187)."""
    text = "input image: 2 x 2 x 2\ntowers gpu0, gpu1 {\n    l1 = flatten(image)\n    l2 = softmax(image) | relu\n}\n"
    path = tmp_path / "v.net"
    path.write_text(text + "l3 = relu(all l1)\noutput all l2, l3\n")
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32)
    got = netdsl_run(path, {}, {"image": x})[-1]
    np.testing.assert_allclose(got, np.maximum(np.concatenate([x.reshape(1, -1)] * 2, 1), 0), rtol=1e-6)


def test_a_used_indices_output_is_named_as_the_problem(tmp_path):
    """MaxPool's Indices read by a Cast was refused as "Cast on the activations is not supported": the error
    now names the MaxPool and its second output."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], name="s"),
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["p", "f"], ["y"]),
    ]
    path = tmp_path / "m.onnx"
    onnx.save(_model(nodes), str(path))
    with pytest.raises(NetError, match=r"MaxPool node 's', #0: its output #1 \('i'\) is used") as caught:
        import_onnx(path)
    assert caught.value.hint


def test_tower_copies_without_weights_come_back_in_their_towers(tmp_path):
    """Tower copies of a layer without weights reading one input (`p = maxpool(image, 2)` in each tower) were
    merged into one before --towers looked for copies, so they left the towers (and the devices changed)."""
    text = """net t
input image: 4 x 8 x 8
towers gpu0, gpu1 {
    p = maxpool(image, 2) | relu
    c = conv(p, 3, size=3, pad=1)
}
output all c
"""
    graph = graph_from_text(text, str(tmp_path / "t.net"))
    weights = random_weights(graph, 0)
    export_onnx(graph, weights, tmp_path / "t.onnx")
    result = import_onnx(tmp_path / "t.onnx", towers=True)
    assert "towers gpu0, gpu1 {\n    p = maxpool(image, 2) | relu\n" in result.text
    back = graph_from_text(result.text, str(tmp_path / "back.net"))
    assert layer_census(back, result.weights, True) == layer_census(graph, weights, True)
    assert "maxpool(image, 2)" in import_onnx(tmp_path / "t.onnx").text.replace("p_gpu0", "p")  # one copy without


def test_a_layer_computed_twice_alike_is_no_tower_where_the_model_names_its_towers(tmp_path):
    """Two layers outside the towers computing the same thing from the same input (`l1 = add(image, image)`, `l2 =
    add(image, image)`) were taken by --towers for a tower copy each, beside the real towers (`l4_gpu0`, `l4_gpu1`):
    `l2` came back as `l1@gpu1`, on gpu1 (the campaign of seed 947, case 231). Where the names say the towers,
    layers that read the same inputs are copies only when theirs do too."""
    text = """net t
input image: 2 x 6 x 6
l1 = add(image, image)
l2 = add(image, image)
l3 = add(image, l1)
towers gpu0, gpu1 {
    l4 = batchnorm(l3) | maxpool(2)
}
output all l4, l2
"""
    net, back_net = tmp_path / "t.net", tmp_path / "back.net"
    net.write_text(text)
    graph = graph_from_text(text, str(net))
    weights = random_weights(graph, 0)
    export_onnx(graph, weights, tmp_path / "t.onnx")
    result = import_onnx(tmp_path / "t.onnx", towers=True)
    assert "l1 = add(image, image)\nl2 = add(image, image)\n" in result.text and "l1@gpu1" not in result.text
    assert "towers gpu0, gpu1 {\n    l4 = batchnorm(l3" in result.text
    back_net.write_text(result.text)
    back = graph_from_text(result.text, str(back_net))
    assert layer_census(back, result.weights, True) == layer_census(graph, weights, True)
    feeds = net_inputs(graph, 0)
    compare(netdsl_run(back_net, result.weights, feeds), netdsl_run(net, weights, feeds), "imported vs original")


def test_towers_add_of_a_split_layer(tmp_path):
    """--towers split a grouped conv that an Add reads, and wrote the Add as `add(all c, all c)`: netdsl's add
    reads each copy as an input of its own, so it summed the towers' halves (half the channels, other numbers).
    The join stays a concat layer."""
    rng = np.random.default_rng(5)
    inits = {"v": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)}
    inits["w"] = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "v"], ["a"])]  # (a conv reading the net's input stays whole)
    nodes.append(helper.make_node("Conv", ["a", "w"], ["c"], group=2, pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Add", ["c", "c"], ["y"]))
    result = _imports_and_matches(_model(nodes, inits), tmp_path, towers=True)
    assert "towers gpu0, gpu1 {" in result.text and "add(all" not in result.text


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("Conv", dict(auto_pad="SAME_UPPER", dilations=[2, 3], strides=[2, 1])),
        ("Conv", dict(auto_pad="SAME_LOWER", dilations=[2, 2])),
        ("MaxPool", dict(auto_pad="SAME_UPPER", kernel_shape=[3, 2], dilations=[2, 3], strides=[2, 2])),
    ],
)
def test_same_padding_where_onnxruntime_departs_from_onnx(op, attrs, tmp_path):
    """A dilated SAME window: onnxruntime refuses the conv and sizes the pools otherwise than ONNX says, so the
    reference here is ONNX's own (onnx.reference, and its shape inference for the declared shape)."""
    from onnx.reference import ReferenceEvaluator

    inits = {}
    inputs = ["x"]
    if op == "Conv":
        inits["w"] = np.random.default_rng(3).standard_normal((3, 4, 3, 2)).astype(np.float32)
        inputs.append("w")
    model = _model([helper.make_node(op, inputs, ["y"], **attrs)], inits, shape=(BATCH, 4, 9, 8))
    path = tmp_path / "m.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))  # the declared shape: ONNX's
    x = np.random.default_rng(4).standard_normal((BATCH, 4, 9, 8)).astype(np.float32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    result = import_onnx(path)
    (tmp_path / "m.net").write_text(result.text)
    compare(netdsl_run(tmp_path / "m.net", result.weights, {"x": x}), [want], result.text)


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_same_padding_below_zero_is_refused(op, tmp_path):
    """SAME with a stride past the window (ceil(9 / 3) = 3 windows of 2 need 8 of the 9 rows: padding -1) has no
    agreed meaning (onnxruntime fails, onnx.reference crops the input); netdsl read it as no padding, which is
    one of the two: now it is refused, naming the node."""
    inits, inputs = {}, ["x"]
    if op == "Conv":
        inits["w"] = np.ones((2, 4, 2, 2), np.float32)
        inputs.append("w")
    attrs = dict(auto_pad="SAME_UPPER", strides=[3, 3]) | ({} if op == "Conv" else dict(kernel_shape=[2, 2]))
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node(op, inputs, ["y"], name="n", **attrs)], inits, shape=(1, 4, 9, 9)), str(path))
    with pytest.raises(NetError, match=r"node 'n', #0: auto_pad SAME_UPPER over 9 rows .* negative padding") as caught:
        import_onnx(path)
    assert "explicit pads" in caught.value.hint
