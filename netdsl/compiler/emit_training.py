"""Code emission for training: one readable file per training step, `train/<step>.py`.

Each file holds copies of the `@triton.jit` kernels the step runs, forward and backward (and the device
functions they call), the step's options (`OPTIONS`), layers and shapes as literals, and

    forward(x, weights)            -> (output, saved): the training forward, and what it keeps for backward
    backward(grad, saved, weights) -> {"input": ..., "weight": ..., "bias": ...}: the gradients
    check()                        the kernels against PyTorch autograd in float64 on random data

`forward` and `backward` run the copies through their families' launchers in netdsl.codegen, the launchers
the triton backend (netdsl.runtime.kernel_ops) calls with the originals. The loss step's file gives the loss
and the logits' gradient, each device's update the fused SGD. `netdsl.compiler.train_launches` records the
launches by running these files on meta tensors. As in netdsl.compiler.emit, nothing from the `.net` file
reaches the code but through `literal()` of plain values and identifiers, and a file run by hand on a machine
without a GPU runs its kernels under Triton's interpreter.
"""

from __future__ import annotations

import math
import textwrap
from importlib import import_module

import networkx as nx

from netdsl._version import __version__
from netdsl.codegen.source import device_functions
from netdsl.compiler.backward import KERNELS
from netdsl.compiler.emit import assignment, function_source, imports, literal, safe
from netdsl.compiler.steps import Step
from netdsl.ir.dtypes import dot_precision
from netdsl.ir.ops import layer_pads, layer_tensors, trained_tensors

# kind -> (the body of `forward`, the body of `backward`); the kernels each kind runs: netdsl.compiler.backward.KERNELS
_CONV = """
    names = ("stride", "padding", "dilation", "groups", "activation", "slope", "input_precision")
    options = {key: OPTIONS[key] for key in names}"""
