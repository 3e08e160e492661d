"""`mixup = ALPHA` and `cutmix = ALPHA`: each training batch blended with a permutation of itself.

The mixing is checked image by image against its definition in float64 (a blend; a pasted box, the same for
the whole batch, whose area gives the labels' weights), its shares against Beta(alpha, alpha), and a whole
training step against one written out in PyTorch: the mixed batch through the same initial weights,
`F.cross_entropy` with the mixed labels as probabilities (label smoothing on top), autograd, and the paper's
update with no momentum or decay. Float32 throughout; the step agrees to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import TINY

from netdsl.cli.main import main
from netdsl.lang.frontend import load_graph
from netdsl.runtime.module import GraphModule
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.mix import Mixing, mixed

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")


def batch(seed: int, size: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((size, 3, 7, 9)).astype(np.float32)), torch.from_numpy(
        rng.integers(0, classes, size)
    )


def test_mixup_blends_each_image_and_its_labels_with_its_partners():
    x, y = batch(1)
    mixing = Mixing(mixup=0.4, seed=3)
    draw = mixing.draw(8, 7, 9, epoch=2, batch=5, rank=0)
    got, targets = mixing(x, y, 10, epoch=2, batch=5, rank=0)
    assert draw.kind == "mixup" and 0 < draw.share < 1 and sorted(draw.partners) == list(range(8))
    for i, j in enumerate(draw.partners):
        want = draw.share * x[i].double() + (1 - draw.share) * x[j].double()
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-6)
        labels = torch.zeros(10, dtype=torch.float64)
        labels[y[i]] += draw.share
        labels[y[j]] += 1 - draw.share
        torch.testing.assert_close(targets[i].double(), labels, rtol=1e-6, atol=1e-7)
    assert targets.dtype == torch.float32 and torch.allclose(targets.sum(1), torch.ones(8))


def test_cutmix_pastes_one_box_of_the_partner_and_weights_the_labels_by_its_area():
    x, y = batch(2)
    mixing = Mixing(cutmix=1.0, seed=4)
    for number in range(10):
        draw = mixing.draw(8, 7, 9, epoch=0, batch=number, rank=1)
        got, targets = mixed(x, y, 10, draw)
        assert draw.kind == "cutmix"
        pasted = torch.stack([(got[i] == x[j]).all(0) & (got[i] != x[i]).any(0) for i, j in enumerate(draw.partners)])
        kept = torch.stack([(got[i] == x[i]).all(0) for i in range(8)])
        assert bool((pasted | kept).all())  # every pixel is the image's own or its partner's
        moved = [i for i, j in enumerate(draw.partners) if i != j]
        rows, columns = pasted[moved[0]].nonzero(as_tuple=True)
        area = len(rows)
        if area:  # one rectangle, the same in every image
            top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1
            assert area == (bottom - top) * (right - left) and draw.box == (top, bottom, left, right)
            assert all(torch.equal(pasted[i], pasted[moved[0]]) for i in moved)
        assert draw.share == pytest.approx(1 - area / 63)
        for i, j in enumerate(draw.partners):
            assert float(targets[i, y[j]]) == pytest.approx((1 - draw.share) + (draw.share if y[j] == y[i] else 0))


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_the_shares_follow_beta(alpha):
    """4,000 batches: mixup's shares have Beta(alpha, alpha)'s mean 1/2 and variance 1 / (4 (2 alpha + 1)) (to
    about 5 standard errors); with cutmix as well, half the batches take each."""
    shares = np.array([Mixing(mixup=alpha, seed=7).draw(4, 8, 8, 0, number, 0).share for number in range(4000)])
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(shares.mean() - 0.5) < 5 * np.sqrt(variance / 4000)
    assert abs(shares.var() - variance) < 0.1 * variance
    both = Mixing(mixup=alpha, cutmix=alpha, seed=7)
    kinds = [both.draw(4, 8, 8, 0, number, 0).kind for number in range(4000)]
    assert abs(kinds.count("cutmix") / 4000 - 0.5) < 0.04


def test_a_batchs_mixing_depends_on_its_place_alone():
    mixing = Mixing(mixup=1.0, cutmix=1.0, seed=5)
    first = mixing.draw(16, 8, 8, 3, 4, 1)
    again = Mixing(mixup=1.0, cutmix=1.0, seed=5).draw(16, 8, 8, 3, 4, 1)
    assert first.share == again.share and np.array_equal(first.partners, again.partners) and first.box == again.box
    for other in [mixing.draw(16, 8, 8, 4, 4, 1), mixing.draw(16, 8, 8, 3, 5, 1), mixing.draw(16, 8, 8, 3, 4, 0),
                  Mixing(mixup=1.0, cutmix=1.0, seed=6).draw(16, 8, 8, 3, 4, 1)]:  # fmt: skip
        assert other.share != first.share and not np.array_equal(other.partners, first.partners)
    assert not Mixing() and Mixing().describe() == ""
    assert Mixing(mixup=0.2, cutmix=1).describe() == ", mixup 0.2 or cutmix 1 (one each batch)"


# --- the training step ------------------------------------------------------------------------------------------


def arrays(path):
    rng = np.random.default_rng(8)
    np.savez(path, x=rng.standard_normal((32, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 32))
    return path


@pytest.mark.parametrize(
    "flags",
    [
        ("--mixup", "0.4"),
        ("--cutmix", "1", "--backend", "triton"),
        ("--mixup", "1", "--cutmix", "1", "--accumulate", "2", "--label-smoothing", "0.1"),
    ],
    ids=["mixup", "cutmix-triton", "both-in-parts-smoothed"],
)
def test_a_step_is_pytorchs_step_on_the_mixed_batch(tmp_path, monkeypatch, flags):
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    seen = []
    step = loop.Trainer._train_step

    def keep_batch(self, x, y):
        seen.append((x.clone(), y.clone()))
        return step(self, x, y)

    monkeypatch.setattr(loop.Trainer, "_train_step", keep_batch)
    args = ["train", str(net), "--data", str(arrays(tmp_path / "d.npz")), "--batch", "16", "--steps", "1", *PLAIN]
    args += ["--lr", "0.5", "--momentum", "0", "--weight-decay", "0", "--schedule", "constant", "--seed", "11"]
    assert main([*args, "--val-fraction", "0", "--out", str(tmp_path / "run"), *flags]) == 0
    (x, y), = seen  # fmt: skip
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").weights

    recipe = dict(zip(flags[::2], flags[1::2], strict=True))
    mixing = Mixing(float(recipe.get("--mixup", 0)), float(recipe.get("--cutmix", 0)), seed=11)
    draw = mixing.draw(16, 8, 8, epoch=0, batch=0, rank=0)
    if draw.box is None:
        images = draw.share * x + (1 - draw.share) * x[draw.partners]
    else:
        top, bottom, left, right = draw.box
        images = x.clone()
        images[:, :, top:bottom, left:right] = x[draw.partners][:, :, top:bottom, left:right]
    targets = draw.share * F.one_hot(y, 10).float() + (1 - draw.share) * F.one_hot(y[draw.partners], 10).float()
    module = GraphModule(load_graph(net), seed=11)
    smoothing = float(recipe.get("--label-smoothing", 0))
    F.cross_entropy(module(images), targets, label_smoothing=smoothing).backward()
    for name, param in module.named_parameters():
        want = param.detach() - 0.5 * param.grad
        torch.testing.assert_close(trained[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_resumed_run_mixes_as_the_straight_run(tmp_path):
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    data = arrays(tmp_path / "d.npz")
    args = ["train", str(net), "--data", str(data), "--batch", "8", *PLAIN, "--mixup", "0.4", "--cutmix", "1"]
    args += ["--val-fraction", "0", "--schedule", "constant"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--epochs", "2", "--steps", "5", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--steps", "none"]) == 0
    straight, cut = (load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "cut"))
    assert straight.state["step"] == cut.state["step"] == 8
    for name, value in straight.weights.items():
        assert torch.equal(cut.weights[name], value), name


@pytest.mark.parametrize("flag,value", [("--mixup", "-1"), ("--cutmix", "nan"), ("--cutmix", "x")])
def test_a_bad_alpha_is_an_error_at_the_flag(tmp_path, capsys, flag, value):
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    data = arrays(tmp_path / "d.npz")
    code = main(["train", str(net), "--data", str(data), flag, value, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"{flag}: error:") and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()
