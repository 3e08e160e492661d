"""The runtime (`netdsl.runtime.net.Net`, `netdsl.load`) against hand-written PyTorch models.

The models below are written with plain torch.nn, independently of netdsl (their LRN too), and get the
same weights as the compiled net. Both backends run: `torch` (netdsl's PyTorch reference per step) and
`triton` (the generated kernels, under Triton's interpreter on a machine without a GPU).
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netdsl
from netdsl.errors import NetError
from netdsl.lang.frontend import load_graph
from netdsl.runtime.module import GraphModule
from netdsl.runtime.net import Net

LENET_PATH = Path(__file__).resolve().parent.parent / "nets" / "lenet5.net"

NETS = Path(__file__).resolve().parent.parent / "nets"
TOLERANCE = 1e-4  # relative to the largest output, fp32

TWO_TOWER = """
net two_tower
device gpu0, gpu1
input image: 3 x 35 x 35

const norm = lrn(size=5, alpha=0.5, beta=0.75, k=2)   # a large alpha, so that the LRN matters

towers gpu0, gpu1 {
    conv1 = conv(image, 8, size=5, stride=2) | relu | norm | maxpool(3, stride=2)   # 35 -> 16 -> 7
    conv3 = conv(all conv1, 12, size=3, pad=1) | relu
    fc6   = fc(all conv3, 32) | relu | dropout(0.5)
}
fc8  = fc(all fc6, 10) on gpu0
prob = softmax(fc8)
output fc8, prob
"""

# The same net on one device, each tower written out and the cross-tower reads as concats.
ONE_DEVICE = """
net two_tower_one_device
input image: 3 x 35 x 35

const norm = lrn(size=5, alpha=0.5, beta=0.75, k=2)

