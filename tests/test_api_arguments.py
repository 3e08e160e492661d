"""The Python API given what a user may well hand it: arguments of the wrong kind or value, weights the dtype
cannot hold, threads sharing a net, outputs by name. Each is a `NetError` naming the argument, or the right
result checked against an independent PyTorch computation; never a raw internal error or a silently wrong
answer. (Small nets on the torch backend: no kernel runs here.)"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_run_cli import TWO_OUTPUTS  # a chain `features` and an fc `scores`, both outputs

import netdsl
from netdsl.errors import NetError
from netdsl.interop.onnx_export import export_onnx
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import init_weights, load_weights, save_weights, weight_specs

LENET = "nets/lenet5.net"


@pytest.fixture(scope="module")
def lenet():
    return netdsl.load(LENET, init="he")


@pytest.fixture(scope="module")
def weights():
    return init_weights(netdsl.load_graph(LENET), scheme="he")


def refused(call, where: str, *words: str) -> NetError:
    with pytest.raises(NetError) as caught:
        call()
    assert caught.value.where == where, caught.value
    for word in words:
        assert word in str(caught.value), caught.value
    return caught.value


@pytest.mark.parametrize("batch", [0, -1, 2.5, "4", True, None])
def test_a_batch_that_is_not_a_whole_number_of_images(batch, lenet):
    refused(lambda: netdsl.load(LENET, batch=batch), "batch", "whole number >= 1", repr(batch))
    refused(lambda: netdsl.load_graph(LENET, batch=batch), "batch", repr(batch))
    refused(lambda: lenet.memory(batch), "batch", repr(batch))


def test_memory_of_a_batch(lenet):
    arena, weights = lenet.memory(np.int64(3))["gpu0"]
    assert arena == 3 * lenet.memory(1)["gpu0"][0] > 0 and weights == lenet.memory(1)["gpu0"][1] > 0


@pytest.mark.parametrize(
    "options,where,word",
    [
        ({"dtype": "x"}, "dtype", "unknown dtype 'x'"),
        ({"dtype": None}, "dtype", "unknown dtype None"),
        ({"memory_limit": "1GiB"}, "memory_limit", "'1GiB'"),
        ({"memory_limit": -1}, "memory_limit", "bytes >= 1"),
    ],
)
def test_graph_options(options, where, word):
    refused(lambda: netdsl.load_graph(LENET, **options), where, word)
    refused(lambda: netdsl.graph_from_text("input x: 3\ny = fc(x, 2)\n", **options), where, word)


def test_graph_from_text_refuses_unknown_options():
    with pytest.raises(TypeError, match="batchh"):
        netdsl.graph_from_text("input x: 3\ny = fc(x, 2)\n", batchh=2)


@pytest.mark.parametrize("devices", [0, 1.5, ["cpu"]])
def test_devices_of_the_wrong_kind(devices):
    refused(lambda: netdsl.load(LENET, devices=devices), "devices", "devices must name torch devices")


def test_devices_as_the_command_line_writes_them():
    assert netdsl.load(LENET, devices="gpu0=cpu").devices == {"gpu0": torch.device("cpu")}
    refused(lambda: netdsl.load(LENET, devices="gpu9=cpu"), "devices", "no device `gpu9`")
    refused(lambda: netdsl.load(LENET, devices="gpu0=cpu,=x"), "devices", "cannot read `=x`")


def test_a_progress_that_is_not_a_stream():
    refused(lambda: netdsl.load(LENET, progress="x"), "progress", "text stream")


def test_a_path_where_a_graph_goes(weights, tmp_path):
    """netdsl.load takes a path, the functions on graphs a graph: the likely slip is named as such."""
    saved = tmp_path / "w.safetensors"
    save_weights(saved, weights)
    for call in (
        lambda: weight_specs(LENET),
        lambda: init_weights(LENET),
        lambda: load_weights(saved, LENET),
        lambda: GraphModule(LENET),
        lambda: export_onnx(LENET, weights, tmp_path / "m.onnx"),
    ):
        error = refused(call, "graph", "expected a net's layer graph, got the path `nets/lenet5.net`")
        assert "netdsl.load_graph(path)" in error.hint
    refused(lambda: weight_specs({"a": 1}), "graph", "got a dict")


def test_weights_of_the_wrong_kind(lenet, weights, tmp_path):
    refused(lambda: save_weights(tmp_path / "w.safetensors", [1]), str(tmp_path / "w.safetensors"), "got list")
    refused(lambda: lenet.load_weights({**weights, 3: weights["c1.bias"]}), "weights", "weight names are strings")
    meta = {**weights, "c1.bias": torch.empty(6, device="meta")}
    refused(lambda: lenet.load_weights(meta), "weights", "`c1.bias` is a meta tensor")
    sparse = {**weights, "c1.weight": torch.from_numpy(weights["c1.weight"]).to_sparse()}
    refused(lambda: lenet.load_weights(sparse), "weights", "`c1.weight` is a torch.sparse_coo tensor")


def test_weights_beyond_the_dtype(weights):
    """float64 beyond float32, or float32 beyond fp16: an error, not a net of infinities (and the net keeps
    the weights it had)."""
    huge = {**weights, "c1.bias": np.full(6, 1e300)}
    refused(lambda: netdsl.load(LENET, weights=huge), "weights", "`c1.bias`", "beyond float32's range")
    loud = {**weights, "f7.bias": np.full(10, 1e5, np.float32)}
    error = refused(lambda: netdsl.load(LENET, dtype="fp16", weights=loud), "weights", "`f7.bias`", "fp16's range")
    assert "wider dtype" in error.hint
    net = netdsl.load(LENET, dtype="fp16", weights=weights)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)).half()
    before = net(x)
    refused(lambda: net.load_weights(loud), "weights", "fp16's range")
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    assert bool(torch.isfinite(netdsl.load(LENET, weights=loud)(x.float())).all())  # fp32 holds 1e5


def test_export_checks_its_weights(weights, tmp_path):
    graph = netdsl.load_graph(LENET)
    out = tmp_path / "m.onnx"
    refused(lambda: export_onnx(graph, {}, out), "weights", "is missing")
    refused(lambda: export_onnx(graph, {**weights, "zz.weight": weights["c1.bias"]}, out), "weights", "no weight `zz")
    nan = {**weights, "c1.bias": np.full(6, np.nan, np.float32)}
    refused(lambda: export_onnx(graph, nan, out), "weights", "holds NaN")
    transposed = {**weights, "f5.weight": weights["f5.weight"].T}
    refused(lambda: export_onnx(graph, transposed, out), "weights", "`f5.weight` has shape")
    assert not out.exists()


def test_threads_sharing_a_net_take_turns(lenet):
    """Two threads calling one net with the same batch size (one arena) get each its own result."""
    generator = torch.Generator().manual_seed(5)
    a, b = (torch.randn(16, 1, 32, 32, generator=generator) for _ in range(2))
    want = {"a": lenet(a), "b": lenet(b)}
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def work(name: str, x: torch.Tensor) -> None:
        for _ in range(12):
            got[name].append(lenet(x))

    threads = [threading.Thread(target=work, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, results in got.items():
        assert len(results) == 12
        for result in results:
            torch.testing.assert_close(result, want[name], rtol=0, atol=0)


def test_outputs_go_by_the_names_output_wrote(tmp_path):
    """`output features, scores` where `features` is a chain: keys `features` and `scores`, from `Net` and from
    its module, against the net computed by hand."""
    path = tmp_path / "two.net"
    path.write_text(TWO_OUTPUTS)
    net = netdsl.load(path, init="he", seed=3)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    w = {name: torch.from_numpy(value) for name, value in init_weights(netdsl.load_graph(path), 3, "he").items()}
    features = F.relu(F.conv2d(x, w["features.weight"], w["features.bias"], padding=1))
    scores = F.linear(features.flatten(1), w["scores.weight"], w["scores.bias"])
    for outputs in (net(x), net.as_module()(x)):
        assert sorted(outputs) == ["features", "scores"]
        torch.testing.assert_close(outputs["features"], features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs["scores"], scores, rtol=1e-5, atol=1e-5)


def test_outputs_of_towers(tmp_path):
    """`output a@g0, all a`: the copy named alone goes by `a@g0`, the other copy `all a` reads by its layer's
    name (`all a` names two layers)."""
    path = tmp_path / "towers.net"
    path.write_text(
        "device g0, g1\ninput x: 2 x 4 x 4\n"
        "towers g0, g1 {\n    a = conv(x, 2, size=1) | relu\n}\noutput a@g0, all a\n"
    )
    outputs = netdsl.load(path, init="he")(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)))
    assert sorted(outputs) == ["a.relu@g1", "a@g0"]
    assert netdsl.load_graph(path).graph["outputs"] == ["a.relu@g0", "a.relu@g1"]


def test_numpy_inputs_of_any_layout_and_read_only(lenet, weights):
    x = np.random.default_rng(2).standard_normal((2, 1, 32, 32), dtype=np.float32)
    want = lenet(torch.from_numpy(x.copy()))
    flipped = x.astype(">f4")[::-1][::-1]  # big-endian, through two reversals: the same values
    read_only = x.copy()
    read_only.flags.writeable = False
    frozen = {name: value.copy() for name, value in weights.items()}
    for value in frozen.values():
        value.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about read-only arrays is not shown: they are only read
        torch.testing.assert_close(lenet(flipped), want, rtol=0, atol=0)
        torch.testing.assert_close(lenet(read_only), want, rtol=0, atol=0)
        torch.testing.assert_close(lenet.as_module()(flipped), want, rtol=1e-6, atol=1e-6)
        netdsl.load(LENET, weights=frozen)
    error = refused(lambda: lenet(x.astype(np.float64)), LENET, "has dtype float64, the net runs in fp32")
    assert "x.astype(np.float32)" in error.hint


def test_an_onnx_model_given_to_load(tmp_path, weights):
    model = tmp_path / "m.onnx"
    export_onnx(netdsl.load_graph(LENET), weights, model)
    error = refused(lambda: netdsl.load(model), str(model), "not UTF-8 text")
    assert "import_onnx" in error.hint


def test_partitions_of_one_net_run_side_by_side_in_threads(tmp_path):
    """run_partition hands transfers to its caller: gpu1's thread waits in `receive` for what gpu0's thread
    sends, even when gpu1 starts first (a lock held across the calls would leave both waiting)."""
    import queue

    path = tmp_path / "two.net"
    path.write_text(
        "device gpu0, gpu1\ninput image: 2 x 8 x 8\na = conv(image, 4, size=3, pad=1) on gpu0\n"
        "b = conv(a, 4, size=3, pad=1) on gpu1\noutput b\n"
    )
    net = netdsl.load(path, devices="cpu", init="he")
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    links: dict[str, queue.Queue] = {}
    results: dict[str, object] = {}

    def send(step, output, devices):
        links.setdefault(step, queue.Queue()).put(output.clone())

    def receive(step, out):
        while step not in links:
            threading.Event().wait(0.01)
        out.copy_(links[step].get(timeout=30))

    def work(device):
        results[device] = net.run_partition(device, x, receive, send)

    threads = [threading.Thread(target=work, args=(device,)) for device in ("gpu1", "gpu0")]
    threads[0].start()
    threading.Event().wait(0.2)  # gpu1 asks for its input before gpu0 has computed it
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    torch.testing.assert_close(results["gpu1"]["b"], net(x), rtol=0, atol=0)


def test_outputs_named_as_savez_arguments_are_saved(tmp_path):
    from netdsl.files import write_arrays

    arrays = {"file": np.arange(6.0).reshape(2, 3), "allow_pickle": np.full(2, 3.0, np.float32), "x.relu": np.eye(2)}
    write_arrays(tmp_path / "out.npz", arrays)
    with np.load(tmp_path / "out.npz") as saved:
        assert sorted(saved) == sorted(arrays)
        for name, value in arrays.items():
            np.testing.assert_array_equal(saved[name], value)
            assert saved[name].dtype == value.dtype
