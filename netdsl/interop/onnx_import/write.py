"""Writing the `.net` text: the layers as chains (`a = conv(...) | relu | maxpool(2)`) under readable names,
towers as a `towers` block; then the text is built again with netdsl, to check it and to name the weights.

A layer whose name is what netdsl would call it anyway (`conv1.relu` after `conv1`), or whose name was not a
valid name (and that is not a conv or fc), continues the chain of the layer it reads.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netdsl.errors import NetError
from netdsl.interop.onnx_import.layers import LayerGraph, frozen
from netdsl.interop.onnx_import.names import is_name, sanitize, sanitize_file
from netdsl.interop.onnx_import.read import opset_of
from netdsl.interop.onnx_import.towers import Towers
from netdsl.interop.onnx_metadata import imported_metadata
from netdsl.ir.ops import OPS


@dataclass
class OnnxImport:
    """A model read from ONNX: the `.net` text, its weights (float32, in `weight_specs` order), notes for
    the user (e.g. why --towers could not split the net), the safetensors metadata of the weights (the
    preprocessing record `netdsl export` keeps in the model, under "netdsl.preprocess") and the net's
    inputs with their shapes (C x H x W, or F)."""

    text: str
    weights: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __iter__(self) -> Iterator:  # text, weights = import_onnx(path)
        return iter((self.text, self.weights))


def write(net: LayerGraph, model, path: Path, plan: Towers | None, weights_name: str | None) -> OnnxImport:
    """The `.net` text of `net` (imported from `model` at `path`) and its weights named as netdsl names them.
    `weights_name` is only mentioned in the header comment."""
    from netdsl.lang.frontend import graph_from_text
    from netdsl.runtime.weights import weight_specs

    writer = _Writer(net, plan)
    text, weights = writer.text(path, model.graph.name, opset_of(model), weights_name)
    try:
        graph = graph_from_text(text, file=str(path.with_suffix(".net")))
    except NetError as error:  # a bug here, not in the model
        raise net.fail(
            f"internal error: the imported net does not build: {error.message}", hint="please report this model"
        ) from None
    specs = weight_specs(graph)
    if set(specs) != set(weights) or any(tuple(weights[n].shape) != s for n, s in specs.items()):
        raise net.fail("internal error: the weights do not match the imported net", hint="please report this model")
    return OnnxImport(
        text,
        {name: weights[name] for name in specs},
        list(net.notes),
        metadata=imported_metadata(model),
        inputs={name: tuple(graph.nodes[name]["layer"].shape) for name in graph.graph["inputs"]},
    )


def _number(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)


def _size(value: tuple[int, ...]) -> str:
    """n, (h, w), or padding (top, left, bottom, right)."""
    if len(value) == 2 and value[0] == value[1]:
        return str(value[0])
    return "(" + ", ".join(map(str, value)) + ")"


def _arguments(op: str, params: dict) -> list[str]:
    """The parameters of a layer as written after its input: positional ones, then those that
    differ from netdsl's defaults."""
    p = params
    if op == "conv":
        args = [str(p["filters"]), f"size={_size(p['size'])}"]
        if p["stride"] != (1, 1):
            args.append(f"stride={_size(p['stride'])}")
        if p["pad"] != (0, 0):
            args.append(f"pad={_size(p['pad'])}")
        if p["dilation"] != (1, 1):
            args.append(f"dilation={_size(p['dilation'])}")
        if p["groups"] != 1:
            args.append(f"groups={p['groups']}")
        if not p["bias"]:
            args.append("bias=false")
        return args
    if op == "fc":
        return [str(p["units"])] + ([] if p["bias"] else ["bias=false"])
    if op in ("maxpool", "avgpool"):
        args = [_size(p["size"])]
        if p["stride"] != p["size"]:
            args.append(f"stride={_size(p['stride'])}")
        if p["pad"] != (0, 0):
            args.append(f"pad={_size(p['pad'])}")
        if p.get("dilation", (1, 1)) != (1, 1):
            args.append(f"dilation={_size(p['dilation'])}")
        if p["ceil"]:
            args.append("ceil=true")
        if op == "avgpool" and not p["count_pad"] and p["pad"] != (0, 0):
            args.append("count_pad=false")
        return args
    if op == "lrn":
        args = [
            f"size={p['size']}",
            f"alpha={_number(p['alpha'])}",
            f"beta={_number(p['beta'])}",
            f"k={_number(p['k'])}",
        ]
        return args + ([f"groups={p['groups']}"] if p["groups"] != 1 else [])
    if op == "leaky_relu":
        return [_number(p["slope"])]
    if op == "shuffle":
        return [str(p["groups"])]
    if op == "dropout":
        return [_number(p["rate"])]
    if op == "batchnorm":
        args = [] if p["eps"] == 1e-5 else [f"eps={_number(p['eps'])}"]
        return args + ([] if p.get("momentum", 0.1) == 0.1 else [f"momentum={_number(p['momentum'])}"])
    return []