a1 = conv(image, 8, size=5, stride=2) | relu | norm | maxpool(3, stride=2)
b1 = conv(image, 8, size=5, stride=2) | relu | norm | maxpool(3, stride=2)
c1 = concat(a1, b1)
a3 = conv(c1, 12, size=3, pad=1) | relu
b3 = conv(c1, 12, size=3, pad=1) | relu
c3 = concat(a3, b3)
a6 = fc(c3, 32) | relu | dropout(0.5)
b6 = fc(c3, 32) | relu | dropout(0.5)
c6 = concat(a6, b6)
fc8  = fc(c6, 10)
prob = softmax(fc8)
output fc8, prob
"""

# A batch norm folded into the conv before it, one that is not (after a pool), and a flatten output.
BATCHNORM = """
net bn
input image: 2 x 12 x 12
a = conv(image, 6, size=3, pad=1, bias=false) | batchnorm | relu | maxpool(2, stride=2)
b = a | batchnorm | flatten
out = fc(b, 5)
output out, b
"""


# --- hand-written models ----------------------------------------------------------------------------


def paper_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """b_c = a_c / (k + alpha * sum_{j = c - (size-1)//2 .. c + size//2, clipped} a_j^2) ^ beta."""
    channels = x.shape[1]
    out = []
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels, c + size // 2 + 1)
        out.append(x[:, c] / (k + alpha * (x[:, lo:hi] ** 2).sum(1)) ** beta)
    return torch.stack(out, 1)


class TwoTower(nn.Module):
    towers = ("gpu0", "gpu1")

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.ModuleList(nn.Conv2d(3, 8, 5, stride=2) for _ in self.towers)
        self.conv3 = nn.ModuleList(nn.Conv2d(16, 12, 3, padding=1) for _ in self.towers)
        self.fc6 = nn.ModuleList(nn.Linear(24 * 7 * 7, 32) for _ in self.towers)
        self.fc8 = nn.Linear(64, 10)

    def forward(self, x):
        c1 = [F.max_pool2d(paper_lrn(F.relu(conv(x)), 5, 0.5, 0.75, 2.0), 3, 2) for conv in self.conv1]
        c3 = [F.relu(conv(torch.cat(c1, 1))) for conv in self.conv3]
        f6 = [F.relu(fc(torch.cat(c3, 1).flatten(1))) for fc in self.fc6]
        fc8 = self.fc8(torch.cat(f6, 1))
        return {"fc8": fc8, "prob": torch.softmax(fc8, 1)}

    def netdsl_weights(self) -> dict[str, torch.Tensor]:
        modules = {"fc8": self.fc8}
        for i, tower in enumerate(self.towers):
            modules.update({f"{name}@{tower}": getattr(self, name)[i] for name in ("conv1", "conv3", "fc6")})
        return _params(modules)


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.f5, self.f6, self.f7 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2, 2)
        x = F.relu(self.f5(x.flatten(1)))
        return self.f7(F.relu(self.f6(x)))

    def netdsl_weights(self) -> dict[str, torch.Tensor]:
        return _params({name: getattr(self, name) for name in ("c1", "c3", "f5", "f6", "f7")})


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.fc = nn.Linear(216, 5)
        generator = torch.Generator().manual_seed(7)
        for bn in (self.bn1, self.bn2):
            bn.weight.data = torch.rand(6, generator=generator) + 0.5
            bn.bias.data = torch.randn(6, generator=generator)
            bn.running_mean = torch.randn(6, generator=generator)
            bn.running_var = torch.rand(6, generator=generator) + 0.2
        self.eval()

    def forward(self, x):
        a = F.max_pool2d(F.relu(self.bn1(self.conv(x))), 2, 2)
        b = self.bn2(a).flatten(1)
        return {"out": self.fc(b), "b": b}  # `output out, b`: by the names written

    def netdsl_weights(self) -> dict[str, torch.Tensor]:
        return _params({"a": self.conv, "a.batchnorm": self.bn1, "b": self.bn2, "out": self.fc})


def _params(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    weights = {}
    for name, module in modules.items():
        for key, value in [*module.named_parameters(), *module.named_buffers()]:
            if key != "num_batches_tracked":
                weights[f"{name}.{key}"] = value.detach().clone()
    return weights


# --- fixtures -----------------------------------------------------------------------------------------

MODELS = {"two_tower": (TwoTower, (3, 35, 35)), "lenet5": (LeNet5, (1, 32, 32)), "bn": (BatchNormNet, (2, 12, 12))}


@pytest.fixture(scope="module")
def net_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nets")
    files = {"lenet5": NETS / "lenet5.net"}
    for name, text in {"two_tower": TWO_TOWER, "one_device": ONE_DEVICE, "bn": BATCHNORM}.items():
        files[name] = root / f"{name}.net"
        files[name].write_text(text, encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: cls().eval() for name, (cls, _) in MODELS.items()}


@pytest.fixture(scope="module")
def loaded(net_files, models):
    """(net name, backend) -> a Net with the hand-written model's weights, compiled once per module."""
    cache: dict[tuple[str, str], Net] = {}

    def get(name: str, backend: str) -> Net:
        key = (name, backend)
        if key not in cache:
            cache[key] = netdsl.load(net_files[name], backend=backend, weights=models[name].netdsl_weights())
        return cache[key]

    return get


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_close(got, want) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (sorted(got), sorted(want))
        for key in want:
            assert got[key].shape == want[key].shape, key
            assert relative_error(got[key], want[key]) <= TOLERANCE, (key, relative_error(got[key], want[key]))
    else:
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert relative_error(got, want) <= TOLERANCE, relative_error(got, want)


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_hand_written_model(loaded, models, name, backend):
    net = loaded(name, backend)
    generator = torch.Generator().manual_seed(list(MODELS).index(name) * 2 + (backend == "triton"))
    for batch in (1, 2):
        x = torch.randn(batch, *MODELS[name][1], generator=generator)
        with torch.no_grad():
            want = models[name](x)
        assert_close(net(x), want)


def test_two_devices_equal_one_device(loaded, net_files, models):
    two = loaded("two_tower", "torch")
    assert set(two.devices) == {"gpu0", "gpu1"} and all(d == torch.device("cpu") for d in two.devices.values())
    assert any(step.kind == "transfer" for step in two._steps.values())
    rename = {"a1": "conv1@gpu0", "b1": "conv1@gpu1", "a3": "conv3@gpu0", "b3": "conv3@gpu1"}
    rename.update({"a6": "fc6@gpu0", "b6": "fc6@gpu1", "fc8": "fc8"})
    weights = models["two_tower"].netdsl_weights()
    twin_weights = {
        f"{new}.{key}": weights[f"{old}.{key}"] for new, old in rename.items() for key in ("weight", "bias")
    }
    one = Net(net_files["one_device"], weights=twin_weights)
    assert list(one.devices) == ["gpu0"]
    explicit = Net(net_files["two_tower"], devices={"gpu0": "cpu", "gpu1": "cpu"}, weights=weights)
    x = torch.randn(2, 3, 35, 35, generator=torch.Generator().manual_seed(5))
    want = one(x)
    for got in (two(x), explicit(x)):
        for key in ("fc8", "prob"):
            assert relative_error(got[key], want[key]) <= 1e-6


def test_as_module_is_the_same_net_trainable(loaded, models):
    """`as_module()`: a GraphModule in eval mode with the weights the net was given (batch norms not
    folded), computing the net's outputs, on the net's devices, that gradients flow through."""
    net = loaded("lenet5", "torch")
    module = net.as_module()
    assert isinstance(module, GraphModule) and not module.training and module.devices == net.devices
    model = nn.Sequential(nn.Identity(), module, nn.Softmax(dim=1))
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model(x), torch.softmax(models["lenet5"](x), 1))
    assert "lenet5" in repr(model)
    given = models["lenet5"].netdsl_weights()
    params = dict(module.named_parameters())
    assert list(params) == list(given) and all(torch.equal(params[k].detach(), given[k]) for k in given)
    F.cross_entropy(module.train()(x), torch.tensor([1, 7])).backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in module.parameters())

    bn = loaded("bn", "torch")
    assert set(bn.as_module().state_dict()) == set(models["bn"].netdsl_weights())  # the batch norms apart
    x = torch.randn(2, 2, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(bn.as_module()(x), models["bn"](x))
    two = loaded("two_tower", "torch").as_module()
    assert set(two.devices) == {"gpu0", "gpu1"}


def test_arena_allocated_once_per_batch(loaded, models):
    net = loaded("two_tower", "torch")
    generator = torch.Generator().manual_seed(11)
    x2, x1 = torch.randn(2, 3, 35, 35, generator=generator), torch.randn(1, 3, 35, 35, generator=generator)
    first = net(x2)
    arenas = net.arena(2)
    pointers = {device: arena.data_ptr() for device, arena in arenas.items()}
    assert set(arenas) == {"gpu0", "gpu1"}
    net(x1)
    again = net(x2)
    assert net.arena(2) is arenas
    assert all(net.arena(2)[device] is arenas[device] for device in arenas)
    assert {device: arena.data_ptr() for device, arena in net.arena(2).items()} == pointers
    assert net.arena(1)["gpu0"] is not arenas["gpu0"]
    for key in first:
        assert torch.equal(first[key], again[key])  # no state left over from the batch-1 call
    # Each step's output lives inside its device's arena, at its planned offset.
    for name, view in net.views(2).items():
        device = net._steps[name].device
        arena = arenas[device]
        offset = (view.data_ptr() - arena.data_ptr()) // arena.element_size()
        root = net.program.graph["views"].get(name, name)
        assert offset == net.program.graph["buffers"][root].offset * 2
        assert offset + view.numel() <= arena.numel()
    # The outputs are copies: the next call does not change them.
    kept = first["prob"].clone()
    net(torch.randn(2, 3, 35, 35, generator=generator))
    assert torch.equal(first["prob"], kept)


def test_flatten_output_shares_its_input_buffer(loaded):
    net = loaded("bn", "torch")
    views = net.views(1)
    assert views["b_flatten_gpu0_flatten"].data_ptr() == views["b_gpu0_batchnorm"].data_ptr()
    assert net._step_weights["a_gpu0_conv_bn_bias_relu"].keys() == {"weight", "bias"}  # the folded batch norm's bias


def test_default_weights(net_files):
    net = netdsl.load(net_files["lenet5"])
    y = net(torch.randn(3, 1, 32, 32))
    assert y.shape == (3, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 35, 35), "add the batch dimension"),
        (torch.randn(1, 4, 35, 35), "has shape 1 x 4 x 35 x 35, expected N x 3 x 35 x 35"),
        (torch.randn(0, 3, 35, 35), "N >= 1"),
        (torch.zeros(1, 3, 35, 35, dtype=torch.int64), "dtype torch.int64"),
        (torch.zeros(1, 3, 35, 35, dtype=torch.float64), "dtype torch.float64"),
        (torch.full((1, 3, 35, 35), float("nan")), "contains NaN"),
        (torch.full((1, 3, 35, 35), float("inf")), "contains infinite values"),
        ({"images": torch.randn(1, 3, 35, 35)}, "no input `images`"),
        ([1.0, 2.0], "must be a tensor"),
    ],
)
def test_bad_inputs_raise_net_error(loaded, x, message):
    net = loaded("two_tower", "torch")
    with pytest.raises(NetError) as error:
        net(x)
    assert message in str(error.value)


