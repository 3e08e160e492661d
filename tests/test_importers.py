"""netdsl.interop.importers: a one-device grouped AlexNet's weights (safetensors or torch.save, netdsl's or
torchvision-style names) split into the two towers of nets/alexnet.net, checked with the runtime."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from golden.models import halves_lrn
from safetensors.numpy import save_file
from torch import nn

import netdsl
from netdsl import NetError
from netdsl.interop.importers import GROUPED_ALEXNET, LAYOUTS, import_grouped_alexnet, split_grouped_alexnet
from netdsl.runtime.weights import init_weights, save_weights, weight_specs

TOWERS = "nets/alexnet.net"
GROUPED = "nets/alexnet_1gpu.net"


@pytest.fixture(scope="module")
def two_tower():
    return netdsl.load_graph(TOWERS)


@pytest.fixture(scope="module")
def original():
    """Random one-device weights (He scheme, so the output is far from uniform)."""
    return init_weights(netdsl.load_graph(GROUPED), seed=3, scheme="he")


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(np.random.default_rng(7).standard_normal((1, 3, 227, 227), dtype=np.float32))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, original, two_tower):
    path = tmp_path_factory.mktemp("grouped") / "alexnet_1gpu.safetensors"
    save_weights(path, original)
    return import_grouped_alexnet(path, two_tower)


@pytest.fixture(scope="module")
def grouped_output(original, image):
    return netdsl.load(GROUPED, backend="torch", weights=original)(image).double().numpy()


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- the mapping -----------------------------------------------------------------------------------


def test_grouped_shapes_are_the_one_device_nets():
    assert weight_specs(netdsl.load_graph(GROUPED)) == GROUPED_ALEXNET


def test_split_follows_the_towers(imported, original, two_tower):
    assert list(imported) == list(weight_specs(two_tower))
    assert {name: value.shape for name, value in imported.items()} == weight_specs(two_tower)
    for layer, half in [("conv1", 48), ("conv2", 128), ("conv3", 192), ("conv4", 192), ("conv5", 128)]:
        for tensor in ("weight", "bias"):
            whole = original[f"{layer}.{tensor}"]
            np.testing.assert_array_equal(imported[f"{layer}@gpu0.{tensor}"], whole[:half])
            np.testing.assert_array_equal(imported[f"{layer}@gpu1.{tensor}"], whole[half:])
    assert imported["conv1@gpu1.weight"].shape == (48, 3, 11, 11)  # each tower reads all 3 channels
    assert imported["conv2@gpu1.weight"].shape == (128, 48, 5, 5)  # a group's weight, as it is
    assert imported["conv3@gpu0.weight"].shape == (192, 256, 3, 3)  # both towers' 128 channels
    for layer in ("fc6", "fc7"):
        np.testing.assert_array_equal(imported[f"{layer}@gpu0.weight"], original[f"{layer}.weight"][:2048])
        np.testing.assert_array_equal(imported[f"{layer}@gpu1.weight"], original[f"{layer}.weight"][2048:])
    assert imported["fc6@gpu0.weight"].shape == (2048, 9216)  # all conv5: 2 x 128 x 6 x 6, inputs whole
    np.testing.assert_array_equal(imported["fc8.weight"], original["fc8.weight"])
    np.testing.assert_array_equal(imported["fc8.bias"], original["fc8.bias"])


def test_imported_towers_compute_the_grouped_net(imported, image, grouped_output):
    towers = netdsl.load(TOWERS, backend="torch", weights=imported)(image).double().numpy()
    assert relative_error(towers, grouped_output) <= 1e-5
    assert grouped_output.max() > 10 / 1000  # not a uniform softmax: the comparison sees the weights


def test_torch_save_equals_safetensors(tmp_path, original, imported, two_tower):
    path = tmp_path / "alexnet_1gpu.pt"
    torch.save({name: torch.from_numpy(value) for name, value in original.items()}, path)
    assert_same(import_grouped_alexnet(path, two_tower), imported)


def test_other_float_types_are_read_as_float32(tmp_path, original, two_tower):
    path = tmp_path / "half.pt"
    state = {name: torch.from_numpy(value).to(torch.bfloat16) for name, value in original.items()}
    state["fc8.bias"] = state["fc8.bias"].double()
    torch.save(state, path)
    got = import_grouped_alexnet(path, two_tower)
    np.testing.assert_array_equal(got["conv1@gpu1.weight"], state["conv1.weight"][48:].float().numpy())
    assert all(value.dtype == np.float32 for value in got.values())


def test_split_in_memory(original, imported, two_tower):
    assert_same(split_grouped_alexnet(original, two_tower), imported)
    tensors = {name: torch.from_numpy(value) for name, value in original.items()}
    assert_same(split_grouped_alexnet(tensors, two_tower), imported)


# --- torchvision-style names: a hand-written grouped nn.Sequential ---------------------------------


class HalvesLRN(nn.Module):
    """The paper's LRN on each tower's half of the channels (no parameters)."""

    def forward(self, x):
        return halves_lrn(x)


class GroupedAlexNet(nn.Module):
    """torchvision.models.AlexNet's structure with the paper's widths, groups=2 and LRN.

    lrn_modules=False: LRN and pool share one module, so the indices are torchvision's:
        features 0 conv1, 3 conv2, 6 conv3, 8 conv4, 10 conv5; classifier 1 fc6, 4 fc7, 6 fc8.
    lrn_modules=True: an LRN module after the first two ReLUs (Caffe's conv relu norm pool):
        features 0 conv1, 4 conv2, 8 conv3, 10 conv4, 12 conv5; classifier as above."""

    def __init__(self, lrn_modules: bool) -> None:
        super().__init__()

        def norm_pool():
            pool = nn.MaxPool2d(3, stride=2)
            return [HalvesLRN(), pool] if lrn_modules else [nn.Sequential(HalvesLRN(), pool)]

        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4),
            nn.ReLU(),
            *norm_pool(),
            nn.Conv2d(96, 256, 5, padding=2, groups=2),
            nn.ReLU(),
            *norm_pool(),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, 1000),
        )
        self.eval()

    def forward(self, x):
        return torch.softmax(self.classifier(torch.flatten(self.avgpool(self.features(x)), 1)), dim=1)

    def layers(self) -> dict[str, nn.Module]:
        convs = [module for module in self.features if isinstance(module, nn.Conv2d)]
        fcs = [module for module in self.classifier if isinstance(module, nn.Linear)]
        return dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"), convs + fcs))


@pytest.mark.parametrize(
    ("lrn_modules", "layout", "conv_indices"),
    [(False, "torchvision", (0, 3, 6, 8, 10)), (True, "torchvision+lrn", (0, 4, 8, 10, 12))],
)
def test_torchvision_layout(tmp_path, original, imported, two_tower, image, lrn_modules, layout, conv_indices):
    model = GroupedAlexNet(lrn_modules)
    with torch.no_grad():
        for name, module in model.layers().items():
            module.weight.copy_(torch.from_numpy(original[f"{name}.weight"]))
            module.bias.copy_(torch.from_numpy(original[f"{name}.bias"]))
    state = model.state_dict()
    keys = {f"features.{i}.{t}" for i in conv_indices for t in ("weight", "bias")}
    keys |= {f"classifier.{i}.{t}" for i in (1, 4, 6) for t in ("weight", "bias")}
    assert set(state) == keys == set(LAYOUTS[layout])
    path = tmp_path / "grouped_alexnet.pth"
    torch.save(state, path)
    got = import_grouped_alexnet(path, two_tower)
    assert_same(got, imported)
    with torch.no_grad():
        want = model(image).double().numpy()
    towers = netdsl.load(TOWERS, backend="torch", weights=got)(image).double().numpy()
    assert relative_error(towers, want) <= 1e-5


# --- errors ----------------------------------------------------------------------------------------


def stub(shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor of `shape` whose storage holds one value: torch.save writes a few bytes for it."""
    return torch.zeros(1, dtype=dtype).expand(shape)


def stubs(**changes) -> dict[str, torch.Tensor]:
    """A grouped AlexNet's state_dict (netdsl names) of stubs, with `changes` (`conv2_weight=` for
    `conv2.weight`) replacing or, when None, removing tensors."""
    state = {name: stub(shape) for name, shape in GROUPED_ALEXNET.items()}
    for key, value in changes.items():
        name = key.replace("_", ".")
        if value is None:
            del state[name]
        else:
            state[name] = value
    return state


def error_of(path, graph) -> NetError:
    with pytest.raises(NetError) as error:
        import_grouped_alexnet(path, graph)
    assert error.value.where == str(path)
    return error.value


def saved(tmp_path, state, name="w.pt") -> os.PathLike:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_missing_file(tmp_path, two_tower):
    error = error_of(tmp_path / "absent.pt", two_tower)
    assert "not found" in error.message
    assert "safetensors" in error.hint


def test_folder(tmp_path, two_tower):
    assert "not a file" in error_of(tmp_path, two_tower).message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"\x13" + np.random.default_rng(3).bytes(4095), id="random"),
        pytest.param(b"", id="empty"),
        pytest.param(b"conv1.weight = 0.01\n" * 50, id="text"),
    ],
)
def test_neither_format(tmp_path, two_tower, content):
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    assert "neither a safetensors nor a PyTorch file" in error_of(path, two_tower).message


