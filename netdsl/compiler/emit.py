"""Code emission: one readable Triton source file per fused step.

Each file holds a copy of its kernel family's `@triton.jit` kernel (from `netdsl.codegen`) followed by
copies of the `@triton.jit` device functions it calls (`device_functions`: a helper shared by two
kernel families, such as conv.py's epilogue, is copied into each file that needs it; the formatter's
`# fmt:` markers left out), the step's options (`OPTIONS`), layers and shapes as literals,
`launch(inputs, weights, out=None)` that runs that copy through the family's launcher,
`reference(inputs, weights)` built from PyTorch ops (`netdsl.codegen.reference`), and a `__main__` that
checks one against the other on random data (run on a machine without a GPU, the file chooses Triton's
interpreter before it imports triton: `imports`). A family whose launcher takes tiles (`tunable`) also gets
`candidates()`, the tiles `netdsl tune` times, and `TUNED`, the tiles `launch` takes at each batch size
(from a tuning file: netdsl.compiler.tuning), which its `config` argument overrides. Nothing from the
`.net` file is pasted into the code except through `literal()` of plain values and identifiers made of
[A-Za-z0-9_]: a hostile layer name cannot become code.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import textwrap
import tokenize
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import networkx as nx

from netdsl._version import __version__
from netdsl.codegen.source import device_functions
from netdsl.codegen.windows import compact
from netdsl.compiler.layout import weight_layouts
from netdsl.compiler.steps import Step, identifier
from netdsl.ir.dtypes import DTYPE_BYTES, TORCH_NAMES
from netdsl.ir.ops import layer_pads, layer_tensors

LINE_LENGTH = 120  # of a generated file's own lines, as of the repository's code (STYLE.md)


@dataclass(frozen=True)
class Family:
    module: str  # netdsl.codegen.<module>
    kernel: str  # the @triton.jit function in it
    launch: str  # the body of `launch`, using inputs, weights, out, OPTIONS (kernel_parameters) and KERNEL
    # For a family whose launcher takes `config`: the arguments of its module's `tuning_candidates` for a step (of
    # the step, its weights' shapes and the build's dtype), the tiles `netdsl tune` times (then `launch` takes a
    # `config` too, and TUNED holds the tiles tuned per batch); None for the others.
    candidate_args: Callable[[Step, dict[str, tuple[int, ...]], str], dict[str, int]] | None = None


_JOIN = "x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)  # several inputs: joined on channels"

# Both conv families' launchers take the same arguments (the channels-last one also split_k).
_CONV_LAUNCH = """
        if len(inputs) > 2:  # the kernel reads up to two inputs in place; join the rest
            inputs = [torch.cat(inputs, dim=1)]
        return family.{function}(
            inputs, weights["weight"], weights.get("bias"), stride=OPTIONS["stride"], padding=OPTIONS["pad"],
            dilation=OPTIONS["dilation"], groups=OPTIONS["groups"], activation=OPTIONS["activation"],
            slope=OPTIONS["slope"], input_precision=OPTIONS["input_precision"], out=out, config=config,
            kernel=KERNEL,{more}
        )"""

FAMILIES: dict[str, Family] = {
    "conv": Family(
        "conv",
        "conv2d_kernel",
        _CONV_LAUNCH.format(function="conv2d", more=""),
        lambda step, weights, dtype: {"element_bytes": DTYPE_BYTES[dtype]},
    ),
    "conv_nhwc": Family(
        "conv_nhwc",
        "conv2d_nhwc_kernel",
        _CONV_LAUNCH.format(function="conv2d_nhwc", more=' split_k=OPTIONS["split_k"],'),
        lambda step, weights, dtype: {"c_in_group": weights["weight"][1], "element_bytes": DTYPE_BYTES[dtype]},
    ),
    "conv_lrn_maxpool": Family(
        "conv_lrn_pool",
        "conv_lrn_pool_kernel",
        f"""
        {_JOIN}
        bias = weights.get("bias")
        if bias is None:
            bias = x.new_zeros(weights["weight"].shape[0])
        return family.conv_lrn_maxpool(
            x, weights["weight"], bias, OPTIONS["stride"], OPTIONS["pad"], OPTIONS["dilation"], OPTIONS["groups"],
            OPTIONS["size"], OPTIONS["alpha"], OPTIONS["beta"], OPTIONS["k"], OPTIONS["pool_size"],
            OPTIONS["pool_stride"], OPTIONS["pool_pad"], ceil_mode=OPTIONS["ceil"],
            input_precision=OPTIONS["input_precision"], out=out, config=config, kernel=KERNEL,
        )""",
        lambda step, weights, dtype: {
            "channels_per_group": weights["weight"][0] // step.first.params["groups"],
            "element_bytes": DTYPE_BYTES[dtype],
        },
    ),
    "fc": Family(
        "fc",
        "linear_kernel",
        """
        if len(inputs) > 2:  # the kernel reads up to two inputs in place; join the rest
            inputs = [torch.cat([x.flatten(1) for x in inputs], dim=1)]
        return family.linear(
            inputs, weights["weight"], weights.get("bias"), activation=OPTIONS["activation"],
            slope=OPTIONS["slope"], input_precision=OPTIONS["input_precision"], out=out, config=config,
            kernel=KERNEL,
        )""",
        lambda step, weights, dtype: {"element_bytes": DTYPE_BYTES[dtype]},
    ),
    "lrn": Family(
        "lrn",
        "lrn_pool_kernel",
        f"""
        {_JOIN}
        return family.lrn(
            x, OPTIONS["size"], OPTIONS["alpha"], OPTIONS["beta"], OPTIONS["k"], relu_first=OPTIONS["relu_first"],
            out=out, groups=OPTIONS["groups"], config=config, kernel=KERNEL,
        )""",
        lambda step, weights, dtype: {"channels": step.shape[0]},
    ),
    "lrn_maxpool": Family(
        "lrn",
        "lrn_pool_kernel",
        f"""
        {_JOIN}
        return family.lrn_maxpool(
            x, OPTIONS["size"], OPTIONS["alpha"], OPTIONS["beta"], OPTIONS["k"], OPTIONS["pool_size"],
            OPTIONS["pool_stride"], OPTIONS["pool_pad"], ceil_mode=OPTIONS["ceil"], relu_first=OPTIONS["relu_first"],
            out=out, groups=OPTIONS["groups"], config=config, kernel=KERNEL,
        )""",
        lambda step, weights, dtype: {"channels": step.shape[0]},
    ),
    "pool": Family(
        "pool",
        "pool2d_kernel",
        f"""
        {_JOIN}
        return family.pool2d(
            x, OPTIONS["mode"], OPTIONS["size"], OPTIONS["stride"], OPTIONS["pad"], ceil_mode=OPTIONS["ceil"],
            count_include_pad=OPTIONS["count_pad"], out=out, dilation=OPTIONS["dilation"], kernel=KERNEL,
        )""",
    ),
    "global_avgpool": Family(
        "pool",
        "pool2d_kernel",
        f"""
        {_JOIN}
        return family.global_avg_pool2d(x, out=out, kernel=KERNEL)""",
    ),
    "softmax": Family(
        "softmax",
        "softmax_kernel",
        f"""
        {_JOIN}
        return family.softmax(x, out=out, kernel=KERNEL)""",
    ),
    "eltwise": Family(
        "elementwise",
        "elementwise_kernel",
        f"""
        {_JOIN}
        if OPTIONS["op"] == "batchnorm":
            scale, shift = family.fold_batch_norm(
                weights["running_mean"], weights["running_var"], weights["weight"], weights["bias"], OPTIONS["eps"]
            )
            return family.elementwise(x, "affine", scale=scale, shift=shift, out=out, kernel=KERNEL)
        return family.elementwise(
            x, "copy", activation=OPTIONS["op"], slope=OPTIONS["slope"], out=out, kernel=KERNEL
        )""",
    ),
    "space_to_depth": Family(
        "space_to_depth",
        "space_to_depth_kernel",
        """
        return family.space_to_depth(
            inputs[0], OPTIONS["block"], OPTIONS["pad"], OPTIONS["groups"], OUTPUT_SHAPE[1:], out=out, kernel=KERNEL
        )""",
    ),
    "shuffle": Family(
        "shuffle",
        "shuffle_kernel",
        f"""
        {_JOIN}
        return family.shuffle(x, OPTIONS["groups"], out=out, kernel=KERNEL)""",
    ),
    "add": Family(
        "elementwise",
        "elementwise_kernel",
        """
        out = family.elementwise(inputs[0], "add", other=inputs[1], out=out, kernel=KERNEL)
        for other in inputs[2:]:
            family.elementwise(out, "add", other=other, out=out, kernel=KERNEL)
        return out""",
    ),
    "concat": Family(
        "elementwise",
        "elementwise_kernel",
        """
        if out is None:
            channels = sum(x.shape[1] for x in inputs)
            out = inputs[0].new_empty((inputs[0].shape[0], channels, *inputs[0].shape[2:]))
        start = 0
        for x in inputs:  # each input copied into its channel slice
            family.elementwise(x, "copy", out=out[:, start : start + x.shape[1]], kernel=KERNEL)
            start += x.shape[1]
        return out""",
    ),
}


def family_of(step: Step) -> str:
    """The key of the step's kernel family in FAMILIES: its kind, or the channels-last conv, or the global pool."""
    if step.kind == "conv" and step.options.get("kernel") == "nhwc":
        return "conv_nhwc"
    if step.kind == "pool" and step.first.op == "global_avgpool":
        return "global_avgpool"
    return step.kind


