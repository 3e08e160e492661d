"""Weights saved by other tools, imported into netdsl's nets.

`import_grouped_alexnet(path, two_tower_graph)` reads the weights of a one-device grouped AlexNet (the
paper's two towers as `groups=2` convolutions, as `nets/alexnet_1gpu.net` and Caffe's bvlc_alexnet run
it) from a safetensors file or a PyTorch state_dict saved with `torch.save`, and splits every layer
into the two towers of `nets/alexnet.net` (docs/weights.md, "Importing a one-device grouped AlexNet").

Every tensor is split on its first axis, tower 0 (the first tower the net's `all` reads list) taking
the first half: a conv's filters, or an fc layer's units. That is exact for every layer:

- conv1 reads the image in both nets: filters 0..47 go to tower 0, 48..95 to tower 1, each whole;
- conv2, conv4, conv5 are grouped: a grouped weight is already per group (filters 0..127 of conv2
  read channels 0..47, tower 0's conv1), so each tower gets its group's filters as they are;
- conv3, fc6, fc7 read both towers: their filters (units) are halved and their inputs kept whole, in the
  order `all x` joins the towers (tower 0's channels, then tower 1's). fc6 flattens channel-major in
  both nets: 256 x 6 x 6 with tower 0's 128 channels first is `all conv5` flattened;
- fc8 lives on one device in both nets and is copied whole.

PyTorch files are read with `torch.load(path, weights_only=True)` only: a file that needs any other
object unpickled is refused, never loaded.
"""

from __future__ import annotations

import difflib
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import networkx as nx
import numpy as np

from netdsl.errors import NetError, did_you_mean, os_hint
from netdsl.ir import layer
from netdsl.runtime.weights import _FLOAT_DTYPES, _read_bf16, weight_specs
from netdsl.tables import format_shape

Shape = tuple[int, ...]

# The one-device grouped AlexNet's tensors, netdsl's names (weight_specs of nets/alexnet_1gpu.net).
GROUPED_ALEXNET: dict[str, Shape] = {
    "conv1.weight": (96, 3, 11, 11),
    "conv1.bias": (96,),
    "conv2.weight": (256, 48, 5, 5),
    "conv2.bias": (256,),
    "conv3.weight": (384, 256, 3, 3),
    "conv3.bias": (384,),
    "conv4.weight": (384, 192, 3, 3),
    "conv4.bias": (384,),
    "conv5.weight": (256, 192, 3, 3),
    "conv5.bias": (256,),
    "fc6.weight": (4096, 9216),
    "fc6.bias": (4096,),
    "fc7.weight": (4096, 4096),
    "fc7.bias": (4096,),
    "fc8.weight": (1000, 4096),
    "fc8.bias": (1000,),
}
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
TOWERED = LAYERS[:-1]  # fc8 runs on one device in the two-tower net too
CROSSING = ("conv3", "fc6", "fc7")  # read both towers (`all x`); conv2, conv4, conv5 read their own tower


def _layout(modules: Mapping[str, str]) -> dict[str, str]:
    """File key -> netdsl's one-device name, from layer -> module path."""
    return {f"{modules[name]}.{tensor}": f"{name}.{tensor}" for name in LAYERS for tensor in ("weight", "bias")}


# Key layouts a file may use: file key -> netdsl's one-device name. The layout whose keys the file
# shares most is the one checked (ties: the first listed).
LAYOUTS: dict[str, dict[str, str]] = {
    # netdsl's own names: nets/alexnet_1gpu.net, saved with netdsl.runtime.weights.save_weights
    "netdsl": _layout({name: name for name in LAYERS}),
    # torchvision.models.AlexNet's module indices with groups=2 on conv2, conv4 and conv5:
    # features = conv1 relu pool conv2 relu pool conv3 relu conv4 relu conv5 relu pool,
    # classifier = dropout fc6 relu dropout fc7 relu fc8
    "torchvision": _layout(
        {
            "conv1": "features.0",
            "conv2": "features.3",
            "conv3": "features.6",
            "conv4": "features.8",
            "conv5": "features.10",
            "fc6": "classifier.1",
            "fc7": "classifier.4",
            "fc8": "classifier.6",
        }
    ),
    # the same Sequential with a local response normalization after the first two ReLUs, in Caffe's
    # bvlc_alexnet order: features = conv1 relu norm pool conv2 relu norm pool conv3 relu conv4 relu conv5
    # relu pool; the classifier as torchvision's
    "torchvision+lrn": _layout(
        {
            "conv1": "features.0",
            "conv2": "features.4",
            "conv3": "features.8",
            "conv4": "features.10",
            "conv5": "features.12",
            "fc6": "classifier.1",
            "fc7": "classifier.4",
            "fc8": "classifier.6",
        }
    ),
}