BODIES: dict[str, tuple[str, str]] = {
    "conv2d": (
        _CONV + """
    out = conv.conv2d(x, weights["weight"], weights.get("bias"), **options, kernel=KERNELS["conv2d_kernel"])
    return out, {"x": x, "out": out}""",
        _CONV + """
    x, out = saved["x"], saved["out"]
    dx = None
    if OPTIONS["input_gradient"]:  # the images need none
        dx = conv_backward.conv2d_dgrad(grad, out, weights["weight"], x.shape, **options,
                                        kernel=KERNELS["conv2d_dgrad_kernel"])
    dw, db = conv_backward.conv2d_wgrad(
        grad, out, x, weights["weight"].shape, bias=OPTIONS["bias"], **options, kernel=KERNELS["conv2d_wgrad_kernel"],
        reduce_kernel=KERNELS["conv2d_wgrad_reduce_kernel"],
    )
    return {"input": dx, "weight": dw, "bias": db}""",
    ),
    "linear": (
        """
    x = x.flatten(1)
    out = fc.linear(x, weights["weight"], weights.get("bias"), OPTIONS["activation"], OPTIONS["slope"],
                    OPTIONS["input_precision"], kernel=KERNELS["linear_kernel"])
    return out, {"x": x, "out": out}""",
        """
    grads, launches = fc_backward.linear_backward_launches(
        grad, saved["out"], saved["x"], weights["weight"], OPTIONS["bias"], OPTIONS["activation"], OPTIONS["slope"],
        OPTIONS["input_precision"], OPTIONS["input_gradient"],
    )
    for launch in launches:  # dgrad, wgrad and, where the batch is split, the sum of the splits
        KERNELS[launch.kernel.fn.__name__][launch.grid](**launch.arguments)
    return {"input": grads.inputs[0], "weight": grads.weight, "bias": grads.bias}""",
    ),
    "lrn_maxpool": (
        """
    (out, argmax, scale), grid, arguments = lrn_pool_backward.lrn_maxpool_train_launch(
        x, OPTIONS["size"], OPTIONS["alpha"], OPTIONS["beta"], OPTIONS["k"], OPTIONS["pool_size"],
        OPTIONS["pool_stride"], OPTIONS["pool_padding"], OPTIONS["ceil"], OPTIONS["relu_first"], OPTIONS["groups"],
    )
    KERNELS["lrn_pool_train_kernel"][grid](**arguments)
    return out, {"x": x, "argmax": argmax, "scale": scale}""",
        """
    dx, grid, arguments = lrn_pool_backward.lrn_maxpool_backward_launch(
        grad, saved["x"], saved["argmax"], saved["scale"], OPTIONS["size"], OPTIONS["alpha"], OPTIONS["beta"],
        OPTIONS["k"], OPTIONS["pool_size"], OPTIONS["pool_stride"], OPTIONS["pool_padding"], OPTIONS["ceil"],
        OPTIONS["relu_first"], OPTIONS["groups"],
    )
    KERNELS["lrn_pool_backward_kernel"][grid](**arguments)
    return {"input": dx}""",
    ),
    "maxpool": (
        """
    (out, argmax), grid, arguments = pool_backward.max_pool2d_train_launch(
        x, OPTIONS["size"], OPTIONS["stride"], OPTIONS["padding"], OPTIONS["ceil"], dilation=OPTIONS["dilation"]
    )
    KERNELS["max_pool2d_train_kernel"][grid](**arguments)
    return out, {"argmax": argmax, "input_shape": x.shape}""",
        """
    dx, grid, arguments = pool_backward.max_pool2d_backward_launch(
        grad, saved["argmax"], saved["input_shape"], OPTIONS["size"], OPTIONS["stride"], OPTIONS["padding"],
        OPTIONS["ceil"], dilation=OPTIONS["dilation"],
    )
    KERNELS["pool2d_backward_kernel"][grid](**arguments)
    return {"input": dx}""",
    ),
    "avgpool": (
        """
    out = pool.pool2d(x, "avg", OPTIONS["size"], OPTIONS["stride"], OPTIONS["padding"], OPTIONS["ceil"],
                      OPTIONS["count_pad"], dilation=OPTIONS["dilation"], kernel=KERNELS["pool2d_kernel"])
    return out, {"input_shape": x.shape}""",
        """
    dx, grid, arguments = pool_backward.avg_pool2d_backward_launch(
        grad, saved["input_shape"], OPTIONS["size"], OPTIONS["stride"], OPTIONS["padding"], OPTIONS["ceil"],
        OPTIONS["count_pad"], dilation=OPTIONS["dilation"],
    )
    KERNELS["pool2d_backward_kernel"][grid](**arguments)
    return {"input": dx}""",
    ),
    "activation": (
        """
    out = elementwise.elementwise(x, "copy", activation=OPTIONS["activation"], slope=OPTIONS["slope"],
                                  kernel=KERNELS["elementwise_kernel"])
    return out, {"out": out}""",
        """
    dx, grid, arguments = elementwise_backward.activation_backward_launch(
        grad, saved["out"], OPTIONS["activation"], OPTIONS["slope"]
    )
    KERNELS["activation_backward_kernel"][grid](**arguments)
    return {"input": dx}""",
    ),
    "batch_norm": (
        """
    # the batch's statistics; the running ones (weights["running_mean"], ["running_var"]) are updated in place
    result = batchnorm_train.batch_norm_forward(
        x, weights["weight"], weights["bias"], weights["running_mean"], weights["running_var"],
        momentum=OPTIONS["momentum"], eps=OPTIONS["eps"],
        kernels={"partials": KERNELS["batchnorm_partials_kernel"], "forward": KERNELS["batchnorm_forward_kernel"]},
    )
    return result.y, {"x": x, "mean": result.mean, "invstd": result.invstd}""",
        """
    result = batchnorm_train.batch_norm_backward(
        grad, saved["x"], weights["weight"], saved["mean"], saved["invstd"],
        kernels={"partials": KERNELS["batchnorm_partials_kernel"], "backward": KERNELS["batchnorm_backward_kernel"]},
    )
    return {"input": result.dx, "weight": result.dweight, "bias": result.dbias}""",
    ),
    "dropout": (
        """
    # the mask is a counter-based random stream of `seed`, drawn again by backward, never stored
    out = dropout.dropout(x, OPTIONS["rate"], seed, kernel=KERNELS["dropout_kernel"])
    return out, {"seed": seed}""",
        """
    dx = dropout.dropout_backward(grad, OPTIONS["rate"], saved["seed"], kernel=KERNELS["dropout_kernel"])
    return {"input": dx}""",
    ),
    "loss": (
        """
    # x: the logits; the loss and its gradient on them come from one kernel, the batch mean from another
    result = cross_entropy.cross_entropy(
        x.flatten(1), target, label_smoothing=OPTIONS["label_smoothing"], kernel=KERNELS["cross_entropy_kernel"],
        mean_kernel=KERNELS["fixed_order_mean_kernel"],
    )
    return result.loss, {"grad": result.grad}""",
        """
    return {"input": saved["grad"] * grad}  # grad: the gradient on the loss, 1 for the loss itself""",
    ),
}  # fmt: skip
_REFERENCE_IMPORT = "from netdsl.codegen.reference import apply"
_ABOUT = (
    "The kernels are copies of {} (and the functions they call); `forward` and `backward` run them through their "
    "modules' launchers with the parameters below. Run this file to check them against PyTorch autograd."
)