def kernel_parameters(step: Step, input_precision: str) -> dict[str, object]:
    """The step's `OPTIONS`, the literal parameters `launch` reads, from its layers and fusion options."""
    first = step.first
    p = first.params
    if step.kind in ("conv", "fc"):
        params = {
            "activation": step.options["activation"],
            "slope": float(step.options.get("slope", 0.0)),
            "input_precision": input_precision,
        }
        if step.kind == "conv":
            params.update(stride=p["stride"], pad=_pads(first), dilation=p["dilation"], groups=p["groups"])
        if family_of(step) == "conv_nhwc":
            params["split_k"] = bool(step.options.get("split_k"))
        return params
    if step.kind == "conv_lrn_maxpool":
        conv, _, norm, pool = step.layers
        return {
            "stride": conv.params["stride"],
            "pad": _pads(conv),
            "dilation": conv.params["dilation"],
            "groups": conv.params["groups"],
            "input_precision": input_precision,
            **{key: norm.params[key] for key in ("size", "alpha", "beta", "k")},
            "pool_size": pool.params["size"],
            "pool_stride": pool.params["stride"],
            "pool_pad": _pads(pool),
            "ceil": pool.params["ceil"],
        }
    if step.kind in ("lrn", "lrn_maxpool"):
        norm = next(item for item in step.layers if item.op == "lrn")
        params = {key: norm.params[key] for key in ("size", "alpha", "beta", "k", "groups")}
        params["relu_first"] = bool(step.options.get("relu_first"))
        if step.kind == "lrn_maxpool":
            pool = step.last.params
            params.update(pool_size=pool["size"], pool_stride=pool["stride"], pool_pad=_pads(step.last))
            params["ceil"] = pool["ceil"]
        return params
    if step.kind == "pool" and first.op != "global_avgpool":  # the global pool needs none: its window is the map
        return {
            "mode": "max" if first.op == "maxpool" else "avg",
            "size": p["size"],
            "stride": p["stride"],
            "pad": _pads(first),
            "dilation": p["dilation"],
            "ceil": p["ceil"],
            "count_pad": p.get("count_pad", True),
        }
    if step.kind == "shuffle":
        return {"groups": p["groups"]}
    if step.kind == "space_to_depth":
        return {"block": p["block"], "pad": p["pad"], "groups": p["groups"]}
    if step.kind == "eltwise":
        return {"op": first.op, "slope": float(p.get("slope", 0.0)), "eps": float(p.get("eps", 0.0))}
    return {}


