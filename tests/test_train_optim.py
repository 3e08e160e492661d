"""Optimizers, multipliers and schedules (netdsl/train/optim.py, schedule.py) against hand-written references.

- K steps of `PaperSGD` on LeNet-5 (netdsl's trainable module), with "no decay on biases" and a doubled
  rate on some layers, from the same weights and batches as a loop written here on the hand-written
  model of tests/golden/models.py that applies the paper's rule to each tensor by hand, with a drop of
  the learning rate by 10 in the middle: equal in fp32 to STEP_TOLERANCE (relative to the tensor's
  largest value). `torch.optim.SGD` agrees with both before the drop and not after it.
- Nesterov and AdamW against hand-written loops (and torch's SGD with nesterov before the drop).
- Resume: an optimizer's state_dict and a module's, saved half way and loaded into fresh ones, continue
  bit-identically. Schedules against hand-computed factors; plateau's drops and its limit.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from golden.models import LeNet5
from golden.regenerate import golden_weights, net_path

import netdsl
from netdsl.errors import NetError
from netdsl.runtime.module import GraphModule
from netdsl.train.optim import PaperSGD, make_optimizer, param_groups, set_learning_rate
from netdsl.train.schedule import Schedule

STEP_TOLERANCE = 1e-5  # fp32, K steps: what rounding in a different order leaves
STEPS, DROP_AT, BASE_LR = 6, 3, 0.01  # steps 0..2 at BASE_LR, 3..5 at BASE_LR / 10
MOMENTUM, WEIGHT_DECAY = 0.9, 0.01  # a large decay, so that a decay wrongly applied to biases shows
LR_MULTS = [("f*", 2.0), ("f5.*", 1.0), ("c1.weight", 0.5)]  # the last match wins: f6 and f7 at 2, f5 at 1
DECAY_MULTS = [("*.bias", 0.0)]
# The same multipliers, written out by hand per tensor (1 where not listed).
LR_BY_NAME = {"f6.weight": 2.0, "f6.bias": 2.0, "f7.weight": 2.0, "f7.bias": 2.0, "c1.weight": 0.5}
DECAY_BY_NAME = {f"{layer}.bias": 0.0 for layer in ("c1", "c3", "f5", "f6", "f7")}


def learning_rates() -> list[float]:
    return [BASE_LR if step < DROP_AT else BASE_LR / 10 for step in range(STEPS)]


@pytest.fixture(scope="module")
def lenet():
    graph = netdsl.load_graph(net_path("lenet5"))
    generator = torch.Generator().manual_seed(21)
    batches = [
        (torch.randn(8, 1, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(STEPS)
    ]
    return graph, golden_weights("lenet5"), batches


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def worst_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    return max(relative_error(got[name].detach(), want[name].detach()) for name in want)


# --- netdsl's side and the hand-written side -----------------------------------------------------------


def netdsl_run(
    lenet, name: str, steps: int = STEPS, lr_mults=LR_MULTS, decay_mults=DECAY_MULTS, **kwargs
) -> dict[str, torch.Tensor]:
    graph, weights, batches = lenet
    module = GraphModule(graph, weights=weights)
    groups = param_groups(module.named_parameters(), lr_mults, decay_mults)
    optimizer = make_optimizer(name, groups, lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **kwargs)
    for (x, y), lr in list(zip(batches, learning_rates()))[:steps]:
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad()
        F.cross_entropy(module.logits(x), y).backward()
        optimizer.step()
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def hand_written_run(lenet, update, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The golden LeNet-5 trained by a loop: `update(name, w, grad, state, lr, decay, t)` changes w in place."""
    _, weights, batches = lenet
    model = LeNet5().load(weights)
    params = model.tensors()
    states = {name: {} for name in params}
    for t, ((x, y), lr) in enumerate(list(zip(batches, learning_rates()))[:steps], start=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for name, w in params.items():
                rate = lr * LR_BY_NAME.get(name, 1.0)
                decay = WEIGHT_DECAY * DECAY_BY_NAME.get(name, 1.0)
                update(w, w.grad, states[name], rate, decay, t)
    return {name: w.detach().clone() for name, w in params.items()}


def paper_update(w, grad, state, lr, decay, t):
    """v <- momentum * v - decay * lr * w - lr * grad; w <- w + v."""
    v = state.get("v", torch.zeros_like(w))
    state["v"] = MOMENTUM * v - decay * lr * w - lr * grad
    w += state["v"]


def nesterov_update(w, grad, state, lr, decay, t):
    """v as the paper's; w <- w + momentum * v - lr * (grad + decay * w)."""
    v = state.get("v", torch.zeros_like(w))
    state["v"] = MOMENTUM * v - decay * lr * w - lr * grad
    w += MOMENTUM * state["v"] - lr * (grad + decay * w)


BETAS, EPS = (0.9, 0.999), 1e-8


def adamw_update(w, grad, state, lr, decay, t):
    """Loshchilov & Hutter: w <- w - lr * decay * w, then Adam's bias-corrected step."""
    m = state["m"] = BETAS[0] * state.get("m", torch.zeros_like(w)) + (1 - BETAS[0]) * grad
    v = state["v"] = BETAS[1] * state.get("v", torch.zeros_like(w)) + (1 - BETAS[1]) * grad * grad
    w -= lr * decay * w
    w -= lr * (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)


def torch_sgd_run(lenet, steps: int, nesterov: bool = False) -> dict[str, torch.Tensor]:
    graph, weights, batches = lenet
    module = GraphModule(graph, weights=weights)
    groups = param_groups(module.named_parameters(), LR_MULTS, DECAY_MULTS)
    torch_groups = [
        {"params": g["params"], "lr_mult": g["lr_mult"], "weight_decay": WEIGHT_DECAY * g["decay_mult"]} for g in groups
    ]
    optimizer = torch.optim.SGD(torch_groups, lr=BASE_LR, momentum=MOMENTUM, nesterov=nesterov)
    for (x, y), lr in list(zip(batches, learning_rates()))[:steps]:
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad()
        F.cross_entropy(module.logits(x), y).backward()
        optimizer.step()
    return {name: param.detach().clone() for name, param in module.named_parameters()}


# --- the paper's SGD ------------------------------------------------------------------------------------


def test_paper_sgd_equals_the_hand_written_rule_across_a_learning_rate_drop(lenet):
    got = netdsl_run(lenet, "sgd")
    want = hand_written_run(lenet, paper_update)
    initial = {name: torch.as_tensor(value) for name, value in lenet[1].items()}
    assert worst_error(want, initial) > 100 * STEP_TOLERANCE  # the weights moved
    assert worst_error(got, want) <= STEP_TOLERANCE, worst_error(got, want)
    # The comparison sees the multipliers: ignoring the lr multipliers or decaying the biases shows.
    assert worst_error(netdsl_run(lenet, "sgd", lr_mults=[]), want) > 100 * STEP_TOLERANCE
    assert worst_error(netdsl_run(lenet, "sgd", decay_mults=[]), want) > 100 * STEP_TOLERANCE


def test_torch_sgd_agrees_before_the_drop_and_not_after(lenet):
    """While lr is constant, torch's v = -lr * buf makes the two rules one; after the drop, torch's buffer of
    old gradients is scaled by the new rate at once, the paper's velocity is not."""
    before = DROP_AT
    assert worst_error(torch_sgd_run(lenet, before), netdsl_run(lenet, "sgd", before)) <= STEP_TOLERANCE
    after_torch, after_paper = torch_sgd_run(lenet, STEPS), netdsl_run(lenet, "sgd")
    assert worst_error(after_torch, after_paper) > 100 * STEP_TOLERANCE


def test_nesterov_equals_the_hand_written_rule_and_torch_before_the_drop(lenet):
    got = netdsl_run(lenet, "sgd", nesterov=True)
    assert worst_error(got, hand_written_run(lenet, nesterov_update)) <= STEP_TOLERANCE
    assert worst_error(got, netdsl_run(lenet, "sgd")) > 100 * STEP_TOLERANCE  # it is not plain momentum
    early = netdsl_run(lenet, "sgd", DROP_AT, nesterov=True)
    assert worst_error(torch_sgd_run(lenet, DROP_AT, nesterov=True), early) <= STEP_TOLERANCE


def test_adamw_equals_the_hand_written_rule(lenet):
    got = netdsl_run(lenet, "adamw", betas=BETAS, eps=EPS)
    assert worst_error(got, hand_written_run(lenet, adamw_update)) <= STEP_TOLERANCE


def test_paper_sgd_takes_plain_parameters_and_skips_those_without_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    frozen = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = PaperSGD([w, frozen], lr=0.1, momentum=0.5, weight_decay=0.2)
    w.grad = torch.tensor([0.5, 0.25])
    optimizer.step()
    # v = -0.2 * 0.1 * w - 0.1 * g = [-0.07, 0.015]; w + v
    torch.testing.assert_close(w.detach(), torch.tensor([0.93, -1.985]))
    w.grad = torch.tensor([0.0, 0.0])
    optimizer.step()  # v = 0.5 * v - 0.02 * w
    torch.testing.assert_close(w.detach(), torch.tensor([0.93 - 0.035 - 0.0186, -1.985 + 0.0075 + 0.0397]))
    assert torch.equal(frozen.detach(), torch.tensor([3.0])) and frozen not in optimizer.state


# --- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dicts_resume_bit_identically(lenet, name):
    graph, weights, batches = lenet
    half = STEPS // 2

    def fresh():
        module = GraphModule(graph, weights=weights)
        groups = param_groups(module.named_parameters(), LR_MULTS, DECAY_MULTS)
        return module, make_optimizer(name, groups, lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def train(module, optimizer, steps):
        for step in steps:
            x, y = batches[step]
            set_learning_rate(optimizer, learning_rates()[step])
            optimizer.zero_grad()
            F.cross_entropy(module.logits(x), y).backward()
            optimizer.step()

    straight, straight_optimizer = fresh()
    train(straight, straight_optimizer, range(STEPS))

    first, first_optimizer = fresh()
    train(first, first_optimizer, range(half))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, range(half, STEPS))

    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    want, got = straight_optimizer.state_dict(), resumed_optimizer.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert want["param_groups"][0]["names"] and "lr_mult" in want["param_groups"][0]
    for index, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


# --- multipliers ----------------------------------------------------------------------------------------


def test_param_groups_by_multipliers():
    module = GraphModule(netdsl.load_graph(net_path("lenet5")))
    groups = param_groups(module.named_parameters(), LR_MULTS, DECAY_MULTS)
    found = {name: (g["lr_mult"], g["decay_mult"]) for g in groups for name in g["names"]}
    want = {name: (LR_BY_NAME.get(name, 1.0), DECAY_BY_NAME.get(name, 1.0)) for name, _ in module.named_parameters()}
    assert found == want
    assert [g["names"][0] for g in groups] == ["c1.weight", "c1.bias", "c3.weight", "f6.weight", "f6.bias"]
    for group in groups:
        params = dict(module.named_parameters())
        assert all(param is params[name] for name, param in zip(group["names"], group["params"]))
    module.get_parameter("c1.bias").requires_grad_(False)
    assert "c1.bias" not in {name for g in param_groups(module.named_parameters(), [], []) for name in g["names"]}


def test_multiplier_mistakes_are_net_errors():
    named = list(GraphModule(netdsl.load_graph(net_path("lenet5"))).named_parameters())
    with pytest.raises(NetError, match=r"pattern `f8\.\*` matches no weight of the net"):
        param_groups(named, [("f8.*", 2.0)], [])
    assert len(param_groups(named, [("f8.*", 2.0)], [], strict=False)) == 1
    with pytest.raises(NetError) as error:
        param_groups(named, [], [("c1.weigth", 0.0)])
    assert "did you mean `c1.weight`" in str(error.value)
    with pytest.raises(NetError, match="must be a number >= 0"):
        param_groups(named, [("*.bias", -1.0)], [])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "sdg"}, "did you mean `sgd`"),
        ({"lr": 0.0}, "learning rate must be a number > 0"),
        ({"momentum": 1.0}, "momentum must be at least 0 and below 1"),
        ({"weight_decay": -1e-4}, "weight decay must be a number >= 0"),
        ({"momentum": 0.0, "nesterov": True}, "Nesterov momentum needs a momentum above 0"),
    ],
)
def test_optimizer_mistakes_are_net_errors(kwargs, message):
    settings = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, **kwargs}
    with pytest.raises(NetError, match=message):
        make_optimizer(settings.pop("name"), [torch.nn.Parameter(torch.zeros(2))], **settings)


