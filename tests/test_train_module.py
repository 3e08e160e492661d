"""The trainable module (`netdsl.runtime.module.GraphModule`) against independent references.

- Every layer kind: output, input gradient and every parameter's gradient against plain
  torch.nn.functional code written here (LRN, batch norm, softmax and global pooling written out by
  hand), in float64, on fresh seeded inputs and weights; `torch.autograd.gradcheck` on a few.
- Whole nets in training mode (dropout active, batch norm on batch statistics) against the hand-written
  models of tests/golden/models.py (lenet5, simplenet, alexnet on a 99 x 99 input) and the two-tower net
  written out below: loss, every parameter's gradient and the updated running statistics, float64.
- Towers: two logical devices mapped to one torch device, both ways, equal the net written out on one
  device; with CUDA, towers split between the CPU and the GPU equal the CPU alone (the gradient crosses).
- eval() equals `Net(backend="torch")`; names, state_dict, weights files, errors.

Dropout masks: both sides draw them from torch's global generator, seeded identically just before the
forward pass. On the CPU nothing else in either forward pass draws random numbers, both call
`F.dropout` on tensors of the same shape, dtype and device, and both drop in the same order (netdsl
runs layers in definition order, tower gpu0's copy before gpu1's; the models drop tower 0 then tower 1),
so the masks are the same. Were the order or the shapes ever to differ, the masks would differ and the
comparison would fail loudly, never pass wrongly; each such test also checks that training mode changes
the loss, so a dropout that silently did nothing on both sides could not pass either.

Tolerances (float64), relative to the largest |reference| of each tensor: F64_TOLERANCE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from golden.models import AlexNet, LeNet5, SimpleNet
from golden.regenerate import golden_weights, net_path
from kernel_support import fresh_weights

import netdsl
from netdsl.errors import NetError
from netdsl.runtime.module import GraphModule
from netdsl.runtime.net import Net
from netdsl.runtime.weights import init_weights, load_weights, save_weights, weight_specs

F64 = torch.float64
F64_TOLERANCE = 1e-9  # measured: at most ~1e-13 (summation order: conv algorithms, pooling, sums)
FP32_TOLERANCE = 1e-5  # eval() against Net in fp32: batch norm folded into the conv there (measured ~2e-6)
TOWERS = ("gpu0", "gpu1")


# --- helpers ----------------------------------------------------------------------------------------


def graph_of(text: str):
    return netdsl.graph_from_text(text, file="case.net")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got.detach() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-300)).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tolerance: float = F64_TOLERANCE) -> None:
    assert torch.isfinite(want).all() and want.abs().max() > 0, f"{what}: a degenerate reference"
    error = relative_error(got, want)
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


def by_hand_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """The paper's LRN, channel by channel: window c - (size-1)//2 .. c + size//2, clipped; alpha not / size."""
    channels = x.shape[1]
    out = []
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels, c + size // 2 + 1)
        out.append(x[:, c] / (k + alpha * (x[:, lo:hi] ** 2).sum(1)) ** beta)
    return torch.stack(out, 1)


def by_hand_softmax(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.amax(1, keepdim=True)).exp()
    return e / e.sum(1, keepdim=True)


def by_hand_batchnorm(x, weight, bias, eps):
    dims = [0] if x.dim() == 2 else [0, 2, 3]
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight.reshape(shape) + bias.reshape(shape)


# --- every layer kind -------------------------------------------------------------------------------

