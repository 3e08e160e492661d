"""`early_stop = N`: training ends once the validation error has not improved (by more than `threshold`) for N
validated epochs in a row.

The trainer's tests script the validation top-1 per epoch (its `validate` replaced, the rest of the run real),
so where a run must stop is known in advance; one run validates for real, with a threshold no epoch can beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from train_support import TINY

from netdsl.cli.main import main
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.evaluate import Tally
from netdsl.train.runs import METRICS
from netdsl.train.schedule import EarlyStop

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")
STEPS_PER_EPOCH = 4  # 32 images, batch 8


def test_the_watch():
    """Improving: below the best so far by more than the threshold; a patience of 2 stops at the second epoch in
    a row that does not; unmeasured epochs are skipped; `None` never stops, yet keeps watching."""
    watch, never = EarlyStop(2, 0.01), EarlyStop(None, 0.01)
    for epoch, (error, stops) in enumerate([(0.5, False), (0.4, False), (0.395, False), (None, False), (0.2, False),
                                            (0.2, False), (0.21, True)]):  # fmt: skip
        for each in (watch, never):
            each.end_of_epoch(epoch, error)
        assert watch.stops is stops, epoch
        assert not never.stops
    assert (watch.best, watch.best_epoch, watch.bad_epochs) == (0.2, 4, 2)
    assert never.state_dict() == watch.state_dict()
    again = EarlyStop(2, 0.01)
    again.load_state_dict(watch.state_dict())
    assert again.stops and again.reason() == watch.reason()
    assert watch.reason() == (
        "the validation error has not improved (by more than 1 points) for 2 validated epochs (best 20.00% at epoch 5)"
    )


# --- the trainer ------------------------------------------------------------------------------------------


@pytest.fixture
def scripted(monkeypatch) -> list[int]:
    """Validation's top-1 per epoch (by the epoch being validated, from 0): 50, 60, 59.95, 60, 55, 70, ...%;
    returns the epochs validated, in order."""
    accuracy = [0.5, 0.6, 0.5995, 0.6, 0.55, 0.7, 0.71, 0.72, 0.73, 0.74]
    seen: list[int] = []

    def validate(self) -> Tally:
        seen.append(self.epoch)
        return Tally(self.classes, count=2000, top1=round(2000 * accuracy[self.epoch]), top5=2000, loss=1000.0)

    monkeypatch.setattr(loop.Trainer, "validate", validate)
    return seen


def arrays(path: Path) -> Path:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, 32), x_val=x[:8], y_val=rng.integers(0, 10, 8))
    return path


def train(tmp_path: Path, name: str, *extra: str) -> int:
    net = tmp_path / "tiny.net"
    if not net.exists():
        net.write_text(TINY)
        arrays(tmp_path / "d.npz")
    args = ["train", str(net), "--data", str(tmp_path / "d.npz"), "--batch", "8", "--lr", "0.05", *PLAIN]
    return main([*args, "--schedule", "constant", "--out", str(tmp_path / name), *extra])


def epochs_recorded(run: Path) -> list[int]:
    import json

    lines = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [line["epoch"] for line in lines if line["kind"] == "epoch"]


def test_a_run_stops_at_the_epoch_the_watch_says(tmp_path, scripted, capsys):
    """60% at epoch 2; 59.95% (not better) and 60% (not better by more than 0.1 points) at epochs 3 and 4: a
    patience of 2 ends the run of 10 epochs after epoch 4, its checkpoint the last, the best weights epoch 2's."""
    assert train(tmp_path, "run", "--epochs", "10", "--early-stop", "2") == 0
    err = capsys.readouterr().err
    assert "10 epochs (40 steps; fewer if 2 validated in a row do not improve)" in err
    assert "stopped early after epoch 4: the validation error has not improved (by more than 0.1 points) for 2 " \
           "validated epochs (best 40.00% at epoch 2)" in err  # fmt: skip
    assert scripted == [0, 1, 2, 3]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").state
    assert (state["epoch"], state["step"], state["ended"]) == (4, 4 * STEPS_PER_EPOCH, True)
    assert state["early_stop"] == {"best": pytest.approx(0.4), "best_epoch": 1, "bad_epochs": 2}
    assert state["best"][0][1] == 1 and epochs_recorded(tmp_path / "run") == [1, 2, 3, 4]


def test_without_it_the_run_goes_on(tmp_path, scripted):
    assert train(tmp_path, "run", "--epochs", "6") == 0
    assert scripted == [0, 1, 2, 3, 4, 5]


def test_it_counts_validated_epochs(tmp_path, scripted):
    """Validating every other epoch (epochs 2, 4, 6, 8: 60, 60, 70, 72%): one epoch without improvement is
    epoch 4; a patience of 1 stops there."""
    assert train(tmp_path, "run", "--epochs", "10", "--early-stop", "1", "--val-every", "2") == 0
    assert scripted == [1, 3]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").state["epoch"] == 4


def test_a_run_stopped_and_resumed_stops_where_the_straight_run_did(tmp_path, scripted):
    """Cut after epoch 3 (`--epochs 3`, then resumed with 10): the watch's count is in the checkpoint, so the
    resumed run stops after epoch 4, with the straight run's weights, bit for bit."""
    assert train(tmp_path, "straight", "--epochs", "10", "--early-stop", "2") == 0
    assert train(tmp_path, "cut", "--epochs", "3", "--early-stop", "2") == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "10"]) == 0
    straight, cut = (load_file(tmp_path / name / "weights.safetensors") for name in ("straight", "cut"))
    for name, value in straight.items():
        np.testing.assert_array_equal(cut[name], value, err_msg=name)
    for run in ("straight", "cut"):
        assert load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt").state["step"] == 4 * STEPS_PER_EPOCH


def test_resuming_a_stopped_run(tmp_path, scripted, capsys):
    """As it is: nothing to train (it says why again); with a larger patience it goes on from there, its watch
    knowing the epochs before (epoch 5: 55%, a third without improvement; epoch 6: 70%, better)."""
    assert train(tmp_path, "run", "--epochs", "10", "--early-stop", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "10 epochs (40 steps; fewer if 2 validated in a row do not improve)" in err
    assert "stopped early after epoch 4" in err and "the run had already trained its 16 steps" in err
    assert main(["train", "--resume", str(tmp_path / "run"), "--early-stop", "3"]) == 0
    assert "stopped early after epoch 5" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--early-stop", "none"]) == 0
    assert scripted == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_with_real_validation(tmp_path, capsys):
    """No epoch beats the first by more than 99 points: a patience of 1 stops after epoch 2."""
    assert train(tmp_path, "run", "--epochs", "5", "--early-stop", "1", "--threshold", "0.99") == 0
    assert "stopped early after epoch 2" in capsys.readouterr().err
    assert epochs_recorded(tmp_path / "run") == [1, 2]


def test_without_a_validation_set_it_is_an_error(tmp_path, capsys):
    code = train(tmp_path, "run", "--epochs", "5", "--early-stop", "2", "--val-fraction", "0", "--data", "digits")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("--early-stop: error: early_stop watches the validation error, and there is no validation")
    assert "hint: give val_fraction above 0" in err and not (tmp_path / "run").exists()