# --- schedules -----------------------------------------------------------------------------------------


def factors(schedule: Schedule, epochs: int, steps_per_epoch: int = 1) -> list[float]:
    return [schedule.factor(e, s, steps_per_epoch) for e in range(epochs) for s in range(steps_per_epoch)]


def test_schedule_factors():
    assert factors(Schedule(), 3) == [1.0, 1.0, 1.0]
    assert factors(Schedule("step", every=2, gamma=0.5), 6) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert factors(Schedule("multistep", milestones=[2, 5], gamma=0.1), 7) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01], rel=1e-12
    )
    cosine = Schedule("cosine", epochs=4, min_factor=0.1)
    assert cosine.factor(0, 0, 4) == 1.0
    assert cosine.factor(2, 0, 4) == pytest.approx(0.55, rel=1e-12)  # half way: (1 + 0.1) / 2
    assert cosine.factor(1, 2, 4) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 1.5 / 4)) / 2, rel=1e-12)
    assert cosine.factor(4, 0, 4) == cosine.factor(9, 3, 4) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize(("power", "epochs", "per_epoch"), [(1.0, 3, 4), (0.9, 2.5, 4), (2.0, 1, 7)])
def test_poly_follows_pytorchs_polynomial_lr_step_by_step(power, epochs, per_epoch):
    """`poly` against torch.optim.lr_scheduler.PolynomialLR over the run's steps (epochs x per_epoch, which
    may end inside an epoch), stepped once per step from lr 1; then 0 past the end, in float64."""
    total = round(epochs * per_epoch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=1.0)
    reference = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=power)
    poly = Schedule("poly", epochs=epochs, power=power)
    for step in range(total + per_epoch):
        epoch, within = divmod(step, per_epoch)
        want = optimizer.param_groups[0]["lr"]
        assert poly.factor(epoch, within, per_epoch) == pytest.approx(want, rel=1e-9, abs=1e-15), step
        optimizer.step()
        reference.step()
    assert poly.factor(9, 0, per_epoch) == 0.0


