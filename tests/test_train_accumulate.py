"""`accumulate`: each batch run through the net in parts, their gradients summed before the step, against
hand-written PyTorch steps on the very batches the run read (recorded from its loader).

Without batch norm the parts take the whole batch's step (to float32 rounding of the gradients' sums); with
it, each part is normalized on its own statistics and updates the running averages once, as a hand-written
loop over the parts does.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import NORMED, TINY

import netdsl
from netdsl.cli.main import main
from netdsl.runtime.weights import init_weights
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.step import backward_in_parts, split

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")
RULE = ("--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.001", "--schedule", "constant")


def arrays(path: Path, count: int, seed: int, nan_at: int | None = None, scale: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((count, 1, 8, 8))).astype(np.float32)
    if nan_at is not None:
        x[nan_at, 0, 3, 3] = np.nan
    np.savez(path, x=x, y=rng.integers(0, 10, count), x_val=x[:4], y_val=rng.integers(0, 10, 4))
    return path


def record_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches the run's steps read, in order (the loader's own: shuffled, as the run had them)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = loop.loader

    class Recorded:
        def __init__(self, batches) -> None:
            self.batches = batches

        def __len__(self) -> int:
            return len(self.batches)

        def __iter__(self):
            for x, y in self.batches:
                seen.append((x.clone(), y.clone()))
                yield x, y

    monkeypatch.setattr(loop, "loader", lambda *args, **kwargs: Recorded(real(*args, **kwargs)))
    return seen


def train(net: Path, data: Path, out: Path, *extra) -> int:
    args = [net, "--data", data, "--init", "he", "--seed", "3", "--keep-best", "0", "--out", out, *RULE, *PLAIN]
    return main(["train", *map(str, args), *map(str, extra)])


def hand_written_steps(net: Path, batches, parts: int) -> dict[str, torch.Tensor]:
    """The paper's rule on conv -> [batch norm] -> relu -> max-pool -> fc, written out; each batch in `parts`
    parts, each part's mean loss weighted by its share before its backward pass."""
    graph = netdsl.load_graph(net)
    start = init_weights(graph, 3, "he")
    w = {name: torch.tensor(value, requires_grad="running" not in name) for name, value in start.items()}
    normed = "c1.batchnorm.weight" in w
    trained = [name for name in w if "running" not in name]
    velocity = {name: torch.zeros_like(w[name]) for name in trained}
    for x, y in batches:
        for name in trained:
            w[name].grad = None
        for xp, yp in zip(x.chunk(parts), y.chunk(parts), strict=True):
            h = F.conv2d(xp, w["c1.weight"], w["c1.bias"])
            if normed:
                h = F.batch_norm(
                    h, w["c1.batchnorm.running_mean"], w["c1.batchnorm.running_var"], w["c1.batchnorm.weight"],
                    w["c1.batchnorm.bias"], training=True, momentum=0.1, eps=1e-5,
                )  # fmt: skip
            h = F.max_pool2d(F.relu(h), 2, 2)
            logits = F.linear(h.flatten(1), w["f2.weight"], w["f2.bias"])
            (F.cross_entropy(logits, yp) * (len(yp) / len(y))).backward()
        with torch.no_grad():
            for name in trained:
                velocity[name] = 0.9 * velocity[name] - 0.001 * 0.05 * w[name] - 0.05 * w[name].grad
                w[name] += velocity[name]
    return {name: value.detach() for name, value in w.items()}


def write_net(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "net.net"
    path.write_text(text)
    return path


def assert_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("parts", [2, 4])
def test_parts_take_the_whole_batchs_step(tmp_path, monkeypatch, parts):
    """No batch norm: 4 steps of 16 images, each in 2 or 4 parts, land where 4 whole-batch steps of the paper's
    rule do, and the logged loss of each step is the whole batch's mean."""
    net, data, run = write_net(tmp_path, TINY), arrays(tmp_path / "d.npz", 36, seed=1), tmp_path / "run"
    batches = record_batches(monkeypatch)
    assert train(net, data, run, "--batch", 16, "--steps", 4, "--val-fraction", 0, "--accumulate", parts) == 0
    assert len(batches) == 4 and all(len(y) == 16 for _, y in batches)
    got = load_checkpoint(run / "checkpoints" / "last.ckpt").weights
    assert_weights(got, hand_written_steps(net, batches, parts=1))
    start = init_weights(netdsl.load_graph(net), 3, "he")
    assert max(float((got[name] - torch.from_numpy(start[name])).abs().max()) for name in start) > 1e-2

    # the first step's logged loss: the whole first batch's mean loss at the initial weights
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in lines if line["kind"] == "step" and line["step"] == 1)
    w = {name: torch.from_numpy(value) for name, value in start.items()}
    x, y = batches[0]
    h = F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"])), 2, 2)
    want = float(F.cross_entropy(F.linear(h.flatten(1), w["f2.weight"], w["f2.bias"]), y))
    assert math.isclose(first["loss"], want, rel_tol=1e-5)


