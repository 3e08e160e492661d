"""The training program: the passes that turn a shaped layer graph into a whole training step.

    validate -> shapes -> train_groups -> place -> backward -> choose_backward -> plan_training_memory
        -> training_limits

`train_groups` makes one step per training kernel (netdsl.compiler.training), a `loss` step (softmax
cross-entropy on the logits, loss and gradient in one kernel) and nothing for a softmax output (the net
trains on its input). `place` is the inference pipeline's pass: partitions per device, transfers where a
connection crosses devices. `backward` then walks the forward in reverse and gives every step its
backward on the device of its forward:

    <step>_backward     the step's gradients (netdsl's backward kernels, or PyTorch's for `reference`);
                        it reads the gradients its readers' backwards produced, summed where several
    <transfer>_grad     a forward transfer's gradient, copied back to the producer's device
    update_<device>     the fused SGD update of that device's flat parameter buffer, after its last backward

`choose_backward` picks netdsl's or PyTorch's backward for each conv and fc (netdsl.compiler.backward_choice)
and `plan_training_memory` works out what the forward saves for the backward and the peak memory per
device (netdsl.compiler.train_memory); `training_limits` holds each device's peak against its memory (a
`device ... memory` statement or --memory-limit), and where it does not fit says in how many parts
(`accumulate`) the batch would. Each graph is dumpable (`netdsl compile --train --dump-after PASS`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import networkx as nx

from netdsl.compiler.backward_choice import Choice, choose, layer_key, load_table
from netdsl.compiler.passes import Options, Pass, validate
from netdsl.compiler.place import partitions, place
from netdsl.compiler.steps import Step, identifier, launch_order, unique_name
from netdsl.compiler.train_memory import check_training_memory, plan_training_memory, saved_for_backward
from netdsl.compiler.training import RECOMPUTE, recompute_runs, training_groups
from netdsl.errors import NetError
from netdsl.ir import copy_graph, layer, layers
from netdsl.ir.ops import layer_pads, layer_tensors, trained_tensors
from netdsl.ir.shapes import infer_shapes

# The Triton kernels (netdsl.codegen.<module>.<kernel>) each training step launches, forward and backward.
KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "conv2d": (("conv.conv2d_kernel",), ("conv_backward.conv2d_dgrad_kernel", "conv_backward.conv2d_wgrad_kernel",
                                         "conv_backward.conv2d_wgrad_reduce_kernel")),
    "linear": (("fc.linear_kernel",), ("fc_backward.linear_dgrad_kernel", "fc_backward.linear_wgrad_kernel",
                                       "fc_backward.sum_splits_kernel")),
    "lrn_maxpool": (("lrn_pool_backward.lrn_pool_train_kernel",), ("lrn_pool_backward.lrn_pool_backward_kernel",)),
    "maxpool": (("pool_backward.max_pool2d_train_kernel",), ("pool_backward.pool2d_backward_kernel",)),
    "avgpool": (("pool.pool2d_kernel",), ("pool_backward.pool2d_backward_kernel",)),
    "activation": (("elementwise.elementwise_kernel",), ("elementwise_backward.activation_backward_kernel",)),
    "batch_norm": (("batchnorm_train.batchnorm_partials_kernel", "batchnorm_train.batchnorm_forward_kernel"),
                   ("batchnorm_train.batchnorm_partials_kernel", "batchnorm_train.batchnorm_backward_kernel")),
    "dropout": (("dropout.dropout_kernel",), ("dropout.dropout_kernel",)),
    "loss": (("cross_entropy.cross_entropy_kernel", "cross_entropy.fixed_order_mean_kernel"), ()),
    "update": ((), ("optimizer.paper_sgd_kernel",)),
}  # fmt: skip


def train_groups(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    """The shaped layer graph as a program of training steps, one per group, and the loss."""
    outputs = graph.graph["outputs"]
    if len(outputs) != 1:
        raise NetError(
            f"training needs one output, the class scores; the net has {len(outputs)}",
            where=str(graph.graph.get("source") or graph.graph.get("name")),
            hint="declare one `output` in the .net file",
        )
    items = layers(graph)
    final = layer(graph, outputs[0])
    logits = final.inputs if final.op == "softmax" else [final.name]
    computed = [item for item in items if item.op != "input" and not (final.op == "softmax" and item is final)]
    program = nx.DiGraph()
    program.graph.update(graph.graph)
    taken: set[str] = set()
    made: dict[str, str] = {}  # layer name -> the step that computes it
    for item in items:
        if item.op == "input":
            name = unique_name(identifier(f"{item.name}_input"), taken)
            program.add_node(name, step=Step(name, "input", [item], [], item.device, item.shape))
            made[item.name] = name
    groups = training_groups(graph, computed)
    names: list[str] = []  # each group's step
    for group in groups:
        kind = group.kind
        if kind == "pool":
            kind = group.first.op
        forward, _ = KERNELS.get(kind, ((), ()))
        base, ops = identifier(group.first.name), "_".join(item.op for item in group.layers)
        name = unique_name(base if base.endswith(ops) else f"{base}_{ops}", taken)
        options_ = {**group.options, "forward_kernels": list(forward) or ["PyTorch"]}
        inputs = [made[source] for source in group.first.inputs]
        step = Step(name, kind, list(group.layers), inputs, group.first.device, group.last.shape, options_)
        program.add_node(name, step=step)
        program.add_edges_from((source, name) for source in dict.fromkeys(inputs))
        for item in group.layers:
            made[item.name] = name
        names.append(name)
    # the runs the backward pass computes again (`recompute`), by step: what train_memory plans for each setting
    program.graph["recompute"] = options.recompute
    program.graph["runs"] = {
        mode: [[names[index] for index in run] for run in recompute_runs(graph, groups, mode) if len(run) > 1]
        for mode in RECOMPUTE[1:]
    }
    sources = [made[name] for name in logits]
    scores = program.nodes[sources[0]]["step"]
    loss = unique_name("loss", taken)
    classes = sum(math.prod(program.nodes[s]["step"].shape) for s in sources)  # the logits, flattened
    program.add_node(
        loss,
        step=Step(loss, "loss", [final], sources, scores.device, (1,),
                  {"classes": classes, "forward_kernels": list(KERNELS["loss"][0])}),
    )  # fmt: skip
    program.add_edges_from((source, loss) for source in sources)
    program.graph["outputs"] = [loss]
    program.graph["training"] = True
    return program


def backward(program: nx.DiGraph, options: Options) -> nx.DiGraph:
    """A backward step for every forward step that needs one, in reverse order on the forward's device;
    a gradient transfer for every forward transfer; one update per device holding parameters."""
    result = copy_graph(program)
    taken = set(program.nodes)
    forward_order = [name for names in program.graph["partitions"].values() for name in names]
    order = launch_order(program)
    gradient_of: dict[str, str] = {}  # forward step -> the step that produces the gradient of its output
    needs_grad = _needs_gradient(program, order)
    for name in reversed(order):
        step: Step = program.nodes[name]["step"]
        if step.kind == "input" or not needs_grad[name]:
            continue
        contributions = [gradient_of[reader] for reader in program.successors(name) if reader in gradient_of]
        if step.kind == "loss":
            gradient_of[name] = name  # the loss kernel writes the logits' gradient with the loss
            continue
        if not contributions:  # the loss does not read it (a dangling layer): no gradient, not trained
            continue
        if step.kind == "transfer":
            back = Step(
                unique_name(identifier(f"{name}_grad"), taken), "transfer", step.layers, contributions,
                step.options["source_device"], step.shape, {"source_device": step.device, "gradient": True},
            )  # fmt: skip
        else:
            _, kernels = KERNELS.get(step.kind, ((), ()))
            back = Step(
                unique_name(identifier(f"{name}_backward"), taken), "backward", step.layers, contributions,
                step.device, step.first.input_shape or step.shape,
                {
                    "forward": name,
                    "forward_kind": step.kind,
                    "kernels": list(kernels) or [f"PyTorch autograd ({step.first.op})"],
                    "input_gradient": any(needs_grad[source] for source in step.inputs),
                    "sums": len(contributions),
                    "parameters": sorted(
                        f"{item.name}.{tensor}" for item in step.layers for tensor in trained_tensors(item)
                    ),
                },
            )  # fmt: skip
        result.add_node(back.name, step=back)
        result.add_edges_from((source, back.name) for source in dict.fromkeys(contributions))
        if back.kind == "backward":
            result.add_edge(name, back.name)  # it reads what its forward saved
        gradient_of[name] = back.name
    for device, names in program.graph["partitions"].items():
        trained = [
            gradient_of[name] for name in names
            if name in gradient_of and result.nodes[gradient_of[name]]["step"].options.get("parameters")
        ]  # fmt: skip
        if not trained:
            continue
        update = Step(
            unique_name(identifier(f"update_{device}"), taken), "update", [], trained, device, (0,),
            {"kernels": list(KERNELS["update"][1]), "parameters": sum(
                len(result.nodes[t]["step"].options["parameters"]) for t in trained)},
        )  # fmt: skip
        result.add_node(update.name, step=update)
        result.add_edges_from((t, update.name) for t in trained)
    result.graph["partitions"] = partitions(result)
    result.graph["forward_steps"] = forward_order
    return result


def choose_backward(program: nx.DiGraph, options: Options) -> nx.DiGraph:
    """For each conv's and fc's backward, netdsl's kernels or PyTorch's, from the shipped measurements."""
    result = copy_graph(program)
    table = load_table()
    for name in result.nodes:
        step: Step = result.nodes[name]["step"]
        if step.kind != "backward" or step.options["forward_kind"] not in ("conv2d", "linear"):
            continue
        kind = step.options["forward_kind"]
        choice = choose(kind, backward_key(step.first), options.dtype, options.batch, table)
        result.nodes[name]["step"] = replace(
            step, options={**step.options, "implementation": choice.implementation, "chosen_by": choice.reason}
        )
    return result


def backward_choices(graph: nx.DiGraph, batch: int, dtype: str, table: list | None = None) -> dict[str, Choice]:
    """Each conv and fc layer of a shaped layer graph -> whose backward it runs at this batch and dtype."""
    table = load_table() if table is None else table
    kinds = {"conv": "conv2d", "fc": "linear"}
    return {
        item.name: choose(kinds[item.op], backward_key(item), dtype, batch, table)
        for item in layers(graph)
        if item.op in kinds
    }


def backward_key(item) -> str:
    """The choice table's key for a conv or fc layer (netdsl.compiler.backward_choice.layer_key)."""
    weight = layer_tensors(item)["weight"]
    if item.op == "fc":
        return layer_key((math.prod(item.input_shape),), weight)
    p = item.params
    pads = layer_pads(p, tuple(item.input_shape[1:]))
    return layer_key(tuple(item.input_shape), weight, p["stride"], pads, p["dilation"], p["groups"])


