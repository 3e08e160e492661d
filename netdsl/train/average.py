"""An exponential moving average of the weights (`ema = DECAY`): the optimizer steps the weights, validation
measures their average, and the average is what the run delivers.

After each optimizer step every weight and running statistic w moves its average a towards it,
a <- decay * a + (1 - decay) * w (`torch.lerp`), the first step's weights starting it: the average of
`torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn(decay)` and `use_buffers=True`. It spans
about 1 / (1 - decay) steps (1,000 at 0.999), and does not change a step: the weights the optimizer reads
and writes are the same with it or without.

Checkpoints hold the average under the weights' own names, so that everything that reads a checkpoint or
`weights.safetensors` as a weights file (`netdsl run`, `eval`, `export`, a fine-tuning start) reads what
validation measured; the optimizer's weights go under `live:<name>`, which is what a resume trains on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class WeightAverage:
    """The average of a module's state (weights and batch norm's running statistics); `decay` None: none kept,
    every method a no-op."""

    def __init__(self, decay: float | None) -> None:
        self.decay = decay
        self.tensors: dict[str, torch.Tensor] | None = None  # None until the first step (or without `decay`)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """After an optimizer step: moves the average towards the module's state (the first step: copies it)."""
        if self.decay is None:
            return
        state = module.state_dict()
        if self.tensors is None:
            self.tensors = {name: value.detach().clone() for name, value in state.items()}
            return
        for name, value in state.items():
            average = self.tensors[name]
            if average.is_floating_point():
                average.lerp_(value, 1.0 - self.decay)
            else:  # a count: taken as it is
                average.copy_(value)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside the block the module holds the average (where there is one); its own state again after."""
        if self.tensors is None:
            yield
            return
        state = module.state_dict()
        with torch.no_grad():
            kept = {name: value.detach().clone() for name, value in state.items()}
            for name, value in state.items():
                value.copy_(self.tensors[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in state.items():
                    value.copy_(kept[name])

    def saved(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A checkpoint's weights and live weights for the module's `state`: the average and the state itself
        when there is an average; the state and nothing before the first step or without `decay`."""
        if self.tensors is None:
            return dict(state), {}
        return dict(self.tensors), dict(state)

    def load(
        self, weights: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], module: torch.nn.Module
    ) -> None:
        """At resume, after the module has its live weights: the checkpoint's average (its `weights` where it
        holds `live` ones) on the module's devices, when this run keeps one. A run that kept none starts one at
        its next step."""
        if self.decay is None or not live:
            return
        self.tensors = {}
        for name, value in module.state_dict().items():
            average = torch.empty_like(value)  # the module's device, dtype and memory format
            average.copy_(weights[name])
            self.tensors[name] = average
