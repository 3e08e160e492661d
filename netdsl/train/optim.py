"""Optimizers: the AlexNet paper's SGD (and Nesterov's variant), AdamW, and per-layer multipliers.

The paper's update (section 5), per weight w with gradient g of the batch's loss:

    v <- momentum * v - weight_decay * lr * w - lr * g
    w <- w + v

`torch.optim.SGD` keeps `buf <- momentum * buf + (g + weight_decay * w)` and steps `w <- w - lr * buf`.
The two agree while lr is constant (v = -lr * buf), and differ once it changes: the paper's velocity
carries the steps already taken at the old rate, and the new rate scales only new gradients; PyTorch's
buffer carries old gradients, which the new rate rescales at once (a drop by 10 shrinks the momentum
that was already built up by 10 too).

Multipliers (Caffe's `lr_mult` / `decay_mult`, cuda-convnet2's `epsW` / `epsB` / `wc`) are glob patterns
over netdsl's weight names, the last matching pattern winning: `("*.bias", 0)` in the decay
multipliers is "no weight decay on biases". Each parameter group's `lr` is the rate its parameters
step with, the group's `lr_mult` already applied (`set_learning_rate` applies it); its weight decay
is the optimizer's times the group's `decay_mult`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable

import torch

from netdsl.errors import NetError, did_you_mean

OPTIMIZERS = ("sgd", "adamw")


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    lr_mults: list[tuple[str, float]],
    decay_mults: list[tuple[str, float]],
    *,
    strict: bool = True,
    where: Callable[[str, str], str] | None = None,
) -> list[dict]:
    """Parameter groups by multipliers: `{"params", "names", "lr_mult", "decay_mult"}`, one per distinct
    (lr_mult, decay_mult) pair, in the order their first parameter comes. A parameter takes the value
    of the last pattern (fnmatch) that matches its name, 1 when none does; parameters that do not
    require gradients (a layer no output reads) are left out. `strict`: a pattern that matches no parameter,
    trained or not, is an error (a typo would otherwise change nothing, silently); one naming only a layer
    no output reads is not a typo, and changes nothing. `where(setting, pattern)`: where a pattern was given,
    for its error (`Recipe.source`: a file position or a flag); the setting's name otherwise."""
    every = list(named_params)
    named = [(name, param) for name, param in every if param.requires_grad]
    names = [name for name, _ in every]
    for setting, rules in (("lr_mult", lr_mults), ("decay_mult", decay_mults)):
        for pattern, value in rules:
            place = where(setting, pattern) if where is not None else setting
            if not (_real(value) and value >= 0):
                raise NetError(
                    f"{setting} `{pattern}` must be a number >= 0, got {value!r}",
                    where=place,
                    hint="0 turns it off for the matching weights (no learning, or no decay); 1 keeps the base value",
                )
            if strict and not fnmatch.filter(names, pattern):
                hint = did_you_mean(pattern, names) or (f"weights are named like `{names[0]}`" if names else None)
                raise NetError(f"{setting} pattern `{pattern}` matches no weight of the net", where=place, hint=hint)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        key = (_multiplier(name, lr_mults), _multiplier(name, decay_mults))
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": key[0], "decay_mult": key[1]})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def _multiplier(name: str, rules: list[tuple[str, float]]) -> float:
    found = 1.0
    for pattern, value in rules:
        if fnmatch.fnmatchcase(name, pattern):
            found = float(value)
    return found


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's rate to `lr` times its `lr_mult` (what a schedule does before each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _with_rates(groups, lr: float) -> list[dict]:
    """Groups given as dicts keep their own `lr` if they have one, else `lr` times their `lr_mult`; a plain
    iterable of parameters is one group."""
    groups = list(groups)
    if not groups or not isinstance(groups[0], dict):
        return [{"params": groups, "lr": lr}]
    return [{**group, "lr": group.get("lr", lr * group.get("lr_mult", 1.0))} for group in groups]


