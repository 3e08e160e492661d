"""Learning-rate schedules: the factor of the base rate at each step, and the state a checkpoint keeps.

`Schedule(kind, ...)` gives `factor(epoch, step_in_epoch, steps_per_epoch)`, the base rate's multiplier
for the step about to be taken (epochs and steps count from 0):

- `constant`: 1;
- `step`: gamma ** (epoch // every);
- `multistep`: gamma ** (the number of milestones <= epoch);
- `cosine`: min_factor + (1 - min_factor) * (1 + cos(pi * t / epochs)) / 2, with t = epoch + step_in_epoch /
  steps_per_epoch (so it falls smoothly, step by step), and min_factor after `epochs` (the run's length,
  a fraction when it ends inside an epoch);
- `poly`: (1 - t / epochs) ** power, t as for cosine (Caffe's and Darknet's `poly`; power 1 falls in a
  straight line), 0 after `epochs`;
- `exp`: gamma ** s, s the steps taken before this one (from 0, over the whole run): Caffe's `exp` policy, gamma
  close to 1 (0.9999: a tenth after about 23,000 steps);
- `inv`: (1 + gamma * s) ** -power, s as for exp: Caffe's `inv` policy, which its LeNet solver uses (gamma 1e-4,
  power 0.75);
- `plateau`: gamma ** drops, the paper's "divide the learning rate by 10 when the validation error stops
  improving".

`warmup_epochs` > 0 multiplies any of them by a linear ramp: step s (counted over epochs from 0) gets
(s + 1) / (warmup_epochs * steps_per_epoch) until that reaches 1.

`plateau` watches the validation error given to `end_of_epoch`: an epoch improves when its error is
below the best so far by more than `threshold` (absolute: errors are fractions, 0.01 = one point of
accuracy); after `patience` epochs in a row without improvement, the next one without improvement drops
the rate (the factor is multiplied by `gamma`, from the next epoch on) and the count starts again, at
most `max_drops` times (None: no limit). The paper dropped three times (0.01 -> 0.00001).

`EarlyStop` watches the same error with the same rule of improvement: after `patience` validated epochs
in a row without improvement, training ends.

The state (`state_dict`, JSON-able) is what changes while training: plateau's best error, count and
drops. The settings are the object's own: a run resumed with other settings uses them with the saved
counts; a resumed schedule of another kind is an error.
"""

from __future__ import annotations

import math

from netdsl.errors import NetError, did_you_mean

KINDS = ("constant", "step", "multistep", "cosine", "poly", "exp", "inv", "plateau")


