"""netdsl.runtime.weights: tensor names, deterministic initial values, safetensors files and batch norm folding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import netdsl
from netdsl import NetError
from netdsl.compiler.fold import fold_inference
from netdsl.ir.stats import totals
from netdsl.runtime.weights import (
    fold_batchnorm,
    fold_weights,
    init_weights,
    load_weights,
    save_weights,
    weight_specs,
)

NETS = Path(__file__).resolve().parent.parent / "nets"

SMALL = """net small
input image: 3 x 8 x 8
a = conv(image, 8, size=3) | relu
b = fc(a, 10)
output b
"""

SMALL_WITH_EXTRA = """net small
input image: 3 x 8 x 8
extra = conv(image, 4, size=1)
a = conv(image, 8, size=3) | relu
b = fc(a, 10)
output b
"""


@pytest.fixture(scope="module")
def alexnet():
    return netdsl.load_graph(NETS / "alexnet.net")


@pytest.fixture(scope="module")
def alexnet_1gpu():
    return netdsl.load_graph(NETS / "alexnet_1gpu.net")


@pytest.fixture(scope="module")
def alexnet_weights(alexnet):
    return init_weights(alexnet)


@pytest.fixture(scope="module")
def simplenet():
    return netdsl.load_graph(NETS / "simplenet.net")


@pytest.fixture
def small():
    return netdsl.graph_from_text(SMALL)


# --- names and shapes ------------------------------------------------------------------------------


def test_names_follow_layers_and_keep_tower_suffix(alexnet):
    specs = weight_specs(alexnet)
    names = list(specs)
    assert names[:4] == ["conv1@gpu0.weight", "conv1@gpu0.bias", "conv1@gpu1.weight", "conv1@gpu1.bias"]
    assert names[-2:] == ["fc8.weight", "fc8.bias"]
    assert specs["conv1@gpu0.weight"] == (48, 3, 11, 11)
    assert specs["conv3@gpu1.weight"] == (192, 256, 3, 3)  # reads both towers
    assert specs["fc6@gpu0.weight"] == (2048, 9216)
    assert specs["fc8.weight"] == (1000, 4096)
    assert len(specs) == 30


def test_batchnorm_tensors_and_conv_without_bias(simplenet):
    specs = weight_specs(simplenet)
    assert "s1.bias" not in specs  # bias=false
    assert specs["s1.weight"] == (32, 1, 3, 3)
    for tensor in ("weight", "bias", "running_mean", "running_var"):
        assert specs[f"s1.batchnorm.{tensor}"] == (32,)
    assert specs["logits.fc.weight"] == (15, 4096)


@pytest.mark.parametrize("net", ["alexnet", "alexnet_1gpu", "simplenet", "vgg16", "lenet5"])
def test_count_matches_stats(net):
    graph = netdsl.load_graph(NETS / f"{net}.net")
    overall, _ = totals(graph)
    assert sum(int(np.prod(s)) for s in weight_specs(graph).values()) == overall.params + overall.buffers


def test_grouped_conv_shapes(alexnet_1gpu):
    specs = weight_specs(alexnet_1gpu)
    assert specs["conv2.weight"] == (256, 48, 5, 5)  # groups=2
    assert specs["conv3.weight"] == (384, 256, 3, 3)


# --- initial values --------------------------------------------------------------------------------


def test_init_matches_specs_and_is_float32(alexnet, alexnet_weights):
    specs = weight_specs(alexnet)
    assert list(alexnet_weights) == list(specs)
    for name, value in alexnet_weights.items():
        assert value.dtype == np.float32 and value.shape == specs[name], name
    overall, _ = totals(alexnet)
    assert sum(v.size for v in alexnet_weights.values()) == overall.params + overall.buffers == 60_965_224


def test_init_is_deterministic(small):
    one, two = init_weights(small), init_weights(small)
    assert all(np.array_equal(one[name], two[name]) for name in one)
    other = init_weights(small, seed=1)
    assert not np.array_equal(one["a.weight"], other["a.weight"])


def test_tensor_does_not_depend_on_other_layers(small):
    with_extra = init_weights(netdsl.graph_from_text(SMALL_WITH_EXTRA))
    alone = init_weights(small)
    assert "extra.weight" in with_extra
    for name in alone:
        assert np.array_equal(alone[name], with_extra[name]), name


def test_init_golden_values(alexnet_weights):
    """The first values of conv1@gpu0.weight for seed 0, as IEEE bits: the same on every platform."""
    bits = alexnet_weights["conv1@gpu0.weight"].ravel()[:4].view("<u4")
    assert [hex(b) for b in bits] == ["0x3c1ccb95", "0x39bbebe0", "0x3a1d173c", "0xbbf69495"]


def test_paper_scheme_two_towers(alexnet_weights):
    for name, value in alexnet_weights.items():
        if name.endswith(".weight"):
            assert abs(value.mean()) < 1e-3, name
            assert abs(value.std() / 0.01 - 1) < 0.03, name
    one = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, value in alexnet_weights.items():
        if name.endswith(".bias"):
            expected = 1.0 if name.split("@")[0].split(".")[0] in one else 0.0
            assert np.all(value == expected), name
    assert np.all(alexnet_weights["conv1@gpu1.bias"] == 0)
    assert np.all(alexnet_weights["conv3@gpu0.bias"] == 0)
    assert np.all(alexnet_weights["fc8.bias"] == 0)
    assert np.all(alexnet_weights["fc7@gpu1.bias"] == 1)


def test_paper_scheme_one_device(alexnet_1gpu):
    weights = init_weights(alexnet_1gpu)
    conv1 = weights["conv1.weight"]
    assert conv1.size == 34_848
    assert abs(conv1.std() / 0.01 - 1) < 0.03
    assert abs(conv1.mean()) < 0.01 * 4 / np.sqrt(conv1.size)
    for layer in ("conv1", "conv3", "fc8"):
        assert np.all(weights[f"{layer}.bias"] == 0), layer
    for layer in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert np.all(weights[f"{layer}.bias"] == 1), layer


def test_bias_one_only_for_alexnet():
    text = SMALL.replace("a = conv(image, 8", "conv2 = conv(image, 8").replace("fc(a,", "fc(conv2,")
    weights = init_weights(netdsl.graph_from_text(text))
    assert np.all(weights["conv2.bias"] == 0)  # not the paper's net: the rule does not apply
    weights = init_weights(netdsl.graph_from_text(text.replace("net small", "net alexnet")))
    assert np.all(weights["conv2.bias"] == 1)
    assert np.all(weights["b.bias"] == 0)


def test_batchnorm_starts_as_identity(simplenet):
    weights = init_weights(simplenet)
    assert np.all(weights["s2.batchnorm.weight"] == 1)
    assert np.all(weights["s2.batchnorm.bias"] == 0)
    assert np.all(weights["s2.batchnorm.running_mean"] == 0)
    assert np.all(weights["s2.batchnorm.running_var"] == 1)
    he = init_weights(simplenet, scheme="he")
    assert np.all(he["s2.batchnorm.running_var"] == 1)


def test_he_scheme(alexnet_1gpu):
    weights = init_weights(alexnet_1gpu, scheme="he")
    for layer, fan_in in [("conv1", 3 * 11 * 11), ("conv2", 48 * 5 * 5), ("conv3", 256 * 9), ("fc6", 9216)]:
        value = weights[f"{layer}.weight"]
        assert abs(value.std() / np.sqrt(2 / fan_in) - 1) < 0.03, layer
        assert np.all(weights[f"{layer}.bias"] == 0), layer


def test_he_keeps_activations_alive(simplenet):
    """A deep chain of he-initialized convs + ReLU keeps its activations at the input's scale."""
    text = "net deep\ninput image: 16 x 16 x 16\n" + "".join(
        f"c{i} = conv({'image' if i == 0 else f'c{i - 1}'}, 16, size=3, pad=1) | relu\n" for i in range(12)
    )
    graph = netdsl.graph_from_text(text + "output c11\n")
    weights = init_weights(graph, scheme="he")
    x = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    for i in range(12):
        x = F.relu(
            F.conv2d(x, torch.from_numpy(weights[f"c{i}.weight"]), torch.from_numpy(weights[f"c{i}.bias"]), 1, 1)
        )
    assert 0.1 < x.pow(2).mean().sqrt().item() < 10


