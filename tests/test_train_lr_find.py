"""`netdsl train --find-lr`: the recipe's steps at rates growing from 1e-7 to 10, the loss against the rate.

The sweep's steps are held against the paper's rule written out by hand, on the very batches the sweep read
(recorded from its loader), at the rates the sweep's formula gives; the suggestion against curves of known
shape.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import TINY

import netdsl
from netdsl.cli.main import main
from netdsl.runtime.weights import init_weights
from netdsl.train import loop, lr_find
from netdsl.train.lr_find import Sweep, rates, steepest

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0")
RULE = ("--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0.001", "--init", "he", "--seed", "3")


def test_the_rates():
    assert rates(5, 1e-4, 1.0) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    swept = rates(100)
    assert swept[0] == pytest.approx(1e-7) and swept[-1] == pytest.approx(10.0)
    assert all(later / earlier == pytest.approx(swept[1] / swept[0]) for earlier, later in itertools.pairwise(swept))
    with pytest.raises(ValueError):
        rates(1)


def test_the_smoothing():
    """An exponential moving average (weight 0.9 of the past) with its start-up bias removed: a constant loss
    stays that constant; otherwise, by hand."""
    flat = Sweep()
    for rate in rates(6):
        flat.add(rate, 2.5)
    assert flat.smoothed == pytest.approx([2.5] * 6, rel=1e-12)
    sweep = Sweep()
    for rate, loss in zip(rates(3), [1.0, 3.0, 2.0]):
        sweep.add(rate, loss)
    average, want = 0.0, []
    for count, loss in enumerate([1.0, 3.0, 2.0], start=1):
        average = 0.9 * average + 0.1 * loss
        want.append(average / (1 - 0.9**count))
    assert sweep.smoothed == pytest.approx(want, rel=1e-12)


def test_the_suggestion_is_where_the_loss_falls_fastest():
    """A loss that falls like a logistic curve around rate 1e-3 (in log10), then rises: the steepest fall is
    there; a loss that never falls has no suggestion."""
    swept = rates(100)
    x = np.log10(swept)
    falling = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3))  # steepest at log10(rate) = -3
    curve = np.where(x < 0, falling, falling + 10 * x**2)
    assert 10**-3.3 < steepest(swept, list(curve)) < 10**-2.7
    assert steepest(swept, list(np.linspace(1.0, 5.0, 100))) is None
    assert steepest(swept[:4], [3.0, 1.0, 2.0, 4.0]) is None  # fewer points before the lowest than a window


def record_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    real = loop.loader

    def recorded(*args, **kwargs):
        for x, y in real(*args, **kwargs):
            seen.append((x.clone(), y.clone()))
            yield x, y

    monkeypatch.setattr(loop, "loader", recorded)
    return seen


def capture_sweep(monkeypatch) -> list[Sweep]:
    found = []
    real = lr_find.report

    def report(sweep: Sweep, rows: int = 20) -> str:
        found.append(sweep)
        return real(sweep, rows)

    monkeypatch.setattr(lr_find, "report", report)
    return found


def arrays(path: Path, count: int, nan_at: int | slice | None = None) -> Path:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((count, 1, 8, 8)).astype(np.float32)
    if nan_at is not None:
        x[nan_at, 0, 2, 2] = np.nan
    np.savez(path, x=x, y=rng.integers(0, 10, count))
    return path


def find(tmp_path: Path, *extra: str, data: Path | None = None) -> int:
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    data = data or arrays(tmp_path / "d.npz", 24)
    args = ["train", str(net), "--data", str(data), "--batch", "8", "--val-fraction", "0", *RULE, *PLAIN]
    return main([*args, *extra])


def test_the_sweep_takes_the_recipes_steps_at_its_rates(tmp_path, monkeypatch, capsys):
    """8 steps (three epochs of 3 batches: the data's order per epoch) from 1e-7 to 10, lr_mult 2 on the
    biases: each step's loss, before its update, is the hand-written paper's rule's on the same batches."""
    monkeypatch.chdir(tmp_path)
    batches, found = record_batches(monkeypatch), capture_sweep(monkeypatch)
    assert find(tmp_path, "--find-lr", "8", "--lr-mult", "*.bias=2") == 0
    (sweep,) = found
    assert len(batches) >= 8
    assert sweep.rates == pytest.approx(rates(8), rel=1e-12)
    start = init_weights(netdsl.load_graph(tmp_path / "tiny.net"), 3, "he")
    w = {name: torch.tensor(value, requires_grad=True) for name, value in start.items()}
    velocity = {name: torch.zeros_like(value) for name, value in w.items()}
    want = []
    for (x, y), rate in zip(batches, rates(8)):
        for value in w.values():
            value.grad = None
        h = F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"])), 2, 2)
        loss = F.cross_entropy(F.linear(h.flatten(1), w["f2.weight"], w["f2.bias"]), y)
        loss.backward()
        want.append(float(loss.detach()))
        with torch.no_grad():
            for name, value in w.items():
                lr = rate * (2 if name.endswith(".bias") else 1)
                velocity[name] = 0.9 * velocity[name] - 0.001 * lr * value - lr * value.grad
                value += velocity[name]
    assert sweep.losses == pytest.approx(want, rel=1e-5)
    out = capsys.readouterr().out
    assert "8 steps; the sweep ended: the last rate was reached" in out
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_sweep_ends_when_the_loss_blows_up(tmp_path, monkeypatch, capsys):
    found = capture_sweep(monkeypatch)
    assert find(tmp_path, "--find-lr", "--out", str(tmp_path / "run")) == 0
    (sweep,) = found
    assert len(sweep.rates) < 100 and sweep.ended == "the loss had grown to 4 times its lowest"
    assert sweep.smoothed[-1] > 4 * min(sweep.smoothed)
    out = capsys.readouterr().out
    assert re_suggestion(out) and not (tmp_path / "run").exists()


def re_suggestion(out: str) -> bool:
    suggested = r"^suggested lr: [\d.e-]+ \(where the loss fell fastest\); the loss was lowest at rate [\d.e-]+ "
    return bool(re.search(suggested, out, re.M))


def test_a_sweep_ends_at_a_non_finite_loss(tmp_path, monkeypatch, capsys):
    """A NaN in an image: the step that reads it ends the sweep (no diagnosis, no error), the steps before it
    reported."""
    found = capture_sweep(monkeypatch)
    data = arrays(tmp_path / "nan.npz", 24, nan_at=5)
    assert find(tmp_path, "--find-lr", "20", data=data) == 0
    (sweep,) = found
    assert sweep.ended.startswith("the loss was nan at rate ") and len(sweep.rates) < 20
    assert all(math.isfinite(loss) for loss in sweep.losses)
    assert "Traceback" not in capsys.readouterr().err


def test_a_first_step_that_is_not_finite_is_an_error(tmp_path, capsys):
    """Every image holds a NaN: the first step's loss, at 1e-7, is no rate's doing and there is no curve to
    read. It crashed the report (an argmin of nothing); now an error at the flag, exit 1."""
    assert find(tmp_path, "--find-lr", "10", data=arrays(tmp_path / "nan.npz", 24, nan_at=slice(None))) == 1
    err = capsys.readouterr().err
    assert "--find-lr: error: the sweep's first step, at rate 1e-07, has a loss of nan" in err
    assert "hint: look at the data and the starting weights" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--find-lr", "3"), "--find-lr: error: --find-lr takes at least 5 steps, not 3"),
        (("--find-lr", "0"), "netdsl train: error: argument --find-lr: not a positive whole number: '0'"),
    ],
)
def test_errors(tmp_path, capsys, extra, message):
    assert find(tmp_path, *extra) == 1
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err


def test_not_with_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert find(tmp_path, "--steps", "2", "--out", str(run)) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--find-lr"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("--find-lr: error: --find-lr starts a sweep of its own") and "Traceback" not in err