@pytest.mark.parametrize(("gamma", "per_epoch"), [(0.9, 4), (0.99, 7)])
def test_exp_follows_pytorchs_exponential_lr_stepped_each_step(gamma, per_epoch):
    """`exp` (Caffe's policy: gamma ** s, s the steps done) against torch.optim.lr_scheduler.ExponentialLR
    stepped once per step from lr 1, across epochs, in float64."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=1.0)
    reference = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    exp = Schedule("exp", gamma=gamma)
    for step in range(5 * per_epoch):
        epoch, within = divmod(step, per_epoch)
        assert exp.factor(epoch, within, per_epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        reference.step()


def test_inv_is_caffes_inverse_decay_over_the_runs_steps():
    """`inv`: Caffe's `base_lr * (1 + gamma * iter) ^ (-power)`, iter the steps done over the whole run (its LeNet
    solver's gamma 1e-4 and power 0.75: 0.5946 of the rate left at step 10,000), written out step by step; and
    under a warm-up, the ramp times it."""
    inv = Schedule("inv", gamma=1e-4, power=0.75)
    assert inv.factor(0, 0, 100) == 1.0
    assert inv.factor(100, 0, 100) == pytest.approx(1 / 2**0.75, rel=1e-12)  # step 10,000: (1 + 1) ** -0.75
    for step in (1, 99, 100, 12_345):
        epoch, within = divmod(step, 100)
        assert inv.factor(epoch, within, 100) == pytest.approx((1 + 1e-4 * step) ** -0.75, rel=1e-12)
    warm = Schedule("inv", gamma=0.01, power=1.0, warmup_epochs=1)
    assert warm.factor(0, 4, 10) == pytest.approx(0.5 / 1.04, rel=1e-12)  # step 4 of a 10-step ramp


def test_warm_up_ramps_linearly_and_multiplies_any_schedule():
    """2 epochs of 4 steps: step s (from 0) gets (s + 1) / 8 until it reaches 1."""
    warm = Schedule(warmup_epochs=2)
    assert factors(warm, 3, 4) == [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1, 1, 1, 1]
    stepped = Schedule("step", every=1, gamma=0.5, warmup_epochs=1.5)  # a ramp of 6 steps
    assert factors(stepped, 3, 4)[:8] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 0.5 * 5 / 6, 0.5, 0.5, 0.5]
    cosine = Schedule("cosine", epochs=2, warmup_epochs=1)
    assert cosine.factor(0, 1, 2) == pytest.approx(1.0 * (1 + math.cos(math.pi * 0.25)) / 2, rel=1e-12)
    assert cosine.factor(0, 0, 2) == pytest.approx(0.5, rel=1e-12)  # ramp 1/2 of a cosine at 1


def test_plateau_drops_after_patience_and_stops_at_its_limit():
    """patience 1: one epoch without improvement (by more than the threshold) is tolerated, the second in
    a row drops; at most two drops."""
    plateau = Schedule("plateau", patience=1, gamma=0.1, max_drops=2, threshold=0.01)
    errors = [0.5, 0.4, 0.395, 0.39, 0.38, 0.385, 0.5, None, 0.5, 0.5, 0.5, 0.1, 0.2, 0.2]
    seen = []
    for epoch, error in enumerate(errors):
        plateau.end_of_epoch(epoch, error)
        seen.append(plateau.factor(epoch + 1, 0, 10))
    # 0.395 is not 0.01 below 0.4 (bad 1), 0.39 neither (bad 2: drop); 0.38 improves; 0.385, 0.5: drop;
    # None is no measurement; then the limit holds, whatever comes.
    assert plateau.drop_epochs == [3, 6]
    assert seen == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], rel=1e-12)
    assert plateau.best == 0.1


def test_plateau_without_a_limit_keeps_dropping():
    plateau = Schedule("plateau", patience=0, gamma=0.5, max_drops=None, threshold=0.0)
    for epoch, error in enumerate([0.3, 0.3, 0.3, 0.3, 0.2, 0.2]):
        plateau.end_of_epoch(epoch, error)
    assert plateau.drop_epochs == [1, 2, 3, 5] and plateau.factor(6, 0, 1) == 0.5**4


def test_schedule_state_round_trips_through_json():
    first = Schedule("plateau", patience=1, max_drops=3, warmup_epochs=1)
    for epoch, error in enumerate([0.5, 0.6, 0.6, 0.4]):
        first.end_of_epoch(epoch, error)
    state = json.loads(json.dumps(first.state_dict()))
    second = Schedule("plateau", patience=1, max_drops=3, warmup_epochs=1)
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict() and second.drops == 1
    for epoch, error in enumerate([0.45, 0.45, 0.3, 0.35], start=4):
        first.end_of_epoch(epoch, error)
        second.end_of_epoch(epoch, error)
        assert first.factor(epoch + 1, 0, 3) == second.factor(epoch + 1, 0, 3)
    with pytest.raises(NetError, match="the saved learning-rate schedule is `plateau`, this run's is `cosine`"):
        Schedule("cosine", epochs=3).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "cosin"}, "did you mean `cosine`"),
        ({"kind": "step"}, "`every` must be a whole number of epochs >= 1"),
        ({"kind": "multistep", "milestones": [5, 2]}, "`milestones` must be increasing"),
        ({"kind": "cosine"}, "`epochs` must be a number of epochs > 0"),
        ({"kind": "poly"}, "`epochs` must be a number of epochs > 0"),
        ({"kind": "poly", "epochs": 2, "power": 0}, "`power` must be a number > 0"),
        ({"kind": "inv", "gamma": 1e-4, "power": -0.5}, "`power` must be a number > 0"),
        ({"kind": "exp", "gamma": 1.5}, "`gamma` must be a number in \\(0, 1\\]"),
        ({"kind": "plateau", "patience": -1}, "`patience` must be a whole number >= 0"),
        ({"kind": "plateau", "max_drops": 1.5}, "`max_drops` must be a whole number >= 0, or none"),
        ({"gamma": 0.0}, "`gamma` must be a number in \\(0, 1\\]"),
        ({"warmup_epochs": -1}, "`warmup_epochs` must be a number >= 0"),
    ],
)
def test_schedule_mistakes_are_net_errors(kwargs, message):
    kind = kwargs.pop("kind", "constant")
    with pytest.raises(NetError, match=message):
        Schedule(kind, **kwargs)
