"""`--towers`: the imported layers written inside a `towers` block, one tower per copy or group.

Two readings are tried in turn: parallel copies of layers (what `netdsl export` writes for a net with towers) are
one layer written once per tower; else the groups of grouped convolutions are split, one tower per group. When
neither fits, the net stays on one device and a note says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from netdsl.interop.onnx_import.layers import Layer, LayerGraph, fmt, frozen
from netdsl.interop.onnx_import.names import is_name, tower_base
from netdsl.interop.onnx_import.read import shown

_PER_CHANNEL = frozenset({"relu", "leaky_relu", "maxpool", "avgpool", "global_avgpool", "batchnorm", "lrn"})


@dataclass
class Towers:
    """Layers written inside `towers`: each set is one layer per tower (in tower order); `allref`
    concats (of a whole set, in order) are written `all x`."""

    devices: list[str]
    sets: list[list[int]]
    allref: dict[int, int]  # concat layer -> set index
    names: list[str]  # each set's name, without the tower

    def tower_of(self) -> dict[int, tuple[int, int]]:
        return {key: (s, t) for s, members in enumerate(self.sets) for t, key in enumerate(members)}


def tower_plan(net: LayerGraph) -> Towers | None:
    """The layers to write inside `towers` (copies or groups, which may rewrite `net`), or None: one device."""
    plan = _find_copies(net, named=True) or _find_copies(net, named=False)
    if plan is not None:
        net.notes.append(f"--towers: {len(plan.sets)} layers written once per tower ({', '.join(plan.devices)})")
    else:
        plan = _split_groups(net)
    if plan is not None:  # `add(all x, ...)` adds the copies up: a join an add reads stays a concat layer
        readers = net.readers()
        for key in [k for k in plan.allref if any(net.layers[r].op == "add" for r in readers.get(k, []))]:
            del plan.allref[key]
    return plan


def _signature(layer: Layer) -> tuple:
    return (
        layer.op,
        frozen(layer.params),
        tuple(sorted((n, w.shape) for n, w in layer.weights.items())),
        layer.shape,
    )


def _find_copies(net: LayerGraph, named: bool) -> Towers | None:
    """Parallel copies of layers, as `netdsl export` writes a net with towers: layers of one kind
    reading the same inputs (or each its own copy of them) form a set, one copy per tower. `named`: layers
    reading the same inputs are copies only when their names say which tower each is in (`conv1_gpu0`,
    `conv1_gpu1`; the same towers as every set before): two layers a net computes twice alike (`a = add(x, x)`,
    `b = add(x, x)`) are not towers when the model names its towers."""
    order = net.order()
    readers = net.readers()
    outputs = net.output_keys()
    tower_of: dict[int, tuple[int, int]] = {}
    allref: dict[int, int] = {}
    sets: list[list[int]] = []
    count: int | None = None
    said: list[str] | None = None  # named: the towers the first set's names say

    def describe(layer: Layer):
        refs, towers = [], set()
        for k in layer.inputs:
            if k in allref:
                refs.append(("all", allref[k]))
            elif k in tower_of:
                s, t = tower_of[k]
                refs.append(("own", s))
                towers.add(t)
            else:
                refs.append(("shared", k))
        if len(towers) > 1:
            return None
        return (_signature(layer), tuple(refs)), (towers.pop() if towers else None)

    for key in order:
        layer = net.layers[key]
        if layer.op == "input" or key in tower_of:
            continue
        if layer.op == "concat" and key not in outputs:
            whole = [tower_of.get(k) for k in layer.inputs]
            if whole and all(whole) and len({s for s, _ in whole}) == 1:
                s = whole[0][0]
                if [t for _, t in whole] == list(range(len(sets[s]))):
                    allref[key] = s
                    continue
        described = describe(layer)
        if described is None:
            continue
        signature, tower = described
        if tower is None:
            source = layer.inputs[0] if layer.inputs else None
            if source is None:
                continue
            members = []
            for r in dict.fromkeys(readers[source]):
                other = net.layers[r]
                if r in tower_of or r in allref or other.op == "input":
                    continue
                found = describe(other)
                if found is not None and found == (signature, None):
                    members.append(r)
            members.sort(key=lambda k: net.layers[k].order)
            if len(members) < 2 or (count is not None and len(members) != count):
                continue
            if named:
                ends = tower_base([net.layers[k].name for k in members])[1]
                if ends is None or len(set(ends)) != len(ends) or said not in (None, ends):
                    continue
                said = ends
        else:
            position = next(i for i, ref in enumerate(signature[1]) if ref[0] == "own")
            s = signature[1][position][1]
            members = []
            for t, copy in enumerate(sets[s]):
                if t == tower:
                    members.append(key)
                    continue
                found = [
                    r
                    for r in dict.fromkeys(readers[copy])
                    if r not in tower_of
                    and net.layers[r].inputs[position : position + 1] == [copy]
                    and describe(net.layers[r]) == (signature, t)
                ]
                if len(found) != 1:
                    break
                members.append(found[0])
            if len(members) != len(sets[s]):
                continue
        count = len(members)
        for t, k in enumerate(members):
            tower_of[k] = (len(sets), t)
        sets.append(members)
    if not sets:
        return None
    names, suffixes = [], []
    for members in sets:
        base, ends = tower_base([net.layers[k].name for k in members])
        names.append(base)
        suffixes.append(ends)
    devices = [f"gpu{t}" for t in range(count)]
    first = suffixes[0]
    if first and all(s == first for s in suffixes) and all(is_name(d) for d in first) and len(set(first)) == count:
        devices = list(first)
    return Towers(devices, sets, allref, names)


def _split_groups(net: LayerGraph) -> Towers | None:
    """Grouped convolutions (all with the same groups g, 2 to 8) split into g towers: each tower
    computes one group's channels. Layers a grouped conv reads are split as far back as needed (a
    conv with groups=1 splits its filters, reading all its input; per-channel layers split along);
    per-channel layers after a split layer are split too; the rest reads `all x`."""
    grouped = [k for k, layer in net.layers.items() if layer.op == "conv" and layer.params["groups"] > 1]
    if not grouped:
        net.notes.append("--towers: no grouped convolutions or parallel layers to split; wrote a one-device net")
        return None
    counts = {net.layers[k].params["groups"] for k in grouped}
    if len(counts) != 1 or not 2 <= min(counts) <= 8:
        listed = ", ".join(str(g) for g in sorted(counts))
        net.notes.append(
            f"--towers: the grouped convolutions have groups {listed}; towers need one count from 2 to 8, "
            "so the net stays on one device"
        )
        return None
    count = counts.pop()
    outputs = net.output_keys()
    split: set[int] = set()
    joins: dict[tuple[int, ...], int] = {}  # the `all x` concats made so far

    def splittable(key: int, need: list[int]) -> str | None:
        """Marks `key` (and what it needs) to split; returns why it cannot be split, or None."""
        if key in split or key in need:
            return None
        layer = net.layers[key]
        p = layer.params
        if key in outputs:
            return f"`{shown(layer.name)}` is an output"
        if layer.op == "input":
            return f"`{shown(layer.name)}` is an input of the net"
        if len(layer.shape) != 3 or layer.shape[0] % count:
            return f"`{shown(layer.name)}` ({fmt(layer.shape)}) cannot be cut into {count} channel groups"
        if layer.op == "conv" and p["groups"] == 1:
            need.append(key)
            return None
        if (layer.op in ("conv", "lrn") and p["groups"] % count == 0) or layer.op in _PER_CHANNEL - {"lrn"}:
            need.append(key)
            return splittable(layer.inputs[0], need)
        return f"`{shown(layer.name)}` ({layer.op}) mixes the channels of the groups"

    for key in sorted(grouped):
        need: list[int] = []
        why = splittable(key, need)
        if why is not None:
            net.notes.append(
                f"--towers: cannot split the groups of `{shown(net.layers[key].name)}`: {why}; "
                "the net stays on one device"
            )
            return None
        split.update(need)
    for key in net.order():
        layer = net.layers[key]
        if key in split or key in outputs or not layer.inputs or layer.inputs[0] not in split:
            continue
        p = layer.params
        if layer.op in _PER_CHANNEL - {"lrn"} or (layer.op == "lrn" and p["groups"] % count == 0):
            split.add(key)
    # Replace each split layer by one copy per tower.
    copies: dict[int, list[int]] = {}
    for key in net.order():
        if key not in split:
            continue
        layer = net.layers[key]
        members = []
        for t in range(count):
            params, weights = dict(layer.params), {}
            part = layer.shape[0] // count
            cut = slice(t * part, (t + 1) * part)
            if layer.op == "conv":
                params["filters"] = part
                params["groups"] = max(1, layer.params["groups"] // count)
            if layer.op == "lrn":
                params["groups"] = layer.params["groups"] // count
            for name, value in layer.weights.items():
                weights[name] = np.ascontiguousarray(value[cut])
            source = layer.inputs[0]
            if source in copies:
                if layer.op == "conv" and layer.params["groups"] == 1:
                    inputs = [_all_of(net, copies[source], joins)]
                else:
                    inputs = [copies[source][t]]
            else:
                inputs = [source]
            copy = net.add_layer(layer.name, layer.op, params, inputs, layer.where, weights)
            net.layers[copy].order = layer.order + (t + 1) / (count + 1) / 2
            members.append(copy)
        copies[key] = members
    for key, members in copies.items():
        joined = _all_of(net, members, joins)
        for other in list(net.layers.values()):
            if other.key not in split and not (other.op == "concat" and other.inputs == members):
                other.inputs = [joined if k == key else k for k in other.inputs]
    for key in split:
        del net.layers[key]
    sets = [copies[k] for k in sorted(copies, key=lambda k: net.layers[copies[k][0]].order)]
    index = {members[0]: i for i, members in enumerate(sets)}
    allref = {}
    for layer in net.layers.values():
        if layer.op == "concat" and layer.inputs and layer.inputs[0] in index:
            s = index[layer.inputs[0]]
            if layer.inputs == sets[s]:
                allref[layer.key] = s
    net.drop_unused()
    devices = [f"gpu{t}" for t in range(count)]
    net.notes.append(f"--towers: {len(sets)} layers split into {count} towers ({', '.join(devices)})")
    return Towers(devices, sets, allref, [net.layers[m[0]].name for m in sets])


def _all_of(net: LayerGraph, members: list[int], joins: dict[tuple[int, ...], int]) -> int:
    """A concat of every tower's copy (written `all x`), made once per set: `joins` holds those made."""
    if tuple(members) not in joins:
        key = net.add_layer(net.layers[members[0]].name + "/all", "concat", {}, list(members), "")
        net.layers[key].order = max(net.layers[m].order for m in members) + 0.01
        joins[tuple(members)] = key
    return joins[tuple(members)]