# name -> (net text: input x, output y; the reference: (x, weights by netdsl name) -> y)
LAYER_CASES = {
    "conv_groups_dilation_stride_pad": (
        "input x: 4 x 11 x 13\ny = conv(x, 6, size=3, stride=2, pad=(1, 2), dilation=2, groups=2)\noutput y",
        lambda x, w: F.conv2d(x, w["y.weight"], w["y.bias"], stride=2, padding=(1, 2), dilation=2, groups=2),
    ),
    "conv_rectangular_no_bias": (
        "input x: 3 x 7 x 6\ny = conv(x, 5, size=(3, 2), stride=(1, 2), bias=false)\noutput y",
        lambda x, w: F.conv2d(x, w["y.weight"], None, stride=(1, 2)),
    ),
    "fc_of_a_map": (
        "input x: 3 x 4 x 5\ny = fc(x, 7)\noutput y",
        lambda x, w: x.reshape(len(x), -1) @ w["y.weight"].T + w["y.bias"],
    ),
    "relu": ("input x: 3 x 5 x 5\ny = relu(x)\noutput y", lambda x, w: x.clamp_min(0)),
    "leaky_relu": ("input x: 3 x 5 x 5\ny = leaky_relu(x, 0.1)\noutput y", lambda x, w: torch.where(x > 0, x, 0.1 * x)),
    "lrn": (
        "input x: 7 x 4 x 4\ny = lrn(x, size=5, alpha=0.5, beta=0.75, k=2)\noutput y",
        lambda x, w: by_hand_lrn(x, 5, 0.5, 0.75, 2.0),
    ),
    "lrn_groups": (
        "input x: 8 x 3 x 3\ny = lrn(x, size=3, alpha=0.3, beta=0.6, k=1.5, groups=2)\noutput y",
        lambda x, w: torch.cat([by_hand_lrn(half, 3, 0.3, 0.6, 1.5) for half in x.chunk(2, 1)], 1),
    ),
    "maxpool_overlapping": (
        "input x: 3 x 9 x 9\ny = maxpool(x, 3, stride=2)\noutput y",
        lambda x, w: F.max_pool2d(x, 3, 2),
    ),
    "maxpool_ceil_pad": (
        "input x: 3 x 8 x 10\ny = maxpool(x, 3, stride=2, pad=1, ceil=true)\noutput y",
        lambda x, w: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True),
    ),
    "avgpool_ceil_pad_no_count": (
        "input x: 3 x 8 x 10\ny = avgpool(x, 3, stride=2, pad=1, ceil=true, count_pad=false)\noutput y",
        lambda x, w: F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True, count_include_pad=False),
    ),
    "avgpool_overlapping": (
        "input x: 3 x 9 x 9\ny = avgpool(x, 3, stride=2)\noutput y",
        lambda x, w: F.avg_pool2d(x, 3, 2),
    ),
    "global_avgpool": (
        "input x: 4 x 5 x 6\ny = global_avgpool(x)\noutput y",
        lambda x, w: F.adaptive_avg_pool2d(x, 1),
    ),
    "batchnorm_eval": (
        "input x: 4 x 5 x 5\ny = batchnorm(x, eps=1e-3)\noutput y",
        lambda x, w: (
            (x - w["y.running_mean"].reshape(1, -1, 1, 1))
            / (w["y.running_var"].reshape(1, -1, 1, 1) + 1e-3).sqrt()
            * w["y.weight"].reshape(1, -1, 1, 1)
            + w["y.bias"].reshape(1, -1, 1, 1)
        ),
    ),
    "concat": (
        "input x: 3 x 5 x 5\na = conv(x, 3, size=1)\nb = conv(x, 2, size=3, pad=1)\ny = concat(a, b)\noutput y",
        lambda x, w: torch.cat(
            [F.conv2d(x, w["a.weight"], w["a.bias"]), F.conv2d(x, w["b.weight"], w["b.bias"], padding=1)], 1
        ),
    ),
    "add": (
        "input x: 3 x 5 x 5\na = conv(x, 4, size=1)\nb = conv(x, 4, size=3, pad=1)\ny = add(a, b)\noutput y",
        lambda x, w: F.conv2d(x, w["a.weight"], w["a.bias"]) + F.conv2d(x, w["b.weight"], w["b.bias"], padding=1),
    ),
    "softmax_flat": (
        "input x: 2 x 3 x 3\ny = fc(x, 6) | softmax\noutput y",
        lambda x, w: by_hand_softmax(x.reshape(len(x), -1) @ w["y.weight"].T + w["y.bias"]),
    ),
    "softmax_channels": ("input x: 5 x 3 x 2\ny = softmax(x)\noutput y", lambda x, w: by_hand_softmax(x)),
    "flatten": (
        "input x: 3 x 4 x 2\ny = flatten(x) | fc(5)\noutput y",
        lambda x, w: x.reshape(len(x), -1) @ w["y.fc.weight"].T + w["y.fc.bias"],
    ),
    "dropout_eval": ("input x: 3 x 4 x 4\ny = dropout(x, 0.4)\noutput y", lambda x, w: x.clone()),
}

TRAINING_CASES = {
    "batchnorm_map": (
        "input x: 4 x 5 x 5\ny = batchnorm(x, eps=1e-3, momentum=0.3)\noutput y",
        lambda x, w: by_hand_batchnorm(x, w["y.weight"], w["y.bias"], 1e-3),
    ),
    "batchnorm_flat": (
        "input x: 6\ny = batchnorm(x)\noutput y",
        lambda x, w: by_hand_batchnorm(x, w["y.weight"], w["y.bias"], 1e-5),
    ),
}


