"""Finding a learning rate: the loss over a short run whose rate grows step by step (`netdsl train --find-lr`).

A from-scratch net's rate is otherwise a guess: too low and it crawls, too high and its loss jumps or
diverges (SimpleNet's did at 0.02 until it warmed up). The sweep takes the recipe's whole step (optimizer,
momentum, weight decay, lr_mult, clipping, dtype, parts, augmentation, starting weights) with only the
rate changed: step i of n takes `low * (high / low) ** (i / (n - 1))`, times each weight's lr_mult. The
loss is smoothed (an exponential moving average, its start-up bias removed); the sweep ends early once
the smoothed loss is four times its lowest, or the loss is not finite. Nothing is written: the weights
it moved are thrown away.

The suggested rate is where the smoothed loss fell fastest against the rate's logarithm, before its
lowest point (Smith's range test reads the curve the same way); the rate at the lowest loss, a tenth of
it, is said too. They are a starting point for `lr`, not a result: a schedule and a warm-up still apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from netdsl.errors import NetError
from netdsl.train.loop import Trainer
from netdsl.train.progress import Progress

LOW, HIGH = 1e-7, 10.0  # the rates swept, first and last
SMOOTHING = 0.9  # the moving average's weight of the past
BLOWN_UP = 4.0  # the sweep ends once the smoothed loss is this many times its lowest


@dataclass
class Sweep:
    """The rates taken and the losses they gave, step by step."""

    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each step's batch loss, before its update
    smoothed: list[float] = field(default_factory=list)
    ended: str = "the last rate was reached"  # why the sweep stopped
    average: float = 0.0  # the moving average so far, before its start-up bias is removed

    def add(self, rate: float, loss: float) -> None:
        self.rates.append(rate)
        self.losses.append(loss)
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        self.smoothed.append(self.average / (1 - SMOOTHING ** len(self.losses)))

    @property
    def lowest(self) -> int:
        """The step of the lowest smoothed loss."""
        return int(np.argmin(self.smoothed))

    def suggestion(self) -> float | None:
        """The rate where the smoothed loss fell fastest against log(rate), up to its lowest point; None when
        it never fell."""
        return steepest(self.rates, self.smoothed)


def steepest(rates: Sequence[float], losses: Sequence[float]) -> float | None:
    """The rate where `losses` fell fastest against log10(rates), up to the lowest loss: the least-squares
    slope over a window of a tenth of the points (at least 3) slid along the curve, its first tenth left out
    (where the average is still settling); the window's middle rate. None when no window falls."""
    end = int(np.argmin(losses)) + 1
    width = max(3, len(losses) // 10)
    first = len(losses) // 10
    if end - first < width:
        return None
    x, y = np.log10(np.asarray(rates, dtype=np.float64)), np.asarray(losses, dtype=np.float64)
    slopes = [
        np.polyfit(x[start : start + width], y[start : start + width], 1)[0] for start in range(first, end - width + 1)
    ]
    best = int(np.argmin(slopes))
    return float(rates[first + best + width // 2]) if slopes[best] < 0 else None


def rates(steps: int, low: float = LOW, high: float = HIGH) -> list[float]:
    """The sweep's rates: `steps` of them, evenly spaced in log from `low` to `high`."""
    if steps < 2:
        raise ValueError(f"a sweep takes at least 2 steps, not {steps}")
    return [low * (high / low) ** (index / (steps - 1)) for index in range(steps)]


class RateFinder(Trainer):
    """A trainer whose steps take the sweep's rates (its schedule's factor, against `lr`), that ends at the
    first non-finite loss instead of diagnosing it, and that writes nothing."""

    def sweep(self, steps: int) -> Sweep:
        if self.world.distributed:
            raise NetError(
                "--find-lr runs in one process",
                where="--find-lr",
                hint="run it without torchrun (the rate found holds for the same batch under torchrun)",
            )
        found = Sweep()
        self.schedule = _Rates(rates(steps), self.recipe.lr)
        self.module.train()
        progress = Progress(self.stream, steps, "sweeping the rate", self.world)  # a bar on a terminal
        try:
            epoch = 0
            while len(found.rates) < steps:
                for index, (x, y) in enumerate(self._training_batches(epoch)):
                    self.epoch, self.batch_in_epoch = epoch, index  # where the step is: what `mixup` draws from
                    rate = self.schedule.at(len(found.rates))
                    try:
                        loss, _ = self._train_step(x, y)
                    except _NotFiniteError as error:
                        if not found.rates:
                            raise NetError(
                                f"the sweep's first step, at rate {rate:g}, has a loss of {error.loss}: not the "
                                "rate's doing (so small a rate has not moved the weights yet)",
                                where="--find-lr",
                                hint="look at the data and the starting weights: `netdsl train` on them names the "
                                "first layer whose values are not finite",
                            ) from None
                        found.ended = f"the loss was {error.loss} at rate {rate:.3g}"
                        return found
                    found.add(rate, loss)
                    progress.advance()
                    if found.smoothed[-1] > BLOWN_UP * min(found.smoothed):
                        found.ended = f"the loss had grown to {BLOWN_UP:g} times its lowest"
                        return found
                    if len(found.rates) == steps:
                        return found
                epoch += 1
            return found
        finally:
            progress.close()

    def _diverged(self, parts: list, rng: dict, loss: float) -> None:
        raise _NotFiniteError(loss)


class _Rates:
    """Stands in for the trainer's schedule: the factor of `lr` that gives the sweep's rate for the step
    about to be taken (`at` chooses it)."""

    def __init__(self, sweep: list[float], lr: float) -> None:
        self.sweep, self.lr = sweep, lr
        self.index = 0

    def at(self, index: int) -> float:
        self.index = index
        return self.sweep[index]

    def factor(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
        return self.sweep[self.index] / self.lr


class _NotFiniteError(Exception):
    def __init__(self, loss: float) -> None:
        super().__init__(loss)
        self.loss = loss


def report(found: Sweep, rows: int = 20) -> str:
    """The sweep as a table (about `rows` of its steps, and its lowest), the suggestion and why it ended."""
    from netdsl.tables import format_table

    count = len(found.rates)
    shown = sorted({*range(0, count, max(1, math.ceil(count / rows))), count - 1, found.lowest})
    table = [
        (str(index + 1), f"{found.rates[index]:.3g}", f"{found.losses[index]:.4f}", f"{found.smoothed[index]:.4f}")
        for index in shown
    ]
    lines = format_table(("step", "rate", "loss", "smoothed"), table, left=set())
    lines.append(f"{count} steps; the sweep ended: {found.ended}")
    suggested = found.suggestion()
    lowest = found.rates[found.lowest]
    if suggested is None:
        lines.append(f"the loss did not fall: no rate to suggest (lowest at rate {lowest:.3g})")
    else:
        lines.append(
            f"suggested lr: {suggested:.3g} (where the loss fell fastest); the loss was lowest at rate {lowest:.3g} "
            f"(a tenth of it: {lowest / 10:.3g})"
        )
    return "\n".join(lines)