def test_bad_weights_and_devices_raise_net_error(net_files, models):
    weights = models["lenet5"].netdsl_weights()
    path = net_files["lenet5"]
    cases = [
        ({k: v for k, v in weights.items() if k != "c3.bias"}, {}, "weight `c3.bias` is missing"),
        (
            {**weights, "c3.weight": torch.zeros(16, 6, 3, 3)},
            {},
            "has shape 16 x 6 x 3 x 3, the net needs 16 x 6 x 5 x 5",
        ),
        ({**weights, "c4.weight": torch.zeros(1)}, {}, "no weight `c4.weight`"),
        (weights, {"devices": {"gpu7": "cpu"}}, "no device `gpu7`"),
        (weights, {"devices": {}}, "no torch device given for the net's device `gpu0`"),
        (weights, {"backend": "numpy"}, "unknown backend"),
        (weights, {"streams": "one"}, "unknown streams `one`"),
    ]
    for bad, kwargs, message in cases:
        with pytest.raises(NetError) as error:
            Net(path, weights=bad, **kwargs)
        assert message in str(error.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_a_net_keeps_its_own_copy_of_the_weights(dtype):
    """Weights given as arrays are copied in (float32, exact for 16-bit ones; float64 kept until rounded into
    the net's dtype): changing the caller's arrays afterwards changes neither the net nor its module."""
    from netdsl.runtime.weights import init_weights

    given = {k: np.asarray(v, dtype=dtype) for k, v in init_weights(load_graph(LENET_PATH), seed=1).items()}
    net = Net(LENET_PATH, backend="torch", weights=given)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    before, module = net(x), net.as_module()(x)
    want = netdsl.load(LENET_PATH, backend="torch", weights={k: v.astype(np.float64) for k, v in given.items()})(x)
    for value in given.values():
        value *= 2
    assert torch.equal(net(x), before) and torch.equal(net.as_module()(x), module) and torch.equal(before, want)


def test_load_is_exported():
    assert "load" in netdsl.__all__
    net = netdsl.load(NETS / "lenet5.net", backend="torch")
    assert isinstance(net, Net) and net.input_shapes == {"image": (1, 32, 32)}


def test_weights_from_a_file(tmp_path, net_files, models, loaded):
    weights_module = pytest.importorskip("netdsl.runtime.weights")
    path = tmp_path / "lenet5.safetensors"
    weights_module.save_weights(path, {k: v.numpy() for k, v in models["lenet5"].netdsl_weights().items()})
    net = Net(net_files["lenet5"], weights=path)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    assert torch.equal(net(x), loaded("lenet5", "torch")(x))


def test_a_batch_too_large_for_the_devices_is_a_clear_error(tmp_path):
    path = tmp_path / "small.net"
    path.write_text("device gpu0 memory 1 MiB\ninput x: 3 x 32 x 32\ny = conv(x, 8, size=3, pad=1) | relu\n")
    net = Net(path, backend="torch")
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 8, 32, 32)
    with pytest.raises(NetError, match=r"would need .* but has 1\.0 MiB"):
        net(torch.randn(64, 3, 32, 32))


