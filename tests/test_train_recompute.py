"""`recompute`: layers that keep only their input in the forward pass and run again in the backward pass.

The step must be the one without it, bit for bit (the same operations on the same inputs): the gradients,
the logits, batch norm's running averages (moved once: the second pass updates copies) and dropout's masks
(the random state replayed). What the forward pass keeps for the backward is counted tensor by tensor
through autograd's saved-tensor hooks, against what each setting should keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from train_support import NORMED

from netdsl.cli.main import main
from netdsl.lang.frontend import graph_from_text
from netdsl.runtime.module import GraphModule
from netdsl.train import loop

# Every kind of run boundary: two towers on two devices, batch norm, LRN, an add reading two layers, dropout, a
# cross-tower fc and a softmax output.
NET = """\
net recompute
device gpu0, gpu1
input image: 3 x 12 x 12

towers gpu0, gpu1 {
    c1 = conv(image, 4, size=3, pad=1) | batchnorm | relu | lrn(size=3, k=2) | maxpool(2, stride=2)
    c2 = conv(all c1, 4, size=3, pad=1) | relu
    r  = add(c1, c2) | relu | avgpool(2, stride=2)
    f3 = fc(all r, 12) | relu | dropout(0.5)
}
f4 = fc(all f3, 5) on gpu0
p = softmax(f4)
output p
"""
TOWERS = {"gpu0": "cpu", "gpu1": "cpu"}


def runs(module: GraphModule) -> list[list[str]]:
    """The layers of each run of two groups or more (those recomputed), by name."""
    plan = module._netdsl
    return [[item.name for index in run for item in plan.groups[index].layers] for run in plan.segments if len(run) > 1]


def chain(prefix: str, names: str, tower: str) -> list[str]:
    return [f"{prefix}{'.' + name if name else ''}@{tower}" for name in names.split(",")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_runs(backend):
    """`cheap`: what follows a conv or fc, up to a layer another one also reads; `all`: the conv or fc too. A
    layer reading two (the add) starts a run; a net output (the softmax) is never in one. The triton backend
    groups f3's fc with its ReLU, which leaves the dropout alone: no run there with `cheap`."""
    graph = graph_from_text(NET)
    for tower in ("gpu0", "gpu1"):
        cheap = runs(GraphModule(graph, devices=TOWERS, backend=backend, recompute="cheap"))
        assert chain("c1", "batchnorm,relu,lrn,maxpool", tower) in cheap
        assert chain("r", ",relu,avgpool", tower) in cheap
        assert (chain("f3", "relu,dropout", tower) in cheap) == (backend == "torch")
        every = runs(GraphModule(graph, devices=TOWERS, backend=backend, recompute="all"))
        assert chain("c1", ",batchnorm,relu,lrn,maxpool", tower) in every
        assert chain("f3", ",relu,dropout", tower) in every
        assert (chain("c2", ",relu", tower) in every) == (backend == "torch")  # triton: one group
    assert len(cheap) == (6 if backend == "torch" else 4) and len(every) == (8 if backend == "torch" else 6)
    assert not runs(GraphModule(graph, devices=TOWERS, backend=backend))


def step(graph, recompute: str, backend="torch", dtype=None, masks=7, devices=TOWERS, tf32=None) -> dict:
    """One forward and backward pass in training mode on seeded images: the logits, every gradient and every
    running statistic after it."""
    module = GraphModule(graph, devices=devices, seed=3, init="he", backend=backend, recompute=recompute, tf32=tf32)
    module.train()
    images = torch.randn(6, *next(iter(module._netdsl.inputs.values())), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(masks)  # dropout's
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = module.logits(images).float()
    (logits.square().mean() + logits[:, 0].sum()).backward()
    found = {"logits": logits.detach()}
    found.update({f"grad {name}": param.grad for name, param in module.named_parameters()})
    found.update(dict(module.named_buffers()))
    return found


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["cheap", "all"])
def test_the_same_step_bit_for_bit(recompute, dtype):
    graph = graph_from_text(NET)
    want, got = step(graph, "none", dtype=dtype), step(graph, recompute, dtype=dtype)
    assert want.keys() == got.keys()
    assert any(name.endswith("running_var") for name in got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    # ...and the step is not blind to what it checks: another dropout mask gives other gradients.
    other = step(graph, recompute, dtype=dtype, masks=8)
    assert not torch.equal(other["grad f3@gpu0.weight"], want["grad f3@gpu0.weight"])


@pytest.mark.parametrize("recompute", ["cheap", "all"])
def test_the_same_step_on_netdsls_kernels(recompute):
    """The triton backend's kernels (batch norm's running averages moved in its kernel, dropout's seed drawn
    from torch's generator) under the interpreter."""
    graph = graph_from_text(NET)
    want, got = step(graph, "none", backend="triton"), step(graph, recompute, backend="triton")
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's TF32 convolutions)")
@pytest.mark.parametrize("tf32", [False, True])
def test_on_a_gpu_the_pass_again_takes_the_forward_passs_precision(tf32):
    """The module sets TF32 for its forward pass as `tf32` says; the backward pass runs under torch's own switches
    (cuDNN's convolutions in TF32 by default). The layers run again must compute as the forward pass did: the
    logits, the running averages and the gradients to the order of the GPU's reduction orders (TF32's error would
    be 1e-3)."""
    graph = graph_from_text(NET)
    gpu = {"gpu0": "cuda:0", "gpu1": "cuda:0"}
    want, got = step(graph, "none", devices=gpu, tf32=tf32), step(graph, "all", devices=gpu, tf32=tf32)
    for name, value in want.items():
        assert (got[name] - value).abs().max() <= 1e-5 * value.abs().max(), name


def kept(module: GraphModule, images: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What a training forward pass keeps for the backward pass, besides weights: each storage's tensor."""
    found = {}
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*module.parameters(), *module.buffers()]}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage().data_ptr()
        if storage not in weights:
            found[storage] = (tuple(tensor.shape), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = module.logits(images)
    logits.sum().backward()  # the recomputed layers' own tensors are not counted: they live only in here
    return sorted(found.values(), key=str)


def test_what_the_forward_pass_keeps():
    """conv | batchnorm | relu | maxpool, then fc, at batch 2: without recompute every layer keeps what its
    backward reads (the image, the conv's output for batch norm, its statistics, the ReLU's output, the pool's
    argmax, the fc's input); `cheap` keeps the conv's output in place of its chain's; `all` the chain's input."""
    graph = graph_from_text(NORMED)
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    image, conv, fc = ((2, 1, 8, 8), torch.float32), ((2, 4, 6, 6), torch.float32), ((2, 36), torch.float32)
    channel, argmax = ((4,), torch.float32), ((2, 4, 3, 3), torch.int64)
    every = sorted([image, conv, conv, channel, channel, argmax, fc], key=str)  # conv twice: its output, the ReLU's
    assert kept(GraphModule(graph).train(), images) == every
    assert kept(GraphModule(graph, recompute="cheap").train(), images) == sorted([image, conv, fc], key=str)
    assert kept(GraphModule(graph, recompute="all").train(), images) == sorted([image, fc], key=str)


# --- netdsl train ---------------------------------------------------------------------------------------

PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")
DROPPED = NORMED.replace("f2 = fc(c1, 10)", "f2 = fc(c1, 16) | relu | dropout(0.5)\nf3 = fc(f2, 10)").replace(
    "output f2", "output f3"
)


def arrays(path: Path, count: int = 48) -> Path:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((count, 1, 8, 8)).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, count), x_val=x[:8], y_val=rng.integers(0, 10, 8))
    return path