def _pads(item) -> tuple[int, ...]:
    """A conv's or pool's padding of its input as numbers: (h, w), or (top, left, bottom, right) where the
    ends of an axis differ (`same` worked out for the input's size)."""
    return compact(layer_pads(item.params, item.input_shape[1:]))


def literal(value) -> str:
    """A deterministic Python literal for plain data, on one line: dicts keep their insertion order, strings take
    double quotes as the code around them in a generated file does."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [literal(v) for v in value]
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "[" + ", ".join(items) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # ASCII, and each of JSON's escapes means the same in Python
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise TypeError(f"cannot emit {type(value).__name__} as a literal")


def assignment(name: str, value, comment: str = "") -> str:
    """`name = <literal of value>` (then `  # comment`), its containers written one item a line, outermost
    first, where a line would be longer than LINE_LENGTH."""
    return "\n".join(_fitted(f"{name} = ", value, "", f"  # {comment}" if comment else "", ""))


def _fitted(prefix: str, value, suffix: str, comment: str, indent: str) -> list[str]:
    line = f"{indent}{prefix}{literal(value)}{suffix}"
    if len(line + comment) <= LINE_LENGTH or not isinstance(value, (dict, list, tuple)) or not value:
        return [line + comment]
    opening, closing = "{}" if isinstance(value, dict) else "()" if isinstance(value, tuple) else "[]"
    items = [(f"{literal(k)}: ", v) for k, v in value.items()] if isinstance(value, dict) else [("", v) for v in value]
    lines = [f"{indent}{prefix}{opening}{comment}"]
    for key, item in items:  # each with a trailing comma: a tuple of one stays a tuple
        lines += _fitted(key, item, ",", "", indent + "    ")
    return [*lines, f"{indent}{closing}{suffix}"]


def function_source(fn: types.FunctionType) -> str:
    """A function, decorator included, as written in netdsl/codegen less the formatter's markers (`# fmt: skip`,
    `# fmt: off`, `# fmt: on`): they keep the repository's formatter off hand-laid code, and mean nothing in a
    generated file."""
    source = textwrap.dedent(inspect.getsource(fn)).rstrip()
    lines, dropped = source.splitlines(), set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and _FORMATTER_MARKER.search(token.string):
            row, column = token.start
            comment = _FORMATTER_MARKER.sub("", token.string)  # a comment before the marker stays
            kept = (lines[row - 1][:column] + comment).rstrip()
            if not kept:
                dropped.add(row - 1)  # a marker on a line of its own
            lines[row - 1] = kept
    return "\n".join(line for number, line in enumerate(lines) if number not in dropped)


_FORMATTER_MARKER = re.compile(r"\s*#\s*fmt:\s*(skip|off|on)\s*$")


def tunable(step: Step) -> bool:
    """Whether `netdsl tune` can choose the step's tiles (its family's launcher takes a `config`)."""
    family = FAMILIES.get(family_of(step))
    return family is not None and family.candidate_args is not None


def step_weights(step: Step) -> dict[str, tuple[int, ...]]:
    """The shapes of the weights a step's kernel takes, by name (a folded batch norm's shift is a bias)."""
    weights = {}
    for item in step.layers if step.kind != "space_to_depth" else []:  # its layer is the compiler's, weightless
        weights.update(layer_tensors(item))
        if item.op in ("conv", "fc"):
            if step.options.get("folded"):  # the folded batch norm's shift becomes the bias
                weights["bias"] = (item.params["filters"],)
            break  # the activation after it has no weights
    return weights


def candidate_args(step: Step, dtype: str) -> dict[str, int]:
    """The arguments of the step's family's `tuning_candidates` (a tunable step)."""
    return FAMILIES[family_of(step)].candidate_args(step, step_weights(step), dtype)


def tuning_candidates(step: Step, dtype: str) -> list[dict[str, int]]:
    """The tiles `netdsl tune` times for a tunable step, as its kernel file's `candidates()` gives them."""
    module = import_module(f"netdsl.codegen.{FAMILIES[family_of(step)].module}")
    return module.tuning_candidates(**candidate_args(step, dtype))


