"""`weights = FILE|RUN`: training that starts from weights trained before (fine-tuning). Weights are matched by
name, a renamed layer starts from `init`, `mean = auto` and `std = auto` take the statistics the weights were
trained with, and a resumed run needs the starting file no more. Data sets are small seeded .npz arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import NORMED

import netdsl
from netdsl.cli.main import main
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import init_weights, load_weights, save_weights, weights_metadata
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.start import Start

PLAIN = ("--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1", "--schedule", "constant")

TINY = NORMED  # with batch norm: its running averages load too
RENAMED = TINY.replace("f2 = fc(c1, 10)", "f2_new = fc(c1, 6)").replace("output f2", "output f2_new")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def arrays(path: Path, count: int, seed: int, classes: int = 10, offset: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal((count, 1, 8, 8))).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, classes, count))
    return path


def train(net: Path, data: Path, out: Path, *extra) -> int:
    args = [net, "--data", data, "--batch", 8, "--init", "he", "--val-fraction", 0, "--out", out, *PLAIN, *extra]
    return main(["train", *map(str, args)])


@pytest.fixture
def pretrained(tmp_path) -> Path:
    """A run of TINY on 10 classes, its data's mean near 3 and its std near 1 measured (`auto`)."""
    data = arrays(tmp_path / "first.npz", 32, seed=1, offset=3.0)
    run = tmp_path / "first"
    assert train(write(tmp_path, "tiny.net", TINY), data, run, "--steps", 4, "--std", "auto") == 0
    return run


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.ckpt").weights


def preprocess_of(run: Path) -> dict:
    return json.loads(weights_metadata(run / "weights.safetensors")["netdsl.preprocess"])


def test_a_renamed_last_layer_starts_afresh_and_the_rest_from_the_file(tmp_path, pretrained, capsys):
    """Every rate at 0: after the steps the net holds exactly where it started, the pretrained conv and batch
    norm's weights from the run's file, the renamed fc layer (6 classes now) from `init`; the log says which."""
    net = write(tmp_path, "renamed.net", RENAMED)
    data = arrays(tmp_path / "second.npz", 24, seed=2, classes=6)
    run = tmp_path / "second"
    capsys.readouterr()
    assert train(net, data, run, "--steps", 2, "--weights", pretrained, "--lr-mult", "*=0") == 0
    before = load_weights(pretrained / "weights.safetensors", netdsl.load_graph(tmp_path / "tiny.net"))
    got = weights_of(run)
    for name in ("c1.weight", "c1.bias", "c1.batchnorm.weight", "c1.batchnorm.bias"):
        assert torch.equal(got[name], torch.from_numpy(before[name])), name
    fresh = init_weights(netdsl.load_graph(net), 0, "he")
    for name in ("f2_new.weight", "f2_new.bias"):
        assert torch.equal(got[name], torch.from_numpy(fresh[name])), name
    err = capsys.readouterr().err
    assert f"starting from {pretrained / 'weights.safetensors'}: 6 of 8 weights" in err, err
    assert "from `init`: `f2_new.weight`, `f2_new.bias`; not in the net, left out: `f2.bias`, `f2.weight`" in err


