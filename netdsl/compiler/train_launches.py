"""What every kernel of a training step launches with, found without a GPU, for the sm_90 report.

Each step of the training program (netdsl.compiler.backward) is run on `meta` tensors (shapes and dtypes, no
data) through the same codegen launchers the triton backend calls (netdsl.runtime.kernel_ops), with each
kernel replaced by a recorder: the launcher's own code picks the grid and the tiles for the batch, as on a GPU.
The recordings become `netdsl.compiler.launches.Launch`es, which `sm90_resources` builds and caches.
A step's launches are named `<step>.<kernel>`.
"""

from __future__ import annotations

import inspect
import math

import networkx as nx
import torch

from netdsl.codegen import (
    batchnorm_train,
    conv,
    conv_backward,
    cross_entropy,
    dropout,
    elementwise,
    elementwise_backward,
    fc,
    fc_backward,
    lrn_pool_backward,
    optimizer,
    pool,
    pool_backward,
)
from netdsl.compiler.launches import Launch, _launch, _Recorder
from netdsl.compiler.steps import Step
from netdsl.ir.dtypes import torch_dtype
from netdsl.ir.ops import layer_pads, layer_tensors


class _Recording:
    """Recorders standing in for kernels, by the name a launcher is given them under."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.kernels: dict[str, tuple[object, _Recorder]] = {}

    def __call__(self, kernel) -> _Recorder:
        recorder = _Recorder()
        self.kernels[kernel.fn.__name__] = (kernel, recorder)
        return recorder

    def add(self, kernel, grid, arguments: dict) -> None:
        """A launch a launcher returned instead of running it."""
        recorder = self(kernel)
        recorder[grid](**arguments)

    def launches(self) -> list[Launch]:
        found = []
        for name, (kernel, recorder) in self.kernels.items():
            for grid, args, kwargs in recorder.calls[:1]:
                source = inspect.getsource(kernel.fn)
                found.append(_launch(f"{self.step}.{name}", kernel, grid, args, kwargs, source))
        return found


def training_launches(program: nx.DiGraph, batch: int, dtype: str) -> list[Launch]:
    """Every kernel launch of one training step at `batch` in `dtype`, in plan order."""
    element = torch_dtype(dtype)
    precision = "tf32" if dtype == "tf32" else "ieee"
    launches: list[Launch] = []
    by_name = {name: program.nodes[name]["step"] for name in program.nodes}
    for names in program.graph["partitions"].values():
        for name in names:
            step: Step = by_name[name]
            recording = _Recording(name)
            if step.kind == "backward":
                _backward(recording, by_name[step.options["forward"]], step, batch, element, precision)
            elif step.kind == "update":
                _update(recording, program, step)
            elif step.kind not in ("input", "transfer"):
                _forward(recording, program, step, batch, element, precision)
            launches += recording.launches()
    return launches


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _input(program: nx.DiGraph, step: Step, batch: int, element: torch.dtype) -> torch.Tensor:
    """The step's input as its kernel reads it: several inputs joined on channels (or features)."""
    shapes = [program.nodes[source]["step"].shape for source in step.inputs]
    if step.kind == "linear" or step.kind == "loss":
        return _meta(batch, sum(math.prod(shape) for shape in shapes), dtype=element)
    return _meta(batch, sum(shape[0] for shape in shapes), *shapes[0][1:], dtype=element)


def _weights(item, element: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: _meta(*shape, dtype=torch.float32 if name.startswith("running_") else element)
            for name, shape in layer_tensors(item).items()}  # fmt: skip


def _conv_options(item, x: torch.Tensor, step: Step, precision: str) -> dict:
    p = item.params
    return {
        "stride": tuple(p["stride"]), "padding": layer_pads(p, tuple(x.shape[2:])), "dilation": tuple(p["dilation"]),
        "groups": p["groups"], "activation": step.options["activation"], "slope": step.options["slope"],
        "input_precision": precision,
    }  # fmt: skip


def _forward(recording, program, step: Step, batch: int, element: torch.dtype, precision: str) -> None:
    item = step.first
    x = _input(program, step, batch, element)
    tensors = _weights(item, element)
    if step.kind == "conv2d":
        options = _conv_options(item, x, step, precision)
        conv.conv2d(x, tensors["weight"], tensors.get("bias"), **options, kernel=recording(conv.conv2d_kernel))
    elif step.kind == "linear":
        fc.linear(x, tensors["weight"], tensors.get("bias"), step.options["activation"], step.options["slope"],
                  precision, kernel=recording(fc.linear_kernel))  # fmt: skip
    elif step.kind == "lrn_maxpool":
        norm, q = step.layers[-2].params, step.last.params
        _, grid, arguments = lrn_pool_backward.lrn_maxpool_train_launch(
            x, norm["size"], norm["alpha"], norm["beta"], norm["k"], q["size"], q["stride"],
            layer_pads(q, tuple(x.shape[2:])), q["ceil"], step.options["relu_first"], norm.get("groups", 1),
        )  # fmt: skip
        recording.add(lrn_pool_backward.lrn_pool_train_kernel, grid, arguments)
    elif step.kind == "maxpool":
        p = item.params
        _, grid, arguments = pool_backward.max_pool2d_train_launch(
            x, p["size"], p["stride"], layer_pads(p, tuple(x.shape[2:])), p["ceil"], dilation=p.get("dilation", 1)
        )
        recording.add(pool_backward.max_pool2d_train_kernel, grid, arguments)
    elif step.kind == "avgpool":
        p = item.params
        pool.pool2d(x, "avg", p["size"], p["stride"], layer_pads(p, tuple(x.shape[2:])), p["ceil"], p["count_pad"],
                    dilation=p.get("dilation", 1), kernel=recording(pool.pool2d_kernel))  # fmt: skip
    elif step.kind == "activation":
        elementwise.elementwise(x, "copy", activation=item.op, slope=float(item.params.get("slope", 0.01)),
                                kernel=recording(elementwise.elementwise_kernel))  # fmt: skip
    elif step.kind == "batch_norm":
        batchnorm_train.batch_norm_forward(
            x, tensors["weight"].float(), tensors["bias"].float(), tensors["running_mean"], tensors["running_var"],
            momentum=item.params.get("momentum", 0.1), eps=item.params["eps"],
            kernels={"partials": recording(batchnorm_train.batchnorm_partials_kernel),
                     "forward": recording(batchnorm_train.batchnorm_forward_kernel)},
        )  # fmt: skip
    elif step.kind == "dropout":
        dropout.dropout(x, item.params["rate"], 1, kernel=recording(dropout.dropout_kernel))
    elif step.kind == "loss":
        cross_entropy.cross_entropy(
            x, _meta(batch, dtype=torch.int64), kernel=recording(cross_entropy.cross_entropy_kernel),
            mean_kernel=recording(cross_entropy.fixed_order_mean_kernel),
        )  # fmt: skip


