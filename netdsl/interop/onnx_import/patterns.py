"""Subgraphs that exporters write for one layer, read back as that layer before an ONNX model is imported.

PyTorch has no ONNX symbol for `local_response_norm`: `torch.onnx.export` traces its Python body,

    div = x * x
    div = div.view(N, 1, C, H, W) | pad channels by (size // 2, (size - 1) // 2) | avg_pool3d((size, 1, 1))
    div = div.squeeze(1).view(N, C, H, W)
    y = x / (div * alpha + k) ** beta

and writes some forty nodes (Shape, Gather, Reshape, Pad, AveragePool, If, ...). `fold_torch_lrn`
finds each such subgraph by its two ends — `Mul(x, x)` and `Div(x, Pow(Add(Mul(., alpha), k), beta))` —
with exactly one AveragePool between them, whose window along the channels is `size`, and replaces it
by one ONNX `LRN(size, alpha, beta, bias=k)`: the average over the window is ONNX's `alpha / size *
sum`. Only odd sizes are exact: for an even size PyTorch's window sits one channel lower than ONNX's
(and netdsl's), so that is an error. Nodes left computing nothing (the shape arithmetic) are removed.
Nothing is evaluated but scalar constants.
"""

from __future__ import annotations

import numpy as np

from netdsl.errors import NetError


def _scalar_constants(graph) -> dict[str, float]:
    """Names of one-element constants (initializers and Constant nodes) -> their value."""
    from onnx import numpy_helper

    def scalar(tensor) -> float | None:
        try:
            values = numpy_helper.to_array(tensor).reshape(-1)
        except (TypeError, ValueError, KeyError):  # a damaged tensor: the checker reports it later
            return None
        return float(values[0]) if values.size == 1 and values.dtype.kind in "fiu" else None

    found = {}
    for tensor in graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) == 1 and (value := scalar(tensor)) is not None:
            found[tensor.name] = value
    for node in graph.node:
        if node.op_type != "Constant" or len(node.output) != 1:
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and (value := scalar(attribute.t)) is not None:
                found[node.output[0]] = value
            elif attribute.name == "value_float":
                found[node.output[0]] = float(attribute.f)
    return found


def _split_constant(node, constants: dict[str, float]) -> tuple[str, float] | None:
    """For a two-input node with one scalar constant input: (the other input, the constant)."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    if b in constants and a not in constants:
        return a, constants[b]
    if a in constants and b not in constants and node.op_type in ("Mul", "Add"):
        return b, constants[a]
    return None


def fold_torch_lrn(model, where: str) -> int:
    """Rewrites every PyTorch LRN subgraph of `model.graph` as one LRN node; returns how many."""
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    outputs = {value.name for value in graph.output}
    constants = _scalar_constants(graph)

    def made_by(name: str, op: str) -> int | None:
        index = producer.get(name)
        return index if index is not None and nodes[index].op_type == op else None

    removed: set[int] = set()
    replacements: dict[int, object] = {}
    for div_index, div in enumerate(nodes):
        if div.op_type != "Div" or len(div.input) != 2:
            continue
        x, denominator = div.input
        pow_index = made_by(denominator, "Pow")
        if pow_index is None or nodes[pow_index].input[1] not in constants:
            continue
        beta = constants[nodes[pow_index].input[1]]
        add_index = made_by(nodes[pow_index].input[0], "Add")
        add = _split_constant(nodes[add_index], constants) if add_index is not None else None
        if add is None:
            continue
        mul_index = made_by(add[0], "Mul")
        mul = _split_constant(nodes[mul_index], constants) if mul_index is not None else None
        if mul is None:
            continue
        (averaged, alpha), k = mul, add[1]

        # The region: the nodes on some path from the square x * x to `averaged`.
        ancestors, stack = set(), [averaged]
        while stack:
            index = producer.get(stack.pop())
            if index is None or index in ancestors:
                continue
            ancestors.add(index)
            stack.extend(nodes[index].input)
        squares = [i for i in ancestors if nodes[i].op_type == "Mul" and list(nodes[i].input) == [x, x]]
        if len(squares) != 1:
            continue
        square = squares[0]
        region, stack = {square}, [square]
        while stack:
            for name in nodes[stack.pop()].output:
                for reader in consumers.get(name, []):
                    if reader in ancestors and reader not in region:
                        region.add(reader)
                        stack.append(reader)
        pools = [i for i in region if nodes[i].op_type == "AveragePool"]
        if len(pools) != 1:
            continue
        kernel = next((list(a.ints) for a in nodes[pools[0]].attribute if a.name == "kernel_shape"), [])
        if not kernel or any(extent != 1 for extent in kernel[1:]):
            continue
        region |= {mul_index, add_index, pow_index}
        # Nothing in the region may be read from outside it (or be an output of the model).
        inner = region | {div_index}
        if any(
            name in outputs or any(reader not in inner for reader in consumers.get(name, []))
            for index in region
            for name in nodes[index].output
        ):
            continue
        size = kernel[0]
        if size % 2 == 0:
            raise NetError(
                f"{div.name or 'a Div node'}: PyTorch's LocalResponseNorm with an even size ({size}) centres its "
                "window one channel lower than ONNX's LRN and netdsl's lrn",
                where=where,
                hint="use an odd size, or write the net in netdsl with lrn(size=...) and load the weights",
            )
        removed |= region
        replacements[div_index] = helper.make_node(
            "LRN", [x], [div.output[0]], name=div.name or f"lrn_{div_index}",
            size=int(size), alpha=float(alpha), beta=float(beta), bias=float(k),
        )  # fmt: skip

    if not replacements:
        return 0
    kept = [replacements.get(i, node) for i, node in enumerate(nodes) if i not in removed]
    # Drop what now computes nothing: the shape arithmetic the subgraphs used.
    while True:
        read = {name for node in kept for name in node.input} | outputs
        alive = [node for node in kept if any(name in read for name in node.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del graph.node[:]
    graph.node.extend(kept)
    return len(replacements)