@pytest.mark.parametrize("scheme", ["xavier", "Paper", ""])
def test_unknown_scheme(small, scheme):
    with pytest.raises(NetError) as error:
        init_weights(small, scheme=scheme)
    assert "unknown weight initialization scheme" in str(error.value)
    assert "paper" in str(error.value)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(small, seed):
    with pytest.raises(NetError, match="seed"):
        init_weights(small, seed=seed)


# --- files -----------------------------------------------------------------------------------------


def test_round_trip_bit_exact(simplenet, tmp_path):
    weights = init_weights(simplenet, seed=7, scheme="he")
    path = tmp_path / "simplenet.safetensors"
    save_weights(path, weights)
    loaded = load_weights(path, simplenet)
    assert list(loaded) == list(weights)
    for name, value in weights.items():
        assert loaded[name].dtype == np.float32
        assert loaded[name].tobytes() == value.tobytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["simplenet.safetensors"]  # no temporary file left


@pytest.mark.slow
def test_round_trip_alexnet(alexnet, alexnet_weights, tmp_path):
    path = tmp_path / "alexnet.safetensors"
    save_weights(path, alexnet_weights)
    loaded = load_weights(str(path), alexnet)
    assert all(np.array_equal(loaded[n], alexnet_weights[n]) for n in alexnet_weights)