def _backward(recording, forward: Step, step: Step, batch: int, element: torch.dtype, precision: str) -> None:
    item = forward.first
    x = _meta(batch, *step.shape, dtype=element)  # the backward writes the gradient of the (joined) input
    if forward.kind == "linear":
        x = x.flatten(1)
    grad = _meta(batch, *forward.shape, dtype=element)
    tensors = _weights(item, element)
    kind = forward.kind
    if kind == "conv2d" and step.options.get("implementation") != "torch":
        options = _conv_options(item, x, forward, precision)
        if step.options["input_gradient"]:
            conv_backward.conv2d_dgrad(grad, grad, tensors["weight"], x.shape, **options,
                                       kernel=recording(conv_backward.conv2d_dgrad_kernel))  # fmt: skip
        conv_backward.conv2d_wgrad(
            grad, grad, x, tensors["weight"].shape, bias="bias" in tensors, **options,
            kernel=recording(conv_backward.conv2d_wgrad_kernel),
            reduce_kernel=recording(conv_backward.conv2d_wgrad_reduce_kernel),
        )  # fmt: skip
    elif kind == "linear" and step.options.get("implementation") != "torch":
        _, launches = fc_backward.linear_backward_launches(
            grad, grad, x, tensors["weight"], "bias" in tensors, forward.options["activation"],
            forward.options["slope"], precision, step.options["input_gradient"],
        )  # fmt: skip
        for launch in launches:
            recording.add(launch.kernel, launch.grid, launch.arguments)
    elif kind == "lrn_maxpool":
        norm, q = forward.layers[-2].params, forward.last.params
        pooled = _meta(*grad.shape, dtype=torch.int8)
        _, grid, arguments = lrn_pool_backward.lrn_maxpool_backward_launch(
            grad, x, pooled, _meta(*grad.shape), norm["size"], norm["alpha"], norm["beta"], norm["k"], q["size"],
            q["stride"], layer_pads(q, tuple(x.shape[2:])), q["ceil"], forward.options["relu_first"],
            norm.get("groups", 1),
        )  # fmt: skip
        recording.add(lrn_pool_backward.lrn_pool_backward_kernel, grid, arguments)
    elif kind in ("maxpool", "avgpool"):
        p = item.params
        pads = layer_pads(p, tuple(x.shape[2:]))
        if kind == "maxpool":
            _, grid, arguments = pool_backward.max_pool2d_backward_launch(
                grad, _meta(*grad.shape, dtype=torch.int8), x.shape, p["size"], p["stride"], pads, p["ceil"],
                dilation=p.get("dilation", 1),
            )  # fmt: skip
        else:
            _, grid, arguments = pool_backward.avg_pool2d_backward_launch(
                grad, x.shape, p["size"], p["stride"], pads, p["ceil"], p["count_pad"], dilation=p.get("dilation", 1)
            )
        recording.add(pool_backward.pool2d_backward_kernel, grid, arguments)
    elif kind == "activation":
        _, grid, arguments = elementwise_backward.activation_backward_launch(
            grad, grad, item.op, float(item.params.get("slope", 0.01))
        )
        recording.add(elementwise_backward.activation_backward_kernel, grid, arguments)
    elif kind == "batch_norm":
        channels = x.shape[1]
        batchnorm_train.batch_norm_backward(
            grad, x, tensors["weight"].float(), _meta(channels), _meta(channels),
            kernels={"partials": recording(batchnorm_train.batchnorm_partials_kernel),
                     "backward": recording(batchnorm_train.batchnorm_backward_kernel)},
        )  # fmt: skip
    elif kind == "dropout":
        dropout.dropout_backward(grad, item.params["rate"], 1, kernel=recording(dropout.dropout_kernel))


def _update(recording, program: nx.DiGraph, step: Step) -> None:
    sizes = []
    for name in step.inputs:
        backward = program.nodes[name]["step"]
        for item in backward.layers:
            sizes += [math.prod(shape) for tensor, shape in layer_tensors(item).items()
                      if not tensor.startswith("running_")]  # fmt: skip
    total = sum(sizes)
    table = optimizer.segments(sizes, [1.0] * len(sizes), [1.0] * len(sizes), device="meta")
    optimizer.paper_sgd_step(_meta(total), _meta(total), _meta(total), table, lr=0.01,
                             kernel=recording(optimizer.paper_sgd_kernel))  # fmt: skip
