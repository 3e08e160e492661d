"""`netdsl train --backend triton`: the training step on netdsl's own kernels (conv, fc, LRN + max-pool, batch
norm, dropout and the loss, forward and backward; under Triton's interpreter here) against the same steps on
the torch backend, and against itself.

Weights after K steps are compared as the norm of the difference over the norm of the weight (fp32, 1e-5):
a max-pooling window whose two largest values differ by less than the two backends' rounding (about 1e-6)
may route one gradient element elsewhere, which moves single elements of a gradient, not the step. Nets
with dropout are trained here with a rate of 0 for the comparison: the kernels draw their masks from a
counter-based stream, PyTorch from its own generator (the dropout kernels' statistics are tested apart).
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_support import SMALL_ALEXNET

from netdsl.cli.main import main
from netdsl.lang.frontend import load_graph
from netdsl.runtime.weights import init_weights
from netdsl.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def exact_fp32_in_pytorch():
    """On a GPU cuDNN and cuBLAS would multiply fp32 in TF32 by default; the comparisons want PyTorch exact, as
    netdsl's kernels are (precision "ieee"). On the CPU this changes nothing."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--keep-best", "0")


def nets(tmp_path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    simplenet = (ROOT / "nets/simplenet.net").read_text().replace("1 x 64 x 64", "1 x 16 x 16")
    (tmp_path / "simplenet.net").write_text(simplenet.replace("dropout(0.5)", "dropout(0)"))
    (tmp_path / "small_alexnet.net").write_text(SMALL_ALEXNET.replace("dropout(0.5)", "dropout(0)"))
    return {
        "lenet5": (ROOT / "nets/lenet5.net", (1, 32, 32)),
        "simplenet": (tmp_path / "simplenet.net", (1, 16, 16)),
        "small_alexnet": (tmp_path / "small_alexnet.net", (3, 27, 27)),
    }


def train(net: Path, data: Path, out: Path, backend: str, steps: int = 2) -> dict[str, torch.Tensor]:
    code = main(
        ["train", str(net), "--data", str(data), "--batch", "4", "--steps", str(steps), "--lr", "0.01", "--init",
         "he", "--seed", "4", "--schedule", "constant", "--backend", backend, "--out", str(out), *PLAIN]
    )  # fmt: skip
    assert code == 0
    return load_checkpoint(out / "checkpoints" / "last.ckpt").weights


def arrays(tmp_path: Path, shape: tuple[int, ...]) -> Path:
    rng = np.random.default_rng(3)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x=rng.standard_normal((8, *shape)).astype(np.float32),
        y=rng.integers(0, 10, 8),
        x_val=rng.standard_normal((2, *shape)).astype(np.float32),
        y_val=rng.integers(0, 10, 2),
    )
    return data


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lenet5", "simplenet", "small_alexnet"])
def test_steps_on_the_kernels_equal_steps_on_pytorch(tmp_path, which):
    """Two steps (an epoch: the schedule, validation and a checkpoint between them)."""
    net, shape = nets(tmp_path)[which]
    data = arrays(tmp_path, shape)
    kernels = train(net, data, tmp_path / "triton", "triton")
    torch_ = train(net, data, tmp_path / "torch", "torch")
    start = train(net, data, tmp_path / "start", "torch", steps=1)
    assert set(kernels) == set(torch_)
    for name, want in torch_.items():
        if name.endswith(("running_mean", "running_var")):
            error = float((kernels[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
        else:
            error = float((kernels[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert error <= 1e-5, (name, error)
    moved = max(float((torch_[name] - start[name]).abs().max()) for name in torch_)
    assert moved > 1e-4  # the second step changed the weights


def test_the_kernels_train_to_the_same_bits_twice(tmp_path):
    """No atomics, fixed-order reductions: the triton backend's training is deterministic."""
    net, shape = nets(tmp_path)["lenet5"]
    data = arrays(tmp_path, shape)
    first, second = (train(net, data, tmp_path / name, "triton") for name in ("first", "second"))
    for name, value in first.items():
        assert torch.equal(second[name], value), name


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs a C compiler")
def test_the_kernels_compose_with_autograd_and_torch_compile():
    """Every kernel is a torch.library custom operator with its backward an operator too: torch.compile traces
    the forward and the backward around them (opaque calls) and gets the eager gradients."""
    import netdsl
    from netdsl.runtime.module import GraphModule

    module = GraphModule(netdsl.load_graph(ROOT / "nets/lenet5.net"), init="he", seed=1, backend="triton").train()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    torch.nn.functional.cross_entropy(module.logits(x).flatten(1), y).backward()
    eager = {name: param.grad.clone() for name, param in module.named_parameters()}
    module.zero_grad()
    compiled = torch.compile(module.logits)
    torch.nn.functional.cross_entropy(compiled(x).flatten(1), y).backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bf16_training_on_the_kernels(interpreter_bf16_dot, low):
    """Under autocast the conv and fc kernels take bf16 (or fp16) operands, fp32 accumulation, and the maps after
    them stay 16-bit, forward and backward, while the weights and their gradients stay fp32. Against PyTorch in
    fp32, each weight's gradient must be within 6% (norm of the difference over the norm), the first conv's 15%:
    PyTorch's own bf16 autocast is 9% off there (sums over 8 x 28 x 28 rounded pixels), and under the
    interpreter a bf16 dot rounds once more than an MMA does. A kernel reading its bf16 operands wrongly would
    be off by the whole gradient. Two runs give the same bits."""
    import netdsl
    from netdsl.runtime import kernel_ops
    from netdsl.runtime.module import GraphModule

    graph = netdsl.load_graph(ROOT / "nets/lenet5.net")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)

    def gradients(backend: str, bf16: bool) -> tuple[torch.dtype, dict[str, torch.Tensor]]:
        module = GraphModule(graph, init="he", seed=1, backend=backend).train()
        with torch.autocast("cpu", dtype=low, enabled=bf16):
            logits = module.logits(x).flatten(1)
            if backend == "triton":
                loss = kernel_ops.cross_entropy(logits, y, 0.0)[0]
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        return logits.dtype, {name: param.grad for name, param in module.named_parameters()}

    reference = gradients("torch", False)[1]
    dtype, grads = gradients("triton", True)
    assert dtype == low
    for name, want in reference.items():
        assert grads[name].dtype == torch.float32
        error = ((grads[name] - want).norm() / want.norm()).item()
        assert error < 0.06 if name != "c1.weight" else error < 0.15, (name, error)
    again = gradients("triton", True)[1]
    for name, value in grads.items():
        assert torch.equal(again[name], value), name


def _step_all(made: dict, grads: dict, rate: float) -> None:
    """One step of each optimizer in `made` (kind -> (params by name, optimizer)) with the same gradients."""
    from netdsl.train.optim import set_learning_rate

    for params, optimizer in made.values():
        optimizer.zero_grad()
        for name, param in params.items():
            if param.grad is None:
                param.grad = grads[name].clone()
            else:
                param.grad.copy_(grads[name])
        set_learning_rate(optimizer, rate)
        optimizer.step()


@pytest.mark.slow
def test_netdsl_train_in_bf16_on_the_kernels_in_a_fresh_process(tmp_path):
    """`netdsl train --backend triton --dtype bf16` on a machine without a GPU: the command chooses the interpreter
    after netdsl.codegen was imported, and must still widen its bf16 dots (a fresh process, as a user runs it;
    once, the first steps' losses came out near 1e9). Weights after two steps within 10% of the torch backend's
    in bf16 (the biases start at 0: after two steps they are their gradients, 4% apart in bf16)."""
    import os
    import subprocess
    import sys

    net, shape = nets(tmp_path)["lenet5"]
    data = arrays(tmp_path, shape)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    weights = {}
    for backend in ("triton", "torch"):
        out = tmp_path / backend
        args = ["train", str(net), "--data", str(data), "--batch", "4", "--steps", "2", "--lr", "0.01", "--init",
                "he", "--seed", "4", "--schedule", "constant", "--backend", backend, "--dtype", "bf16", "--out",
                str(out), *PLAIN]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "netdsl", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        weights[backend] = load_checkpoint(out / "checkpoints" / "last.ckpt").weights
    for name, want in weights["torch"].items():
        got = weights["triton"][name]
        moved = torch.as_tensor(want).float()
        assert ((torch.as_tensor(got).float() - moved).norm() / moved.norm()).item() < 0.1, name


def test_the_fused_update_is_the_papers_rule_in_one_launch_per_device():
    """FlatPaperSGD (one kernel over flat buffers) against PaperSGD: multipliers per weight, Nesterov off and
    on, a rate drop in the middle, and velocities loaded back as a checkpoint does."""
    from netdsl.train.checkpoint import load_optimizer_state, optimizer_state_by_name
    from netdsl.train.optim import FlatPaperSGD, PaperSGD, param_groups

    generator = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 5, 3, 3), "b.bias": (2,)}
    for nesterov in (False, True):
        made = {}
        for kind in (PaperSGD, FlatPaperSGD):
            torch.manual_seed(0)
            params = {name: torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
                      for name, shape in shapes.items()}  # fmt: skip
            groups = param_groups(params.items(), [("b.*", 3.0)], [("*.bias", 0.0)])
            optimizer = kind(groups, 0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
            made[kind] = (params, optimizer)
        for step in range(6):
            grads = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
            _step_all(made, grads, 0.1 if step < 3 else 0.01)
            if step == 3:  # a checkpoint's round trip of the fused optimizer's velocities
                params, optimizer = made[FlatPaperSGD]
                names = {id(param): name for name, param in params.items()}
                saved = optimizer_state_by_name(optimizer, names)
                load_optimizer_state(optimizer, names, saved, Path("last.ckpt"))
        (want, _), (got, fused) = made[PaperSGD], made[FlatPaperSGD]
        for name in shapes:
            torch.testing.assert_close(got[name].detach(), want[name].detach(), rtol=1e-5, atol=1e-6)  # fp32
        assert len(fused.flat) == 1  # one device, one flat buffer, one launch per step


@pytest.mark.parametrize("frozen", ["a.*", "*"])
def test_the_fused_update_leaves_weights_at_rate_0_where_they_are(frozen):
    """lr_mult 0 on the first group, or on every weight (nothing to take a base rate from), then a schedule at
    0: frozen weights do not move (no gradient, no decay: both scale with the rate), the rest step as PaperSGD
    does, momentum included."""
    from netdsl.train.optim import FlatPaperSGD, PaperSGD, param_groups

    generator = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 3), "b.bias": (2,)}
    start = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    made = {}
    for kind in (PaperSGD, FlatPaperSGD):
        params = {name: torch.nn.Parameter(value.clone()) for name, value in start.items()}
        optimizer = kind(param_groups(params.items(), [(frozen, 0.0)], []), 0.1, momentum=0.9, weight_decay=0.01)
        made[kind] = (params, optimizer)
    for rate in (0.1, 0.1, 0.0):
        grads = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        _step_all(made, grads, rate)
    (want, _), (got, _) = made[PaperSGD], made[FlatPaperSGD]
    for name in shapes:
        if fnmatch.fnmatchcase(name, frozen):
            assert torch.equal(got[name].detach(), start[name]), name
        else:
            assert not torch.equal(got[name].detach(), start[name]), name
        torch.testing.assert_close(got[name].detach(), want[name].detach(), rtol=1e-5, atol=1e-6)


def test_netdsl_train_on_the_kernels_with_every_weight_frozen(tmp_path):
    net = tmp_path / "tiny.net"
    net.write_text("net tiny\ninput image: 1 x 8 x 8\nc1 = conv(image, 4, size=3) | relu\nf2 = fc(c1, 10)\noutput f2\n")
    data = arrays(tmp_path, (1, 8, 8))
    out = tmp_path / "run"
    code = main(
        ["train", str(net), "--data", str(data), "--batch", "4", "--steps", "2", "--lr-mult", "*=0", "--init", "he",
         "--seed", "4", "--backend", "triton", "--out", str(out), *PLAIN]
    )  # fmt: skip
    assert code == 0
    got = load_checkpoint(out / "checkpoints" / "last.ckpt").weights
    start = init_weights(load_graph(net), seed=4, scheme="he")
    for name, value in start.items():
        assert np.array_equal(got[name].numpy(), value), name


@pytest.mark.parametrize("lrn", [False, True])
def test_max_pools_too_wide_for_the_kernels_train_on_pytorch(tmp_path, lrn):
    """The kernels save a max-pool winner's offset in its window as int8: a 12 x 12 window (144 taps, alone or after
    an LRN) trains with PyTorch's pooling, with the gradients of the torch backend, instead of failing."""
    import netdsl
    from netdsl.runtime.module import GraphModule

    path = tmp_path / "wide.net"
    path.write_text(
        "net wide\ninput x: 3 x 14 x 14\n"
        f"c = conv(x, 4, size=3, pad=1) | relu{' | lrn(size=3)' if lrn else ''} | maxpool(12, stride=2)\n"
        "y = fc(c, 5)\noutput y\n"
    )
    graph = netdsl.load_graph(path)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 14, 14, generator=generator), torch.randint(0, 5, (2,), generator=generator)
    grads = {}
    for backend in ("triton", "torch"):
        module = GraphModule(graph, init="he", seed=1, backend=backend).train()
        torch.nn.functional.cross_entropy(module.logits(x).flatten(1), y).backward()
        grads[backend] = {name: param.grad for name, param in module.named_parameters()}
    for name, want in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], want, rtol=1e-5, atol=1e-6, msg=name)
