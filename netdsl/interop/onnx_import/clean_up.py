"""Clean-ups of the converted layers, so the net reads as a person would write it: a constant Add after a conv or
fc becomes its bias, per-channel arithmetic folds into the conv or fc before it (or becomes a batchnorm), an fc's
Flatten disappears (fc flattens itself), identical weightless layers are merged, unused layers dropped.
"""

from __future__ import annotations

import numpy as np

from netdsl.interop.onnx_import.layers import LayerGraph, channel_vector, fmt, frozen
from netdsl.interop.onnx_import.names import is_name, tower_base
from netdsl.interop.onnx_import.read import shown


def clean_up(net: LayerGraph, towers: bool = False) -> None:
    """`towers`: keep the tower copies of layers apart (for --towers, which writes them once per tower)."""
    net.drop_unused()  # dangling nodes must not keep a conv from taking its bias
    fold_biases(net)
    lower_affines(net)
    join_flat_concats(net)
    drop_flattens_before_fc(net)
    merge_duplicates(net, towers)
    net.drop_unused()
    name_outputs(net)


def fold_biases(net: LayerGraph) -> None:
    """A constant Add right after a conv or an fc (read by nothing else) is that layer's bias; any
    other per-channel constant Add becomes an `_affine` (see lower_affines)."""
    for key in sorted(k for k, layer in net.layers.items() if layer.op == "_bias"):
        add = net.layers[key]
        source = net.layers[add.inputs[0]]
        readers = net.readers()
        value = np.asarray(add.constant, dtype=np.float32)
        channels = source.shape[0]
        vector = channel_vector(value, source.shape)
        if vector is not None and (
            source.op not in ("conv", "fc") or readers[source.key] != [key] or source.key in net.output_keys()
        ):
            add.op, add.scale, add.shift = "_affine", np.ones_like(vector), vector
            continue
        if vector is None:
            raise net.fail(
                f"{add.where}: adds a constant of shape {fmt(value.shape)} to N x {fmt(source.shape)}; netdsl "
                "reads a constant added to activations only as one number or one per channel"
            )
        old = source.weights.get("bias", np.zeros(channels, np.float32))
        source.weights["bias"] = (old.astype(np.float64) + vector).astype(np.float32)
        source.params["bias"] = True
        source.name = add.name
        net.replace(key, source.key)
        del net.layers[key]


def lower_affines(net: LayerGraph) -> None:
    """Per-channel x * scale + shift: runs of them composed into one, then folded into the conv or
    fc right before (read by nothing else), else written as batchnorm(eps=0) with mean 0, var 1."""
    for key in sorted(k for k, layer in net.layers.items() if layer.op == "_affine"):
        affine = net.layers[key]
        source = net.layers[affine.inputs[0]]
        alone = net.readers()[source.key] == [key] and source.key not in net.output_keys()
        if source.op == "_affine" and alone:  # scale2 * (scale1 * x + shift1) + shift2
            affine.scale, affine.shift = source.scale * affine.scale, source.shift * affine.scale + affine.shift
            affine.inputs = list(source.inputs)
            del net.layers[source.key]
    for key in sorted(k for k, layer in net.layers.items() if layer.op == "_affine"):
        affine = net.layers[key]
        source = net.layers[affine.inputs[0]]
        alone = net.readers()[source.key] == [key] and source.key not in net.output_keys()
        if source.op in ("conv", "fc") and alone:
            weight = source.weights["weight"].astype(np.float64)
            bias = source.weights.get("bias", np.zeros(weight.shape[0])).astype(np.float64)
            scale = affine.scale.reshape(-1, *([1] * (weight.ndim - 1)))
            source.weights["weight"] = (weight * scale).astype(np.float32)
            source.weights["bias"] = (bias * affine.scale + affine.shift).astype(np.float32)
            source.params["bias"] = True
            source.name = affine.name
            net.replace(key, source.key)
            del net.layers[key]
            continue
        channels = affine.scale.size
        affine.op, affine.params = "batchnorm", {"eps": 0.0}
        affine.weights = {
            "weight": affine.scale.astype(np.float32),
            "bias": affine.shift.astype(np.float32),
            "running_mean": np.zeros(channels, np.float32),
            "running_var": np.ones(channels, np.float32),
        }


def join_flat_concats(net: LayerGraph) -> None:
    """concat(flatten(a), flatten(b)) of maps of one size is flatten(concat(a, b)): what an fc
    reading several maps is exported as; netdsl's fc then reads the joined map itself."""
    for key in sorted(k for k, layer in net.layers.items() if layer.op == "concat"):
        join = net.layers[key]
        readers = net.readers()
        flats = [net.layers[k] for k in join.inputs]
        if len(join.shape) != 1 or any(
            f.op != "flatten" or readers[f.key] != [key] or f.key in net.output_keys() for f in flats
        ):
            continue
        maps = [net.layers[f.inputs[0]] for f in flats]
        if len({m.shape[1:] for m in maps}) != 1:
            continue
        inner = net.add_layer(join.name, "concat", {}, [m.key for m in maps], join.where)
        net.layers[inner].order = join.order - 0.5
        join.op, join.inputs, join.name = "flatten", [inner], join.name + "/flat"
        for f in flats:
            del net.layers[f.key]


def drop_flattens_before_fc(net: LayerGraph) -> None:
    outputs = net.output_keys()
    readers = net.readers()
    for key in sorted(k for k, layer in net.layers.items() if layer.op == "flatten"):
        if key in outputs or not readers[key] or any(net.layers[r].op != "fc" for r in readers[key]):
            continue
        net.replace(key, net.layers[key].inputs[0])
        del net.layers[key]
        readers = net.readers()


def merge_duplicates(net: LayerGraph, towers: bool = False) -> None:
    """Layers without weights that compute the same thing from the same inputs are one layer; with `towers`,
    not the copies of a layer that `netdsl export` wrote for each tower (`pool_gpu0`, `pool_gpu1`), which --towers
    writes once per tower, only their joins (the Concat in front of each tower's copy of a layer reading `all x`)."""
    changed = True
    while changed:
        changed = False
        seen: dict[tuple, int] = {}
        outputs = net.output_keys()
        for key in sorted(net.layers, key=lambda k: net.layers[k].order):
            layer = net.layers[key]
            if layer.op == "input" or layer.weights or key in outputs:
                continue
            signature = (layer.op, frozen(layer.params), tuple(layer.inputs))
            if signature in seen and towers and layer.op != "concat":
                ends = tower_base([net.layers[seen[signature]].name, layer.name])[1]
                if ends is not None and all(is_name(end) for end in ends) and ends[0] != ends[1]:
                    continue
            if signature in seen:
                net.replace(key, seen[signature])
                del net.layers[key]
                changed = True
            else:
                seen[signature] = key


def name_outputs(net: LayerGraph) -> None:
    """An output that is an alias of a layer (Identity, Dropout) gives the layer its name."""
    seen: dict[int, str] = {}
    outputs = []
    own = {name for name, key in net.outputs if net.layers[key].name == name}
    for name, key in net.outputs:
        if key in seen:
            net.notes.append(
                f"outputs '{shown(seen[key])}' and '{shown(name)}' are the same layer; the net lists it once"
            )
            continue
        layer = net.layers[key]
        if layer.name != name and layer.name not in own:
            layer.name = name
        seen[key] = name
        outputs.append((name, key))
    net.outputs = outputs