def training_files(program: nx.DiGraph, dtype: str) -> dict[str, str]:
    """File name -> source: one per forward step that runs kernels, one per device's update."""
    precision = dot_precision(dtype)
    files = {}
    for names in program.graph["partitions"].values():
        for name in names:
            step: Step = program.nodes[name]["step"]
            if step.kind in BODIES:
                files[f"{name}.py"] = emit_training_step(program, step, precision)
            elif step.kind == "update":
                files[f"{name}.py"] = emit_update(program, step)
    return files


def training_parameters(program: nx.DiGraph, step: Step, precision: str = "ieee") -> dict[str, object]:
    """The step's `OPTIONS`, the literal parameters `forward` and `backward` read; `precision`: the dots' ("ieee" or
    "tf32")."""
    item, shape = step.first, _input_shape(program, step)
    p = item.params
    backward = next((b for b in program.successors(step.name) if _is_backward_of(program, b, step.name)), None)
    gradient = bool(backward and program.nodes[backward]["step"].options.get("input_gradient"))
    if step.kind in ("conv2d", "linear"):
        params = {
            "activation": step.options["activation"], "slope": float(step.options["slope"]),
            "input_precision": precision, "bias": "bias" in layer_tensors(item), "input_gradient": gradient,
        }  # fmt: skip
        if step.kind == "conv2d":
            params.update(stride=tuple(p["stride"]), padding=layer_pads(p, shape[1:]), dilation=tuple(p["dilation"]),
                          groups=p["groups"])  # fmt: skip
        return params
    if step.kind == "lrn_maxpool":
        norm, q = step.layers[-2].params, step.last.params
        return {
            **{key: norm[key] for key in ("size", "alpha", "beta", "k")}, "groups": norm.get("groups", 1),
            "pool_size": tuple(q["size"]), "pool_stride": tuple(q["stride"]),
            "pool_padding": layer_pads(q, shape[1:]), "ceil": q["ceil"], "relu_first": bool(step.options["relu_first"]),
        }  # fmt: skip
    if step.kind in ("maxpool", "avgpool"):
        params = {"size": tuple(p["size"]), "stride": tuple(p["stride"]), "padding": layer_pads(p, shape[1:]),
                  "ceil": p["ceil"], "dilation": tuple(p.get("dilation", (1, 1)))}  # fmt: skip
        if step.kind == "avgpool":
            params["count_pad"] = p.get("count_pad", True)
        return params
    if step.kind == "activation":
        return {"activation": item.op, "slope": float(p.get("slope", 0.01))}
    if step.kind == "batch_norm":
        return {"momentum": p.get("momentum", 0.1), "eps": p["eps"]}
    if step.kind == "dropout":
        return {"rate": p["rate"]}
    return {"label_smoothing": 0.0}  # loss: the recipe's label_smoothing is an argument of the real step


def _kernel(name: str):
    """The @triton.jit kernel named `module.kernel` in netdsl.codegen."""
    module, kernel = name.split(".")
    return getattr(import_module(f"netdsl.codegen.{module}"), kernel)