def test_the_first_run_shows_progress_and_later_runs_do_not():
    import io

    shown = io.StringIO()
    net = Net(NETS / "lenet5.net", backend="triton", progress=shown)
    x = torch.randn(2, 1, 32, 32)
    first = net(x)
    assert "first run [" in shown.getvalue() and "7/7 kernels" in shown.getvalue()
    shown.truncate(0)
    shown.seek(0)
    torch.testing.assert_close(net(x), first)
    assert shown.getvalue() == ""


def test_tf32_kernels_only_for_dtype_tf32():
    """dtype tf32 builds kernels whose products are TF32; fp32 builds exact ones, and the torch backend
    leaves PyTorch's TF32 switches as it found them."""
    for dtype, want in (("tf32", '"input_precision": "tf32"'), ("fp32", '"input_precision": "ieee"')):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            net = Net(LENET_PATH, backend="triton", dtype=dtype)
            build = net.build_dir
            sources = [path.read_text() for path in (build / "kernels").glob("*conv*.py")]
            assert sources and all(want in source for source in sources), dtype
            del net
            gc.collect()
        assert not build.exists() and not caught, caught  # its build folder goes with it, silently
    saved = torch.backends.cudnn.allow_tf32
    Net(LENET_PATH, backend="torch", dtype="tf32")(torch.randn(1, 1, 32, 32))
    assert torch.backends.cudnn.allow_tf32 == saved