@dataclass
class _Unit:
    """One statement-level thing: a layer, or a set of tower copies written once."""

    index: int
    members: list[int]  # one layer, or one per tower
    towered: bool
    name: str
    op: str
    params: dict
    refs: list[tuple[str, int, int]] = field(default_factory=list)  # (plain | all | at, unit, tower)


class _Writer:
    """The statements of one net: `units` (a layer, or a set of tower copies written once) in `order`, joined
    into chains; `taken` holds the names given so far, `presets` the `const` words made for chain links."""

    def __init__(self, net: LayerGraph, plan: Towers | None) -> None:
        self.net = net
        self.taken: set[str] = set()
        self.presets: dict[str, tuple[str, tuple]] = {}  # word -> (op, frozen params)
        self.plan = plan or Towers([], [], {}, [])
        tower_of = self.plan.tower_of()
        self.units: list[_Unit] = []
        unit_of: dict[int, int] = {}
        for s, members in enumerate(self.plan.sets):
            first = net.layers[members[0]]
            unit = _Unit(len(self.units), members, True, self.plan.names[s], first.op, first.params)
            for k in members:
                unit_of[k] = unit.index
            self.units.append(unit)
        set_unit = {s: unit_of[m[0]] for s, m in enumerate(self.plan.sets)}
        for key in net.order():
            if key in unit_of or key in self.plan.allref:
                continue
            layer = net.layers[key]
            unit_of[key] = len(self.units)
            self.units.append(_Unit(len(self.units), [key], False, layer.name, layer.op, layer.params))
        for unit in self.units:
            for k in net.layers[unit.members[0]].inputs:
                if k in self.plan.allref:
                    unit.refs.append(("all", set_unit[self.plan.allref[k]], 0))
                elif k in tower_of:
                    unit.refs.append(("plain" if unit.towered else "at", unit_of[k], tower_of[k][1]))
                else:
                    unit.refs.append(("plain", unit_of[k], 0))
        self.output_refs = []
        for _, key in net.outputs:
            if key in tower_of:
                self.output_refs.append(("at", unit_of[key], tower_of[key][1]))
            else:
                self.output_refs.append(("plain", unit_of[key], 0))
        self.order = self.unit_order()

    def unit_order(self) -> list[int]:
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(u.index for u in self.units)
        for unit in self.units:
            graph.add_edges_from((ref[1], unit.index) for ref in unit.refs)
        position = {u.index: min(self.net.layers[k].order for k in u.members) for u in self.units}
        return list(nx.lexicographical_topological_sort(graph, key=lambda u: position[u]))

    def text(
        self, path: Path, model_name: str, opset: int | None, weights_name: str | None
    ) -> tuple[str, dict[str, np.ndarray]]:
        net = self.net
        uses = Counter()
        plain_reader: dict[int, int] = {}
        for unit in self.units:
            for kind, source, _ in unit.refs:
                uses[source] += 1
                if kind == "plain":
                    plain_reader[source] = unit.index
        output_units = {ref[1] for ref in self.output_refs}
        for ref in self.output_refs:
            uses[ref[1]] += 1
        wanted = {u.index: sanitize(u.name, "input" if u.op == "input" else u.op) for u in self.units}
        reserved = set(wanted.values())
        preset_params: dict[str, dict] = {}
        chains: list[list[tuple[_Unit, str]]] = []
        head_name: dict[int, str] = {}
        chain_of: dict[int, int] = {}  # unit -> its chain
        for index in self.order:
            unit = self.units[index]
            if index in chain_of:
                continue
            name = self.unique(wanted[index])
            head_name[index] = name
            chain = [(unit, unit.op)]
            chain_of[index] = len(chains)
            counts = Counter()
            current = unit
            while unit.op != "input":
                nxt = plain_reader.get(current.index)
                if nxt is None or uses[current.index] != 1 or current.index in output_units:
                    break
                follower = self.units[nxt]
                if len(follower.refs) != 1 or follower.towered != current.towered or nxt in chain_of:
                    break
                word = self.chain_word(name, follower, counts, follower.index in output_units, reserved)
                if word is None:
                    break
                if word != follower.op:
                    preset_params[word] = follower.params
                counts[word] += 1
                chain.append((follower, word))
                chain_of[nxt] = len(chains)
                current = follower
            chains.append(chain)
        # The name that reads each chain's result, and every layer's netdsl name (for the weights).
        ref_name: dict[int, str] = {}
        layer_names: dict[int, str] = {}
        for chain in chains:
            head = head_name[chain[0][0].index]
            counts = Counter()
            ref_name[chain[-1][0].index] = head
            for position, (unit, word) in enumerate(chain):
                if position == 0:
                    base = head
                else:
                    counts[word] += 1
                    base = f"{head}.{word}" + (f"_{counts[word]}" if counts[word] > 1 else "")
                for t, key in enumerate(unit.members):
                    layer_names[key] = f"{base}@{self.plan.devices[t]}" if unit.towered else base
        weights = {}
        for key, name in layer_names.items():
            for tensor, value in net.layers[key].weights.items():
                weights[f"{name}.{tensor}"] = np.ascontiguousarray(value, dtype=np.float32)

        def ref(kind: str, unit: int, tower: int) -> str:
            if kind == "all":
                return f"all {ref_name[unit]}"
            if kind == "at":
                return f"{ref_name[unit]}@{self.plan.devices[tower]}"
            return ref_name[unit]

        lines = [f"# Imported from the ONNX model {sanitize_file(path.name)} (opset {opset}) by `netdsl import`."]
        if weights_name is not None:
            lines.append(f"# Weights: {sanitize_file(weights_name)}")
        lines.append(f"net {sanitize(model_name or path.stem, 'imported')}")
        lines.append("")
        statements = []
        for chain in chains:
            unit = chain[0][0]
            head = head_name[unit.index]
            if unit.op == "input":
                dims = " x ".join(str(d) for d in net.layers[unit.members[0]].shape)
                lines.append(f"input {head}: {dims}")
                continue
            first_args = [ref(*r) for r in unit.refs] + _arguments(unit.op, unit.params)
            elements = [f"{unit.op}({', '.join(first_args)})"]
            for follower, word in chain[1:]:
                args = [] if word != follower.op else _arguments(follower.op, follower.params)
                elements.append(f"{word}({', '.join(args)})" if args else word)
            statements.append((unit.towered, head, elements))
        if self.presets:
            lines.append("")
            for word in self.presets:
                op = self.presets[word][0]
                lines.append(f"const {word} = {op}({', '.join(_arguments(op, preset_params[word]))})")
        lines.append("")
        open_towers = False
        for towered, head, elements in statements:
            if towered and not open_towers:
                lines.append(f"towers {', '.join(self.plan.devices)} {{")
                open_towers = True
            elif not towered and open_towers:
                lines.extend(["}", ""])
                open_towers = False
            indent = "    " if towered else ""
            line = f"{indent}{head} = {' | '.join(elements)}"
            if len(line) > 110 and len(elements) > 1:
                line = f"{indent}{head} = {elements[0]}" + "".join(f"\n{indent}    | {e}" for e in elements[1:])
            lines.append(line)
        if open_towers:
            lines.append("}")
        lines.append("")
        lines.append(f"output {', '.join(ref(*r) for r in self.output_refs)}")
        return "\n".join(lines) + "\n", weights

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self.taken or not is_name(candidate):
            n += 1
            candidate = f"{name}_{n}"
        self.taken.add(candidate)
        return candidate

    def chain_word(self, head: str, unit: _Unit, counts: Counter, is_output: bool, reserved: set[str]) -> str | None:
        """The word that continues a chain with `unit` (its layer type or a preset), or None when the
        unit starts a statement of its own (to keep its name)."""
        if unit.op in ("concat", "add", "input", "_bias"):
            return None

        def auto(word: str) -> str:
            return f"{head}.{word}" + (f"_{counts[word] + 1}" if counts[word] else "")

        if unit.name == auto(unit.op):
            return unit.op
        prefix = head + "."
        if unit.name.startswith(prefix):
            word = unit.name[len(prefix) :]
            stem = re.sub(r"_\d+\Z", "", word)
            for candidate in dict.fromkeys((word, stem)):
                if (
                    is_name(candidate)
                    and not re.search(r"_\d+\Z", candidate)
                    and candidate not in OPS
                    and candidate not in reserved
                    and (candidate not in self.taken or candidate in self.presets)
                    and auto(candidate) == unit.name
                    and self.presets.get(candidate, (unit.op, frozen(unit.params))) == (unit.op, frozen(unit.params))
                ):
                    self.presets[candidate] = (unit.op, frozen(unit.params))
                    self.taken.add(candidate)
                    return candidate
        if not is_name(unit.name) and unit.op not in ("conv", "fc") and not is_output:
            return unit.op
        return None