def emit_training_step(program: nx.DiGraph, step: Step, precision: str = "ieee") -> str:
    forward, backward = BODIES[step.kind]
    kernel_names = dict.fromkeys([*KERNELS[step.kind][0], *KERNELS[step.kind][1]])  # each once, forward first
    kernels = [_kernel(name) for name in kernel_names]
    sources, copied = [], set()
    for kernel in kernels:
        for fn in device_functions(kernel):
            if fn.__name__ not in copied:
                copied.add(fn.__name__)
                sources.append(function_source(fn))
    modules = sorted({name.split(".")[0] for name in kernel_names})
    netdsl_imports = [*(f"from netdsl.codegen import {module}" for module in modules), _REFERENCE_IMPORT]
    shape = _input_shape(program, step)
    weights = {}
    for item in step.layers:
        weights.update(layer_tensors(item))
        if item.op in ("conv", "fc"):
            break  # the activation after it has no weights
    saved = ", ".join(t.name for t in program.graph.get("saved", {}).get(step.name, [])) or "nothing"
    summary = " -> ".join(safe(item.name) for item in step.layers)
    layers = [(item.op, dict(item.params)) for item in step.layers if step.kind != "loss"]
    lines = [
        f'"""{step.name}: {summary}, on {safe(step.device)}; its training forward and backward.',
        "",
        f"Generated by netdsl {__version__} from net {safe(program.graph['name'])}; do not edit (run netdsl compile "
        "--train).",
        *textwrap.wrap(
            f"Reads {' x '.join(map(str, shape))} per image; writes {' x '.join(map(str, step.shape))}; keeps "
            f"{saved} for the backward.",
            110,
        ),
        *textwrap.wrap(_ABOUT.format(", ".join(f"netdsl.codegen.{name}" for name in kernel_names)), 110),
        '"""',
        "",
        *imports(*netdsl_imports),
        "",
        "",
        "\n\n\n".join(sources),
        "",
        "",
        "KERNELS = {",
        *(f"    {literal(kernel.fn.__name__)}: {kernel.fn.__name__}," for kernel in kernels),
        "}",
        assignment("STEP", step.name),
        assignment("KIND", step.kind),
        "# The step's options, from its layers and the build, as `forward` and `backward` take them.",
        assignment("OPTIONS", training_parameters(program, step, precision)),
        assignment("LAYERS", layers),
        assignment("INPUT_SHAPE", tuple(shape), "per image, the inputs joined"),
        assignment("OUTPUT_SHAPE", tuple(step.shape)),
        assignment("WEIGHT_SHAPES", weights),
        "",
        "",
        "def forward(x, weights, seed=0, target=None):",
        '    """(output, saved) of a training batch x [N, *INPUT_SHAPE]; `seed`: dropout\'s, `target`: the loss\'s."""',
        forward.strip("\n"),
        "",
        "",
        "def backward(grad, saved, weights):",
        '    """The gradients of the input (None where no layer before needs it) and of the weights."""',
        backward.strip("\n"),
        "",
        "",
        _CHECK,
    ]
    return "\n".join(lines)


_CHECK = '''def reference(x, weights, target=None):
    """The same step in PyTorch, layer by layer, in training mode (dropout aside: another random stream)."""
    if KIND == "loss":
        return torch.nn.functional.cross_entropy(x.flatten(1), target, label_smoothing=OPTIONS["label_smoothing"])
    for op, params in LAYERS:
        x = apply(op, params, [x], weights, training=op != "dropout")
    return x


def check(batch=2, seed=0):
    """The largest error of the output and of each gradient, relative to the largest |reference|, on random
    data in float32 (the reference in float64 under autograd). Dropout is checked against its own mask."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *INPUT_SHAPE, generator=generator)
    weights = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in WEIGHT_SHAPES.items()}
    if "running_var" in weights:
        weights["running_var"] = weights["running_var"].abs() + 0.5
    target = torch.randint(0, x[0].numel(), (batch,), generator=generator) if KIND == "loss" else None
    ones = torch.ones(()) if KIND == "loss" else torch.randn(batch, *OUTPUT_SHAPE, generator=generator)
    exact = {name: w.double().requires_grad_(not name.startswith("running_")) for name, w in weights.items()}
    x64 = x.double().requires_grad_()
    want = reference(x64, exact, target)
    got, saved = forward(x.to(device), {n: w.to(device) for n, w in weights.items()}, target=target)
    grads = backward(ones.to(device), saved, {n: w.to(device) for n, w in weights.items()})
    if KIND == "dropout":  # each value kept (scaled) or dropped, the gradient through the same mask
        kept = got.cpu() != 0
        scale = 1 / (1 - OPTIONS["rate"])
        assert torch.allclose(got.cpu()[kept], x[kept] * scale)
        assert torch.allclose(grads["input"].cpu(), ones * kept * scale)
        return {}
    want.backward(ones.double())
    errors = {"output": got.cpu().double() - want.detach()}
    for name, value in grads.items():
        if value is None:
            continue
        expected = x64.grad if name == "input" else exact[name].grad
        errors[name] = value.cpu().double().reshape(expected.shape) - expected
    scale = {"output": want.detach(), "input": x64.grad, **{n: w.grad for n, w in exact.items() if w.grad is not None}}
    return {name: (e.abs().max() / scale[name].abs().max().clamp_min(1e-12)).item() for name, e in errors.items()}


if __name__ == "__main__":
    for name, error in check().items():
        print(f"{STEP} {name}: max error {error:.2e} relative to the largest |reference| (float32 against float64)")
'''


