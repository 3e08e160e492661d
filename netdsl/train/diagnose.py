"""Finding where a training step went wrong, and checking gradients against finite differences.

`first_non_finite` replays a step whose loss or gradients were not finite, with the same random state
(the same dropout masks), keeping every layer's output: the first output in forward order that holds a
NaN or an infinity is named; when every output is finite, backpropagation is replayed and the first
place it produced a non-finite gradient (the last layer, in forward order, whose output gradient is
not finite: every layer before it inherits the NaN) is named.

`check_gradients` (`netdsl train --check-grads`, as cuda-convnet2 had) compares autograd's gradient of
the loss with central finite differences in float64, for a few entries of every weight of every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F

from netdsl.ir import layer
from netdsl.runtime.module import GraphModule
from netdsl.train.checkpoint import rng_states, set_rng_states
from netdsl.train.step import backward_in_parts

RATE_HINT = "lower the learning rate (--lr), add a warm-up (--warmup-epochs 1), or clip gradients (--clip-grad 5)"
DATA_HINT = "look for NaN or infinite pixels in the data, and for a --pca-noise, --mean or --std far from its scale"


class Finding(NamedTuple):
    """Where a step first went non-finite: a phrase for the message, and whether it is the data itself."""

    place: str
    in_data: bool = False

    @property
    def hint(self) -> str:
        """What to try: the data and its normalization when they hold it, else the rate."""
        return DATA_HINT if self.in_data else RATE_HINT


def first_non_finite(
    module: GraphModule,
    graph: nx.DiGraph,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: dict[str, torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager],
    label_smoothing: float = 0.0,
) -> Finding | None:
    """The first non-finite value of the step (see the module's docstring); None when the replay finds
    none."""
    module.zero_grad(set_to_none=True)
    set_rng_states(rng)
    with autocast():
        values = module.trace(x)
    for value in values.values():
        if value.requires_grad:
            value.retain_grad()
    inputs = set(graph.graph["inputs"])
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            if name in inputs:
                return Finding(f"in the net's input `{name}` (the data)", in_data=True)
            return Finding(f"in the output of layer `{name}` ({layer(graph, name).op})")
    logits = values[graph.graph["outputs"][0]].float().flatten(1)
    loss = F.cross_entropy(logits, y.to(logits.device), label_smoothing=label_smoothing)
    if not bool(torch.isfinite(loss)):
        largest = float(logits.detach().abs().max())
        if largest > 1e30:  # finite, but past what a softmax's sum of exponentials can hold in fp32
            return Finding(
                f"in the loss: the logits reach {largest:.3g} (every layer's output is finite, but that large)"
            )
        return Finding("in the loss (every layer's output is finite: are the labels right?)")
    loss.backward()
    for name in reversed(list(values)):
        grad = values[name].grad
        if name not in inputs and grad is not None and not bool(torch.isfinite(grad).all()):
            return Finding(f"in the gradient at the output of layer `{name}` ({layer(graph, name).op})")
    for name, param in module.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return Finding(f"in the gradient of weight `{name}`")
    return None


def first_non_finite_in_parts(
    module: GraphModule,
    graph: nx.DiGraph,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    rng: dict[str, torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager],
    label_smoothing: float = 0.0,
) -> Finding:
    """`first_non_finite` over a step taken in parts (netdsl.train.step), replayed part by part from the
    step's random state: the first part where something is found, and where in it."""
    set_rng_states(rng)
    for index, (x, y) in enumerate(parts):
        found = first_non_finite(module, graph, x, y, rng_states(), autocast, label_smoothing)
        if found is not None and len(parts) > 1:
            return found._replace(place=f"{found.place}, in part {index + 1} of {len(parts)} of the batch")
        if found is not None:
            return found
    return Finding("not found again when the step was replayed (a transient fault?)")


def compiled_gradients_differ(
    module: GraphModule,
    optimizer: torch.optim.Optimizer,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    rng: dict[str, torch.Tensor],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> str | None:
    """The first weight whose gradient, as the step just computed it under torch.compile, differs from the
    same step's in eager PyTorch (same weights, parts and random state) by more than 1e-3 of the eager
    gradient's largest entry; None when all agree, and the weights then hold the compiled gradients again."""
    params = list(module.named_parameters())
    compiled = {name: param.grad.clone() for name, param in params if param.grad is not None}
    saved = rng_states()
    set_rng_states(rng)
    optimizer.zero_grad(set_to_none=True)  # the optimizer's: a fused one keeps its gradients as views of a buffer
    backward_in_parts(module.logits, parts, loss_of, autocast)
    set_rng_states(saved)
    for name, param in params:
        eager, got = param.grad, compiled.get(name)
        scale = max(float(eager.abs().max()), 1e-12) if eager is not None else 1.0
        if eager is None or got is None or float((got - eager).abs().max()) > 1e-3 * scale:
            return name
    for name, param in params:
        if param.grad is not None:
            param.grad.copy_(compiled[name])  # in place: a fused optimizer's gradients are views of its flat buffer
    return None


@dataclass(frozen=True)
class GradientCheck:
    weight: str
    index: tuple[int, ...]
    autograd: float
    numeric: float

    @property
    def error(self) -> float:
        """|autograd - numeric| relative to their size, or over 1e-4 for smaller gradients (where the finite
        difference's own rounding, about 1e-10, would dominate a relative error)."""
        return abs(self.autograd - self.numeric) / max(abs(self.autograd), abs(self.numeric), 1e-4)


def check_gradients(
    graph: nx.DiGraph,
    weights: dict[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    per_weight: int = 3,
    seed: int = 0,
    step: float = 1e-6,
    recompute: str = "none",
) -> list[GradientCheck]:
    """Autograd against central differences (f(w+h) - f(w-h)) / 2h in float64, on the training-mode
    loss (batch norm on batch statistics; dropout with one fixed mask, the same random state before
    every evaluation), for `per_weight` seeded entries of every trained weight of the net (a layer no
    output reads is not trained); autograd's backward pass runs layers again as `recompute` says."""
    module = GraphModule(graph, weights=weights, dtype=torch.float64, recompute=recompute).train()
    x, y = x.to(torch.float64), y.to(torch.int64)
    saved = rng_states()
    torch.manual_seed(seed)
    start = rng_states()

    def loss() -> torch.Tensor:
        set_rng_states(start)
        return F.cross_entropy(module.logits(x).flatten(1), y)

    try:
        module.zero_grad(set_to_none=True)
        loss().backward()
        picker = np.random.default_rng(seed)
        results = []
        with torch.no_grad():
            for name, param in module.named_parameters():
                if not param.requires_grad:  # a layer no output reads: not trained, no gradient to check
                    continue
                flat = param.view(-1)
                grad = param.grad.reshape(-1)
                for position in picker.choice(flat.numel(), size=min(per_weight, flat.numel()), replace=False):
                    original = float(flat[position])
                    flat[position] = original + step
                    above = float(loss())
                    flat[position] = original - step
                    below = float(loss())
                    flat[position] = original
                    index = tuple(int(i) for i in np.unravel_index(int(position), tuple(param.shape)))
                    results.append(GradientCheck(name, index, float(grad[position]), (above - below) / (2 * step)))
        return results
    finally:
        set_rng_states(saved)