_SHOWN = 5  # names listed in an error before "and N more"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy format's pickle protocol opcode
_DAMAGED = "the file may be truncated or damaged; save it again with torch.save(model.state_dict(), path)"
_LAYOUT_HINT = (
    "a grouped AlexNet's tensors are named `conv1.weight` ... `fc8.bias` (netdsl), or `features.{0,3,6,8,10}.*` "
    "and `classifier.{1,4,6}.*` (torchvision), or `features.{0,4,8,10,12}.*` and `classifier.{1,4,6}.*` "
    "(torchvision with LRN modules); see docs/weights.md"
)


@dataclass
class _Stored:
    """One tensor of the file: its type's name, shape, whether it is floating point, and how to read it."""

    dtype: str
    shape: Shape
    floating: bool
    read: Callable[[], np.ndarray]


# --- the API ---------------------------------------------------------------------------------------


def import_grouped_alexnet(path: str | os.PathLike, two_tower_graph: nx.DiGraph) -> dict[str, np.ndarray]:
    """The weights of a one-device grouped AlexNet file, split into `two_tower_graph`'s towers.

    `path` is a safetensors file or a PyTorch state_dict saved with `torch.save` (read with
    `weights_only=True`), keyed in one of `LAYOUTS`; `two_tower_graph` is `load_graph("nets/alexnet.net")`
    or a net with its layers, towers and shapes. Returns `{name: float32 array}` in
    `weight_specs(two_tower_graph)` order, ready for `netdsl.load(..., weights=...)` or `save_weights`.
    Raises `NetError` (where = the file) for a missing or unreadable file, one needing unsafe unpickling,
    missing or extra tensors, wrong shapes or non-float tensors; (where = the net's file) for a net that
    is not the two-tower AlexNet.
    """
    towers = alexnet_towers(two_tower_graph)
    path = Path(path)
    where = str(path)
    stored = _read(path, where)
    keys = _match_layout(stored, where)  # netdsl one-device name -> file key
    _check(stored, keys, where)
    grouped = {name: _as_float32(stored[key].read(), GROUPED_ALEXNET[name]) for name, key in keys.items()}
    return _split(grouped, two_tower_graph, towers)


def split_grouped_alexnet(grouped: Mapping[str, np.ndarray], two_tower_graph: nx.DiGraph) -> dict[str, np.ndarray]:
    """`import_grouped_alexnet` for weights already in memory: `grouped` holds netdsl's one-device names
    (`GROUPED_ALEXNET`: `conv1.weight` ... `fc8.bias`) as arrays or tensors."""
    towers = alexnet_towers(two_tower_graph)
    stored = {}
    for name, value in grouped.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        stored[name] = _Stored(str(array.dtype), tuple(array.shape), array.dtype.kind == "f", lambda a=array: a)
    keys = _match_layout(stored, "weights", layouts={"netdsl": LAYOUTS["netdsl"]})
    _check(stored, keys, "weights")
    return _split(
        {name: _as_float32(stored[name].read(), GROUPED_ALEXNET[name]) for name in keys}, two_tower_graph, towers
    )