def _check(lr: float, momentum: float, weight_decay: float) -> None:
    if not (_real(lr) and lr > 0):
        raise NetError(
            f"the learning rate must be a number > 0, got {lr!r}", where="lr", hint="the paper starts at 0.01"
        )
    if not (_real(momentum) and 0 <= momentum < 1):
        raise NetError(
            f"the momentum must be at least 0 and below 1, got {momentum!r}",
            where="momentum",
            hint="the paper uses 0.9; 0 is plain SGD",
        )
    if not (_real(weight_decay) and weight_decay >= 0):
        raise NetError(
            f"the weight decay must be a number >= 0, got {weight_decay!r}",
            where="weight_decay",
            hint="the paper uses 0.0005; 0 turns decay off",
        )


_F32_MAX = 3.4028234663852886e38  # the update runs in float32: a rate, or a rate times a decay, beyond it overflows


def _check_scales(groups: list[dict], weight_decay: float) -> None:
    """That each group's rate, and its rate times its decay, are float32 numbers (torch converts them when it
    updates float32 weights, and fails past the largest)."""
    for group in groups:
        lr, decay = group["lr"], weight_decay * group.get("decay_mult", 1.0)
        if lr > _F32_MAX or lr * decay > _F32_MAX:
            raise NetError(
                f"a learning rate of {lr:g}{f' with a weight decay of {decay:g}' if lr <= _F32_MAX else ''} is "
                "beyond float32, in which the weights are updated",
                where="lr",
                hint="learning rates are small numbers: the paper starts at 0.01 (lr times lr_mult, and times the "
                "decay, must stay below 3.4e38)",
            )


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, updated as in the AlexNet paper (the module's docstring).

    State per parameter: `velocity` (v). `nesterov=True`: v as above, then
    `w <- w + momentum * v - lr * (g + weight_decay * w)` (Sutskever et al. 2013's form; equal to
    `torch.optim.SGD(nesterov=True)` while lr is constant)."""

    def __init__(
        self, groups, lr: float, momentum: float = 0.9, weight_decay: float = 0.0005, nesterov: bool = False
    ) -> None:
        _check(lr, momentum, weight_decay)
        if nesterov and momentum == 0:
            raise NetError(
                "Nesterov momentum needs a momentum above 0",
                where="nesterov",
                hint="give a momentum such as 0.9, or leave Nesterov off",
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "lr_mult": 1.0,
            "decay_mult": 1.0,
        }
        rated = _with_rates(groups, lr)
        _check_scales(rated, weight_decay)
        super().__init__(rated, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            decay = group["weight_decay"] * group["decay_mult"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise NetError(
                        "PaperSGD does not take sparse gradients",
                        where="optimizer",
                        hint="netdsl nets have dense weights: this optimizer takes dense gradients only",
                    )
                state = self.state[w]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                v = state["velocity"]
                v.mul_(momentum).add_(w, alpha=-decay * lr).add_(w.grad, alpha=-lr)
                if group["nesterov"]:
                    step = w.grad.add(w, alpha=decay).mul_(-lr).add_(v, alpha=momentum)
                    w.add_(step)
                else:
                    w.add_(v)
        return loss


class FlatPaperSGD(PaperSGD):
    """`PaperSGD` in one kernel launch per device (codegen/optimizer.py) over flat fp32 buffers.

    At construction each device's parameters are moved into one flat buffer (each parameter's data becomes
    a view of it), and so are their gradients (autograd accumulates into the views) and velocities; a table
    of segments gives each parameter its lr_mult and decay_mult. `zero_grad` zeroes the flat gradients in
    place (the views must stay). Velocities loaded from a checkpoint are copied into the flat buffer."""

    def __init__(
        self, groups, lr: float, momentum: float = 0.9, weight_decay: float = 0.0005, nesterov: bool = False
    ) -> None:
        from netdsl.codegen.optimizer import segments

        super().__init__(groups, lr, momentum, weight_decay, nesterov)
        self.flat: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]] = {}
        self.velocity_views: dict[torch.nn.Parameter, torch.Tensor] = {}
        by_device: dict[torch.device, list[tuple[torch.nn.Parameter, dict]]] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype != torch.float32:
                    raise NetError(
                        f"the fused SGD keeps float32 weights, got {param.dtype}",
                        where="optimizer",
                        hint="train the weights in float32 (mixed precision keeps float32 weights: --dtype bf16)",
                    )
                by_device.setdefault(param.device, []).append((param, group))
        for device, members in by_device.items():
            sizes = [param.numel() for param, _ in members]
            weights = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            grads, velocities = torch.zeros_like(weights), torch.zeros_like(weights)
            start = 0
            for (param, _), size in zip(members, sizes):
                view = slice(start, start + size)
                weights[view].copy_(param.detach().reshape(-1))
                param.data = weights[view].view_as(param)
                param.grad = grads[view].view_as(param)
                self.velocity_views[param] = self.state[param]["velocity"] = velocities[view].view_as(param)
                start += size
            lr_mults, decay_mults = ([g[key] for _, g in members] for key in ("lr_mult", "decay_mult"))
            table = segments(sizes, lr_mults, decay_mults, device)
            self.flat[device] = (weights, grads, velocities, table)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, grads, _, _ in self.flat.values():
            grads.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        from netdsl.codegen.optimizer import paper_sgd_step

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, view in self.velocity_views.items():
            if self.state[param]["velocity"] is not view:  # loaded from a checkpoint: into the flat buffer
                view.copy_(self.state[param]["velocity"])
                self.state[param]["velocity"] = view
        # The base rate: a group's rate over its multiplier (each group's is base * schedule * lr_mult); with
        # every multiplier 0, every rate is 0 whatever the base.
        rated = [group for group in self.param_groups if group["lr_mult"] > 0]
        base = rated[0]["lr"] / rated[0]["lr_mult"] if rated else 0.0
        group = self.param_groups[0]
        if base == 0:
            # Every rate 0 (frozen weights, or a schedule at 0): the rule takes no gradient and no decay (both
            # scale with the rate), only the momentum already built up, which is none for weights frozen from
            # the start. The kernel takes rates above 0 only.
            for weights, _, velocities, _ in self.flat.values():
                velocities.mul_(group["momentum"])
                weights.add_(velocities, alpha=group["momentum"] if group["nesterov"] else 1.0)
            return loss
        for weights, grads, velocities, table in self.flat.values():
            paper_sgd_step(
                weights, grads, velocities, table, lr=base, momentum=group["momentum"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            )  # fmt: skip
        return loss


def make_optimizer(
    name: str,
    groups,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0005,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """`sgd`: `PaperSGD` (`fused`: `FlatPaperSGD`, one kernel launch per device); `adamw`: `torch.optim.AdamW`
    with each group's lr (times its `lr_mult`) and weight decay times its `decay_mult` (decoupled:
    `w <- w - lr * weight_decay * w` before Adam's step). `momentum` and `nesterov` are SGD's; `betas` and
    `eps` AdamW's."""
    if name == "sgd":
        kind = FlatPaperSGD if fused else PaperSGD
        return kind(groups, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        _check(lr, 0.0, weight_decay)
        rated = _with_rates(groups, lr)
        _check_scales(rated, weight_decay)
        for group in rated:
            group["weight_decay"] = group.get("weight_decay", weight_decay) * group.get("decay_mult", 1.0)
        return torch.optim.AdamW(rated, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    hint = did_you_mean(str(name), OPTIMIZERS) or f"optimizers: {', '.join(OPTIMIZERS)}"
    raise NetError(f"unknown optimizer `{name}`", where="optimizer", hint=hint)
