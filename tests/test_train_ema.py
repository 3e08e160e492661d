"""`ema = DECAY`: an exponential moving average of the weights, which validation measures and the run saves.

The reference is PyTorch's own: `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn(decay)` and
`use_buffers=True` (batch norm's running statistics averaged too), updated from the trainer's module after
each of its optimizer steps. Float32 on the CPU: both move each tensor with the same `lerp`, so the averages
agree bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from train_support import NORMED

from netdsl.cli.main import main
from netdsl.lang.frontend import load_graph
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import load_weights
from netdsl.train import loop
from netdsl.train.average import WeightAverage
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.runs import METRICS

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "2")
DECAY = 0.8  # a short average: 8 steps move it well away from its start and from the weights


def arrays(path: Path) -> Path:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    x_val = rng.standard_normal((12, 1, 8, 8)).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, 32), x_val=x_val, y_val=rng.integers(0, 10, 12))
    return path


def train(tmp_path: Path, name: str, *extra: str) -> int:
    """The net with batch norm (running statistics to average), 4 steps of 8 an epoch, sgd at a constant rate."""
    net = tmp_path / "normed.net"
    if not net.exists():
        net.write_text(NORMED)
        arrays(tmp_path / "d.npz")
    args = ["train", str(net), "--data", str(tmp_path / "d.npz"), "--batch", "8", "--lr", "0.1", *PLAIN]
    return main([*args, "--schedule", "constant", "--keep-best", "1", "--out", str(tmp_path / name), *extra])


def last(tmp_path: Path, name: str):
    return load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")


@pytest.fixture
def reference(monkeypatch) -> dict:
    """PyTorch's average of the trainer's module, started at the first step a `train` call takes (a fresh one for
    each call: `reference.clear()`), and the module's own state after that call's last step."""
    held: dict = {}
    step = loop.Trainer._train_step

    def step_then_average(self, x, y):
        result = step(self, x, y)
        if "average" not in held:
            held["average"] = AveragedModel(self.module, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
        held["average"].update_parameters(self.module)
        held["live"] = {name: value.clone() for name, value in self.module.state_dict().items()}
        return result

    monkeypatch.setattr(loop.Trainer, "_train_step", step_then_average)
    return held


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_the_average_is_pytorchs(tmp_path, reference, capsys):
    """Two epochs: the checkpoint's weights are AveragedModel's average of every step (weights and running
    statistics), its live weights the module's; the average is none of them."""
    assert train(tmp_path, "run", "--epochs", "2", "--ema", str(DECAY)) == 0
    assert "validating and saving an average of the weights (ema 0.8)" in capsys.readouterr().err
    saved = last(tmp_path, "run")
    want = {name: value for name, value in reference["average"].module.state_dict().items()}
    assert_equal(saved.weights, want)
    assert_equal(saved.live, reference["live"])
    assert "c1.batchnorm.running_var" in saved.weights
    for name, value in saved.weights.items():
        if name != "c1.bias":  # the batch norm after it subtracts it again: no gradient, nearly 0 throughout
            assert not torch.allclose(value, saved.live[name], rtol=1e-3, atol=1e-4), name


def test_it_does_not_change_the_steps(tmp_path):
    """The weights the optimizer steps are those of a run without an average, bit for bit; without one the
    checkpoint holds no live weights."""
    assert train(tmp_path, "averaged", "--epochs", "2", "--ema", str(DECAY)) == 0
    assert train(tmp_path, "plain", "--epochs", "2") == 0
    averaged, plain = last(tmp_path, "averaged"), last(tmp_path, "plain")
    assert plain.live == {}
    assert_equal(averaged.live, plain.weights)
    assert_equal(averaged.optimizer["f2.weight"], plain.optimizer["f2.weight"])


def measured(weights: dict, tmp_path: Path) -> tuple[float, float]:
    """Top-1 and mean cross-entropy of `weights` on the validation arrays, by a plain evaluation of its own."""
    module = GraphModule(load_graph(tmp_path / "normed.net"))
    module.load_state_dict(weights)
    data = np.load(tmp_path / "d.npz")
    with torch.no_grad():
        logits = module.eval()(torch.from_numpy(data["x_val"]))
    y = torch.from_numpy(data["y_val"])
    return int((logits.argmax(1) == y).sum()) / len(y), float(F.cross_entropy(logits, y))


