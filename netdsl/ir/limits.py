"""Checks of a shaped graph that no single layer can make: memory per device."""

from __future__ import annotations

import networkx as nx

from netdsl.errors import NetError
from netdsl.ir import layers
from netdsl.ir.dtypes import DTYPE_BYTES
from netdsl.ir.stats import totals
from netdsl.tables import format_bytes


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
