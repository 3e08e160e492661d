"""A net's stored tensors: their names and shapes, deterministic initial values, safetensors files.

Every tensor is named `<layer name>.<tensor name>`, e.g. `conv1@gpu0.weight`, `fc8.bias`,
`s1.batchnorm.running_var` (docs/weights.md). Tower copies keep their `@tower` suffix, so a two-tower
net stores each tower's half of a layer as its own tensors. Values are float32 numpy arrays in the
layouts of netdsl/ir/ops.py: conv weight (F, C/groups, KH, KW), fc weight (units, inputs), per-channel
vectors (C,).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import networkx as nx
import numpy as np

from netdsl.compiler.fold import fold_inference
from netdsl.errors import NetError, did_you_mean, os_hint
from netdsl.files import new_temporary, sort_safetensors_header
from netdsl.ir import layer, layers
from netdsl.ir.graph import require_graph
from netdsl.ir.ops import layer_tensors, shuffle_sources
from netdsl.tables import format_shape

Shape = tuple[int, ...]

SCHEMES = ("paper", "he")
# The layers the AlexNet paper starts with bias 1 ("the second, fourth, and fifth convolutional layers,
# as well as in the fully-connected hidden layers"); only for the nets that are that net.
PAPER_BIAS_ONE = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})
PAPER_NETS = frozenset({"alexnet", "alexnet_1gpu"})
PAPER_STD = 0.01

# safetensors dtype codes accepted on load (all converted to float32), and their numpy types.
_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": None}
_SHOWN = 5  # names listed in an error before "and N more"


# --- names and shapes ------------------------------------------------------------------------------


def weight_specs(graph: nx.DiGraph) -> dict[str, Shape]:
    """Every stored tensor of the net (learned weights, then buffers, per layer), in layer order."""
    specs: dict[str, Shape] = {}
    for item in layers(require_graph(graph)):
        for tensor, shape in layer_tensors(item).items():
            name = f"{item.name}.{tensor}"
            if name in specs:  # cannot happen with the language's names; guards a future op's tensor names
                raise NetError(
                    f"two tensors of the net are both named `{name}`",
                    span=item.span,
                    hint="rename one of the layers: a weight is named after its layer (`conv1.weight`)",
                )
            specs[name] = tuple(int(d) for d in shape)
    return specs


def base_name(name: str) -> str:
    """A layer's name without its `@tower` suffix: `conv2@gpu1` -> `conv2`."""
    return name.rsplit("@", 1)[0] if "@" in name else name


# --- initial values --------------------------------------------------------------------------------


def init_weights(graph: nx.DiGraph, seed: int = 0, scheme: str = "paper") -> dict[str, np.ndarray]:
    """Deterministic float32 initial values for every tensor of `weight_specs(graph)`.

    Each tensor draws from its own generator, seeded by (`seed`, CRC-32 of the tensor's name), so it
    does not depend on which other layers the net has or their order. Schemes:

    - `paper` (AlexNet, NIPS 2012): weights N(0, 0.01); biases 0, except 1 for conv2, conv4, conv5, fc6
      and fc7 when the net is named `alexnet` or `alexnet_1gpu`;
    - `he`: weights N(0, sqrt(2 / fan_in)) with fan_in = the values one output reads; biases 0.

    Batch norm starts as the identity in both: weight 1, bias 0, running_mean 0, running_var 1.
    """
    require_graph(graph)
    if scheme not in SCHEMES:
        hint = did_you_mean(str(scheme), SCHEMES) or f"choose one of: {', '.join(SCHEMES)}"
        raise NetError(f"unknown weight initialization scheme `{scheme}`", hint=hint, where="scheme")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NetError(
            f"the seed must be a whole number >= 0, got {seed!r}", where="seed", hint="give a seed such as 0 or 2012"
        )
    paper_net = graph.graph.get("name") in PAPER_NETS
    values: dict[str, np.ndarray] = {}
    for name, shape in weight_specs(graph).items():
        layer_name, tensor = name.rsplit(".", 1)
        item = layer(graph, layer_name)
        values[name] = _initial(name, shape, item.op, tensor, int(seed), scheme, paper_net, item.params)
    return values


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]))