def alexnet_towers(graph: nx.DiGraph) -> tuple[str, str]:
    """The two towers of a two-tower AlexNet, in the order its `all x` reads join them.

    Checks that the net is nets/alexnet.net's: the tensors of conv1..conv5, fc6 and fc7 in each tower with
    half the grouped net's filters or units, fc8 outside the towers, conv3, fc6, fc7 and fc8 reading both
    towers in that order, conv2, conv4 and conv5 their own tower. Raises `NetError` otherwise."""
    net = graph.graph.get("name")
    where = graph.graph.get("file") or f"net `{net}`"

    def fail(reason: str) -> NoReturn:
        raise NetError(
            f"net `{net}` is not the two-tower AlexNet of nets/alexnet.net: {reason}",
            where=where,
            hint="import_grouped_alexnet splits a one-device AlexNet into nets/alexnet.net's towers; a one-device "
            "net loads its own weights with netdsl.runtime.weights.load_weights",
        )

    if "fc8" not in graph:
        fail("it has no layer `fc8` outside the towers")
    towers = tuple(layer(graph, name).tower for name in layer(graph, "fc8").inputs)
    if len(towers) != 2 or None in towers or towers[0] == towers[1]:
        fail("its `fc8` does not read two towers' copies of `fc7`")
    expected: dict[str, Shape] = {}
    for name, shape in GROUPED_ALEXNET.items():
        base, tensor = name.split(".")
        if base in TOWERED:
            for tower in towers:
                expected[f"{base}@{tower}.{tensor}"] = (shape[0] // 2, *shape[1:])
        else:
            expected[name] = shape
    specs = weight_specs(graph)
    missing = [name for name in expected if name not in specs]
    if missing:
        fail(f"it has no tensor {_names(missing)}")
    extra = [name for name in specs if name not in expected]
    if extra:
        fail(f"it has other tensors too: {_names(extra)}")
    for name, shape in expected.items():
        if specs[name] != shape:
            fail(f"`{name}` is {format_shape(specs[name])}, not {format_shape(shape)}")
    for base in TOWERED:
        for tower in towers:
            reads = [layer(graph, name).tower for name in layer(graph, f"{base}@{tower}").inputs]
            if base in CROSSING and reads != list(towers):
                fail(f"`{base}@{tower}` does not read both towers in the order {towers[0]}, {towers[1]}")
            if base not in CROSSING and base != "conv1" and reads != [tower]:
                fail(f"`{base}@{tower}` does not read only its own tower")
    return towers  # type: ignore[return-value]


# --- reading ---------------------------------------------------------------------------------------


def _read(path: Path, where: str) -> dict[str, _Stored]:
    if not path.exists():
        raise NetError(
            "weights file not found",
            where=where,
            hint="give a .safetensors file or a PyTorch state_dict saved with torch.save",
        )
    if not path.is_file():
        raise NetError("the weights path is not a file", where=where, hint="give the weights file itself")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise NetError(
            f"cannot read the weights: {error.strerror or error}", where=where, hint=os_hint(error)
        ) from None
    if head.startswith(_TORCH_MAGIC):
        return _read_torch(path, where)
    return _read_safetensors(path, where)


def _read_safetensors(path: Path, where: str) -> dict[str, _Stored]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as file:
            dtypes = {}
            for name in file.keys():  # noqa: SIM118 -- safe_open is not iterable
                view = file.get_slice(name)
                dtypes[name] = (view.get_dtype(), tuple(int(d) for d in view.get_shape()))
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise NetError(
            f"neither a safetensors nor a PyTorch file (as safetensors: {reason})",
            where=where,
            hint="the file may be truncated or of another format; give a .safetensors file or a state_dict "
            "saved with torch.save",
        ) from None
    except OSError as error:
        raise NetError(
            f"cannot read the weights: {error.strerror or error}", where=where, hint=os_hint(error)
        ) from None

    def reader(name: str, dtype: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if dtype == "BF16":
                return _read_bf16(path, name)
            with safe_open(str(path), framework="np") as file:
                return file.get_tensor(name)

        return read

    return {
        name: _Stored(dtype, shape, dtype in _FLOAT_DTYPES, reader(name, dtype))
        for name, (dtype, shape) in dtypes.items()
    }


REFUSED_OBJECT = r"^\s*(?:WeightsUnpickler error:\s*)?((?:Trying to load )?unsupported global.*?)(?:\. |\.?$)"


def _read_torch(path: Path, where: str) -> dict[str, _Stored]:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle protocol notice of the weights-only unpickler
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "weights only load failed" not in text.lower():
            raise NetError(f"not a readable PyTorch file ({_first_line(text)})", where=where, hint=_DAMAGED) from None
        # What torch says of a refused object, in the wording of torch 2.4 .. 2.13 ("WeightsUnpickler error:
        # Unsupported global: GLOBAL m.C was not an allowed global", "Trying to load unsupported GLOBAL
        # posix.system whose module posix is blocked"): anything else is damaged data (a bad opcode).
        found = re.search(REFUSED_OBJECT, text, re.IGNORECASE | re.MULTILINE)
        reason = found.group(1).strip() if found else ""
        if not reason:
            raise NetError(
                f"not a readable PyTorch file ({reason or _first_line(text)})",
                where=where,
                hint=_DAMAGED,
            ) from None
        reason = f" ({reason})"
        raise NetError(
            f"the PyTorch file holds objects other than tensors, which torch.load(weights_only=True) refuses{reason}",
            where=where,
            hint="netdsl never unpickles arbitrary objects (that can run code): save only the tensors, "
            "e.g. torch.save(model.state_dict(), path), or save a safetensors file",
        ) from None
    except Exception as error:  # torch.load raises many types for a damaged file: RuntimeError, EOFError, ...
        raise NetError(
            f"not a readable PyTorch file ({_first_line(str(error)) or type(error).__name__})",
            where=where,
            hint=_DAMAGED,
        ) from None
    if not isinstance(state, Mapping):
        raise NetError(
            f"the PyTorch file holds a {type(state).__name__}, not a state_dict (tensor names -> tensors)",
            where=where,
            hint="save the model's tensors: torch.save(model.state_dict(), path)",
        )
    stored = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise NetError(
                f"the state_dict has a key {name!r} that is not a string",
                where=where,
                hint="save the model's tensors under their names: torch.save(model.state_dict(), path)",
            )
        if not isinstance(value, torch.Tensor):
            hint = None
            if isinstance(value, Mapping):
                hint = f"a checkpoint holding a state_dict? save checkpoint[{name!r}] on its own"
            raise NetError(
                f"`{name}` holds a {type(value).__name__}, not a tensor: not a state_dict",
                where=where,
                hint=hint or "save the model's tensors: torch.save(model.state_dict(), path)",
            )
        stored[name] = _Stored(
            str(value.dtype).removeprefix("torch."),
            tuple(int(d) for d in value.shape),
            value.is_floating_point(),
            lambda tensor=value: tensor.detach().to(torch.float32).contiguous().numpy(),
        )
    return stored


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)
    return line.split(". ", 1)[0].rstrip(".")[:200]  # the first sentence: torch's advice follows it


# --- checking --------------------------------------------------------------------------------------


def _match_layout(
    stored: Mapping[str, _Stored], where: str, layouts: Mapping[str, dict[str, str]] = LAYOUTS
) -> dict[str, str]:
    """netdsl one-device name -> the file's key, in the layout the file's keys match best."""
    keys = set(stored)
    best = max(layouts, key=lambda layout: len(keys & set(layouts[layout])))
    mapping = layouts[best]
    if not keys & set(mapping):
        raise NetError(
            f"the file holds none of a grouped AlexNet's tensors; it holds {_names(sorted(keys)) or 'nothing'}",
            where=where,
            hint=_foreign_hint(sorted(keys)) or _LAYOUT_HINT,
        )
    missing = [key for key in mapping if key not in keys]
    extra = sorted(keys - set(mapping))
    named = "" if best == "netdsl" else f" ({best} names)"
    if missing:
        hint = None
        for key in missing:
            close = difflib.get_close_matches(key, extra, n=1, cutoff=0.6)
            if close:
                hint = f"the file holds `{close[0]}` instead of `{key}`: a misspelling, or another layout?"
                break
        if hint is None:
            hint = _foreign_hint(extra) or _LAYOUT_HINT
        raise NetError(
            f"the weights file lacks {len(missing)} of the {len(mapping)} tensors of a grouped AlexNet{named}: "
            f"{_names(missing)}",
            where=where,
            hint=hint,
        )
    if extra:
        raise NetError(
            f"the weights file holds {len(extra)} tensor{'s' if len(extra) != 1 else ''} that a grouped "
            f"AlexNet{named} does not have: {_names(extra)}",
            where=where,
            hint=did_you_mean(extra[0], mapping)
            or "the file must hold exactly conv1..conv5, fc6, fc7 and fc8's weights and biases: another net?",
        )
    return {name: key for key, name in mapping.items()}


def _foreign_hint(keys: list[str]) -> str | None:
    """Why a file's keys are not a grouped AlexNet's, when it can be told."""
    towered = [key for key in keys if "@" in key]
    if towered:
        return (
            f"the file holds `{towered[0]}`: weights of a net with towers, which "
            "netdsl.runtime.weights.load_weights reads as they are"
        )
    if keys and all(key.startswith("module.") for key in keys):
        return "the keys start with `module.` (a DataParallel model's): save model.module.state_dict() instead"
    return None


def _check(stored: Mapping[str, _Stored], keys: Mapping[str, str], where: str) -> None:
    """Shapes, then types, of the tensors `keys` names (netdsl one-device name -> file key)."""
    for name, key in keys.items():
        want, got = GROUPED_ALEXNET[name], stored[key].shape
        if got == want:
            continue
        label = f"`{key}`" if key == name else f"`{key}` (the grouped net's `{name}`)"
        hint = None
        if name.startswith("conv1.") and got[:1] == (64,):
            hint = (
                "torchvision's alexnet (64 filters in conv1, no groups) is a different net: only the grouped "
                "AlexNet (96, 256, 384, 384, 256 filters; groups=2 in conv2, conv4, conv5) splits into towers"
            )
        elif got == (want[0] // 2, *want[1:]):
            hint = "that is one tower's half: a two-tower net's file? load it with netdsl.runtime.weights.load_weights"
        elif len(got) == 4 and got[0] == want[0] and got[1] == 2 * want[1]:
            hint = "the conv reads all channels: saved without groups=2? only the grouped AlexNet splits into towers"
        elif math.prod(got) == math.prod(want):
            hint = "it has the right number of values in another layout: was it saved transposed or reshaped?"
        raise NetError(
            f"tensor {label} has shape {format_shape(got)} in the weights file, "
            f"but a grouped AlexNet's is {format_shape(want)}",
            where=where,
            hint=hint or "only a grouped AlexNet's weights split into towers (docs/weights.md): another net's file?",
        )
    for key in keys.values():
        if not stored[key].floating:
            raise NetError(
                f"tensor `{key}` is stored as {stored[key].dtype}, but weights must be floating point",
                where=where,
                hint="store float32, float16, bfloat16 or float64 (all are read as float32)",
            )


# --- splitting -------------------------------------------------------------------------------------


def _split(grouped: Mapping[str, np.ndarray], graph: nx.DiGraph, towers: tuple[str, str]) -> dict[str, np.ndarray]:
    """Each towered layer's tensor split on axis 0 (filters or units), tower 0 the first half; fc8 whole."""
    split: dict[str, np.ndarray] = {}
    for name, value in grouped.items():
        base, tensor = name.split(".")
        if base not in TOWERED:
            split[name] = value
            continue
        for tower, half in zip(towers, np.split(value, 2, axis=0)):
            split[f"{base}@{tower}.{tensor}"] = np.ascontiguousarray(half)
    return {name: split[name] for name in weight_specs(graph)}


def _as_float32(value: np.ndarray, shape: Shape) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=np.float32).reshape(shape)


def _names(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
