"""Checks of a shaped graph that no single layer can make: memory per device."""

from __future__ import annotations

import networkx as nx
import numpy as np

from netdsl.errors import NetError
from netdsl.ir import layers
from netdsl.ir.dtypes import DTYPE_BYTES
from netdsl.ir.stats import totals
from netdsl.tables import format_bytes


def check_batch(batch: object, where: str = "batch") -> int:
    """`batch` as an int when it is a whole number >= 1 (not a bool); a NetError otherwise."""
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
        raise NetError(f"the batch must be a whole number >= 1, got {batch!r}", where=where, hint="e.g. batch=32")
    return int(batch)


def check_options(batch: object, dtype: object, limit: object) -> None:
    """The arguments of `check_memory` given in Python (the command line checks its flags as it reads them)."""
    check_batch(batch)
    if dtype not in DTYPE_BYTES:
        raise NetError(f"unknown dtype {dtype!r}", where="dtype", hint=f"dtypes: {', '.join(DTYPE_BYTES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1):
        raise NetError(
            f"the memory limit is a number of bytes >= 1, got {limit!r}", where="memory_limit", hint="e.g. 3 * 2**30"
        )


def check_memory(graph: nx.DiGraph, batch: int = 1, dtype: str = "fp32", limit: int | None = None) -> None:
    """Fails when a device's weights plus all activations (no buffer reuse) exceed its memory limit.

    `limit` (bytes, from the command line) applies to every device; otherwise a device's own
    `device ... memory N GiB` limit applies, and devices without one are not checked.
    """
    width = DTYPE_BYTES[dtype]
    _, per_device = totals(graph)
    for name, device in graph.graph["devices"].items():
        cap = limit if limit is not None else device.memory
        if cap is None:
            continue
        used = per_device[name]
        weights = (used.params + used.buffers) * width
        activations = used.activations * batch * width
        if weights + activations <= cap:
            continue
        if limit is not None:
            span = None
        else:
            span = device.span or next(layer.span for layer in layers(graph) if layer.device == name)
        raise NetError(
            f"device `{name}` would need {format_bytes(weights + activations)} but has {format_bytes(cap)}: "
            f"weights {format_bytes(weights)} + activations {format_bytes(activations)} "
            f"at batch {batch} in {dtype}",
            span,
            where="--memory-limit" if limit is not None else None,
            hint="use a smaller batch, spread the layers over more devices, or raise the limit",
        )
