"""Names the compiler makes (steps, input uploads, transfers, buffers, kernel files) are unique by
construction: nets whose layer and device names are built to collide once joined with `_` compute exactly
what the same nets with every name replaced by a fresh one compute.

The two collisions found by a hostile-input probe are kept as cases of their own.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import netdsl
from netdsl import NetError
from netdsl.runtime.weights import init_weights

PARTS = ["a", "b", "c", "g", "x", "to", "relu", "conv", "bias", "input", "gpu0"]
SHAPE = (3, 6, 6)


def run(text: str, inputs: dict[str, np.ndarray], weights=None, backend: str = "torch"):
    net = netdsl.load(text_file(text), backend=backend, weights=weights)
    out = net({name: torch.from_numpy(value) for name, value in inputs.items()})
    return out if isinstance(out, dict) else {net.layer_graph.graph["outputs"][0]: out}, net


_FILES: dict[str, str] = {}


def text_file(text: str) -> str:
    """The net as a file (netdsl.load compiles files): one per text, in a folder the session keeps."""
    import hashlib
    import tempfile
    from pathlib import Path

    from netdsl.files import write_atomic

    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    if key not in _FILES:
        folder = Path(tempfile.gettempdir()) / "netdsl-test-names"
        folder.mkdir(exist_ok=True)
        path = folder / f"n{key}.net"
        write_atomic(path, text)  # whole, though another test process (pytest -n) may be reading the same file
        _FILES[key] = str(path)
    return _FILES[key]


def test_an_input_replica_and_another_input_do_not_share_a_name():
    text = (
        "net n1\ndevice z, c, b_c\ninput a: 3 x 6 x 6 on z\ninput a_b: 3 x 6 x 6 on c\n"
        "u = relu(a) on b_c\nv = relu(a_b)\noutput u, v\n"
    )
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((2, *SHAPE), dtype=np.float32) for name in ("a", "a_b")}
    out, net = run(text, inputs)
    np.testing.assert_array_equal(out["u"].numpy(), np.maximum(inputs["a"], 0))
    np.testing.assert_array_equal(out["v"].numpy(), np.maximum(inputs["a_b"], 0))
    assert len(set(net.program.nodes)) == net.program.number_of_nodes() == 5


def test_a_transfer_and_a_layers_step_do_not_share_a_name():
    text = (
        "net n2\ndevice g, to, relu\ninput x: 3 x 6 x 6 on g\na = conv(x, 3, size=1)\nb = maxpool(a, 2) on relu\n"
        "a_g_conv_bias = relu(x) on to\noutput b, a_g_conv_bias\n"
    )
    x = np.random.default_rng(1).standard_normal((2, *SHAPE), dtype=np.float32)
    graph = netdsl.graph_from_text(text)
    weights = init_weights(graph, seed=3)
    for backend in ("torch", "triton"):
        out, _ = run(text, {"x": x}, weights, backend)
        np.testing.assert_array_equal(out["a_g_conv_bias"].numpy(), np.maximum(x, 0))
        conv = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(weights["a.weight"]), torch.from_numpy(weights["a.bias"])
        )
        pooled = torch.nn.functional.max_pool2d(conv, 2).numpy()
        np.testing.assert_allclose(out["b"].numpy(), pooled, rtol=1e-5, atol=1e-6)


def test_layer_names_longer_than_a_file_name_compile_train_and_match_pytorch(tmp_path):
    """Kernel files are named by their steps, and steps by their layers: a 250-character layer name made a
    kernel file name past the file system's 255 bytes ("cannot write ...: File name too long"). Long step names
    are cut to NAME_LIMIT and told apart by a digest of the whole: two long names alike for their first 200
    characters stay two kernels; the outputs are PyTorch's, and a training step on the kernels runs."""
    from netdsl.cli.main import main
    from netdsl.compiler.steps import NAME_LIMIT

    first, second = "c" * 200 + "_one", "c" * 200 + "_two"
    text = (f"net long\ninput x: 3 x 6 x 6\n{first} = conv(x, 4, size=3) | relu\n{second} = conv({first}, 4, size=1)\n"
            f"f = fc({second}, 3)\noutput f\n")  # fmt: skip
    x = np.random.default_rng(4).standard_normal((2, *SHAPE), dtype=np.float32)
    graph = netdsl.graph_from_text(text)
    weights = init_weights(graph, seed=5, scheme="he")
    out, net = run(text, {"x": x}, weights, "triton")
    w = {name: torch.from_numpy(value) for name, value in weights.items()}
    y = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), w[f"{first}.weight"], w[f"{first}.bias"]))
    y = torch.nn.functional.conv2d(y, w[f"{second}.weight"], w[f"{second}.bias"])
    y = torch.nn.functional.linear(y.flatten(1), w["f.weight"], w["f.bias"])
    np.testing.assert_allclose(out["f"].numpy(), y.numpy(), rtol=1e-4, atol=1e-5)
    kernels = [name for name in net.program.nodes if name.startswith("c" * 20)]
    assert len(kernels) == 2 and all(len(name) <= NAME_LIMIT for name in kernels), kernels
    source = tmp_path / "long.net"
    source.write_text(text)
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (8, 3, 6, 6), dtype=np.uint8), y=np.arange(8) % 3)
    assert main(["compile", str(source), "-o", str(tmp_path / "build"), "--no-sm90"]) == 0
    assert main(["train", str(source), "--data", str(tmp_path / "d.npz"), "--steps", "1", "--batch", "4",
                 "--backend", "triton", "--workers", "0", "--out", str(tmp_path / "run")]) == 0  # fmt: skip