def emit_update(program: nx.DiGraph, step: Step) -> str:
    (kernel_name,) = KERNELS["update"][1]
    kernel = _kernel(kernel_name)
    sizes = []
    for name in step.inputs:
        for item in program.nodes[name]["step"].layers:
            sizes += [(f"{item.name}.{tensor}", math.prod(shape)) for tensor, shape in trained_tensors(item).items()]
    lines = [
        f'"""{step.name}: the paper\'s SGD on every weight of {safe(step.device)}, in one launch.',
        "",
        f"Generated by netdsl {__version__} from net {safe(program.graph['name'])}; do not edit (run netdsl compile "
        "--train).",
        "The weights, gradients and velocities of the device lie end to end in flat fp32 buffers (PARAMETERS gives",
        "their order and sizes); the kernel is a copy of netdsl.codegen.optimizer.paper_sgd_kernel.",
        '"""',
        "",
        *imports("from netdsl.codegen import optimizer"),
        "",
        "",
        "\n\n\n".join(function_source(fn) for fn in device_functions(kernel)),
        "",
        "",
        'KERNELS = {"paper_sgd_kernel": paper_sgd_kernel}',
        assignment("STEP", step.name),
        assignment("PARAMETERS", sizes, "name, elements"),
        "",
        "",
        "def update(weights, grads, velocities, lr, momentum=0.9, weight_decay=0.0005, lr_mults=None,",
        "           decay_mults=None):",
        '    """One step on the flat buffers, in place."""',
        "    sizes = [size for _, size in PARAMETERS]",
        "    table = optimizer.segments(sizes, lr_mults or [1.0] * len(sizes), decay_mults or [1.0] * len(sizes),",
        "                               device=weights.device)",
        "    optimizer.paper_sgd_step(weights, grads, velocities, table, lr=lr, momentum=momentum,",
        '                             weight_decay=weight_decay, kernel=KERNELS["paper_sgd_kernel"])',
        "",
        "",
        'if __name__ == "__main__":',
        "    generator = torch.Generator().manual_seed(0)",
        "    total = sum(size for _, size in PARAMETERS)",
        "    w, g, v = (torch.randn(total, generator=generator) for _ in range(3))",
        "    want_v = 0.9 * v - 0.0005 * 0.01 * w - 0.01 * g  # the paper's rule",
        "    want_w = w + want_v",
        "    update(w, g, v, lr=0.01)",
        "    error = max((w - want_w).abs().max().item(), (v - want_v).abs().max().item())",
        '    print(f"{STEP}: max error {error:.2e} against the paper\'s rule in PyTorch")',
        "",
    ]
    return "\n".join(lines)


def _input_shape(program: nx.DiGraph, step: Step) -> tuple[int, ...]:
    shapes = [program.nodes[source]["step"].shape for source in step.inputs]
    if step.kind in ("linear", "loss"):
        return (sum(math.prod(shape) for shape in shapes),)
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _is_backward_of(program: nx.DiGraph, name: str, forward: str) -> bool:
    step: Step = program.nodes[name]["step"]
    return step.kind == "backward" and step.options.get("forward") == forward