def test_fine_tuning_steps_from_the_loaded_weights(tmp_path, pretrained):
    """With the rates on, the first step of a fine-tuning run is the paper's rule applied to the loaded weights:
    the same as a run whose initial weights are the file's (both on the same batch and random state)."""
    net = tmp_path / "tiny.net"
    data = arrays(tmp_path / "second.npz", 16, seed=3)
    tuned = tmp_path / "tuned"
    plain = ("--mean", "none", "--std", "false")
    assert train(net, data, tuned, "--steps", 1, "--batch", 16, "--weights", pretrained, *plain) == 0
    start = {name: torch.from_numpy(value) for name, value in load_weights(pretrained / "weights.safetensors",
             netdsl.load_graph(net)).items()}  # fmt: skip
    module = GraphModule(netdsl.load_graph(net), weights=start).train()
    with np.load(data) as stored:
        x, y = torch.from_numpy(stored["x"]), torch.from_numpy(stored["y"])
    torch.nn.functional.cross_entropy(module.logits(x).flatten(1), y).backward()  # the whole set: one batch
    got = weights_of(tuned)
    for name, param in module.named_parameters():
        want = param.detach() - 0.01 * (param.grad + 0.0005 * param.detach())  # momentum's first step: none yet
        np.testing.assert_allclose(got[name].numpy(), want.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
        assert not torch.equal(got[name], start[name])
    for name in ("c1.batchnorm.running_mean", "c1.batchnorm.running_var"):  # moved once from the file's
        np.testing.assert_allclose(got[name].numpy(), module.state_dict()[name].numpy(), rtol=1e-5, atol=1e-7)


def test_auto_statistics_are_the_weights_and_given_ones_win(tmp_path, pretrained):
    """The second data set's mean is near 0 and the first's near 3: `auto`, and std left at its default (false
    from scratch), keep what the weights expect (the first run's statistics, as its weights record them);
    `--mean 0.5` and `--std false` win over them."""
    net = tmp_path / "tiny.net"
    data = arrays(tmp_path / "second.npz", 24, seed=4)
    first = preprocess_of(pretrained)
    assert 2.5 < first["mean"][0] < 3.5 and first["std"] is not None
    for name, extra in {"auto": ("--std", "auto"), "default": ()}.items():
        assert train(net, data, tmp_path / name, "--steps", 1, "--weights", pretrained, *extra) == 0
        got = preprocess_of(tmp_path / name)
        assert (got["mean"], got["std"]) == (first["mean"], first["std"]), name
    given = ("--mean", "0.5", "--std", "false")
    assert train(net, data, tmp_path / "given", "--steps", 1, "--weights", pretrained, *given) == 0
    got = preprocess_of(tmp_path / "given")
    assert (got["mean"], got["std"]) == ([0.5], None)
    assert train(net, data, tmp_path / "own", "--steps", 1) == 0  # without weights: the data's mean, no std
    got = preprocess_of(tmp_path / "own")
    assert abs(got["mean"][0]) < 0.5 and got["std"] is None


def test_a_resumed_fine_tuning_needs_the_starting_file_no_more(tmp_path, pretrained, capsys):
    """A fine-tuning run stopped after 2 steps resumes to 4 with the pretrained run folder gone, and ends where
    the straight run does, bit for bit, with the pretrained statistics (kept in its own checkpoint)."""
    net = tmp_path / "tiny.net"
    data = arrays(tmp_path / "second.npz", 40, seed=5)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train(net, data, straight, "--steps", 4, "--weights", pretrained) == 0
    assert train(net, data, stopped, "--steps", 2, "--weights", pretrained) == 0
    mean = preprocess_of(pretrained)["mean"]
    for path in sorted(pretrained.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    pretrained.rmdir()
    assert main(["train", "--resume", str(stopped), "--weights", str(straight)]) == 1  # started from others
    assert "`weights` cannot change when a run is resumed" in capsys.readouterr().err
    assert main(["train", "--resume", str(stopped), "--steps", "4"]) == 0
    for name, value in weights_of(straight).items():
        assert torch.equal(weights_of(stopped)[name], value), name
    assert preprocess_of(stopped)["mean"] == preprocess_of(straight)["mean"] == mean


@pytest.mark.parametrize(
    "text, extra, message, hint",
    [
        (TINY.replace("f2 = fc(c1, 10)", "f2 = fc(c1, 6)"), (), "tensor `f2.weight` has shape 10 x 36 in the "
         "weights file, but the net needs 6 x 36", "to start `f2` afresh (another number of classes or filters), "
         "give it a new name in the net"),
        (TINY.replace("conv(image, 4,", "conv(image, 5,"), (), "tensor `c1.weight` has shape 4 x 1 x 3 x 3 in the "
         "weights file, but the net needs 5 x 1 x 3 x 3", "to start `c1` afresh"),
        (TINY.replace("c1", "k1").replace("f2", "g2"), (), "the weights file holds none of the 8 tensors of net "
         "`tiny`", "weights are matched by name"),
        (TINY, ("--weights", "missing.safetensors"), "weights file not found", None),
    ],
)  # fmt: skip
def test_weights_that_cannot_start_the_net_are_one_clear_error(tmp_path, pretrained, capsys, text, extra, message,
                                                               hint):  # fmt: skip
    net = write(tmp_path, "other.net", text)
    data = arrays(tmp_path / "second.npz", 24, seed=6, classes=6)
    capsys.readouterr()
    code = train(net, data, tmp_path / "run", "--steps", 1, *(extra or ("--weights", pretrained)))
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    if hint:
        assert hint in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_weights_file_that_is_not_safetensors_is_named(tmp_path, capsys):
    net = write(tmp_path, "tiny.net", TINY)
    data = arrays(tmp_path / "d.npz", 24, seed=7)
    code = train(net, data, tmp_path / "run", "--steps", 1, "--weights", net)
    err = capsys.readouterr().err
    assert code == 1 and f"{net}: error: not a safetensors file" in err and "Traceback" not in err, err


def test_weights_holding_nan_do_not_start_a_run(tmp_path, capsys):
    """A NaN would only surface as the first step's divergence, blamed on a layer: the file is named instead."""
    net = write(tmp_path, "tiny.net", TINY)
    values = init_weights(netdsl.load_graph(net), 0, "he")
    values["c1.bias"][2] = np.nan
    save_weights(tmp_path / "w.safetensors", values)
    code = train(net, arrays(tmp_path / "d.npz", 24, seed=9), tmp_path / "run", "--weights", tmp_path / "w.safetensors")
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'w.safetensors'}: error: weight `c1.bias` holds NaN" in err, err


def test_start_loads_buffers_and_leaves_the_rest(tmp_path):
    """The running averages load with the weights; a checkpoint's optimizer tensors (named with `:`) and the
    file's other tensors are not weights and stay out."""
    graph = netdsl.load_graph(write(tmp_path, "tiny.net", TINY))
    values = {name: np.full(value.shape, index + 1.0, np.float32) for index, (name, value) in
              enumerate(init_weights(graph, 0, "he").items()) if not name.startswith("f2.")}  # fmt: skip
    values["other.weight"] = np.ones(3, np.float32)
    save_weights(tmp_path / "w.safetensors", values)
    start = Start.read(str(tmp_path / "w.safetensors"), graph)
    assert start.fresh == ["f2.weight", "f2.bias"] and start.unused == ["other.weight"]
    assert start.preprocess is None
    module = GraphModule(graph, seed=0, init="he")
    untouched = {name: value.clone() for name, value in module.state_dict().items() if name.startswith("f2.")}
    start.load_into(module)
    state = module.state_dict()
    for name, value in values.items():
        if name in state:
            assert torch.equal(state[name], torch.from_numpy(value)), name
    for name, value in untouched.items():
        assert torch.equal(state[name], value), name


def test_the_triton_backends_fused_update_starts_from_the_file(tmp_path, pretrained):
    """The triton backend's optimizer flattens the weights into buffers when it is made: the loaded values
    are what it holds (every rate 0: nothing moves)."""
    net = tmp_path / "tiny.net"
    data = arrays(tmp_path / "second.npz", 16, seed=8)
    run = tmp_path / "kernels"
    assert train(net, data, run, "--steps", 1, "--weights", pretrained, "--lr-mult", "*=0", "--backend", "triton") == 0
    before = load_weights(pretrained / "weights.safetensors", netdsl.load_graph(net))
    got = weights_of(run)
    for name, value in before.items():
        if "running" not in name:
            assert torch.equal(got[name], torch.from_numpy(value)), name


def test_check_grads_checks_where_the_fine_tuning_would_start(tmp_path, pretrained, monkeypatch, capsys):
    """`--check-grads --weights RUN`: the gradients are checked at the file's weights (the renamed layer at
    `init`'s), and they agree with finite differences there."""
    from netdsl.train import diagnose

    seen = {}
    real = diagnose.check_gradients

    def check_gradients(graph, weights, *args, **kwargs):
        seen.update(weights)
        return real(graph, weights, *args, **kwargs)

    monkeypatch.setattr(diagnose, "check_gradients", check_gradients)
    net = write(tmp_path, "renamed.net", RENAMED)
    assert main(["train", str(net), "--check-grads", "--weights", str(pretrained), "--init", "he"]) == 0
    file = load_weights(pretrained / "weights.safetensors", netdsl.load_graph(tmp_path / "tiny.net"))
    fresh = init_weights(netdsl.load_graph(net), 0, "he")
    assert np.array_equal(seen["c1.weight"], file["c1.weight"])
    assert np.array_equal(seen["f2_new.weight"], fresh["f2_new.weight"])
    assert "worst error" in capsys.readouterr().out


def test_fine_tuning_an_imported_onnx_model(tmp_path, pretrained, capsys):
    """A run exported to ONNX and imported back (`.net` + safetensors, the preprocessing record carried through
    the model) starts a fine-tuning run: its last layer renamed for 6 classes, the rest the run's weights, the
    run's mean and std."""
    pytest.importorskip("onnx")
    net = tmp_path / "tiny.net"
    assert main(["export", str(net), "-o", str(tmp_path / "m.onnx"), "--weights", str(pretrained)]) == 0
    imported = tmp_path / "m.net"
    weights = tmp_path / "m.safetensors"
    assert main(["import", str(tmp_path / "m.onnx"), "-o", str(imported), "--weights-out", str(weights)]) == 0
    text = imported.read_text()
    assert "f2 = fc(" in text and "output f2" in text
    imported.write_text(text.replace("f2 = fc(c1, 10)", "f2_new = fc(c1, 6)").replace("output f2", "output f2_new"))
    data = arrays(tmp_path / "second.npz", 24, seed=10, classes=6)
    run = tmp_path / "tuned"
    capsys.readouterr()
    assert train(imported, data, run, "--steps", 1, "--weights", weights, "--lr-mult", "*=0") == 0
    assert "6 of 8 weights; from `init`: `f2_new.weight`, `f2_new.bias`" in capsys.readouterr().err
    got, want = weights_of(run), load_weights(pretrained / "weights.safetensors", netdsl.load_graph(net))
    assert torch.equal(got["c1.weight"], torch.from_numpy(want["c1.weight"]))
    first, tuned = preprocess_of(pretrained), preprocess_of(run)
    assert (tuned["mean"], tuned["std"]) == (first["mean"], first["std"])


def test_the_hint_to_rename_names_a_tower_layer_as_the_net_writes_it(tmp_path, capsys):
    """A layer inside `towers` is stored once per tower (`c@gpu0.weight`): the hint names `c`, the name to change."""
    towers = """\
net towers
device gpu0, gpu1
input image: 1 x 8 x 8
towers gpu0, gpu1 {
    c = conv(image, 4, size=3) | relu | maxpool(2, stride=2)
}
out = fc(all c, 10) on gpu0
output out
"""
    first, second = write(tmp_path, "first.net", towers), write(tmp_path, "second.net", towers.replace(" 4,", " 5,"))
    values = init_weights(netdsl.load_graph(first), 0, "he")
    assert "c@gpu0.weight" in values
    save_weights(tmp_path / "w.safetensors", values)
    data = arrays(tmp_path / "d.npz", 24, seed=11)
    assert train(second, data, tmp_path / "run", "--steps", 1, "--weights", tmp_path / "w.safetensors") == 1
    err = capsys.readouterr().err
    assert "tensor `c@gpu0.weight` has shape 4 x 1 x 3 x 3 in the weights file" in err, err
    assert "hint: to start `c` afresh" in err
