"""The trainable module: a shaped layer graph as a `torch.nn.Module` that autograd differentiates.

`GraphModule(graph)` runs every layer with PyTorch (`netdsl.codegen.reference.apply`, the meaning the
torch backend gives each op), so the module and `Net(backend="torch")` compute one function:

- its parameters and buffers carry netdsl's weight names, `<layer>.<tensor>` (`conv1@gpu0.weight`,
  `s1.batchnorm.running_var`): a name split on "." is a path of submodules, so `named_parameters()` and
  `state_dict()` list exactly the names of `netdsl.runtime.weights.weight_specs(graph)`, and a state dict
  saved with `save_weights` is a weights file `netdsl run --weights` reads. The buffers are the batch
  norms' running statistics, nothing else;
- each layer runs on its logical device's torch device (`devices=`), where its parameters live; a layer
  reading another device's output moves it there with `.to()`, so gradients flow back across towers;
- `train()`: dropout drops and batch norm normalizes with the batch's statistics, updating the running
  ones (each batch norm's `momentum`); `eval()`: inference, exactly as `Net` computes it;
- `logits(x)` is the net's output before a final softmax: what a cross-entropy loss reads;
- `recompute=`: memory for compute. A training forward pass keeps what each layer's backward reads;
  with "cheap", each run of layers after a chain's conv or fc (activation, LRN, pooling, batch norm,
  dropout: two layers or more) keeps only its input, and its backward first runs it forward again;
  with "all", each conv or fc and the layers after it (a chain, as the .net file writes one) do.
  The gradients are the same; batch norm's running averages move once (the second pass updates copies);
  dropout draws the same masks (torch.utils.checkpoint replays the random state). Under torch.compile,
  whose partitioner chooses what to recompute itself, the setting is left out.

Submodules are registered under the layer names as they are, even where a name is also a method of a
module (simplenet's `logits`): reach a layer's tensors through `named_parameters()` or `state_dict()`,
not by attribute. A layer name that torch itself assigns to (`training`, `_parameters`, ...) cannot be a
submodule and is refused, as is a weight name that is also the path to another's (`a.weight` beside a
layer `a.weight` with a bias).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from netdsl.codegen.reference import apply
from netdsl.compiler.training import RECOMPUTE, Group, recompute_runs, training_groups
from netdsl.errors import NetError
from netdsl.ir import Layer, layers
from netdsl.ir.graph import output_names, require_graph
from netdsl.ir.ops import OPS, layer_tensors
from netdsl.runtime.arrays import from_numpy
from netdsl.runtime.devices import map_devices
from netdsl.runtime.weights import checked_weights, init_weights, weight_specs

DTYPES = (torch.float32, torch.float64)
BACKENDS = ("torch", "triton")
# Names a module's own code assigns to after construction or keeps its state under.
RESERVED = frozenset(vars(torch.nn.Module())) | {"_netdsl"}


@dataclass
class _Plan:
    """What forward needs, set once: the layers in order and where each one's tensors live."""

    name: str  # the net's
    layers: list[Layer]
    groups: list[Group]  # what runs as one: a layer each with the torch backend, a training kernel's with triton
    spent: list[tuple[str, ...]]  # per group: the values no later group reads (dropped after it ran)
    scopes: dict[str, torch.nn.Module]  # layer name -> the submodule holding its tensors
    tensors: dict[str, tuple[str, ...]]  # layer name -> its tensor names (parameters, then buffers)
    placed: dict[str, torch.device]  # logical device -> the torch device it was mapped to
    anchors: dict[str, tuple[str, str]]  # logical device -> (layer, tensor) whose device it follows
    inputs: dict[str, tuple[int, ...]]  # input layer -> per-image shape
    outputs: list[str]
    output_names: dict[str, str]  # output layer -> what `forward` calls it (netdsl.ir.graph.output_names)
    softmax_output: bool
    tf32: bool | None
    precision: str  # the triton backend's dots: "tf32" with tf32, else exact ("ieee")
    kernels: Callable | None  # netdsl.runtime.kernel_ops.run_group with the triton backend (it imports Triton)
    backward: dict[str, str]  # conv or fc layer -> whose backward it runs with the triton backend: netdsl or torch
    segments: list[tuple[int, ...]]  # group indices run (and, with several, recomputed) as one while training
    recomputing: bool = False  # set while a segment runs again in the backward pass


class Scope(torch.nn.Module):
    """A node of the name tree: the tensors of the layer with this name and the scopes below it."""