def test_save_overwrites_atomically(small, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, init_weights(small, seed=1))
    before = path.read_bytes()
    with pytest.raises(NetError, match="object"):
        save_weights(path, {"a.weight": np.array([object()])})
    assert path.read_bytes() == before  # a failed save leaves the old file alone
    save_weights(path, init_weights(small, seed=2))
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_into_missing_folder(small, tmp_path):
    path = tmp_path / "nowhere" / "w.safetensors"
    with pytest.raises(NetError) as error:
        save_weights(path, init_weights(small))
    assert "does not exist" in str(error.value)
    assert error.value.where == str(path)


def _error(path, graph) -> NetError:
    with pytest.raises(NetError) as error:
        load_weights(path, graph)
    assert error.value.where == str(path)
    return error.value


def test_missing_file(small, tmp_path):
    error = _error(tmp_path / "absent.safetensors", small)
    assert "not found" in error.message
    assert str(tmp_path / "absent.safetensors") in str(error)


def test_folder_instead_of_file(small, tmp_path):
    assert "not a file" in _error(tmp_path, small).message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(os.urandom(4096), id="random"),
        pytest.param(b"", id="empty"),
        pytest.param(b"conv1.weight = 0.01\n" * 50, id="text"),
        pytest.param(b"\x10\x00", id="tiny"),
    ],
)
def test_not_safetensors(small, tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    assert "not a safetensors file" in _error(path, small).message


@pytest.mark.parametrize("keep", [20, 100, -1, -100])
def test_truncated(small, tmp_path, keep):
    path = tmp_path / "w.safetensors"
    save_weights(path, init_weights(small))
    path.write_bytes(path.read_bytes()[:keep])
    assert "not a safetensors file" in _error(path, small).message


def test_missing_tensors(alexnet, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv1@gpu0.weight": np.zeros((48, 3, 11, 11), np.float32)}, str(path))
    error = _error(path, alexnet)
    assert "lacks 29 of the 30 tensors of net `alexnet`" in error.message
    assert "`conv1@gpu0.bias`, `conv1@gpu1.weight`" in error.message
    assert "and 24 more" in error.message


def test_one_missing_tensor(small, tmp_path):
    weights = init_weights(small)
    del weights["b.bias"]
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert error.message.endswith("lacks 1 of the 4 tensors of net `small`: `b.bias`")


def test_renamed_tensor(small, tmp_path):
    weights = init_weights(small)
    weights["b.baias"] = weights.pop("b.bias")
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert "`b.bias`" in error.message
    assert "the file holds `b.baias` instead of `b.bias`" in error.hint


def test_one_device_weights_into_two_towers(alexnet, alexnet_1gpu, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {n: np.zeros(s, np.float32) for n, s in weight_specs(alexnet_1gpu).items()})
    error = _error(path, alexnet)
    assert "lacks 28 of the 30 tensors" in error.message  # fc8 has one name and shape in both
    assert error.hint.startswith("the file holds `conv1.weight` where the net has `conv1@gpu0.weight`")
    assert "one-device net" in error.hint


def test_two_tower_weights_into_one_device(alexnet, alexnet_1gpu, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {n: np.zeros(s, np.float32) for n, s in weight_specs(alexnet).items()})
    error = _error(path, alexnet_1gpu)
    assert "lacks 14 of the 16 tensors of net `alexnet_1gpu`" in error.message
    assert "where the net has `conv1.weight`: weights of a net with towers?" in error.hint


def test_extra_tensors(small, tmp_path):
    weights = init_weights(small)
    weights["b.weights"] = np.zeros(3, np.float32)
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert "holds 1 tensor that net `small` does not have: `b.weights`" in error.message
    assert error.hint == "did you mean `b.weight`?"


def test_misshaped_tensor(small, tmp_path):
    weights = init_weights(small)
    weights["b.weight"] = weights["b.weight"].T.copy()
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert error.message == "tensor `b.weight` has shape 288 x 10 in the weights file, but the net needs 10 x 288"
    assert "transposed" in error.hint


def test_whole_layer_into_one_tower(alexnet, tmp_path):
    weights = {n: np.zeros(s, np.float32) for n, s in weight_specs(alexnet).items()}
    weights["conv1@gpu0.weight"] = np.zeros((96, 3, 11, 11), np.float32)
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, alexnet)
    assert "96 x 3 x 11 x 11" in error.message and "48 x 3 x 11 x 11" in error.message
    assert "tower" in error.hint


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_tensors_rejected(small, tmp_path, dtype):
    weights = init_weights(small)
    weights["a.bias"] = np.zeros(8, dtype)
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert "tensor `a.bias` is stored as" in error.message
    assert "floating point" in error.message


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_types_converted(small, tmp_path, dtype):
    weights = init_weights(small)
    path = tmp_path / "w.safetensors"
    save_weights(path, {n: v.astype(dtype) for n, v in weights.items()})
    loaded = load_weights(path, small)
    for name, value in weights.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value.astype(dtype).astype(np.float32))