@pytest.mark.parametrize("seed", range(8))
def test_garbage_after_pickle_opcode(tmp_path, two_tower, seed):
    """Bytes that start like a legacy pickle but are noise: damaged, not 'objects other than tensors'."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"\x80" + np.random.default_rng(seed).bytes(4095))
    message = error_of(path, two_tower).message
    assert "not a readable PyTorch file" in message


@pytest.mark.parametrize("keep", [100, -100])
def test_truncated_torch_file(tmp_path, two_tower, keep):
    path = saved(tmp_path, stubs())
    path.write_bytes(path.read_bytes()[:keep])
    assert "not a readable PyTorch file" in error_of(path, two_tower).message


class Pickled:
    """An object weights_only refuses to unpickle."""


def test_unsafe_pickle_is_refused(tmp_path, two_tower):
    path = saved(tmp_path, {**stubs(), "fc8.bias": Pickled()})
    error = error_of(path, two_tower)
    assert "objects other than tensors" in error.message
    assert "weights_only=True" in error.message
    assert "Pickled" in error.message
    assert "never unpickles" in error.hint


def test_not_a_state_dict(tmp_path, two_tower):
    assert "holds a Tensor, not a state_dict" in error_of(saved(tmp_path, torch.zeros(3)), two_tower).message


def test_checkpoint_with_a_state_dict_inside(tmp_path, two_tower):
    error = error_of(saved(tmp_path, {"state_dict": stubs(), "epoch": torch.tensor(90)}), two_tower)
    assert "`state_dict` holds a dict, not a tensor" in error.message
    assert "checkpoint['state_dict']" in error.hint


def test_missing_tensor_with_did_you_mean(tmp_path, two_tower):
    state = stubs(conv2_weight=None)
    state["conv2.weights"] = stub(GROUPED_ALEXNET["conv2.weight"])
    error = error_of(saved(tmp_path, state), two_tower)
    assert error.message.endswith("lacks 1 of the 16 tensors of a grouped AlexNet: `conv2.weight`")
    assert "`conv2.weights` instead of `conv2.weight`" in error.hint


def test_missing_tensor_torchvision_names(tmp_path, two_tower):
    names = {name: key for key, name in LAYOUTS["torchvision"].items()}
    state = {names[name]: value for name, value in stubs(fc8_bias=None).items()}
    error = error_of(saved(tmp_path, state), two_tower)
    assert "lacks 1 of the 16 tensors of a grouped AlexNet (torchvision names): `classifier.6.bias`" in error.message


def test_extra_tensor(tmp_path, two_tower):
    error = error_of(saved(tmp_path, {**stubs(), "fc9.weight": stub((10, 1000))}), two_tower)
    assert "holds 1 tensor that a grouped AlexNet does not have: `fc9.weight`" in error.message
    assert error.hint == "did you mean `fc8.weight`?"


def test_another_nets_file(tmp_path, two_tower):
    path = tmp_path / "lenet.safetensors"
    save_weights(path, init_weights(netdsl.load_graph("nets/lenet5.net")))
    error = error_of(path, two_tower)
    assert "holds none of a grouped AlexNet's tensors" in error.message
    assert "`c1.weight`" in error.message
    assert "features" in error.hint


def test_two_tower_file(tmp_path, two_tower):
    path = tmp_path / "towers.safetensors"
    save_file({"conv1@gpu0.weight": np.zeros((48, 3, 11, 11), np.float32)}, str(path))
    error = error_of(path, two_tower)
    assert "`conv1@gpu0.weight`" in error.hint
    assert "load_weights" in error.hint


def test_data_parallel_prefix(tmp_path, two_tower):
    state = {f"module.{name}": value for name, value in stubs().items()}
    assert "module.state_dict()" in error_of(saved(tmp_path, state), two_tower).hint


@pytest.mark.parametrize(
    ("change", "message", "hint"),
    [
        (
            {"fc6_weight": stub((9216, 4096))},
            "tensor `fc6.weight` has shape 9216 x 4096 in the weights file, but a grouped AlexNet's is 4096 x 9216",
            "transposed",
        ),
        ({"conv2_weight": stub((128, 48, 5, 5))}, "`conv2.weight` has shape 128 x 48 x 5 x 5", "one tower's half"),
        ({"conv4_weight": stub((384, 384, 3, 3))}, "`conv4.weight` has shape 384 x 384 x 3 x 3", "groups=2"),
        ({"conv1_bias": stub((96, 1))}, "`conv1.bias` has shape 96 x 1", "another layout"),
    ],
)
def test_wrong_shape(tmp_path, two_tower, change, message, hint):
    error = error_of(saved(tmp_path, stubs(**change)), two_tower)
    assert message in error.message
    assert hint in error.hint


def test_torchvisions_own_alexnet(tmp_path, two_tower):
    """torchvision.models.alexnet (64 filters in conv1, no groups) has the same keys but is another net."""
    names = {name: key for key, name in LAYOUTS["torchvision"].items()}
    state = {names[name]: value for name, value in stubs(conv1_weight=stub((64, 3, 11, 11))).items()}
    error = error_of(saved(tmp_path, state), two_tower)
    assert "`features.0.weight` (the grouped net's `conv1.weight`) has shape 64 x 3 x 11 x 11" in error.message
    assert "torchvision's alexnet" in error.hint


def test_safetensors_shape_checked_before_reading(tmp_path, two_tower):
    path = tmp_path / "w.safetensors"
    save_file({name: np.zeros(1, np.float32) for name in GROUPED_ALEXNET}, str(path))
    assert "`conv1.weight` has shape 1 in the weights file" in error_of(path, two_tower).message


def test_integer_tensor(tmp_path, two_tower):
    error = error_of(saved(tmp_path, stubs(conv1_bias=stub((96,), torch.int64))), two_tower)
    assert "tensor `conv1.bias` is stored as int64, but weights must be floating point" in error.message


@pytest.mark.parametrize("net", ["nets/alexnet_1gpu.net", "nets/lenet5.net"])
def test_target_must_be_the_two_tower_alexnet(tmp_path, net):
    with pytest.raises(NetError) as error:
        import_grouped_alexnet(tmp_path / "unread.pt", netdsl.load_graph(net))
    assert "is not the two-tower AlexNet of nets/alexnet.net" in error.value.message
    assert error.value.where == net


class RunsCode:
    """What a malicious file holds: unpickling it would call os.system (netdsl never unpickles it)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run > pwned.txt",))


def test_a_file_carrying_code_is_refused_as_such_not_as_damaged(tmp_path, two_tower, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = saved(tmp_path, {**stubs(), "fc8.bias": RunsCode()})
    error = error_of(path, two_tower)
    assert "objects other than tensors" in error.message and "system" in error.message
    assert "damaged" not in error.hint and "never unpickles" in error.hint
    assert not (tmp_path / "pwned.txt").exists()