class Schedule:
    """A learning-rate schedule (the module's docstring): `factor` before each step, `end_of_epoch` after
    each epoch's validation."""

    def __init__(
        self,
        kind: str = "constant",
        *,
        every: int | None = None,
        milestones: tuple[int, ...] | list[int] = (),
        gamma: float = 0.1,
        epochs: float | None = None,
        min_factor: float = 0.0,
        power: float = 1.0,
        patience: int = 5,
        max_drops: int | None = 3,
        threshold: float = 1e-4,
        warmup_epochs: float = 0.0,
    ) -> None:
        if kind not in KINDS:
            hint = did_you_mean(str(kind), KINDS) or f"schedules: {', '.join(KINDS)}"
            raise NetError(f"unknown learning-rate schedule `{kind}`", where="schedule", hint=hint)
        self.kind = kind
        self.every = every
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.epochs = epochs
        self.min_factor = min_factor
        self.power = power
        self.patience = patience
        self.max_drops = max_drops
        self.threshold = threshold
        self.warmup_epochs = warmup_epochs
        self._check()
        # plateau's state
        self.best: float | None = None
        self.bad_epochs = 0
        self.drops = 0
        self.drop_epochs: list[int] = []

    def _check(self) -> None:
        _need(_real(self.gamma) and 0 < self.gamma <= 1, "gamma", self.gamma, "a number in (0, 1]")
        _need(_real(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs)
        if self.kind == "step":
            _need(_whole(self.every) and self.every >= 1, "every", self.every, "a whole number of epochs >= 1")
        if self.kind == "multistep":
            steps = list(self.milestones)
            increasing = bool(steps) and all(_whole(m) and m >= 0 for m in steps) and steps == sorted(set(steps))
            _need(increasing, "milestones", steps, "increasing whole numbers of epochs")
        if self.kind in ("cosine", "poly"):
            _need(_real(self.epochs) and self.epochs > 0, "epochs", self.epochs, "a number of epochs > 0")
        if self.kind == "cosine":
            _need(_real(self.min_factor) and 0 <= self.min_factor <= 1, "min_factor", self.min_factor, "in [0, 1]")
        if self.kind in ("poly", "inv"):
            _need(_real(self.power) and self.power > 0, "power", self.power, "a number > 0")
        if self.kind == "plateau":
            _need(_whole(self.patience) and self.patience >= 0, "patience", self.patience, "a whole number >= 0")
            limit = self.max_drops is None or (_whole(self.max_drops) and self.max_drops >= 0)
            _need(limit, "max_drops", self.max_drops, "a whole number >= 0, or none for no limit")
            _need(_real(self.threshold) and self.threshold >= 0, "threshold", self.threshold)

    # --- the factor -------------------------------------------------------------------------------

    def factor(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
        """The base learning rate's multiplier for step `step_in_epoch` of epoch `epoch` (both from 0)."""
        if steps_per_epoch < 1 or not 0 <= step_in_epoch < steps_per_epoch or epoch < 0:
            raise ValueError(f"no step {step_in_epoch} of {steps_per_epoch} in epoch {epoch}")
        if self.kind == "constant":
            value = 1.0
        elif self.kind == "step":
            value = self.gamma ** (epoch // self.every)
        elif self.kind == "multistep":
            value = self.gamma ** sum(1 for milestone in self.milestones if epoch >= milestone)
        elif self.kind == "cosine":
            progress = min((epoch + step_in_epoch / steps_per_epoch) / self.epochs, 1.0)
            value = self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * progress)) / 2
        elif self.kind == "poly":
            progress = min((epoch + step_in_epoch / steps_per_epoch) / self.epochs, 1.0)
            value = (1 - progress) ** self.power
        elif self.kind == "exp":
            value = self.gamma ** (epoch * steps_per_epoch + step_in_epoch)
        elif self.kind == "inv":
            value = (1 + self.gamma * (epoch * steps_per_epoch + step_in_epoch)) ** -self.power
        else:
            value = self.gamma**self.drops
        ramp = self.warmup_epochs * steps_per_epoch
        done = epoch * steps_per_epoch + step_in_epoch + 1
        if ramp > 0 and done < ramp:
            value *= done / ramp
        return value

    def end_of_epoch(self, epoch: int, val_error: float | None) -> None:
        """Takes epoch `epoch`'s validation error (None: not measured; ignored). Only `plateau` uses it."""
        if self.kind != "plateau" or val_error is None:
            return
        if improves(val_error, self.best, self.threshold):
            self.best = float(val_error)
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience and (self.max_drops is None or self.drops < self.max_drops):
            self.drops += 1
            self.bad_epochs = 0
            self.drop_epochs.append(int(epoch))

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What training changed (JSON-able), with the kind it belongs to."""
        return {
            "kind": self.kind,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "drops": self.drops,
            "drop_epochs": list(self.drop_epochs),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise NetError(
                f"the saved learning-rate schedule is `{state.get('kind')}`, this run's is `{self.kind}`",
                where="schedule",
                hint=f"resume with schedule `{state.get('kind')}`, or start a new run",
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.drops = int(state["drops"])
        self.drop_epochs = [int(epoch) for epoch in state["drop_epochs"]]

    def __repr__(self) -> str:
        settings = {
            "constant": {},
            "step": {"every": self.every, "gamma": self.gamma},
            "multistep": {"milestones": list(self.milestones), "gamma": self.gamma},
            "cosine": {"epochs": self.epochs, "min_factor": self.min_factor},
            "poly": {"epochs": self.epochs, "power": self.power},
            "exp": {"gamma": self.gamma},
            "inv": {"gamma": self.gamma, "power": self.power},
            "plateau": {
                "patience": self.patience,
                "gamma": self.gamma,
                "max_drops": self.max_drops,
                "threshold": self.threshold,
            },
        }[self.kind]
        if self.warmup_epochs:
            settings["warmup_epochs"] = self.warmup_epochs
        return f"Schedule({self.kind!r}" + "".join(f", {key}={value!r}" for key, value in settings.items()) + ")"


class EarlyStop:
    """Ends training when the validation error has not improved (dropped below the best so far by more than
    `threshold`) for `patience` validated epochs in a row; patience None: never. The watch runs either way,
    so a run resumed with a patience sees the epochs before it."""

    def __init__(self, patience: int | None, threshold: float) -> None:
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def end_of_epoch(self, epoch: int, val_error: float | None) -> None:
        """Takes epoch `epoch`'s validation error (None: not measured; ignored)."""
        if val_error is None:
            return
        if improves(val_error, self.best, self.threshold):
            self.best, self.best_epoch, self.bad_epochs = float(val_error), int(epoch), 0
        else:
            self.bad_epochs += 1

    @property
    def stops(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def reason(self) -> str:
        """Why it stopped, for the log."""
        return (
            f"the validation error has not improved (by more than {100 * self.threshold:g} points) for "
            f"{self.bad_epochs} validated epoch"
            f"{'' if self.bad_epochs == 1 else 's'} (best {100 * self.best:.2f}% at epoch {self.best_epoch + 1})"
        )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


def improves(error: float, best: float | None, threshold: float) -> bool:
    """The rule plateau and early stopping share: an epoch improves when its validation error is below the
    best so far by more than `threshold` (the first measured epoch always does)."""
    return best is None or error < best - threshold


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(good: bool, setting: str, value, wanted: str = "a number >= 0") -> None:
    if not good:
        raise NetError(
            f"schedule setting `{setting}` must be {wanted}, got {value!r}",
            where=setting,
            hint="docs/training.md lists the schedule settings and what each takes",
        )