def test_float64_beyond_float32s_range_is_refused(small, tmp_path, capsys):
    """A float64 weight of 1e300 would become infinity in float32 (with numpy's overflow warning): refused,
    naming the file and the weight; float64 NaN stays NaN and is refused where a net takes the weights."""
    weights = {n: v.astype(np.float64) for n, v in init_weights(small).items()}
    weights["a.bias"][3] = -1e300
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    error = _error(path, small)
    assert error.where == str(path) and "weight a.bias holds values beyond float32's range" in error.message
    assert "Warning" not in capsys.readouterr().err


def test_export_refuses_weights_a_net_refuses(small, tmp_path, capsys):
    pytest.importorskip("onnx")
    from netdsl.cli.main import main

    net = tmp_path / "small.net"
    net.write_text(SMALL)
    weights = init_weights(small)
    weights["a.bias"][0] = np.nan
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    assert main(["export", str(net), "--weights", str(path), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "--weights: error: weight `a.bias` holds NaN" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_bfloat16_converted(small, tmp_path):
    from safetensors.torch import save_file

    weights = init_weights(small, scheme="he")
    tensors = {n: torch.from_numpy(v).to(torch.bfloat16) for n, v in weights.items()}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    loaded = load_weights(path, small)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == weights[name].shape
        np.testing.assert_array_equal(loaded[name], tensor.float().numpy())


def test_error_formats_with_file(small, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_text("hello")
    assert str(_error(path, small)).startswith(f"{path}: error: not a safetensors file")


# --- batch norm folding ----------------------------------------------------------------------------


def _bn(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "weight": rng.normal(1, 0.5, channels).astype(np.float32),
        "bias": rng.normal(0, 0.5, channels).astype(np.float32),
        "running_mean": rng.normal(0, 1, channels).astype(np.float32),
        "running_var": rng.uniform(0.1, 3, channels).astype(np.float32),
    }


@pytest.mark.parametrize("groups,bias,eps", [(1, True, 1e-5), (2, True, 1e-3), (1, False, 1e-5)])
def test_fold_batchnorm_matches_torch(groups, bias, eps):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(2, 8, 10, 10)).astype(np.float32))
    w = rng.normal(0, 0.2, (16, 8 // groups, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.5, 16).astype(np.float32) if bias else None
    bn = _bn(rng, 16)
    t = {k: torch.from_numpy(v) for k, v in bn.items()}
    expected = F.batch_norm(
        F.conv2d(x, torch.from_numpy(w), None if b is None else torch.from_numpy(b), padding=1, groups=groups),
        t["running_mean"],
        t["running_var"],
        t["weight"],
        t["bias"],
        training=False,
        eps=eps,
    )
    w2, b2 = fold_batchnorm(w, b, {**bn, "eps": eps})
    assert w2.dtype == b2.dtype == np.float32 and w2.shape == w.shape and b2.shape == (16,)
    got = F.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2), padding=1, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fold_batchnorm_eps_argument():
    rng = np.random.default_rng(4)
    w, bn = rng.normal(size=(4, 2, 1, 1)), _bn(rng, 4)
    assert not np.array_equal(fold_batchnorm(w, None, bn)[0], fold_batchnorm(w, None, bn, eps=0.5)[0])
    np.testing.assert_array_equal(
        fold_batchnorm(w, None, bn, eps=0.5)[0], fold_batchnorm(w, None, {**bn, "eps": 0.5})[0]
    )


def test_fold_weights_simplenet(simplenet):
    rng = np.random.default_rng(5)
    weights = init_weights(simplenet, scheme="he")
    for stage in ("s1", "s2", "s3", "s4"):
        weights.update({f"{stage}.batchnorm.{k}": v for k, v in _bn(rng, weights[f"{stage}.weight"].shape[0]).items()})
    folded = fold_weights(simplenet, weights)
    assert not any("batchnorm" in name for name in folded)
    assert list(folded)[:2] == ["s1.weight", "s1.bias"]  # a bias appears for the bias=false conv
    assert set(folded) == set(weight_specs(fold_inference(simplenet))) | {f"s{i}.bias" for i in range(1, 5)}
    x = torch.from_numpy(rng.standard_normal((2, 1, 16, 16), dtype=np.float32))
    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    expected = F.batch_norm(
        F.conv2d(x, t["s1.weight"], padding=1),
        t["s1.batchnorm.running_mean"],
        t["s1.batchnorm.running_var"],
        t["s1.batchnorm.weight"],
        t["s1.batchnorm.bias"],
        training=False,
        eps=1e-5,
    )
    got = F.conv2d(x, torch.from_numpy(folded["s1.weight"]), torch.from_numpy(folded["s1.bias"]), padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert np.array_equal(folded["logits.fc.weight"], weights["logits.fc.weight"])


def test_fold_weights_without_batchnorm_is_identity(small):
    weights = init_weights(small)
    folded = fold_weights(small, weights)
    assert list(folded) == list(weights)
    assert all(folded[n] is weights[n] for n in weights)


def test_a_layer_can_choose_its_own_initial_weights():
    from netdsl import graph_from_text

    graph = graph_from_text(
        "input x: 16 x 8 x 8\n"
        "a = conv(x, 64, size=3, init_std=0.5, init_bias=0.25)\n"
        "b = fc(a, 32, init_bias=-1)\n"
        "c = fc(b, 8)\n",
        file="own.net",
    )
    for scheme in ("paper", "he"):
        weights = init_weights(graph, seed=1, scheme=scheme)
        assert abs(float(weights["a.weight"].std()) - 0.5) < 0.02  # 9,216 draws
        assert np.all(weights["a.bias"] == np.float32(0.25)) and np.all(weights["b.bias"] == -1)
        assert np.all(weights["c.bias"] == 0)  # what the scheme says
    assert abs(float(init_weights(graph, scheme="paper")["c.weight"].std()) - 0.01) < 0.002


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_with_nan_or_inf_are_refused_with_the_tensors_name(tmp_path, capsys, bad):
    from netdsl.cli.main import main
    from netdsl.runtime.module import GraphModule

    lenet = NETS / "lenet5.net"
    weights = init_weights(netdsl.load_graph(lenet), seed=1, scheme="he")
    weights["f6.bias"][3] = bad
    what = "NaN" if np.isnan(bad) else "infinite values"
    with pytest.raises(NetError, match=f"weight `f6.bias` holds {what}"):
        netdsl.load(lenet, weights=weights)
    with pytest.raises(NetError, match=f"weight `f6.bias` holds {what}"):
        GraphModule(netdsl.load_graph(lenet), weights=weights)
    save_weights(tmp_path / "bad.safetensors", weights)
    assert main(["run", str(lenet), "--weights", str(tmp_path / "bad.safetensors"), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert f"--weights: error: weight `f6.bias` holds {what}" in err and "Traceback" not in err


def test_all_finite_agrees_with_isfinite_everywhere():
    """`all_finite`, which checks weights, inputs and each step's gradients by a tensor's largest and smallest
    value, against torch.isfinite(...).all(): a NaN or an infinity at the start, the middle or the end (of
    lengths about the vector units' widths), in each float dtype, in a strided view, among other tensors;
    empty and integer tensors are finite."""
    from netdsl.runtime.arrays import all_finite

    rng = np.random.default_rng(12)
    checked = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for length in (1, 7, 8, 9, 16, 33, 1000, 4099):
            for where in {0, length // 2, length - 1}:
                for value in (np.nan, np.inf, -np.inf, 3.0):
                    x = torch.from_numpy(rng.standard_normal(length)).to(dtype)
                    x[where] = value
                    strided = x.view(1, -1).expand(2, -1).t()
                    want = bool(torch.isfinite(x).all())
                    assert all_finite([x]) == all_finite([strided]) == want, (dtype, length, where, value)
                    assert all_finite([torch.ones(3), x, torch.zeros(0)]) == want
                    checked += not want
    assert checked == 4 * 3 * sum(len({0, n // 2, n - 1}) for n in (1, 7, 8, 9, 16, 33, 1000, 4099))
    assert all_finite([]) and all_finite([torch.zeros(0), torch.arange(5)])
    assert all_finite([torch.tensor([1e300], dtype=torch.float64)])  # finite, though not in float32