def test_validation_measures_the_average_and_the_run_keeps_it(tmp_path):
    """The last epoch's validation loss and top-1 are the average's (not the live weights'), and the best
    checkpoint and weights.safetensors hold the average of their epoch."""
    assert train(tmp_path, "run", "--epochs", "3", "--ema", str(DECAY)) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    epoch = [record for record in records if record["kind"] == "epoch"][-1]
    saved = last(tmp_path, "run")
    top1, loss = measured(saved.weights, tmp_path)
    assert epoch["val_top1"] == pytest.approx(top1, abs=1e-9)
    assert epoch["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert measured(saved.live, tmp_path)[1] != pytest.approx(loss, rel=1e-3)
    best_epoch = saved.state["best"][0][1]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / saved.state["best"][0][2])
    assert best.state["epoch"] == best_epoch + 1 and best.live
    assert_equal(load_file(tmp_path / "run" / "weights.safetensors"), best.weights)


def test_a_checkpoint_read_as_a_weights_file_is_the_average(tmp_path):
    """`netdsl run --weights RUN/checkpoints/last.ckpt` (and eval, export, a fine-tuning start) reads the average,
    the weights validation measured; the live weights are left out with the optimizer's state."""
    assert train(tmp_path, "run", "--epochs", "1", "--ema", str(DECAY)) == 0
    saved = last(tmp_path, "run")
    read = load_weights(tmp_path / "run" / "checkpoints" / "last.ckpt", load_graph(tmp_path / "normed.net"))
    assert_equal({name: torch.from_numpy(value) for name, value in read.items()}, saved.weights)


def test_a_resumed_run_averages_as_the_straight_run(tmp_path):
    """Stopped after epoch 1 (and again inside epoch 3) and resumed: the average and the live weights of the
    straight run, bit for bit."""
    assert train(tmp_path, "straight", "--epochs", "3", "--ema", str(DECAY)) == 0
    assert train(tmp_path, "cut", "--epochs", "1", "--ema", str(DECAY)) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--steps", "10"]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3", "--steps", "none"]) == 0
    straight, cut = last(tmp_path, "straight"), last(tmp_path, "cut")
    assert straight.state["step"] == cut.state["step"] == 12
    assert_equal(cut.weights, straight.weights)
    assert_equal(cut.live, straight.live)


def test_switched_on_or_off_at_resume(tmp_path, reference):
    """Switched on at resume, the average starts at the resumed run's first step; switched off, the run goes on
    from the live weights (not the average) and saves them as its weights."""
    assert train(tmp_path, "plain", "--epochs", "2") == 0
    assert train(tmp_path, "on", "--epochs", "1") == 0
    reference.clear()
    assert main(["train", "--resume", str(tmp_path / "on"), "--epochs", "2", "--ema", str(DECAY)]) == 0
    on = last(tmp_path, "on")
    assert_equal(on.live, last(tmp_path, "plain").weights)
    assert_equal(on.weights, dict(reference["average"].module.state_dict()))
    assert main(["train", "--resume", str(tmp_path / "on"), "--epochs", "3", "--ema", "none"]) == 0
    assert train(tmp_path, "plain3", "--epochs", "3") == 0
    off = last(tmp_path, "on")
    assert off.live == {}
    assert_equal(off.weights, last(tmp_path, "plain3").weights)


def test_the_module_holds_its_own_weights_again_after_validation(tmp_path):
    """`applied` puts the average in for its block and the module's own state back after it, an error inside
    the block too; before the first step there is nothing to apply."""
    (tmp_path / "normed.net").write_text(NORMED)
    module = GraphModule(load_graph(tmp_path / "normed.net"))
    average = WeightAverage(0.5)
    own = {name: value.clone() for name, value in module.state_dict().items()}
    with average.applied(module):
        assert_equal(dict(module.state_dict()), own)
    average.update(module)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)
    average.update(module)  # halfway between: the first state + 0.5
    moved = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(RuntimeError), average.applied(module):
        torch.testing.assert_close(module.state_dict()["f2.weight"], own["f2.weight"] + 0.5)  # fp32: to rounding
        raise RuntimeError("inside")
    assert_equal(dict(module.state_dict()), moved)


@pytest.mark.parametrize("value", ["1", "0", "-0.5", "1.5", "nan", "x"])
def test_a_decay_outside_0_to_1_is_an_error_at_the_flag(tmp_path, value, capsys):
    assert train(tmp_path, "run", "--epochs", "1", "--ema", value) == 1
    err = capsys.readouterr().err
    assert err.startswith("--ema: error:") and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