def test_batch_norm_normalizes_each_part(tmp_path, monkeypatch):
    """With batch norm the parts are not the whole batch: each is normalized on its own statistics and moves the
    running averages once, as a hand-written loop over the parts does (the whole-batch step lands elsewhere)."""
    net, data, run = write_net(tmp_path, NORMED), arrays(tmp_path / "d.npz", 24, seed=2), tmp_path / "run"
    batches = record_batches(monkeypatch)
    assert train(net, data, run, "--batch", 12, "--steps", 3, "--val-fraction", 0, "--accumulate", 3) == 0
    got = load_checkpoint(run / "checkpoints" / "last.ckpt").weights
    want = hand_written_steps(net, batches, parts=3)
    assert_weights(got, want)
    whole = hand_written_steps(net, batches, parts=1)
    assert float((whole["c1.weight"] - want["c1.weight"]).abs().max()) > 1e-4  # the test tells the two apart
    assert float((whole["c1.batchnorm.running_mean"] - want["c1.batchnorm.running_mean"]).abs().max()) > 1e-4


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_over_parts_takes_the_whole_batchs_step(tmp_path, dtype):
    """bf16 autocast, and fp16 with its loss scale applied to each part and removed once: 3 steps in 2 parts
    land within the low precision's rounding of 3 whole-batch steps (the weights move 100 times further). The
    images are small enough that no scaled gradient overflows fp16 (an overflow skips a step, and the parts'
    gradients, each half the batch's, need not overflow where the whole batch's do)."""
    net, data = write_net(tmp_path, TINY), arrays(tmp_path / "d.npz", 24, seed=4, scale=0.1)
    runs = {parts: tmp_path / f"run{parts}" for parts in (1, 2)}
    for parts, run in runs.items():
        assert train(net, data, run, "--batch", 8, "--steps", 3, "--val-fraction", 0, "--dtype", dtype,
                     "--accumulate", parts) == 0  # fmt: skip
    checkpoints = [load_checkpoint(run / "checkpoints" / "last.ckpt") for run in runs.values()]
    if dtype == "fp16":  # no step was skipped: the scale never backed off from its start
        assert [checkpoint.state["scaler"]["scale"] for checkpoint in checkpoints] == [65536.0, 65536.0]
    whole, halves = (checkpoint.weights for checkpoint in checkpoints)
    start = init_weights(netdsl.load_graph(net), 3, "he")
    for name, value in whole.items():
        moved = float((value - torch.from_numpy(start[name])).abs().max())
        differ = float((halves[name] - value).abs().max())
        assert differ <= 0.01 * moved, (name, differ, moved)


