"""Memory of a training step: what the forward saves for the backward, and the peak per device.

Each forward step saves what its backward kernel reads (as netdsl.runtime.kernel_ops saves it):

    conv2d, linear      its input and its output (the activation's mask is read from the output)
    lrn_maxpool         its input, and per pooled value the winner's offset (int8) and LRN scale (fp32)
    maxpool             per pooled value the winner's offset (int8)
    activation          its output
    batch_norm          its input, and each channel's mean and inverse deviation (fp32)
    loss                the logits' gradient (fp32), computed with the loss
    avgpool, dropout    nothing (dropout regenerates its mask from a seed)
    reference           a copy, a sum, a view or a global average nothing; any other layer (an LRN on its
                        own, a softmax before the last layer) what PyTorch's autograd keeps for it, found
                        by running it once on one image

A step with several inputs joins them first, and saves the joined copy. A saved tensor is counted once
however many backwards read it. Liveness runs over the whole step in one order, forward then backward:
a map lives from the step that writes it to its last reader, forward or backward; a gradient from the
backward that writes it to the one that reads it. Parameters, their gradients and the momentum (three
fp32 copies, the flat buffers of the fused update) and running statistics are held throughout. Peak =
those + the most bytes alive at once, per device, at the build's batch and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from netdsl.compiler.steps import Step, launch_order
from netdsl.compiler.training import RECOMPUTE
from netdsl.errors import NetError
from netdsl.ir import copy_graph
from netdsl.ir.dtypes import DTYPE_BYTES
from netdsl.ir.ops import layer_tensors, trained_tensors
from netdsl.tables import format_bytes

_FREE_REFERENCES = ("concat", "flatten", "add", "global_avgpool", "shuffle", "identity")


@dataclass(frozen=True)
class Saved:
    """One tensor a forward step keeps for a backward."""

    name: str  # the step whose output it is, or "<step>.<what>" for a tensor of its own
    device: str
    elements: int  # per image, or in all when `per_image` is False
    dtype: str  # "map" (the build's dtype), "int8" or "fp32"
    per_image: bool = True

    def bytes(self, batch: int, dtype: str) -> int:
        size = {"map": DTYPE_BYTES[dtype], "int8": 1, "fp32": 4}[self.dtype]
        return self.elements * size * (batch if self.per_image else 1)


def saved_for_backward(program: nx.DiGraph, step: Step) -> list[Saved]:
    """What `step` (a forward step of the training program) keeps for its backward."""
    kind = step.kind
    output = Saved(step.name, step.device, math.prod(step.shape), "map")
    joined = _input(program, step)
    if kind in ("conv2d", "linear"):
        return [joined, output]
    if kind == "lrn_maxpool":
        pooled = math.prod(step.shape)
        return [joined, _own(step, "argmax", pooled, "int8"), _own(step, "scale", pooled, "fp32")]
    if kind == "maxpool":
        return [_own(step, "argmax", math.prod(step.shape), "int8")]
    if kind == "activation":
        return [output]
    if kind == "batch_norm":
        channels = step.shape[0]
        return [joined, _own(step, "mean", channels, "fp32", False), _own(step, "invstd", channels, "fp32", False)]
    if kind == "loss":
        return [_own(step, "gradient", step.options["classes"], "fp32")]
    if kind == "reference":
        if step.first.op in _FREE_REFERENCES:
            return []
        return _measured_reference(step, joined, output)
    return []  # avgpool, dropout, input, transfer


def _measured_reference(step: Step, joined: Saved | None, output: Saved) -> list[Saved]:
    """What PyTorch's autograd keeps for a layer netdsl leaves to PyTorch (an LRN on its own, a softmax that
    is not the last layer, ...): the layer is run once on one random image under `saved_tensors_hooks`, and
    whatever is saved besides its input, its output and its weights is counted as its own (fp32 here, so the
    element count is bytes / 4)."""
    import torch

    from netdsl.codegen.reference import apply

    item = step.first
    x = torch.randn(1, *item.input_shape, requires_grad=True)
    weights = {name: torch.randn(shape, requires_grad=True) for name, shape in layer_tensors(item).items()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = apply(item.op, item.params, [x], weights, training=True)
    known = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    known |= {w.untyped_storage().data_ptr() for w in weights.values()}
    kept = [joined] if x.untyped_storage().data_ptr() in seen else []
    if y.untyped_storage().data_ptr() in seen:
        kept.append(output)
    other = sum(size for pointer, size in seen.items() if pointer not in known) // 4
    if other:
        kept.append(_own(step, "intermediates", other, "map"))
    return kept


def _run_inputs(program: nx.DiGraph, step: Step) -> list[Saved]:
    """What a run computed again keeps from its forward pass: the maps its first step reads, each once."""
    return [Saved(source, program.nodes[source]["step"].device, math.prod(program.nodes[source]["step"].shape), "map")
            for source in dict.fromkeys(step.inputs)]  # fmt: skip


def _input(program: nx.DiGraph, step: Step) -> Saved | None:
    if not step.inputs:
        return None
    if len(step.inputs) == 1:
        source: Step = program.nodes[step.inputs[0]]["step"]
        return Saved(source.name, source.device, math.prod(source.shape), "map")
    elements = sum(math.prod(program.nodes[name]["step"].shape) for name in step.inputs)
    return _own(step, "joined_input", elements, "map")


def _own(step: Step, what: str, elements: int, dtype: str, per_image: bool = True) -> Saved:
    return Saved(f"{step.name}.{what}", step.device, elements, dtype, per_image)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one device for a training step at the plan's batch and dtype."""

    parameters: int  # the number of trained parameters
    static: int  # parameters, gradients, momentum (fp32 each) and running statistics
    saved: int  # what the forward keeps for the backward
    peak_live: int  # the most bytes of maps and gradients alive at once
    peak: int  # static + peak_live
    peak_step: str  # where the peak is reached