def emit_step(
    program: nx.DiGraph,
    step: Step,
    input_precision: str = "ieee",
    dtype: str = "fp32",
    tuned: dict[int, dict[str, int]] | None = None,
) -> str:
    """The source of `kernels/<step>.py`; `tuned`: the tiles `launch` takes at each batch (`netdsl tune`), for a
    family that has `candidates` (others take none)."""
    family = FAMILIES[family_of(step)]
    if tuned and family.candidate_args is None:
        raise ValueError(f"{step.name}: the {family_of(step)} kernels take no tuned tiles")
    if family.candidate_args is not None:
        tuning = [
            "# The tiles `launch` takes at each batch size, timed on a device by `netdsl tune` (none: the",
            f"# launcher's own choice, netdsl.codegen.{family.module}.pick_config).",
            assignment("TUNED", {batch: dict(sorted(tuned[batch].items())) for batch in sorted(tuned or {})}),
        ]
        launch = [
            "def launch(",
            "    inputs: list[torch.Tensor],",
            "    weights: dict[str, torch.Tensor],",
            "    out: torch.Tensor | None = None,",
            "    config: dict[str, int] | None = None,",
            "):",
            '    """Runs the kernel on a batch: inputs are [N, *shape] tensors, weights by name; `config`: the tiles',
            '    (by default TUNED\'s for the batch, else the launcher\'s choice)."""',
            "    config = config or TUNED.get(inputs[0].shape[0])",
        ]
        arguments = ", ".join(f"{key}={literal(value)}" for key, value in candidate_args(step, dtype).items())
        candidates = [
            "",
            "",
            "def candidates() -> list[dict[str, int]]:",
            '    """The tiles `netdsl tune` times for this step, beside the launcher\'s own choice."""',
            f"    return family.tuning_candidates({arguments})",
        ]
    else:
        tuning, candidates = [], []
        launch = [
            "def launch(inputs: list[torch.Tensor], weights: dict[str, torch.Tensor], out: torch.Tensor | None = None):",  # noqa: E501
            '    """Runs the kernel on a batch: inputs are [N, *shape] tensors, weights by name."""',
        ]
    kernel, *helpers = device_functions(getattr(import_module(f"netdsl.codegen.{family.module}"), family.kernel))
    called = ", ".join(f"{fn.__module__}.{fn.__qualname__}" for fn in helpers)
    note = textwrap.wrap(f"Below the kernel, copies of the functions it calls: {called}.", 100) if helpers else []
    inputs = [program.nodes[name]["step"] for name in step.inputs]
    views = program.graph.get("views", {})
    input_layouts = [program.nodes[views.get(name, name)]["step"].layout for name in step.inputs]
    weights = step_weights(step)
    layers = [(item.op, {k: v for k, v in item.params.items()}) for item in step.layers]
    summary = " -> ".join(safe(item.name) for item in step.layers)
    reads = ", ".join(" x ".join(map(str, s.shape)) for s in inputs)
    lines = [
        f'"""{step.name}: {summary}, on {safe(step.device)}.',
        "",
        f"Generated by netdsl {__version__} from net {safe(program.graph['name'])}; do not edit (run netdsl compile).",
        f"Reads {reads or 'nothing'}; writes {' x '.join(map(str, step.shape))} per image.",
        f"The kernel is a copy of netdsl.codegen.{family.module}.{family.kernel}; `launch` runs it through that",
        "module's launcher with the parameters below. Run this file to check it against PyTorch.",
        *note,
        '"""',
        "",
        *imports(
            f"from netdsl.codegen import {family.module} as family",
            "from netdsl.codegen.layouts import to_layout",
            "from netdsl.codegen.reference import run_layers",
        ),
        "",
        "",
        "\n\n\n".join(function_source(fn) for fn in (kernel, *helpers)),
        "",
        "",
        f"KERNEL = {family.kernel}",
        assignment("STEP", step.name),
        "# The step's options, from its layers and the build, as its launcher takes them.",
        assignment("OPTIONS", kernel_parameters(step, input_precision)),
        assignment("LAYERS", layers),
        assignment("INPUT_SHAPES", [tuple(s.shape) for s in inputs]),
        assignment("OUTPUT_SHAPE", tuple(step.shape)),
        assignment("WEIGHT_SHAPES", weights),
        "# How the runtime lays out each map and weight in memory (nhwc: channels-last); the kernel takes any.",
        assignment("INPUT_LAYOUTS", input_layouts),
        assignment("OUTPUT_LAYOUT", step.layout),
        assignment("WEIGHT_LAYOUTS", weight_layouts(step)),
        f"DTYPE = torch.{TORCH_NAMES[dtype]}  # of the build (netdsl compile --dtype {dtype})",
        *tuning,
        "",
        "",
        *launch,
        textwrap.indent(textwrap.dedent(family.launch).strip("\n"), "    "),
        *candidates,
        "",
        "",
        "def reference(inputs: list[torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:",
        '    """The same step with PyTorch ops, layer by layer."""',
        "    return run_layers(LAYERS, inputs, weights)",
        "",
        "",
        'if __name__ == "__main__":',
        "    generator = torch.Generator().manual_seed(0)",
        "    # Random data in the build's dtype and layouts; the reference runs in float64 on the same values.",
        '    device = "cuda" if torch.cuda.is_available() else "cpu"',
        "    inputs = [torch.randn(2, *shape, generator=generator).to(DTYPE) for shape in INPUT_SHAPES]",
        "    weights = {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in WEIGHT_SHAPES.items()}",
        '    if "running_var" in weights:',
        '        weights["running_var"] = weights["running_var"].abs() + 0.5',
        "    weights = {name: w.to(DTYPE) for name, w in weights.items()}",
        "    want = reference([x.double() for x in inputs], {name: w.double() for name, w in weights.items()})",
        "    inputs = [to_layout(x, layout).to(device) for x, layout in zip(inputs, INPUT_LAYOUTS)]",
        '    weights = {n: to_layout(w, WEIGHT_LAYOUTS.get(n, "nchw")).to(device) for n, w in weights.items()}',
        "    got = launch(inputs, weights).double().cpu()",
        "    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()",
        '    print(f"{STEP}: max error {error:.2e} relative to the largest output ({DTYPE}, float64 reference)")',
        "",
    ]
    return "\n".join(lines)