def test_a_nan_is_traced_to_its_part_of_the_batch(tmp_path, monkeypatch, capsys):
    net, data, run = write_net(tmp_path, TINY), arrays(tmp_path / "d.npz", 8, seed=5, nan_at=6), tmp_path / "run"
    batches = record_batches(monkeypatch)
    assert train(net, data, run, "--batch", 8, "--steps", 2, "--val-fraction", 0, "--accumulate", 4) == 1
    err = capsys.readouterr().err
    x, _ = batches[0]
    row = int(torch.isnan(x.flatten(1)).any(dim=1).nonzero()[0])
    part = row // 2 + 1
    assert f"the first non-finite value is in the net's input `image` (the data), in part {part} of 4" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--batch", 10, "--accumulate", 4), "--accumulate: error: a batch of 10 images does not split into 4 "),
        (("--batch", 8, "--accumulate", 0), "--accumulate"),
    ],
)
def test_parts_that_do_not_divide_the_batch_are_refused(tmp_path, capsys, extra, message):
    data = arrays(tmp_path / "d.npz", 24, seed=6)
    assert train(write_net(tmp_path, TINY), data, tmp_path / "run", "--steps", 1, *extra) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_validation_reads_batches_of_a_part(tmp_path, monkeypatch):
    """A batch split for memory's sake is not validated whole: validation's batches are a part's size."""
    sizes = []
    real = loop.view_loader

    def view_loader(*args, **kwargs):
        sizes.append(kwargs["batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "view_loader", view_loader)
    data = arrays(tmp_path / "d.npz", 24, seed=7)
    assert train(write_net(tmp_path, TINY), data, tmp_path / "run", "--batch", 8, "--epochs", 1, "--accumulate", 4) == 0
    assert sizes == [2]


def test_a_run_resumed_with_more_parts_goes_on_as_it_would_have(tmp_path):
    """A run that ran out of memory resumes with `--accumulate 2`: without batch norm, it ends where the
    straight run does (to rounding), and its recipe records the change."""
    net, data = write_net(tmp_path, TINY), arrays(tmp_path / "d.npz", 24, seed=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(net, data, straight, "--batch", 8, "--steps", 4, "--val-fraction", 0) == 0
    assert train(net, data, resumed, "--batch", 8, "--steps", 2, "--val-fraction", 0) == 0
    assert main(["train", "--resume", str(resumed), "--steps", "4", "--accumulate", "2"]) == 0
    assert_weights(*(load_checkpoint(run / "checkpoints" / "last.ckpt").weights for run in (resumed, straight)))
    setting = json.loads((resumed / "recipe.json").read_text())["recipe"]["settings"]["accumulate"]
    assert setting == {"from": "--accumulate", "value": 2}


def test_parts_on_netdsls_kernels(tmp_path, monkeypatch):
    """`--backend triton` (under the interpreter here): the kernels' steps in parts, batch norm included, are the
    hand-written loop's over the parts."""
    net, data, run = write_net(tmp_path, NORMED), arrays(tmp_path / "d.npz", 16, seed=9), tmp_path / "run"
    batches = record_batches(monkeypatch)
    extra = ("--val-fraction", 0, "--accumulate", 2, "--backend", "triton")
    assert train(net, data, run, "--batch", 8, "--steps", 2, *extra) == 0
    assert_weights(load_checkpoint(run / "checkpoints" / "last.ckpt").weights, hand_written_steps(net, batches, 2))


def test_only_the_last_part_averages_over_the_processes():
    """DDP's no_sync is entered for every part but the last, and each part's loss counts by its share."""
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(len(entered))
        yield

    weight = torch.ones(3, requires_grad=True)
    x, y = torch.arange(12.0).reshape(4, 3), torch.tensor([0, 1, 2, 0])
    loss, logits = backward_in_parts(
        lambda part: part * weight, split(x, y, 4), F.cross_entropy, contextlib.nullcontext, no_sync=no_sync
    )
    assert entered == [0, 1, 2]
    whole = torch.ones(3, requires_grad=True)
    want = F.cross_entropy(x * whole, y)
    want.backward()
    assert torch.allclose(loss, want.detach()) and torch.allclose(weight.grad, whole.grad)
    assert torch.equal(logits, x)


def test_under_torchrun_each_process_splits_its_own_share(tmp_path, monkeypatch):
    """A batch of 12 over 2 processes is 6 images each, which 4 parts do not divide: the error counts both
    (checked without launching processes: the parts are checked before the process group is used)."""
    from netdsl.errors import NetError
    from netdsl.train.recipe import Recipe
    from netdsl.train.runs import RunFolder
    from netdsl.train.world import World

    monkeypatch.setattr(World, "join", lambda self, timeout: None)
    recipe = Recipe(batch=12, accumulate=4, data="digits")
    with pytest.raises(NetError) as raised:
        loop.Trainer(write_net(tmp_path, TINY), recipe, RunFolder(tmp_path / "run"), world=World(rank=0, size=2))
    assert raised.value.message == "each process's 6 images of the batch of 12 do not split into 4 equal parts"
    assert raised.value.where == "--accumulate"
    assert raised.value.hint.startswith("make the batch a multiple of 8 (2 processes x 4 parts)")