def _needs_gradient(program: nx.DiGraph, order: list[str]) -> dict[str, bool]:
    """A step needs a backward when something at or before it holds parameters: the gradient has to
    reach those. Steps that only read the images need none."""
    needs: dict[str, bool] = {}
    for name in order:
        step: Step = program.nodes[name]["step"]
        own = any(trained_tensors(item) for item in step.layers) if step.kind not in ("input", "transfer") else False
        needs[name] = own or any(needs[source] for source in step.inputs)
    return needs


TRAINING_PIPELINE: list[Pass] = [
    Pass("validate", validate, "check the graph's structure"),
    Pass("shapes", lambda g, o: infer_shapes(g), "infer every layer's output shape"),
    Pass("train_groups", train_groups, "group layers into training kernels; add the loss"),
    Pass("place", lambda g, o: place(g), "partition by device, insert transfers"),
    Pass("backward", backward, "a backward step per forward step, gradient transfers, one update per device"),
    Pass("choose_backward", choose_backward, "netdsl's or PyTorch's backward per conv and fc, by measurement"),
    Pass("plan_training_memory", lambda g, o: plan_training_memory(g, o.batch, o.dtype),
         "what the forward saves, liveness over both passes, peak memory per device"),
    Pass("training_limits", lambda g, o: check_training_memory(g, o.batch, o.dtype, o.memory_limit),
         "each device's peak against its memory limit (over it: in how many parts the batch fits)"),
]  # fmt: skip
TRAINING_PASS_NAMES = [p.name for p in TRAINING_PIPELINE]

__all__ = ["TRAINING_PASS_NAMES", "TRAINING_PIPELINE", "backward", "run_training_passes", "saved_for_backward"]


def run_training_passes(graph: nx.DiGraph, options: Options) -> dict[str, nx.DiGraph]:
    """Every training pass; the graph after each, by name (as `netdsl.compiler.passes.run_passes`)."""
    after = {}
    for step in TRAINING_PIPELINE:
        graph = after[step.name] = step.run(graph, options)
    return after