class GraphModule(torch.nn.Module):
    """A net's layer graph as a trainable module: `module(x)` -> its outputs, as `Net` returns them.

    `graph`: a shaped layer graph (`netdsl.load_graph`); `devices`: logical device name -> torch device
    (or one device for all; default the CPU); `weights`: name -> array or tensor (default
    `init_weights(graph, seed, init)`), copied; `dtype`: float32 or float64 parameters (bf16 and fp16
    come from autocast around a float32 module); `tf32`: None leaves torch's TF32 switches as they are
    (cuDNN convolutions on a GPU use TF32 by default), a bool sets them for the forward pass (False:
    exact float32 products, as `Net` in fp32; the backward pass always follows torch's own switches).
    `backend`: "torch" runs every layer with PyTorch; "triton" runs netdsl's own kernels, forward and
    backward (netdsl.runtime.kernel_ops), grouped as netdsl.compiler.training groups them, in float32;
    `backward`: with it, conv or fc layer name -> "netdsl" (the default) or "torch" (PyTorch's backward:
    cuDNN and cuBLAS on a GPU), as `netdsl.compiler.backward.backward_choices` picks by measurement.
    `recompute`: "none", "cheap" or "all" (above).
    `share`: another GraphModule with the same weights by name and shape (the net for another input size,
    netdsl.runtime.dense), whose parameters and buffers this one holds as they are: the same tensors, neither
    copied nor checked again, on the same devices (`weights`, `seed`, `init`, `dtype` and `devices` are then
    the shared module's).
    """

    def __init__(
        self,
        graph: nx.DiGraph,
        *,
        devices: Mapping[str, str | torch.device] | str | torch.device | None = None,
        weights: Mapping[str, object] | None = None,
        seed: int = 0,
        init: str = "paper",
        dtype: torch.dtype = torch.float32,
        tf32: bool | None = None,
        backend: str = "torch",
        backward: Mapping[str, str] | None = None,
        recompute: str = "none",
        share: GraphModule | None = None,
    ) -> None:
        super().__init__()
        require_graph(graph)
        if backend not in BACKENDS:
            raise NetError(f"unknown backend `{backend}`", where="backend", hint=f"backends: {', '.join(BACKENDS)}")
        if recompute not in RECOMPUTE:
            raise NetError(f"unknown recompute `{recompute}`", where="recompute", hint=f"one of {', '.join(RECOMPUTE)}")
        if backend == "triton" and dtype != torch.float32:
            raise NetError(
                f"the triton backend trains float32 parameters, not {dtype}",
                where="dtype",
                hint="bf16 and fp16 come from autocast around a float32 module",
            )
        if dtype not in DTYPES:
            raise NetError(
                f"a trainable module holds float32 or float64 parameters, not {dtype}",
                where="dtype",
                hint="train in bf16 or fp16 with torch.autocast around a float32 module",
            )
        items = layers(graph)
        specs = weight_specs(graph)
        _check_names(specs, items)
        if share is not None:
            values = _shared_tensors(share, specs)
        else:
            values = checked_weights(init_weights(graph, seed=seed, scheme=init) if weights is None else weights, specs)
        used = list(dict.fromkeys(item.device for item in items))
        if share is not None:  # its tensors stay where they are
            devices = share.devices
        placed = map_devices(used, devices, declared=graph.graph.get("devices", {}), spread=False)
        outputs = list(graph.graph["outputs"])
        last = graph.nodes[outputs[0]]["layer"] if len(outputs) == 1 else None
        computed = [item for item in items if item.op != "input"]
        if backend == "triton":
            groups = training_groups(graph, computed)
        else:
            groups = [Group("reference", (item,)) for item in computed]
        plan = _Plan(
            name=str(graph.graph.get("name")),
            layers=computed,
            groups=groups,
            spent=_spent(groups, outputs),
            scopes={},
            tensors={},
            placed=placed,
            anchors={},
            inputs={item.name: tuple(item.shape) for item in items if item.op == "input"},
            outputs=outputs,
            output_names=output_names(graph),
            softmax_output=last is not None and last.op == "softmax",
            tf32=tf32,
            precision="tf32" if tf32 else "ieee",
            kernels=_kernel_runner() if backend == "triton" else None,
            backward=_checked_backward(backward or {}, computed),
            segments=recompute_runs(graph, groups, recompute),
        )
        self._netdsl = plan
        # A layer no output reads gets no gradient: its weights are not trained (requires_grad off, so no
        # optimizer, fused or not, decays them and no process waits for their gradients), on either backend.
        reached = set(outputs).union(*(nx.ancestors(graph, name) for name in outputs))
        for item in plan.layers:
            names = tuple(layer_tensors(item))
            if not names:
                continue
            buffers = set(OPS[item.op].buffers(item.params, item.input_shape))
            scope = self._scope(item.name)
            for tensor in names:
                value = values[f"{item.name}.{tensor}"]
                if share is None:
                    value = value.to(device=placed[item.device], dtype=dtype, copy=True)
                if tensor in buffers:
                    scope.register_buffer(tensor, value)
                elif share is not None:  # the shared module's Parameter itself
                    scope.register_parameter(tensor, value)
                else:
                    scope.register_parameter(tensor, torch.nn.Parameter(value, requires_grad=item.name in reached))
            plan.scopes[item.name] = scope
            plan.tensors[item.name] = names
            plan.anchors.setdefault(item.device, (item.name, names[0]))

    def _scope(self, layer_name: str) -> torch.nn.Module:
        """The submodule at the path `layer_name` split on ".", made on first use.

        Children go straight into `_modules`: `add_module` refuses a name that is also an attribute of
        the class (`logits`, `eval`), and such names are fine here, as nothing reads children by attribute."""
        node: torch.nn.Module = self
        for part in layer_name.split("."):
            if part in RESERVED:
                raise NetError(
                    f"layer `{layer_name}` cannot be trained: `{part}` is a name torch.nn.Module keeps for itself",
                    where="graph",
                    hint=f"rename the layer (e.g. `{part.strip('_')}_1`)",
                )
            child = node._modules.get(part)
            if child is None:
                child = node._modules[part] = Scope()
            node = child
        return node

    # --- what the trainer reads -------------------------------------------------------------------

    @property
    def output_is_softmax(self) -> bool:
        """Whether the net's single output is a softmax (then `logits` is that softmax's input)."""
        return self._netdsl.softmax_output

    @property
    def devices(self) -> dict[str, torch.device]:
        """Logical device -> the torch device its layers run on now (where its tensors are: `module.to`
        moves them all)."""
        return {name: self._device(name) for name in self._netdsl.placed}

    def weights(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer by netdsl name, as float32 arrays on the CPU (copies), in the order
        of `weight_specs`: what `save_weights` writes and `Net` loads."""
        found = {}
        for layer_name, tensors in self._netdsl.tensors.items():
            scope = self._netdsl.scopes[layer_name]
            for tensor in tensors:
                value = _tensor(scope, tensor).detach()
                found[f"{layer_name}.{tensor}"] = value.to("cpu", torch.float32, copy=True).numpy()
        return found

    # --- running ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor | np.ndarray | Mapping[str, object]) -> torch.Tensor | dict[str, torch.Tensor]:
        values = self._run(x, logits=False)
        outputs = {self._netdsl.output_names[name]: values[name] for name in self._netdsl.outputs}
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    def logits(self, x: torch.Tensor | np.ndarray | Mapping[str, object]) -> torch.Tensor:
        """The net's single output, or the input of a final softmax (several inputs joined on channels):
        the scores a softmax cross-entropy loss reads."""
        if len(self._netdsl.outputs) != 1:
            raise NetError(
                f"the net has {len(self._netdsl.outputs)} outputs ({', '.join(self._netdsl.output_names.values())}); "
                "a loss on logits needs one",
                where="graph",
                hint="declare one `output` (the class scores) in the .net file",
            )
        return self._run(x, logits=True)[self._netdsl.outputs[0]]

    def trace(self, x: torch.Tensor | np.ndarray | Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Every input's and layer's value by name, in forward order, none freed, the output being the
        logits (as `logits` gives them): for finding the first layer whose values go wrong."""
        return self._run(x, logits=True, keep=True)

    def _run(self, x, logits: bool, keep: bool = False) -> dict[str, torch.Tensor]:
        plan = self._netdsl
        values: dict[str, torch.Tensor] = self._take_inputs(x)
        copies: dict[str, dict[torch.device, torch.Tensor]] = {}  # a value on the other devices that read it
        devices = self.devices
        final = plan.outputs[0] if logits and plan.softmax_output else None
        # Every weight by name, gathered the way torch.compile follows (a tensor reached through the plan's
        # own dicts would be compiled in as a constant, and its gradient lost).
        stored = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        recompute = self.training and not keep and not torch.compiler.is_compiling()
        segments = plan.segments if recompute else [(index,) for index in range(len(plan.groups))]
        with _tf32(plan.tf32):
            for segment in segments:
                item = plan.groups[segment[0]].first
                device = devices[item.device]
                inputs = []
                for source in item.inputs:
                    placed = copies.setdefault(source, {})
                    if device not in placed:
                        placed[device] = values[source].to(device)  # across towers: autograd copies back
                    inputs.append(placed[device])
                if item.name == final:
                    values[item.name] = apply("concat", {}, inputs, {})  # a softmax's input, joined
                    continue
                last = plan.groups[segment[-1]].last.name
                if len(segment) == 1 or not self._records(segment, stored, inputs):
                    values[last] = self._segment(segment, stored, *inputs)
                else:
                    values[last] = checkpoint(
                        self._segment, segment, stored, *inputs, use_reentrant=False, context_fn=self._contexts
                    )
                for name in () if keep else (name for index in segment for name in plan.spent[index]):
                    values.pop(name, None)  # what autograd needs it keeps; the rest can go now
                    copies.pop(name, None)
        return values

    def _segment(self, segment: tuple[int, ...], stored: dict, *inputs: torch.Tensor) -> torch.Tensor:
        """The output of the groups of `segment`, each reading the one before (the first, `inputs`)."""
        values = list(inputs)
        for index in segment:
            group = self._netdsl.groups[index]
            if self.training and group.first.op == "batchnorm":
                _check_batch_statistics(group.first, values)
            values = [self._compute(group, values, stored)]
        return values[0]

    def _records(self, segment: tuple[int, ...], stored: dict, inputs: list[torch.Tensor]) -> bool:
        """Whether autograd records `segment`: an input or a weight of it needs a gradient. A run before the
        first weights is not, and runs once (checkpointed, it would keep its input for nothing)."""
        if any(tensor.requires_grad for tensor in inputs):
            return True
        plan = self._netdsl
        firsts = (plan.groups[index].first.name for index in segment)
        return any(stored[f"{name}.{tensor}"].requires_grad for name in firsts for tensor in plan.tensors.get(name, ()))

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's contexts: none for the forward pass; for the pass again in the backward,
        the forward's TF32 switches and `recomputing` set."""
        return contextlib.nullcontext(), self._again()

    @contextlib.contextmanager
    def _again(self):
        self._netdsl.recomputing = True
        try:
            with _tf32(self._netdsl.tf32):
                yield
        finally:
            self._netdsl.recomputing = False

    def _compute(self, group: Group, inputs: list[torch.Tensor], stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """One group's output: PyTorch's for a layer of its own, else netdsl's training kernel."""
        item = group.first
        tensors = {name: stored[f"{item.name}.{name}"] for name in self._netdsl.tensors.get(item.name, ())}
        if self._netdsl.recomputing:  # running statistics were updated by the forward pass: update copies now
            tensors = {name: v if isinstance(v, torch.nn.Parameter) else v.clone() for name, v in tensors.items()}
        if group.kind == "reference" or (not self.training and group.kind in ("batch_norm", "dropout")):
            return apply(item.op, item.params, inputs, tensors, training=self.training)
        backward = self._netdsl.backward.get(item.name, "netdsl")
        return self._netdsl.kernels(group, inputs, tensors, self.training, self._netdsl.precision, backward)

    def _device(self, logical: str) -> torch.device:
        anchor = self._netdsl.anchors.get(logical)
        if anchor is None:  # a device with no tensors of its own stays where it was mapped
            return self._netdsl.placed[logical]
        layer_name, tensor = anchor
        return _tensor(self._netdsl.scopes[layer_name], tensor).device

    def _dtype(self) -> torch.dtype | None:
        first = next(iter(self._netdsl.tensors.items()), None)
        return None if first is None else _tensor(self._netdsl.scopes[first[0]], first[1][0]).dtype

    def _take_inputs(self, x) -> dict[str, torch.Tensor]:
        names = list(self._netdsl.inputs)
        if isinstance(x, Mapping):
            unknown = [name for name in x if name not in self._netdsl.inputs]
            missing = [name for name in names if name not in x]
            if unknown or missing:
                what = f"the net has no input `{unknown[0]}`" if unknown else f"input `{missing[0]}` is missing"
                raise NetError(what, where="inputs", hint=f"inputs: {', '.join(names)}")
            given = dict(x)
        elif len(names) == 1:
            given = {names[0]: x}
        else:
            raise NetError(
                f"the net has {len(names)} inputs: pass a dict of them",
                where="inputs",
                hint=f"inputs: {', '.join(names)}",
            )
        dtype = self._dtype()
        taken = {}
        for name in names:
            value = given[name]
            if isinstance(value, np.ndarray):
                value = from_numpy(value)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                what = type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype
                raise NetError(
                    f"input `{name}` must be a floating-point tensor, got {what}",
                    where="inputs",
                    hint="give float32, float16 or bfloat16 images: x.float()",
                )
            shape = self._netdsl.inputs[name]
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
                raise NetError(
                    f"input `{name}` has shape {_fmt(value.shape)}, expected N x {_fmt(shape)}",
                    where="inputs",
                    hint=f"the net reads N x {_fmt(shape)}, N >= 1 images",
                )
            taken[name] = value if dtype is None else value.to(dtype)
        return taken

    def extra_repr(self) -> str:
        devices = ", ".join(f"{name}->{device}" for name, device in self.devices.items())
        return f"net {self._netdsl.name}, devices: {devices}"


# --- helpers --------------------------------------------------------------------------------------


def _tensor(scope: torch.nn.Module, name: str) -> torch.Tensor:
    """A scope's parameter or buffer, looked up each time: `module.to()` replaces buffers."""
    found = scope._parameters.get(name)
    return found if found is not None else scope._buffers[name]


def _kernel_runner() -> Callable:
    from netdsl.runtime.kernel_ops import run_group

    return run_group


def _checked_backward(choices: Mapping[str, str], computed: list[Layer]) -> dict[str, str]:
    weighted = {item.name for item in computed if item.op in ("conv", "fc")}
    for name, implementation in choices.items():
        if name not in weighted:
            raise NetError(f"`{name}` is not a conv or fc layer of the net", where="backward",
                           hint="choose a backward for conv and fc layers only")  # fmt: skip
        if implementation not in ("netdsl", "torch"):
            raise NetError(f"unknown backward `{implementation}` for `{name}`", where="backward",
                           hint="netdsl or torch")  # fmt: skip
    return dict(choices)


def _spent(groups: list[Group], outputs: list[str]) -> list[tuple[str, ...]]:
    last_reader = {name: index for index, group in enumerate(groups) for name in group.first.inputs}
    spent: list[list[str]] = [[] for _ in groups]
    for name, index in last_reader.items():
        if name not in outputs:
            spent[index].append(name)
    return [tuple(names) for names in spent]


def _shared_tensors(share: GraphModule, specs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """`share`'s parameters and buffers by weight name, which must be those of `specs`, in their shapes."""
    if not isinstance(share, GraphModule):
        raise NetError(f"share must be a GraphModule, got {type(share).__name__}", where="share",
                       hint="give the module whose weights this one holds too")  # fmt: skip
    tensors = {**dict(share.named_parameters()), **dict(share.named_buffers())}
    differ = [name for name, shape in specs.items() if name not in tensors or tuple(tensors[name].shape) != shape]
    differ += [name for name in tensors if name not in specs]
    if differ:
        raise NetError(
            f"the module shared does not hold this net's weights: `{differ[0]}` differs",
            where="share",
            hint="share a module of the same net (the same layers and weights, for another input size)",
        )
    return tensors


def _check_names(specs: dict[str, tuple[int, ...]], items: list[Layer]) -> None:
    """Every weight name must be a leaf of the name tree: none may also be the path to another one."""
    owner = {f"{item.name}.{tensor}": item.name for item in items for tensor in layer_tensors(item)}
    for name in specs:
        parts = name.split(".")
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end])
            if prefix in specs:
                raise NetError(
                    f"layer `{owner[name]}`'s tensor `{name}` lies under layer `{owner[prefix]}`'s tensor `{prefix}`: "
                    "torch cannot hold both",
                    where="graph",
                    hint=f"rename layer `{owner[name]}`",
                )


def _check_batch_statistics(item: Layer, inputs: list[torch.Tensor]) -> None:
    per_channel = inputs[0].shape[0] * (inputs[0][0, 0].numel() if inputs[0].dim() > 2 else 1)
    if per_channel < 2:
        raise NetError(
            f"batch norm `{item.name}` needs more than one value per channel to train, "
            f"got a batch of {inputs[0].shape[0]}",
            where="batch",
            hint="train with a batch of 2 or more",
        )


@contextlib.contextmanager
def _tf32(enabled: bool | None):
    if enabled is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _fmt(shape) -> str:
    return " x ".join(str(int(n)) for n in shape) or "scalar"
