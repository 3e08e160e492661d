"""`checkpoint_every = N`: the last checkpoint is also written every N steps, so that a run that crashes (no
signal, no chance to write one) resumes from the latest of them and still trains as the straight run does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from train_support import TINY

from netdsl.cli.main import main
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.runs import MEASURED

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")


class CrashError(Exception):
    """What a failing machine does to a run: it ends at once, without writing anything."""


def train(tmp_path: Path, name: str, *extra: str) -> int:
    net = tmp_path / "tiny.net"
    if not net.exists():
        net.write_text(TINY)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
        np.savez(tmp_path / "d.npz", x=x[:32], y=rng.integers(0, 10, 32), x_val=x[32:], y_val=rng.integers(0, 10, 8))
    args = ["train", str(net), "--data", str(tmp_path / "d.npz"), "--batch", "8", "--lr", "0.05", *PLAIN]
    args += ["--epochs", "3", "--schedule", "step", "--step-epochs", "1"]
    return main([*args, "--out", str(tmp_path / name), *extra])


def records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key not in MEASURED} for line in lines]


def test_a_crashed_run_resumes_from_the_latest_and_trains_as_the_straight_run(tmp_path, monkeypatch, capsys):
    """4 steps an epoch, a checkpoint every 3 steps: at 3, 4 (the epoch's end), 6, 8, 9, 12. A crash during step
    8 leaves step 6's; the resumed run does steps 7 and 8 again and ends with the straight run's weights, momentum
    and records, bit for bit."""
    assert train(tmp_path, "straight", "--checkpoint-every", "3") == 0
    step = loop.Trainer._train_step
    written = []
    checkpoint = loop.Trainer._checkpoint

    def crash_at_8(self, x, y):
        if self.step == 7:
            raise CrashError
        return step(self, x, y)

    def noted(self, *args, **kwargs):
        written.append(self.step)
        return checkpoint(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash_at_8)
    monkeypatch.setattr(loop.Trainer, "_checkpoint", noted)
    assert train(tmp_path, "crashed", "--checkpoint-every", "3") != 0
    assert "CrashError" in capsys.readouterr().err
    assert written == [3, 4, 6]
    assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.ckpt").state["step"] == 6
    monkeypatch.setattr(loop.Trainer, "_train_step", step)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    assert "resuming at step 6" in capsys.readouterr().err
    assert written == [3, 4, 6, 8, 9, 12, 12]  # the last after the run's end
    straight, crashed = (
        load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ["straight", "crashed"]
    )
    for name, value in straight.weights.items():
        np.testing.assert_array_equal(crashed.weights[name].numpy(), value.numpy(), err_msg=name)
    for name, state in straight.optimizer.items():
        np.testing.assert_array_equal(crashed.optimizer[name]["velocity"], state["velocity"], err_msg=name)
    assert records(tmp_path / "crashed") == records(tmp_path / "straight")
    assert (tmp_path / "crashed" / "weights.safetensors").read_bytes() == (
        tmp_path / "straight" / "weights.safetensors"
    ).read_bytes()


def test_without_it_only_epochs_write_checkpoints(tmp_path, monkeypatch):
    written = []
    checkpoint = loop.Trainer._checkpoint

    def noted(self, *args, **kwargs):
        written.append(self.step)
        return checkpoint(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "_checkpoint", noted)
    assert train(tmp_path, "run") == 0
    assert written == [4, 8, 12, 12]