def layer_case(text, reference, training: bool, seed: int):
    """Runs the case's net in a float64 module and the reference; returns both sides' outputs and
    gradients (the input's and every parameter's) for one fresh random cotangent."""
    graph = graph_of(text)
    weights = fresh_weights(graph, seed)
    module = GraphModule(graph, weights=weights, dtype=F64).train(training)
    (shape,) = [item.shape for item in netdsl.ir.layers(graph) if item.op == "input"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *shape, generator=generator, dtype=F64)
    ours = x.clone().requires_grad_()
    got = module(ours)
    cotangent = torch.randn(got.shape, generator=generator, dtype=F64)
    (got * cotangent).sum().backward()

    theirs = x.clone().requires_grad_()
    tensors = {name: torch.tensor(value, dtype=F64, requires_grad=True) for name, value in weights.items()}
    want = reference(theirs, tensors)
    (want * cotangent).sum().backward()
    return module, got, want, ours.grad, theirs.grad, tensors, x


# Each case in eval mode and, except those about eval mode, in training mode (which computes the same there).
MODES = [(case, False) for case in sorted(LAYER_CASES)]
MODES += [(case, True) for case in sorted(LAYER_CASES) if not case.endswith("_eval")]


@pytest.mark.parametrize("case, training", MODES, ids=[f"{case}-{'train' if t else 'eval'}" for case, t in MODES])
def test_every_layer_kind_matches_functional_code(case, training):
    text, reference = LAYER_CASES[case]
    module, got, want, x_grad, want_x_grad, tensors, _ = layer_case(text, reference, training, seed=len(case))
    assert_close(got, want, f"{case} output")
    assert_close(x_grad, want_x_grad, f"{case} input gradient")
    params = dict(module.named_parameters())
    for name, param in params.items():
        assert_close(param.grad, tensors[name].grad, f"{case} gradient of {name}")


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_batchnorm_training_uses_batch_statistics_and_updates_the_running_ones(case):
    text, reference = TRAINING_CASES[case]
    module, got, want, x_grad, want_x_grad, tensors, x = layer_case(text, reference, True, seed=3)
    assert_close(got, want, f"{case} output")
    assert_close(x_grad, want_x_grad, f"{case} input gradient")
    for name in ("y.weight", "y.bias"):
        assert_close(dict(module.named_parameters())[name].grad, tensors[name].grad, f"gradient of {name}")
    momentum = 0.3 if case == "batchnorm_map" else 0.1
    dims = [0] if x.dim() == 2 else [0, 2, 3]
    count = math.prod(x.shape[d] for d in dims)
    mean = x.mean(dims)
    unbiased = ((x - mean.reshape(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims) / (count - 1)
    buffers = dict(module.named_buffers())
    assert set(buffers) == {"y.running_mean", "y.running_var"}
    assert_close(buffers["y.running_mean"], (1 - momentum) * tensors["y.running_mean"] + momentum * mean, "mean")
    assert_close(buffers["y.running_var"], (1 - momentum) * tensors["y.running_var"] + momentum * unbiased, "var")


def test_dropout_in_training_drops_and_scales():
    """The mask is read off the output (inputs are never 0): kept values are x / (1 - rate), the gradient
    passes through the same mask, about `rate` of the values are dropped, and a seed repeats a mask."""
    rate = 0.4
    module = GraphModule(graph_of(f"input x: 10 x 10 x 10\ny = dropout(x, {rate})\noutput y"), dtype=F64)
    x = torch.randn(3, 10, 10, 10, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    torch.manual_seed(5)
    y = module(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] / (1 - rate))
    assert abs(1 - kept.double().mean().item() - rate) < 0.03
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    (y * cotangent).sum().backward()
    assert torch.equal(x.grad, cotangent * kept / (1 - rate))
    torch.manual_seed(5)
    assert torch.equal(module(x), y)
    torch.manual_seed(6)
    assert not torch.equal(module(x), y)
    assert torch.equal(module.eval()(x), x)


GRADCHECK_CASES = {
    "conv": ("input x: 4 x 5 x 6\ny = conv(x, 4, size=3, stride=2, pad=1, dilation=1, groups=2)\noutput y", "y.weight"),
    "lrn": ("input x: 5 x 2 x 3\na = conv(x, 5, size=1)\ny = lrn(a, size=3, alpha=0.5)\noutput y", "a.weight"),
    "maxpool_ceil": (
        "input x: 2 x 5 x 6\ny = conv(x, 2, size=1) | maxpool(3, stride=2, ceil=true)\noutput y",
        "y.weight",
    ),
    "batchnorm_training": ("input x: 3 x 3 x 2\ny = batchnorm(x)\noutput y", "y.weight"),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck(case):
    """torch.autograd.gradcheck (finite differences) over the input and one weight, in training mode."""
    text, weight_name = GRADCHECK_CASES[case]
    graph = graph_of(text)
    module = GraphModule(graph, weights=fresh_weights(graph, 4), dtype=F64).train()
    (shape,) = [item.shape for item in netdsl.ir.layers(graph) if item.op == "input"]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4), dtype=F64, requires_grad=True)
    weight = dict(module.named_parameters())[weight_name].detach().clone().requires_grad_()

    def run(x, weight):
        return torch.func.functional_call(module, {weight_name: weight}, (x,))

    assert torch.autograd.gradcheck(run, (x, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- whole nets in training mode ----------------------------------------------------------------------

ALEXNET_SMALL_SIDE = 99  # conv1 -> 23, pools -> 11, 5, 2: fc6 reads 256 x 2 x 2, flattened C, H, W


def alexnet_small_text() -> str:
    """nets/alexnet.net on a 99 x 99 image (everything else as published)."""
    text = net_path("alexnet").read_text(encoding="utf-8")
    published = "input image: 3 x 227 x 227"
    assert published in text
    return text.replace(published, f"input image: 3 x {ALEXNET_SMALL_SIDE} x {ALEXNET_SMALL_SIDE}")


def alexnet_small_weights(graph) -> dict[str, np.ndarray]:
    """He's weights with varied biases; fc8 scaled by 1/16 so that the pixel-scale inputs (which make the
    paper's LRN matter) leave the softmax unsaturated (as tests/golden/regenerate.py does)."""
    weights = fresh_weights(graph, 2012)
    for tensor in ("fc8.weight", "fc8.bias"):
        weights[tensor] = weights[tensor] / np.float32(16)
    return weights


TWO_TOWER = """
net two_tower
device gpu0, gpu1
input image: 3 x 21 x 21

const norm = lrn(size=3, alpha=0.5, beta=0.75, k=2)   # a large alpha, so that the LRN matters

towers gpu0, gpu1 {
    conv1 = conv(image, 4, size=3, stride=2) | relu | norm | maxpool(3, stride=2, ceil=true)   # 21 -> 10 -> 5
    conv3 = conv(all conv1, 6, size=3, pad=1) | relu
    fc6   = fc(all conv3, 16) | relu | dropout(0.5)
}
fc8  = fc(all fc6, 5) on gpu0
prob = softmax(fc8)
output prob
"""

# The same net on one device: each tower written out, the cross-tower reads as concats.
TWO_TOWER_ONE_DEVICE = """
net two_tower_one_device
input image: 3 x 21 x 21
const norm = lrn(size=3, alpha=0.5, beta=0.75, k=2)
a1 = conv(image, 4, size=3, stride=2) | relu | norm | maxpool(3, stride=2, ceil=true)
b1 = conv(image, 4, size=3, stride=2) | relu | norm | maxpool(3, stride=2, ceil=true)
c1 = concat(a1, b1)
a3 = conv(c1, 6, size=3, pad=1) | relu
b3 = conv(c1, 6, size=3, pad=1) | relu
c3 = concat(a3, b3)
a6 = fc(c3, 16) | relu | dropout(0.5)
b6 = fc(c3, 16) | relu | dropout(0.5)
c6 = concat(a6, b6)
fc8 = fc(c6, 5)
prob = softmax(fc8)
output prob
"""
ONE_DEVICE_NAMES = {"a1": "conv1@gpu0", "b1": "conv1@gpu1", "a3": "conv3@gpu0", "b3": "conv3@gpu1"}
ONE_DEVICE_NAMES.update({"a6": "fc6@gpu0", "b6": "fc6@gpu1", "fc8": "fc8"})


class TwoTower(torch.nn.Module):
    """The two-tower net by hand: parameters by netdsl name, LRN written out, dropout in tower order."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.w = torch.nn.ParameterDict(
            {name.replace(".", ":"): torch.tensor(v, dtype=F64) for name, v in weights.items()}
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name.replace(":", "."): value for name, value in self.w.items()}

    def forward(self, image):
        w = self.tensors()
        c1 = [
            F.max_pool2d(
                by_hand_lrn(
                    F.relu(F.conv2d(image, w[f"conv1@{t}.weight"], w[f"conv1@{t}.bias"], stride=2)), 3, 0.5, 0.75, 2
                ),
                3,
                2,
                ceil_mode=True,
            )
            for t in TOWERS
        ]
        c3 = [
            F.relu(F.conv2d(torch.cat(c1, 1), w[f"conv3@{t}.weight"], w[f"conv3@{t}.bias"], padding=1)) for t in TOWERS
        ]
        both = torch.cat(c3, 1).flatten(1)
        f6 = [
            F.dropout(F.relu(F.linear(both, w[f"fc6@{t}.weight"], w[f"fc6@{t}.bias"])), 0.5, self.training)
            for t in TOWERS
        ]
        return torch.softmax(F.linear(torch.cat(f6, 1), w["fc8.weight"], w["fc8.bias"]), 1)


def golden_case(net: str):
    """(graph, weights, hand-written model with the weights in float64, input, labels) of a whole net."""
    if net == "alexnet_small":
        graph = graph_of(alexnet_small_text())
        weights = alexnet_small_weights(graph)
        model, shape, scale = AlexNet(ALEXNET_SMALL_SIDE), (3, ALEXNET_SMALL_SIDE, ALEXNET_SMALL_SIDE), 50.0
    elif net == "two_tower":
        graph = graph_of(TWO_TOWER)
        weights = fresh_weights(graph, 7)
        model, shape, scale = TwoTower(weights), (3, 21, 21), 1.0
    else:
        graph = netdsl.load_graph(net_path(net))
        weights = golden_weights(net)
        model, shape, scale = {"lenet5": LeNet5, "simplenet": SimpleNet}[net](), netdsl.ir.layers(graph)[0].shape, 1.0
    if net != "two_tower":
        model = model.to(F64).load(weights)
    generator = torch.Generator().manual_seed(len(net))
    x = torch.randn(4, *shape, generator=generator, dtype=F64) * scale
    labels = torch.randint(0, graph.nodes[graph.graph["outputs"][0]]["layer"].shape[0], (4,), generator=generator)
    return graph, weights, model, x, labels


def golden_loss(model, x, labels, softmax_output: bool) -> torch.Tensor:
    out = model(x)
    return F.nll_loss(torch.log(out), labels) if softmax_output else F.cross_entropy(out, labels)


@pytest.mark.parametrize("net", ["lenet5", "simplenet", "alexnet_small", "two_tower"])
def test_whole_nets_train_like_the_hand_written_models(net):
    graph, weights, model, x, labels = golden_case(net)
    module = GraphModule(graph, weights=weights, dtype=F64).train()
    model.train()
    assert module.output_is_softmax == (net != "lenet5")
    torch.manual_seed(12)
    loss = F.cross_entropy(module.logits(x), labels)
    loss.backward()
    torch.manual_seed(12)
    want = golden_loss(model, x, labels, module.output_is_softmax)
    want.backward()
    assert_close(loss, want, f"{net} loss")
    params = dict(module.named_parameters())
    assert set(params) | set(dict(module.named_buffers())) == set(model.tensors())
    for name, param in params.items():
        assert_close(param.grad, model.tensors()[name].grad, f"{net} gradient of {name}")
    for name, buffer in module.named_buffers():  # simplenet's running statistics, updated by the step
        assert_close(buffer, model.tensors()[name], f"{net} {name} after the step")
        assert not torch.equal(buffer, torch.as_tensor(weights[name], dtype=F64))
    if net != "lenet5":  # dropout (and batch norm) made the training loss differ from inference's
        with torch.no_grad():
            inference = F.cross_entropy(module.eval().logits(x), labels)
        assert abs(inference.item() - loss.item()) > 1e-3 * abs(loss.item())


# --- towers on devices --------------------------------------------------------------------------------


def train_step(module, x, labels, seed: int = 3):
    torch.manual_seed(seed)
    loss = F.cross_entropy(module.logits(x), labels)
    loss.backward()
    return loss.detach().cpu(), {name: param.grad.detach().cpu() for name, param in module.named_parameters()}


def test_two_devices_equal_one_device_and_the_net_written_out():
    graph, weights, _, x, labels = golden_case("two_tower")
    two = GraphModule(graph, weights=weights, devices={"gpu0": "cpu", "gpu1": "cpu"}, dtype=F64).train()
    one = GraphModule(graph, weights=weights, devices="cpu", dtype=F64).train()
    assert set(two.devices) == set(TOWERS)
    loss_two, grads_two = train_step(two, x, labels)
    loss_one, grads_one = train_step(one, x, labels)
    assert torch.equal(loss_two, loss_one)
    assert all(torch.equal(grads_two[name], grads_one[name]) for name in grads_one)

    twin_weights = {
        f"{new}.{t}": weights[f"{old}.{t}"] for new, old in ONE_DEVICE_NAMES.items() for t in ("weight", "bias")
    }
    twin = GraphModule(graph_of(TWO_TOWER_ONE_DEVICE), weights=twin_weights, dtype=F64).train()
    assert list(twin.devices) == ["gpu0"]
    loss_twin, grads_twin = train_step(twin, x, labels)
    assert_close(loss_two, loss_twin, "loss")
    for new, old in ONE_DEVICE_NAMES.items():
        for tensor in ("weight", "bias"):  # tower gpu1's conv1 learns from gpu0's conv3 and fc8 too
            assert_close(grads_two[f"{old}.{tensor}"], grads_twin[f"{new}.{tensor}"], f"{old}.{tensor}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (towers on the CPU and the GPU)")
@pytest.mark.parametrize("mapping", [{"gpu0": "cpu", "gpu1": "cuda:0"}, {"gpu0": "cuda:0", "gpu1": "cpu"}])
def test_towers_split_between_cpu_and_gpu_equal_the_cpu(mapping):
    graph, weights, _, x, labels = golden_case("two_tower")
    split = GraphModule(graph, weights=weights, devices=mapping, dtype=F64).eval()  # no dropout: CUDA's RNG differs
    cpu = GraphModule(graph, weights=weights, dtype=F64).eval()
    assert dict(split.named_parameters())["conv1@gpu1.weight"].device == torch.device(mapping["gpu1"])
    loss_split, grads_split = train_step(split, x, labels)
    loss_cpu, grads_cpu = train_step(cpu, x, labels)
    assert_close(loss_split, loss_cpu, "loss")
    for name, grad in grads_cpu.items():
        assert_close(grads_split[name], grad, f"gradient of {name}")


# --- inference, names and files -----------------------------------------------------------------------


@pytest.mark.parametrize("net", ["lenet5", "simplenet", "alexnet_small"])
def test_eval_equals_the_torch_backend(net, tmp_path):
    graph, weights, _, x, _ = golden_case(net)
    path = net_path(net)
    if net == "alexnet_small":
        path = tmp_path / "alexnet_small.net"
        path.write_text(alexnet_small_text(), encoding="utf-8")
    module = GraphModule(graph, weights=weights).eval()
    assert module.training is False and all(not m.training for m in module.modules())
    compiled = Net(path, backend="torch", weights=weights)
    x = x.float()
    with torch.no_grad():
        assert_close(module(x), compiled(x), f"{net} eval", FP32_TOLERANCE)


def test_names_are_netdsls():
    graph = netdsl.load_graph(net_path("simplenet"))
    module = GraphModule(graph, init="he")
    assert list(module.state_dict()) == list(weight_specs(graph))
    assert [name for name, _ in module.named_buffers()] == [
        n for n in weight_specs(graph) if n.endswith(("_mean", "_var"))
    ]
    assert "logits.fc.weight" in dict(module.named_parameters())  # `logits` is a layer and a method
    assert all(p.dtype == torch.float32 for p in module.parameters())
    exported = module.weights()
    assert list(exported) == list(weight_specs(graph))
    for name, value in init_weights(graph, scheme="he").items():
        assert exported[name].dtype == np.float32 and np.array_equal(exported[name], value)
    with torch.no_grad():
        next(module.parameters()).add_(1)
    assert not np.array_equal(module.weights()["s1.weight"], exported["s1.weight"])  # a copy, not a view


def test_a_trained_state_dict_runs_in_net(tmp_path):
    """One SGD step, then the module's state_dict written with save_weights is a weights file for
    `Net(weights=path)` (what `netdsl run --weights` loads), and gives the module's own outputs."""
    graph, weights, _, x, labels = golden_case("simplenet")
    module = GraphModule(graph, weights=weights).train()
    x = x.float()
    F.cross_entropy(module.logits(x), labels).backward()
    with torch.no_grad():
        for param in module.parameters():
            param -= 0.1 * param.grad
    path = tmp_path / "trained.safetensors"
    save_weights(path, {name: value.detach().numpy() for name, value in module.state_dict().items()})
    assert set(load_weights(path, graph)) == set(weight_specs(graph))
    compiled = Net(net_path("simplenet"), backend="torch", weights=path)
    with torch.no_grad():
        assert_close(compiled(x), module.eval()(x), "trained simplenet", FP32_TOLERANCE)


def test_float64_and_float32_modules_agree():
    graph, weights, _, x, _ = golden_case("lenet5")
    wide = GraphModule(graph, weights=weights, dtype=F64)
    narrow = GraphModule(graph, weights=weights)
    assert next(wide.parameters()).dtype == F64 and next(narrow.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert_close(narrow(x), wide(x), "float32 against float64", 1e-5)  # inputs are cast to the module's dtype


def test_logits_of_a_softmax_output():
    graph, weights, _, x, _ = golden_case("two_tower")
    module = GraphModule(graph, weights=weights, dtype=F64).eval()
    assert module.output_is_softmax
    assert_close(torch.softmax(module.logits(x), 1), module(x), "softmax of the logits")


def rename_layer(graph, old: str, new: str):
    """The graph with layer `old` called `new` (names the language cannot write)."""
    import networkx as nx

    renamed = nx.relabel_nodes(graph, {old: new})
    for node in renamed.nodes:
        item = renamed.nodes[node]["layer"]
        item.name = node
        item.inputs = [new if name == old else name for name in item.inputs]
    renamed.graph["outputs"] = [new if name == old else name for name in graph.graph["outputs"]]
    return renamed


def test_names_torch_cannot_hold_are_net_errors():
    graph = graph_of("input x: 2 x 4 x 4\na = conv(x, 2, size=1)\nb = conv(a, 3, size=1)\noutput b")
    with pytest.raises(NetError, match=r"`a.weight.weight` lies under layer `a`'s tensor `a.weight`"):
        GraphModule(rename_layer(graph, "b", "a.weight"))
    with pytest.raises(NetError, match=r"`training` is a name torch\.nn\.Module keeps"):
        GraphModule(graph_of("input x: 2 x 4 x 4\ntraining = conv(x, 2, size=1)\noutput training"))
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    for name in ("forward", "eval", "weights"):  # methods are fine: children are not read by attribute
        module = GraphModule(rename_layer(graph, "b", name))
        assert f"{name}.weight" in module.state_dict()
        assert module(x).shape == (1, 3, 4, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": torch.float16}, "float32 or float64 parameters"),
        ({"devices": {"gpu7": "cpu"}}, "the net has no device `gpu7`"),
        ({"devices": {"gpu0": "cpu"}}, "no torch device given for the net's device `gpu1`"),
        ({"devices": "nowhere"}, "is not a torch device"),
        ({"init": "lecun"}, "unknown weight initialization scheme"),
    ],
)
def test_bad_settings_are_net_errors(kwargs, message):
    with pytest.raises(NetError, match=message):
        GraphModule(graph_of(TWO_TOWER), **kwargs)


def test_bad_weights_are_net_errors():
    graph = graph_of(TWO_TOWER)
    weights = fresh_weights(graph)
    cases = [
        ({**weights, "conv1.weight": np.zeros(1)}, "the net has no weight `conv1.weight`"),
        ({k: v for k, v in weights.items() if k != "fc8.bias"}, "weight `fc8.bias` is missing"),
        ({**weights, "fc8.bias": np.zeros(6)}, "weight `fc8.bias` has shape 6, the net needs 5"),
        ({**weights, "fc8.bias": np.array(["a"] * 5)}, "not a tensor|not a real number"),
    ]
    for bad, message in cases:
        with pytest.raises(NetError, match=message):
            GraphModule(graph, weights=bad)


def test_bad_inputs_and_outputs_are_net_errors():
    graph = graph_of("input x: 2 x 4 x 4\ny = conv(x, 2, size=1) | batchnorm\nz = relu(y)\noutput y, z")
    module = GraphModule(graph).train()
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 2, 4, 4, generator=generator)
    with pytest.raises(NetError, match="expected N x 2 x 4 x 4"):
        module(torch.randn(2, 3, 4, 4, generator=generator))
    with pytest.raises(NetError, match="floating-point tensor"):
        module(torch.randint(-3, 4, (2, 2, 4, 4), generator=generator))
    with pytest.raises(NetError, match="a loss on logits needs one"):
        module.logits(x)
    flat = GraphModule(graph_of("input x: 3\ny = batchnorm(x)\noutput y")).train()
    with pytest.raises(NetError, match="more than one value per channel"):
        flat(torch.randn(1, 3, generator=generator))
    outputs = module(x)
    assert set(outputs) == {"y", "z"}  # by the names `output` wrote


@pytest.mark.parametrize("scale, says", [(1e19, "the logits reach"), (1.0, None)])
def test_an_infinite_loss_from_finite_logits_blames_their_size(scale, says):
    """Logits of 3e38 are finite, yet the softmax cross-entropy of them is not: the diagnosis says how large
    they are rather than doubting the labels."""
    import contextlib
    import warnings

    from netdsl.train.checkpoint import rng_states
    from netdsl.train.diagnose import first_non_finite

    graph = graph_of("input x: 4\ny = fc(x, 3)\noutput y")
    weight = torch.tensor([[scale, 0, 0, 0], [-scale, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    module = GraphModule(graph, weights={"y.weight": weight, "y.bias": torch.zeros(3)})
    x = torch.tensor([[scale * 3, 0, 0, 0]], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the diagnosis prints no warning of PyTorch's (a tensor made a float)
        found = first_non_finite(module, graph, x, torch.tensor([1]), rng_states(), contextlib.nullcontext)
    if says is None:  # a step with nothing wrong: nothing is found again
        assert found is None, found
    else:
        assert found.place.startswith("in the loss: the logits reach 3e+38") and not found.in_data, found


@pytest.mark.parametrize("fused", [False, True], ids=["PaperSGD", "FlatPaperSGD"])
def test_a_layer_no_output_reads_is_not_trained(fused):
    """`side` reaches no output, so it has no gradient: the torch backend's SGD skipped it while the fused SGD of
    the triton backend decayed it (weight decay and momentum on a gradient of 0). Its weights are not trained
    now (requires_grad off) under either optimizer, and the layer the loss reaches steps as autograd says."""
    from netdsl.train.optim import make_optimizer, param_groups

    graph = graph_of("input x: 2 x 5 x 5\nside = conv(x, 3, size=3)\nout = fc(x, 3)\noutput out")
    weights = fresh_weights(graph, 5)
    module = GraphModule(graph, weights=weights)
    assert [name for name, p in module.named_parameters() if not p.requires_grad] == ["side.weight", "side.bias"]
    lr, decay = 0.1, 0.05
    # a multiplier naming only `side` is no typo (the training fuzzer's recipes name every layer): it changes
    # nothing; a pattern naming no weight at all stays an error
    groups = param_groups(module.named_parameters(), [("side.*", 2.0)], [("side.bias", 0.0)])
    assert [group["names"] for group in groups] == [["out.weight", "out.bias"]]
    with pytest.raises(NetError, match=r"`sid\.\*` matches no weight of the net"):
        param_groups(module.named_parameters(), [("sid.*", 2.0)], [])
    optimizer = make_optimizer("sgd", groups, lr, momentum=0.9, weight_decay=decay, fused=fused)
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 2, 5, 5, generator=generator), torch.tensor([0, 2, 1, 2])
    w = torch.tensor(weights["out.weight"], dtype=torch.float32, requires_grad=True)
    F.cross_entropy(x.flatten(1) @ w.T + torch.tensor(weights["out.bias"]), y).backward()
    want = w.detach() - lr * decay * w.detach() - lr * w.grad  # v = -decay lr w - lr g from v = 0; w + v
    optimizer.zero_grad()
    F.cross_entropy(module.logits(x), y).backward()
    optimizer.step()
    torch.testing.assert_close(module.get_parameter("out.weight").detach(), want, rtol=1e-5, atol=1e-6)
    for name in ("side.weight", "side.bias"):
        assert torch.equal(module.get_parameter(name).detach(), torch.tensor(weights[name]))


def test_a_module_sharing_another_holds_its_tensors():
    """`share=`: the module holds the other's parameters and buffers themselves (SimpleNet's dense nets for two
    image sizes, batch norms and all), so its outputs are those of a module given the same weights, and a change
    to the weights is seen by both; a module of another net, or no module, is refused by name."""
    from netdsl.runtime.dense import dense_graph, dense_weights

    graph = netdsl.load_graph(net_path("simplenet"))
    weights = dense_weights(graph, fresh_weights(graph, seed=6))
    first = GraphModule(dense_graph(graph, 64, 64), weights=weights).eval()
    second = GraphModule(dense_graph(graph, 80, 96), share=first).eval()
    alone = GraphModule(dense_graph(graph, 80, 96), weights=weights).eval()
    held = {name: tensor.data_ptr() for name, tensor in first.state_dict().items()}
    assert {name: tensor.data_ptr() for name, tensor in second.state_dict().items()} == held
    assert any(name.endswith("running_var") for name in held)  # the buffers too
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 1, 80, 96), dtype=np.float32))
    with torch.no_grad():
        before = second.logits(x)
        assert torch.equal(before, alone.logits(x))
        next(first.parameters()).mul_(1.5)
        assert not torch.allclose(second.logits(x), before, atol=1e-3)
    lenet = netdsl.load_graph(net_path("lenet5"))
    with pytest.raises(NetError, match=r"the module shared does not hold this net's weights: `c1\.weight` differs"):
        GraphModule(dense_graph(lenet, 40, 40), share=first)
    with pytest.raises(NetError, match="share must be a GraphModule, got dict"):
        GraphModule(dense_graph(graph, 80, 96), share=weights)