def imports(*netdsl_imports: str) -> list[str]:
    """The imports of a generated file, then `netdsl_imports`. Run by hand on a machine without a GPU, the file
    first chooses Triton's interpreter, which has to be chosen before `@triton.jit` makes its kernels."""
    return [
        "import os",
        "",
        "import torch",
        "",
        'if __name__ == "__main__" and not torch.cuda.is_available():',
        "    # Run by hand without a GPU: the kernels run on the CPU under Triton's interpreter, chosen before",
        "    # triton is imported (importing netdsl.codegen below then makes the interpreter's bf16 dots a GPU's).",
        '    os.environ.setdefault("TRITON_INTERPRET", "1")',
        "",
        "import triton",
        "import triton.language as tl",
        "",
        *netdsl_imports,
    ]


def safe(text: str) -> str:
    """Text for a docstring: no quotes, backslashes or line breaks can come through."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in " ._-@/[]:") else "?" for ch in str(text))


def emit_program(
    program: nx.DiGraph,
    input_precision: str = "ieee",
    dtype: str = "fp32",
    tiles: Callable[[Step, str], dict[int, dict[str, int]] | None] | None = None,
) -> dict[str, str]:
    """File name -> source for every step that launches a kernel, in launch order. `tiles(step, source)`, asked for
    each tunable step with its file as built without tuning, gives the tiles of its `TUNED` table (by batch size;
    None or empty: none)."""
    files = {}
    for names in program.graph["partitions"].values():
        for name in names:
            step = program.nodes[name]["step"]
            if family_of(step) in FAMILIES:
                source = emit_step(program, step, input_precision, dtype)
                tuned = tiles(step, source) if tiles is not None and tunable(step) else None
                if tuned:
                    source = emit_step(program, step, input_precision, dtype, tuned)
                files[f"{identifier(step.name)}.py"] = source
    return files