def train(tmp_path: Path, name: str, *extra: str) -> dict[str, np.ndarray]:
    net = tmp_path / "dropped.net"
    net.write_text(DROPPED)
    data = tmp_path / "d.npz" if (tmp_path / "d.npz").exists() else arrays(tmp_path / "d.npz")
    args = ["train", str(net), "--data", str(data), "--batch", "8", "--lr", "0.05", "--init", "he", *PLAIN]
    assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
    return load_file(tmp_path / name / "weights.safetensors")


@pytest.mark.parametrize("extra", [("--recompute", "cheap"), ("--recompute", "all", "--accumulate", "2")])
def test_a_run_with_recompute_is_the_run_without(tmp_path, capsys, extra):
    """Two epochs (batch norm, dropout, momentum, validation): the same weights and running averages, bit for
    bit; in parts too (each part's layers run again in its own backward pass)."""
    parts = list(extra[2:])
    want = train(tmp_path, "plain", "--epochs", "2", *parts)
    got = train(tmp_path, "again", "--epochs", "2", *extra)
    assert f", recompute {extra[1]}," in capsys.readouterr().err
    assert want.keys() == got.keys() and any(name.endswith("running_mean") for name in got)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture
def built(monkeypatch) -> list[GraphModule]:
    """The modules the trainer builds, in order."""
    made: list[GraphModule] = []
    real = loop.GraphModule

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "GraphModule", recorded)
    return made


def test_the_trainer_builds_its_module_with_it(tmp_path, built):
    """The setting reaches the module (not only the banner): its runs are the recomputed ones."""
    train(tmp_path, "run", "--steps", "1", "--recompute", "all")
    assert runs(built[0]) == [["c1", "c1.batchnorm", "c1.relu", "c1.maxpool"], ["f2", "f2.relu", "f2.dropout"]]


def test_recompute_may_change_when_a_run_is_resumed(tmp_path, built):
    """It changes how a step is computed, not what: a run resumed with it goes on as the run without."""
    want = train(tmp_path, "straight", "--steps", "8")
    train(tmp_path, "resumed", "--steps", "4")
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "8", "--recompute", "cheap"]) == 0
    assert [bool(runs(module)) for module in built] == [False, False, True]
    got = load_file(tmp_path / "resumed" / "weights.safetensors")
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_recompute_and_compile_are_refused_together(tmp_path, capsys):
    net = tmp_path / "n.net"
    net.write_text(NORMED)
    code = main(["train", str(net), "--data", str(arrays(tmp_path / "d.npz")), "--recompute", "cheap", "--compile"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("--recompute: error: recompute = cheap is for eager PyTorch")
    assert "hint: leave out compile or recompute" in err
    assert not (tmp_path / "runs").exists()


def test_an_unknown_setting_is_an_error(tmp_path, capsys):
    net = tmp_path / "n.net"
    net.write_text(NORMED + "\ntrain {\n    recompute = some\n}\n")
    assert main(["train", str(net), "--data", str(arrays(tmp_path / "d.npz"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{net}:8:17: error: `recompute` must be none, cheap or all, got `some`")
    with pytest.raises(Exception, match="unknown recompute `some`"):
        GraphModule(graph_from_text(NORMED), recompute="some")


def test_check_grads_through_the_layers_run_again(tmp_path, capsys, monkeypatch):
    """`--check-grads --recompute all`: autograd through the recomputed runs (batch norm, LRN, dropout with
    its one mask, two towers) against finite differences in float64."""
    from netdsl.train import diagnose

    built = []
    real = diagnose.GraphModule

    def recorded(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(diagnose, "GraphModule", recorded)
    net = tmp_path / "recompute.net"
    net.write_text(NET)
    assert main(["train", str(net), "--check-grads", "--seed", "1", "--recompute", "all"]) == 0
    assert runs(built[0]) and "worst error" in capsys.readouterr().out