def plan_training_memory(program: nx.DiGraph, batch: int, dtype: str, recompute: str | None = None) -> nx.DiGraph:
    """Annotates the training program: `saved` (forward step -> its Saved list) and `memory` (device ->
    DeviceMemory), with the runs of steps that `recompute` (default: the program's own setting) computes again
    in the backward pass: such a run keeps only its input in the forward pass, and what its steps would keep
    lives again from the run's first backward step to each step's own."""
    result = copy_graph(program)
    mode = program.graph.get("recompute", "none") if recompute is None else recompute
    runs = program.graph.get("runs", {}).get(mode, [])
    run_of = {name: run for run in runs for name in run}
    order = launch_order(program)
    index = {name: i for i, name in enumerate(order)}
    saved: dict[str, list[Saved]] = {}
    lifetimes: dict[tuple[str, str], list[int]] = {}  # (device, tensor) -> [first, last]
    sizes: dict[tuple[str, str], int] = {}

    def live(device: str, tensor: str, size: int, first: int, last: int) -> None:
        key = (device, tensor)
        sizes[key] = size
        span = lifetimes.setdefault(key, [first, last])
        span[0], span[1] = min(span[0], first), max(span[1], last)

    backward_of = {
        step.options["forward"]: name
        for name in order
        if (step := program.nodes[name]["step"]).kind == "backward"
    }
    for name in order:
        step: Step = program.nodes[name]["step"]
        if step.kind in ("backward", "update") or step.options.get("gradient"):
            continue
        # a forward map: from its step to its last forward reader
        readers = [index[r] for r in program.successors(name) if program.nodes[r]["step"].kind != "backward"]
        size = math.prod(step.shape) * batch * DTYPE_BYTES[dtype] if step.kind != "loss" else 4
        live(step.device, name, size, index[name], max([index[name], *readers]))
        has_backward = name in backward_of or (step.kind == "loss" and bool(_gradient_readers(program, name)))
        # a step with no backward (nothing before it has weights) keeps nothing: autograd saves nothing there
        kept = [s for s in saved_for_backward(program, step) if s is not None] if has_backward else []
        if name in run_of:  # computed again in the backward pass: the run keeps its input alone
            run = run_of[name]
            backwards = [index[backward_of[member]] for member in run if member in backward_of]
            inputs = _run_inputs(program, program.nodes[run[0]]["step"]) if backwards else []
            saved[name] = inputs if name == run[0] else []
            for tensor in saved[name]:
                live(tensor.device, tensor.name, tensor.bytes(batch, dtype), index[name], max(backwards))
            if name in backward_of:  # what it would keep lives again from the run's first backward step to its own
                kept_anyway = {each.name for each in inputs}
                for tensor in kept:
                    if tensor.name not in kept_anyway:
                        again = (tensor.device, f"{tensor.name}@again", tensor.bytes(batch, dtype))
                        live(*again, min(backwards), index[backward_of[name]])
            continue
        saved[name] = kept
        until = index[backward_of[name]] if name in backward_of else index[name]
        if step.kind == "loss":  # the logits' gradient is read by the logits' backward
            until = max([index[r] for r in _gradient_readers(program, name)], default=index[name])
        for tensor in kept:
            live(tensor.device, tensor.name, tensor.bytes(batch, dtype), index[name], until)
    for name in order:
        step = program.nodes[name]["step"]
        if step.kind == "backward" or step.options.get("gradient"):
            readers = [index[r] for r in program.successors(name) if program.nodes[r]["step"].kind != "update"]
            if step.kind == "backward" and not step.options["input_gradient"]:
                continue  # nothing before it needs a gradient: it writes only its parameters' gradients
            size = math.prod(step.shape) * batch * DTYPE_BYTES[dtype]
            live(step.device, name, size, index[name], max([index[name], *readers]))
    memory = {}
    for device, names in program.graph["partitions"].items():
        trained, held = _tensors(program, names)
        static = 3 * 4 * trained + 4 * held
        unique = {s.name: s for name in names if name in saved for s in saved[name]}
        timeline = [0] * len(order)
        for (where, tensor), (first, last) in lifetimes.items():
            if where == device:
                for moment in range(first, last + 1):
                    timeline[moment] += sizes[(where, tensor)]
        moments = [index[name] for name in names]
        top = max(moments, key=lambda moment: (timeline[moment], -moment))
        memory[device] = DeviceMemory(
            trained,
            static,
            sum(s.bytes(batch, dtype) for s in unique.values()),
            timeline[top],
            static + timeline[top],
            order[top],
        )
    result.graph["saved"] = saved
    result.graph["memory"] = memory
    return result