def _initial(
    name: str, shape: Shape, op: str, tensor: str, seed: int, scheme: str, paper_net: bool, params: dict
) -> np.ndarray:
    """One tensor's initial value; a layer's own `init_std` / `init_bias` (in the .net file) win."""
    layer_name = name.rsplit(".", 1)[0]
    if op == "batchnorm" or tensor in ("running_mean", "running_var"):
        fill = 1.0 if tensor in ("weight", "running_var") else 0.0
        return np.full(shape, fill, dtype=np.float32)
    if tensor == "bias" and params.get("init_bias") is not None:
        return np.full(shape, params["init_bias"], dtype=np.float32)
    if tensor == "bias":
        one = scheme == "paper" and paper_net and op in ("conv", "fc") and base_name(layer_name) in PAPER_BIAS_ONE
        return np.full(shape, 1.0 if one else 0.0, dtype=np.float32)
    # a weight: conv (F, C/groups, KH, KW) or fc (units, inputs); fan_in is what one output reads
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    std = PAPER_STD if scheme == "paper" else math.sqrt(2.0 / max(fan_in, 1))
    if params.get("init_std") is not None:
        std = params["init_std"]
    values = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    return values


# --- files -----------------------------------------------------------------------------------------


def save_weights(
    path: str | os.PathLike, weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes `weights` to a safetensors file, atomically: a temporary file in the same folder, then a rename.
    `metadata` (text by key) goes into the file's header: a trained net's preprocessing, for instance."""
    from safetensors.numpy import save_file

    path = Path(path)
    where = str(path)
    if not isinstance(weights, Mapping):
        raise NetError(
            f"weights must be a dict of name -> array, got {type(weights).__name__}",
            where=where,
            hint="give a mapping of weight name -> numpy array, such as net.weights()",
        )
    tensors: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise NetError(
                f"tensor names must be strings, got {name!r}",
                where=where,
                hint="name each tensor after its weight: `conv1.weight`, `conv1.bias`, ...",
            )
        array = np.asarray(value)
        if array.dtype.kind not in "fiub":
            raise NetError(
                f"tensor `{name}` holds {array.dtype} values: a weights file stores numbers",
                where=where,
                hint="convert it to float32 before saving: array.astype(numpy.float32)",
            )
        tensors[name] = np.ascontiguousarray(array)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NetError(
            f"cannot write the weights: folder `{folder}` does not exist",
            where=where,
            hint="create the folder first, or write the weights elsewhere",
        )
    if path.is_dir():
        raise NetError("cannot write the weights: the path is a folder", where=where, hint="give a file name")
    try:
        handle, temp = new_temporary(folder / path.name)  # the file safetensors writes: renamed into place
    except OSError as error:
        raise NetError(
            f"cannot write the weights: {error.strerror or error}", where=where, hint=os_hint(error)
        ) from None
    mode = os.fstat(handle).st_mode  # a new file's mode under the umask; safetensors writes 0600
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=dict(metadata) if metadata else None)
        sort_safetensors_header(temp)  # the same bytes for the same weights
        os.chmod(temp, mode)
        os.replace(temp, path)
    except Exception as error:  # OSError (disk full, permissions) or SafetensorError; never leave the temp file
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise NetError(
            f"cannot write the weights: {error}",
            where=where,
            hint="check the folder, its permissions and the free disk space",
        ) from None


_F32_MAX = float(np.finfo(np.float32).max)  # a float64 weight beyond it would become an infinity


def load_weights(path: str | os.PathLike, graph: nx.DiGraph) -> dict[str, np.ndarray]:
    """Reads a safetensors file holding exactly the tensors of `weight_specs(graph)`, as float32 arrays.

    F32, F16, BF16 and F64 tensors are accepted and converted to float32; any other type, a missing,
    extra or mis-shaped tensor, or a file that is not safetensors raises `NetError` (where = the file).
    Tensors whose names hold a `:` are not weights (a training checkpoint keeps its optimizer and random
    state under such names, so a checkpoint is also a weights file) and are skipped.
    """
    return _load(path, graph, partial=False)[0]


def load_matching_weights(path: str | os.PathLike, graph: nx.DiGraph) -> tuple[dict[str, np.ndarray], list[str]]:
    """What training starts from (fine-tuning): the net's weights a safetensors file holds, by name, as
    `load_weights` reads them, and the names of the file's tensors the net has no weight for. A weight the
    file lacks is left out (it starts from the recipe's initialization); one it holds in another shape,
    or a file holding none of the net's weights, raises `NetError`."""
    return _load(path, graph, partial=True)


def _load(path: str | os.PathLike, graph: nx.DiGraph, partial: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    from safetensors import SafetensorError, safe_open

    require_graph(graph)
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise NetError(
            "weights file not found",
            where=where,
            hint="give a run folder or weights file that `netdsl train NET --out DIR` wrote; "
            "from Python, netdsl.runtime.weights.save_weights writes one",
        )
    if not path.is_file():
        raise NetError("the weights path is not a file", where=where, hint="give the .safetensors file itself")
    specs = weight_specs(graph)
    try:
        with safe_open(str(path), framework="np") as file:
            stored = {}
            for name in file.keys():  # noqa: SIM118 -- safe_open is not iterable
                if ":" in name:
                    continue
                view = file.get_slice(name)
                stored[name] = (view.get_dtype(), tuple(view.get_shape()))
            if partial:
                unused = sorted(name for name in stored if name not in specs)
                _check_matching(where, specs, stored, graph.graph.get("name"))
                specs = {name: shape for name, shape in specs.items() if name in stored}
            else:
                unused = []
                _check(where, specs, stored, graph.graph.get("name"))
            values = {}
            for name in specs:
                dtype = stored[name][0]
                values[name] = _read_bf16(path, name) if dtype == "BF16" else file.get_tensor(name)
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise NetError(
            f"not a safetensors file ({reason})",
            where=where,
            hint="the file may be truncated or of another format; netdsl reads safetensors files (docs/weights.md)",
        ) from None
    except OSError as error:
        raise NetError(
            f"cannot read the weights: {error.strerror or error}", where=where, hint=os_hint(error)
        ) from None
    for name, value in values.items():
        if value.dtype == np.float64 and np.abs(value[np.isfinite(value)]).max(initial=0.0) > _F32_MAX:
            raise NetError(
                f"weight {name} holds values beyond float32's range (largest {np.abs(value).max():.3g})",
                where=where,
                hint="netdsl computes in float32 or narrower: scale or clip the weights",
            )
    shaped = {
        name: np.ascontiguousarray(value, dtype=np.float32).reshape(specs[name]) for name, value in values.items()
    }
    return shaped, unused


def weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text a weights file carries in its header (empty when it is not a readable safetensors file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as file:
            return dict(file.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def _check_matching(where: str, specs: dict[str, Shape], stored: dict[str, tuple[str, Shape]], net: str | None) -> None:
    """`load_matching_weights`'s rules: some of the net's weights, each in the net's shape and a float type."""
    shared = {name: shape for name, shape in specs.items() if name in stored}
    if not shared:
        hint = _tower_hint(list(specs), sorted(stored)) or (
            "weights are matched by name (`<layer>.weight`): give weights saved for this net or one sharing its "
            "layers' names"
        )
        raise NetError(
            f"the weights file holds none of the {_count(len(specs))} of net `{net}`"
            + (f" (it holds {_names(sorted(stored))})" if stored else " (it holds no tensors)"),
            where=where,
            hint=hint,
        )
    for name, shape in shared.items():
        got = stored[name][1]
        if got != shape:
            layer_name = base_name(name.split(".")[0])  # the name written in the net: a chain's, every tower's
            hint = (
                f"to start `{layer_name}` afresh (another number of classes or filters), give it a new name in the "
                "net: weights the file lacks start from `init`"
            )
            raise _wrong_shape(where, name, got, shape, hint)
    _check_types(where, shared, stored)


def _check(where: str, specs: dict[str, Shape], stored: dict[str, tuple[str, Shape]], net: str | None) -> None:
    missing = [name for name in specs if name not in stored]
    extra = sorted(name for name in stored if name not in specs)
    if missing:
        hint = _tower_hint(missing, extra)
        renamed = hint is None and len(missing) < len(specs)  # with none of the net's names, not a misspelling
        for name in missing if renamed else ():
            close = difflib.get_close_matches(name, extra, n=1, cutoff=0.6)
            if close:
                hint = f"the file holds `{close[0]}` instead of `{name}`: a renamed layer or a misspelling?"
                break
        if hint is None and extra:
            hint = (
                f"the file holds {_count(len(extra))} the net does not have ({_names(extra)}): saved for another net?"
            )
        if hint is None:
            hint = "were these weights saved for another version of the net?"
        raise NetError(
            f"the weights file lacks {len(missing)} of the {_count(len(specs))} of net `{net}`: {_names(missing)}",
            where=where,
            hint=hint,
        )
    if extra:
        raise NetError(
            f"the weights file holds {_count(len(extra))} that net `{net}` does not have: {_names(extra)}",
            where=where,
            hint=did_you_mean(extra[0], specs) or "remove them, or load the file with the net it was saved for",
        )
    for name, shape in specs.items():
        got = stored[name][1]
        if got != shape:
            hint = None
            if math.prod(got) == math.prod(shape):
                hint = "it has the right number of values in another layout: was it saved transposed or reshaped?"
            elif len(got) == len(shape) and got[0] in (2 * shape[0], shape[0] // 2):
                hint = "a net with towers stores each tower's half of a layer separately (`<layer>@<tower>.weight`)"
            raise _wrong_shape(where, name, got, shape, hint)
    _check_types(where, specs, stored)


def _wrong_shape(where: str, name: str, got: Shape, shape: Shape, hint: str | None) -> NetError:
    return NetError(
        f"tensor `{name}` has shape {format_shape(got)} in the weights file, but the net needs {format_shape(shape)}",
        where=where,
        hint=hint,
    )


def _check_types(where: str, specs: dict[str, Shape], stored: dict[str, tuple[str, Shape]]) -> None:
    for name in specs:
        dtype = stored[name][0]
        if dtype not in _FLOAT_DTYPES:
            raise NetError(
                f"tensor `{name}` is stored as {dtype}, but weights must be floating point",
                where=where,
                hint=f"store F32, F16, BF16 or F64 (all are read as float32); got {dtype}",
            )


def _untowered(name: str) -> str:
    layer_name, _, tensor = name.rpartition(".")
    return f"{base_name(layer_name)}.{tensor}"


def _tower_hint(missing: list[str], extra: list[str]) -> str | None:
    """Weights of a one-device net loaded into a net with towers, or the other way round."""
    extra_set = set(extra)
    for name in missing:
        if "@" in name and _untowered(name) in extra_set:
            return (
                f"the file holds `{_untowered(name)}` where the net has `{name}`: weights of a one-device net? "
                "a net with towers stores each tower's copy of a layer separately"
            )
    towered = {_untowered(name): name for name in reversed(extra) if "@" in name}  # the first tower's copy wins
    for name in missing:
        if name in towered:
            return f"the file holds `{towered[name]}` where the net has `{name}`: weights of a net with towers?"
    return None


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """numpy has no bfloat16: read the tensor's raw bytes (its offsets from the header) and widen them."""
    import json

    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        start, end = header[name]["data_offsets"]
        handle.seek(8 + size + start)
        raw = handle.read(end - start)
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(header[name]["shape"])


def _count(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def _names(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# --- batch norm folding ----------------------------------------------------------------------------


def fold_batchnorm(
    conv_weight: np.ndarray, conv_bias: np.ndarray | None, bn: Mapping[str, np.ndarray], eps: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A conv followed by inference batch norm as one conv: per output channel c, with
    s = gamma / sqrt(var + eps): w' = w * s, b' = (b - mean) * s + beta. `bn` holds `weight` (gamma),
    `bias` (beta), `running_mean`, `running_var` and optionally `eps` (default 1e-5); a conv without
    bias (None) counts as bias 0. Computed in float64, returned as float32."""
    if eps is None:
        eps = float(bn.get("eps", 1e-5))
    weight = np.asarray(conv_weight, dtype=np.float64)
    channels = weight.shape[0]
    bias = np.zeros(channels) if conv_bias is None else np.asarray(conv_bias, dtype=np.float64)
    gamma = np.asarray(bn["weight"], dtype=np.float64) if bn.get("weight") is not None else np.ones(channels)
    beta = np.asarray(bn["bias"], dtype=np.float64) if bn.get("bias") is not None else np.zeros(channels)
    mean = np.asarray(bn["running_mean"], dtype=np.float64)
    var = np.asarray(bn["running_var"], dtype=np.float64)
    scale = gamma / np.sqrt(var + eps)
    folded_weight = weight * scale.reshape((channels,) + (1,) * (weight.ndim - 1))
    folded_bias = (bias - mean) * scale + beta
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def fold_shuffle(weight: np.ndarray, shuffled: Mapping[str, int]) -> np.ndarray:
    """A conv's (F, C, KH, KW) or an fc's (units, features) weight that reads, unshuffled, what it read through a
    channel shuffle: `shuffled` (a record of `Layer.fields["shuffled"]`) gives the shuffle's groups, its channels
    and pixels per channel, and where they start in the weight's second axis (channels of a conv, features of an
    fc). The weight that met shuffled channel i at input channel s(i) = `shuffle_sources(...)[i]` now meets it
    there: w'[:, s(i)] = w[:, i] (for an fc, each channel's block of `pixels` columns)."""
    channels, pixels, start = shuffled["channels"], shuffled["pixels"], shuffled["start"]
    sources = np.asarray(shuffle_sources(channels, shuffled["groups"]))
    folded = np.array(weight, copy=True)
    if weight.ndim == 4:  # a conv: input channels are axis 1
        folded[:, start + sources] = weight[:, start : start + channels]
        return folded
    part = slice(start, start + channels * pixels)
    blocks = np.empty((weight.shape[0], channels, pixels), dtype=weight.dtype)
    blocks[:, sources] = weight[:, part].reshape(weight.shape[0], channels, pixels)
    folded[:, part] = blocks.reshape(weight.shape[0], channels * pixels)
    return folded


def fold_weights(graph: nx.DiGraph, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights of `netdsl.compiler.fold.fold_inference(graph)`: each conv that absorbed a batch norm gets the
    folded weight and a bias (`<conv>.bias`, present even for a conv declared `bias=false`), and the
    folded batch norms' tensors are dropped; a conv or fc that absorbed a channel shuffle reads its input
    channels where the shuffle took them from (`fold_shuffle`). `graph` is the unfolded graph (`load_graph`'s);
    the result follows the folded graph's layer order."""
    result: dict[str, np.ndarray] = {}
    for item in layers(fold_inference(graph)):
        own = {name: weights[f"{item.name}.{name}"] for name in layer_tensors(item)}
        for bn_name in item.fields.get("folded", []):
            bn = {key: weights[f"{bn_name}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")}
            eps = float(layer(graph, bn_name).params["eps"])
            own["weight"], own["bias"] = fold_batchnorm(own["weight"], own.get("bias"), bn, eps)
        for shuffled in item.fields.get("shuffled", []):
            own["weight"] = fold_shuffle(own["weight"], shuffled)
        result.update({f"{item.name}.{name}": value for name, value in own.items()})
    return result


def checked_weights(weights, specs: Mapping[str, Shape], where: str = "weights") -> dict:
    """Weights given in memory (`name -> tensor or array`) checked against `specs` (`weight_specs(graph)`):
    every name known and present, every shape right, numbers that are real and finite. Returns them as torch
    tensors (detached, where they were), in the order of `specs`; NetError otherwise, blaming `where` (the
    argument, or the file they were read from)."""
    import torch

    from netdsl.runtime.arrays import all_finite, from_numpy

    if not isinstance(weights, Mapping):
        raise NetError(
            f"weights must be a dict of name -> tensor, got {type(weights).__name__}",
            where=where,
            hint="give a mapping of weight name -> tensor or array, such as a loaded safetensors file",
        )
    strange = next((name for name in weights if not isinstance(name, str)), None)
    if strange is not None:
        raise NetError(f"weight names are strings, got {strange!r}", where=where, hint="e.g. 'conv1.weight'")
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(specs), n=1)
        more = f" (and {len(unknown) - 1} more unknown)" if unknown[1:] else ""
        raise NetError(
            f"the net has no weight `{unknown[0]}`{more}",
            where=where,
            hint=f"did you mean `{close[0]}`?" if close else "weights are named `<layer>.<tensor>`",
        )
    missing = [name for name in specs if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise NetError(
            f"weight `{missing[0]}` is missing{more}",
            where=where,
            hint=f"it has shape {format_shape(specs[missing[0]])}",
        )
    tensors = {}
    for name, shape in specs.items():
        value = weights[name]
        try:
            tensor = value.detach() if isinstance(value, torch.Tensor) else from_numpy(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as error:
            raise NetError(
                f"weight `{name}` is not a tensor: {error}",
                where=where,
                hint="give each weight as a torch tensor or a numpy array",
            ) from None
        if tensor.layout != torch.strided or tensor.is_meta:
            raise NetError(
                f"weight `{name}` is a {'meta' if tensor.is_meta else str(tensor.layout)} tensor",
                where=where,
                hint="pass dense tensors with values (w.to_dense())",
            )
        if tuple(tensor.shape) != tuple(shape):
            raise NetError(
                f"weight `{name}` has shape {format_shape(tuple(tensor.shape))}, the net needs {format_shape(shape)}",
                where=where,
                hint="the weights are of another net, or another version of this one: `netdsl info` lists its shapes",
            )
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
            raise NetError(
                f"weight `{name}` has dtype {tensor.dtype}, not a real number type",
                where=where,
                hint="convert it to float32: tensor.float()",
            )
        if not all_finite([tensor]):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite values"
            raise NetError(
                f"weight `{name}` holds {bad}",
                where=where,
                hint="the weights are damaged, or were saved from a training run that diverged",
            )
        if tensor.dtype == torch.float64 and tensor.numel() and float(tensor.abs().max()) > _F32_MAX:
            raise NetError(
                f"weight `{name}` holds values beyond float32's range (largest {float(tensor.abs().max()):.3g})",
                where=where,
                hint="netdsl computes in float32 or narrower: scale or clip the weights",
            )
        tensors[name] = tensor
    return tensors
