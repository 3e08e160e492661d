"""A trained net's values at one layer as each image's feature vector, and the images nearest to a query by them.

The AlexNet paper's Figure 4 (right) probes what a net learned this way: for a test image, the six training
images whose 4,096 values in the last hidden layer lie nearest to its own (Euclidean distance) are of its class
although, pixel by pixel, they are not close to it (other poses, other colours). `netdsl neighbours` shows it
for any trained net and any of its layers (the input itself gives the pixel-space neighbours to compare)."""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import numpy as np
import torch

from netdsl.errors import NetError, did_you_mean
from netdsl.ir import layers
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import base_name


def feature_layers(graph: nx.DiGraph, name: str | None = None) -> list[str]:
    """The layers whose values, flattened and joined in this order, are an image's feature vector. By default
    the inputs of the net's last conv or fc layer: its last hidden layer (AlexNet's fc7, both towers' halves).
    `name` stands for what the net's text calls by it: a chain's name its last layer (`f6` in `f6 = fc(f5, 84)
    | relu` is the ReLU's output), a block's its last layer, a towers' layer each tower's (`fc7`: fc7.dropout@gpu0
    and fc7.dropout@gpu1), `@tower` one tower's (`fc7@gpu1`), a chain's part itself (`fc7.relu`); the input's
    name gives the pixels themselves."""
    items = layers(graph)
    if name is None:
        weighted = [item for item in items if item.op in ("conv", "fc")]
        if not weighted:
            raise NetError("the net has no conv or fc layer", where="--layer", hint="name the layer to compare by")
        return list(dict.fromkeys(weighted[-1].inputs))
    base, tower = name.rsplit("@", 1) if "@" in name else (name, None)
    under = [
        item for item in items
        if (base_name(item.name) == base or base_name(item.name).startswith(f"{base}."))
        and (tower is None or item.name.endswith(f"@{tower}"))
    ]  # fmt: skip
    if not under:
        hint = did_you_mean(name, list(dict.fromkeys(base_name(item.name) for item in items)))
        raise NetError(f"the net has no layer `{name}`", where="--layer", hint=hint or "name a layer of the net")
    last = {item.name[len(base_name(item.name)) :]: item.name for item in under}  # by tower ("@gpu0", or "")
    order = {item.name: index for index, item in enumerate(items)}
    return sorted(last.values(), key=order.__getitem__)  # each tower's last layer under the name


class Features:
    """`features(x)` -> (N x D float32 features, the net's output or None): the values of `names` (from
    `feature_layers`) for a batch of prepared images, flattened and joined, computed by a GraphModule of the
    net in evaluation mode (dropout off, batch norm's running statistics) alongside the net's own output
    (when it has one)."""

    def __init__(
        self,
        graph: nx.DiGraph,
        weights: Mapping[str, np.ndarray],
        names: list[str],
        devices=None,
        backend: str = "torch",
    ) -> None:
        outputs = list(graph.graph["outputs"])
        self.names, self.output = list(names), outputs[0] if len(outputs) == 1 else None
        wanted = list(dict.fromkeys([*self.names, *outputs]))
        probed = graph.copy()  # the same layers, each wanted one an output of its own
        probed.graph.update(outputs=wanted, output_names=wanted)
        self.module = GraphModule(probed, devices=devices, weights=weights, backend=backend).eval()
        self.size = sum(int(np.prod(graph.nodes[name]["layer"].shape)) for name in self.names)

    def __call__(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            values = self.module(x)
        if not isinstance(values, dict):  # one output: the features are the net's own output
            values = {self.names[0]: values}
        features = torch.cat([values[name].flatten(1).float().cpu() for name in self.names], dim=1)
        return features, None if self.output is None else values[self.output].float().cpu()


class Nearest:
    """The `count` images nearest to each query (rows of `queries`, Q x D) by Euclidean distance, searched a
    batch at a time (`add`, in the images' order): memory for Q x count, whatever the number of images. Equal
    distances keep the earlier image first."""

    def __init__(self, queries: torch.Tensor, count: int) -> None:
        self.queries = queries.double()
        self.count = count
        self.distances = torch.zeros((len(queries), 0), dtype=torch.float64)
        self.indices = torch.zeros((len(queries), 0), dtype=torch.int64)
        self.seen = 0

    def add(self, features: torch.Tensor) -> None:
        if features.shape[1] != self.queries.shape[1]:
            raise ValueError(f"features of {features.shape[1]} values for queries of {self.queries.shape[1]}")
        if not len(features):
            return
        batch = features.double()  # differences taken one by one: no cancellation of |q|^2 + |x|^2 - 2 q.x
        distances = torch.cdist(self.queries, batch, compute_mode="donot_use_mm_for_euclid_dist")
        indices = torch.arange(self.seen, self.seen + len(batch)).expand(len(self.queries), -1)
        joined = torch.cat([self.distances, distances], dim=1)
        order = torch.sort(joined, dim=1, stable=True).indices[:, : self.count]
        self.distances = joined.gather(1, order)
        self.indices = torch.cat([self.indices, indices], dim=1).gather(1, order)
        self.seen += len(batch)