def _gradient_readers(program: nx.DiGraph, loss: str) -> list[str]:
    return [r for r in program.successors(loss) if program.nodes[r]["step"].kind in ("backward", "transfer")]


def _tensors(program: nx.DiGraph, names: list[str]) -> tuple[int, int]:
    """(trained parameters, running statistics) held by the forward steps among `names`, in elements."""
    trained = held = 0
    for name in names:
        step: Step = program.nodes[name]["step"]
        if step.kind in ("backward", "update", "transfer", "input"):
            continue
        for item in step.layers if step.kind != "loss" else []:
            learned = trained_tensors(item)
            trained += sum(math.prod(shape) for shape in learned.values())
            held += sum(math.prod(shape) for name, shape in layer_tensors(item).items() if name not in learned)
    return trained, held


def check_training_memory(program: nx.DiGraph, batch: int, dtype: str, limit: int | None = None) -> nx.DiGraph:
    """Each device's planned peak (`plan_training_memory`) against its memory: `limit` (bytes, the command
    line's) for every device, else a device's own `device ... memory N` (devices without one are not
    checked). Over it, a NetError that says in how many parts (`accumulate`) the batch would fit: the
    smallest number of equal parts whose part's peak fits on every device, planned again at that batch, and
    which setting of `recompute`, if any, keeps the whole batch."""
    memory = program.graph["memory"]
    devices = program.graph.get("devices", {})
    caps = {name: limit if limit is not None else device.memory for name, device in devices.items()}
    over = [name for name in memory if caps.get(name) is not None and memory[name].peak > caps[name]]
    if not over:
        return program
    name, cap = over[0], caps[over[0]]
    need = memory[name]
    fits = None
    for parts in (count for count in range(2, batch + 1) if batch % count == 0):
        smaller = plan_training_memory(program, batch // parts, dtype).graph["memory"]
        if all(caps.get(device) is None or smaller[device].peak <= caps[device] for device in smaller):
            fits = parts, smaller[name].peak
            break
    again = None  # the first recompute setting, past the program's own, whose step fits whole
    for mode in RECOMPUTE[RECOMPUTE.index(program.graph.get("recompute", "none")) + 1 :]:
        whole = plan_training_memory(program, batch, dtype, mode).graph["memory"]
        if all(caps.get(device) is None or whole[device].peak <= caps[device] for device in whole):
            peak = format_bytes(whole[name].peak)
            again = f"run layers again in the backward pass: `recompute = {mode}` (peak {peak}); "
            break
    if fits is not None:
        parts, peak = fits
        hint = f"{again}or " if again else ""
        hint += (
            f"train in parts: `accumulate = {parts}` runs {batch // parts} images at a time through the "
            f"same steps (peak {format_bytes(peak)}); or spread the layers over more devices"
        )
    elif again:
        hint = f"{again}or spread the layers over more devices"
    else:
        hint = "not even one image at a time fits: spread the layers over more devices, or raise the limit"
    device = devices[name]
    raise NetError(
        f"training at batch {batch} in {dtype}, device `{name}` would need {format_bytes(need.peak)} at its peak "
        f"(at {need.peak_step}) but has {format_bytes(cap)}: weights, gradients and momentum "
        f"{format_bytes(need.static)} + maps and gradients alive then {format_bytes(need.peak_live)}",
        None if limit is not None else device.span,
        where="--memory-limit" if limit is not None else None,
        hint=hint,
    )