def test_bf16_under_the_interpreter_is_right():
    """Triton's interpreter multiplies bf16 dot operands as raw bits; the runtime widens them first, so
    the generated kernels in bf16 agree with the torch backend in bf16 (to bf16's 8 bits, 3e-2 relative)."""
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("runs the kernels under Triton's interpreter")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    got = Net(LENET_PATH, backend="triton", dtype="bf16", init="he")(x).float()
    want = Net(LENET_PATH, backend="torch", dtype="bf16", init="he")(x).float()
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_numpy_inputs_of_any_layout_and_byte_order_and_tensors_without_values():
    """A reversed view and a big-endian array are the same numbers as a plain array (torch.from_numpy refuses
    both); strings, meta and sparse tensors are errors naming the input."""
    import numpy as np

    net = netdsl.load(Path(__file__).resolve().parents[1] / "nets" / "lenet5.net", backend="torch")
    x = np.random.default_rng(8).standard_normal((2, 1, 32, 32)).astype(np.float32)
    want = net(x).numpy()
    np.testing.assert_array_equal(net(x[::-1].copy()[::-1]).numpy(), want)
    np.testing.assert_array_equal(net(x.astype(">f4")).numpy(), want)
    for bad, message in ((np.full((2, 1, 32, 32), "a"), "holds <U1 values"),
                         (torch.zeros(2, 1, 32, 32, device="meta"), "is a meta tensor"),
                         (torch.zeros(2, 1, 32, 32).to_sparse(), "sparse")):  # fmt: skip
        with pytest.raises(netdsl.NetError, match=message):
            net(bad)