@st.composite
def colliding_nets(draw):
    """A small net of relu, 1x1 conv and add layers over several devices, names made of the same few parts
    joined with `_`, then made to collide: for steps of the net as compiled, layers and inputs are added
    whose own steps would bear the same name (`P` on device `D` as relu makes `P_D_relu`; input `P` read
    on `D`, `P_D_input`), so that a transfer `S_to_D` meets a layer `S` on `to`, an input replica meets
    another input. Returned as structure: (inputs, layers, devices), each layer (name, op, sources, device)."""
    word = st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map("_".join)
    names = draw(st.lists(word, min_size=3, max_size=6, unique=True))
    devices = draw(st.lists(word, min_size=2, max_size=3, unique=True))
    count_inputs = draw(st.integers(1, 2))
    inputs = [(name, draw(st.sampled_from(devices))) for name in names[:count_inputs]]
    made = [name for name, _ in inputs]
    layers = []
    for name in names[count_inputs:]:
        op = draw(st.sampled_from(["relu", "conv", "add"]))
        reads = 2 if op == "add" else 1
        sources = draw(st.lists(st.sampled_from(made), min_size=reads, max_size=reads))
        device = draw(st.one_of(st.none(), st.sampled_from(devices)))
        layers.append((name, op, sources, device))
        made.append(name)
    try:
        steps = list(netdsl.load(text_file(net_text((inputs, layers, devices))), backend="torch").program.nodes)
    except NetError:
        return inputs, layers, devices  # a reserved word somewhere: the test skips it
    shadows = []
    for step in steps:
        parts = step.split("_")
        for cut in range(1, len(parts) - 1):
            prefix, device = "_".join(parts[:cut]), "_".join(parts[cut:-1])
            if parts[-1] in ("relu", "input") and prefix and device:
                shadows.append((prefix, device, parts[-1]))
    taken = set(made) | set(devices)
    chosen = draw(st.lists(st.sampled_from(shadows), max_size=3, unique=True)) if shadows else []
    for prefix, device, kind in chosen:
        if prefix in taken:
            continue
        taken.add(prefix)
        if device not in devices:
            devices.append(device)
        if kind == "input":
            inputs.append((prefix, draw(st.sampled_from(devices))))
            # read on `device`: its upload there is named prefix_device_input
            layers.append((f"{prefix}_reader", "relu", [prefix], device))
        else:
            layers.append((prefix, "relu", [draw(st.sampled_from(made))], device))
        made.append(prefix)
    return inputs, layers, devices


def net_text(structure, names: dict[str, str] | None = None, devices_to: dict[str, str] | None = None) -> str:
    """The net's text; with `names` and `devices_to`, every layer and device renamed."""
    inputs, layers, devices = structure
    n = (lambda name: names[name]) if names else (lambda name: name)
    d = (lambda name: devices_to[name]) if devices_to else (lambda name: name)
    lines = ["net colliding", f"device {', '.join(d(device) for device in devices)}"]
    lines += [f"input {n(name)}: 3 x 6 x 6 on {d(device)}" for name, device in inputs]
    read = set()
    for name, op, sources, device in layers:
        if op == "add":
            call = f"add({n(sources[0])}, {n(sources[1])})"
        else:
            call = f"relu({n(sources[0])})" if op == "relu" else f"conv({n(sources[0])}, 3, size=1)"
        lines.append(f"{n(name)} = {call}" + (f" on {d(device)}" if device else ""))
        read.update(sources)
    outputs = [name for name, *_ in layers if name not in read] or [layers[-1][0]]
    lines.append(f"output {', '.join(n(name) for name in outputs)}")
    return "\n".join(lines) + "\n"


@settings(
    max_examples=60,
    derandomize=True,  # the same examples on every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(colliding_nets(), st.integers(0, 2**16))
def test_renaming_every_name_to_a_fresh_one_changes_no_output_bit(structure, seed):
    inputs, layers, devices = structure
    assume(layers)
    text = net_text(structure)
    try:
        graph = netdsl.graph_from_text(text)
    except NetError:
        assume(False)  # a word the language keeps for itself, or an op's name in a chain's place
    rename = {name: f"l{i}" for i, (name, *_) in enumerate([*inputs, *layers])}
    fresh = net_text(structure, rename, {device: f"d{i}" for i, device in enumerate(devices)})
    weights = init_weights(graph, seed=seed)
    renamed = {f"{rename[name.rsplit('.', 1)[0]]}.{name.rsplit('.', 1)[1]}": value for name, value in weights.items()}
    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal((2, *SHAPE), dtype=np.float32) for name, _ in inputs}
    got, net = run(text, values, weights)
    want, _ = run(fresh, {rename[name]: value for name, value in values.items()}, renamed)
    assert set(want) == {rename[name] for name in got}
    for name, value in got.items():
        np.testing.assert_array_equal(value.numpy(), want[rename[name]].numpy(), err_msg=f"{name}\n{text}")
    steps = list(net.program.nodes)
    assert len(steps) == len(set(steps))
    assert set(net.input_shapes) == {name for name, _ in inputs}
