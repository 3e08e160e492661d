"""The training program (netdsl.compiler.backward): backward steps, gradient transfers, what the forward saves,
memory per device, and each conv's and fc's choice of backward.

What the plan says the forward saves is checked against what autograd really keeps: the triton backend's
operators run a forward and the loss under `saved_tensors_hooks`, which sees every tensor saved for the
backward; parameters aside, the bytes must be the plan's to the byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_support import SMALL_ALEXNET

from netdsl.cli.main import main
from netdsl.codegen import conv_backward
from netdsl.compiler.backward import TRAINING_PASS_NAMES, backward_choices, backward_key, run_training_passes
from netdsl.compiler.backward_choice import TABLE, Measured, choose, load_table, write_table
from netdsl.compiler.passes import Options
from netdsl.compiler.train_plan import compile_training, dump_training
from netdsl.errors import NetError
from netdsl.ir import layer
from netdsl.lang.frontend import load_graph
from netdsl.runtime.module import GraphModule
from netdsl.tables import format_bytes

ROOT = Path(__file__).resolve().parents[1]


# Layers left to PyTorch (a sum, a channel shuffle, an LRN on its own, a concatenation, a global average) among
# netdsl's kernels (leaky ReLU, batch norm, average pooling).
MIXED = """\
net mixed
input image: 3 x 16 x 16
a = conv(image, 16, size=3, pad=1) | leaky_relu(slope=0.1)
b = conv(a, 16, size=3, pad=1) | batchnorm | relu
c = add(a, b)
d = shuffle(c, groups=4) | lrn(size=3, alpha=1e-4, beta=0.75, k=1) | avgpool(2)
e = conv(d, 8, size=1)
f = concat(d, e) | global_avgpool
g = fc(f, 10)
output g
"""


# Layers before the first weights need no backward: autograd keeps nothing for them.
POOL_FIRST = """\
net pool_first
input image: 3 x 12 x 12
p = maxpool(image, 2) | relu
c = conv(p, 8, size=3) | relu
y = fc(c, 10)
"""


def small_nets(tmp_path: Path) -> dict[str, Path]:
    simplenet = (ROOT / "nets/simplenet.net").read_text().replace("1 x 64 x 64", "1 x 16 x 16")
    (tmp_path / "simplenet.net").write_text(simplenet)
    (tmp_path / "small_alexnet.net").write_text(SMALL_ALEXNET)
    (tmp_path / "mixed.net").write_text(MIXED)
    (tmp_path / "pool_first.net").write_text(POOL_FIRST)
    return {
        "pool_first": tmp_path / "pool_first.net",
        "lenet5": ROOT / "nets/lenet5.net",
        "simplenet": tmp_path / "simplenet.net",
        "small_alexnet": tmp_path / "small_alexnet.net",
        "mixed": tmp_path / "mixed.net",
    }


def program(path: Path, batch: int = 2, recompute: str = "none"):
    return run_training_passes(load_graph(path), Options(batch=batch, recompute=recompute))["plan_training_memory"]


def measured_saved_bytes(path: Path, batch: int, recompute: str = "none") -> int:
    """Bytes autograd keeps for the backward of one training forward and its loss on the triton backend, each
    storage once, parameters left out (on one CPU a transfer is the tensor itself); with `recompute`, what the
    forward pass keeps (the runs computed again keep their inputs)."""
    from netdsl.runtime import kernel_ops

    graph = load_graph(path)
    module = GraphModule(graph, backend="triton", init="he", seed=1, recompute=recompute).train()
    parameters = {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}
    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            size = tensor.untyped_storage().nbytes()
            seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), size)
        return tensor

    shape = next(layer(graph, name).shape for name in graph.graph["inputs"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=generator)
    target = torch.randint(0, 10, (batch,), generator=generator)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = module.logits(x)
        loss, _ = kernel_ops.cross_entropy(logits, target, 0.0)
    if recompute == "none":  # (with recompute, test_train_recompute.py runs the backward passes)
        loss.backward()  # the graph runs: what was saved was usable
    return sum(seen.values())


def planned_saved_bytes(trained, batch: int) -> int:
    """The plan's saved tensors, each once, with transfers and input replicas read as their source."""
    source = {}
    for name in trained.nodes:
        step = trained.nodes[name]["step"]
        if step.kind == "transfer" and not step.options.get("gradient"):
            source[name] = step.inputs[0]
        if step.kind == "input" and "replica_of" in step.options:
            source[name] = step.options["replica_of"]
    unique = {}
    for tensors in trained.graph["saved"].values():
        for tensor in tensors:
            unique[source.get(tensor.name, tensor.name)] = tensor
    return sum(tensor.bytes(batch, "fp32") for tensor in unique.values())


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "cheap", "all"])
@pytest.mark.parametrize("which", ["lenet5", "simplenet", "small_alexnet", "mixed", "pool_first"])
def test_what_the_plan_saves_is_what_autograd_keeps(tmp_path, which, recompute):
    path = small_nets(tmp_path)[which]
    batch = 3
    planned = planned_saved_bytes(program(path, batch, recompute), batch)
    assert planned == measured_saved_bytes(path, batch, recompute)


def test_every_forward_step_has_a_backward_on_its_device_and_transfers_go_back(tmp_path):
    trained = program(small_nets(tmp_path)["small_alexnet"])
    steps = {name: trained.nodes[name]["step"] for name in trained.nodes}
    forward = [s for s in steps.values() if s.name in trained.graph["forward_steps"]]
    backward = {s.options["forward"]: s for s in steps.values() if s.kind == "backward"}
    for step in forward:
        if step.kind in ("input", "transfer", "loss"):
            continue
        assert step.name in backward, step.name
        assert backward[step.name].device == step.device
        assert trained.has_edge(step.name, backward[step.name].name)  # it reads what its forward saved
    transfers = [s for s in forward if s.kind == "transfer"]
    gradients = {s.layers[0].name: s for s in steps.values() if s.options.get("gradient")}
    assert transfers and len(gradients) == len(transfers)
    for step in transfers:
        back = gradients[step.layers[0].name]
        assert (back.device, back.options["source_device"]) == (step.options["source_device"], step.device)
    # one update per device, after every backward there that trains parameters
    updates = [s for s in steps.values() if s.kind == "update"]
    assert sorted(s.device for s in updates) == ["gpu0", "gpu1"]
    conv1 = backward[next(s.name for s in forward if s.first.name == "conv1@gpu0")]
    assert conv1.options["input_gradient"] is False  # the images need no gradient
    assert not any(s.options.get("input_gradient") for s in backward.values() if s.first.name == "conv1@gpu1")


def test_a_layer_the_loss_does_not_read_gets_no_backward_and_no_update(tmp_path):
    """`side` reaches no output: the training step gave it a backward with no gradient coming in (its
    weights' update and its input gradient, summed into c1's, read a gradient nothing wrote); it has none now,
    as autograd and the module (its weights not trained) have none."""
    net = tmp_path / "dead.net"
    net.write_text("input image: 1 x 8 x 8\nc1 = conv(image, 4, size=3) | relu\nside = fc(c1, 5)\nout = fc(c1, 3)\n"
                   "output out\n")  # fmt: skip
    trained = program(net)
    steps = [trained.nodes[name]["step"] for name in trained.nodes]
    backward = {s.first.name for s in steps if s.kind == "backward"}
    assert backward == {"c1", "out"}
    (update,) = [s for s in steps if s.kind == "update"]
    parameters = {p for t in update.inputs for p in trained.nodes[t]["step"].options["parameters"]}
    assert parameters == {"c1.weight", "c1.bias", "out.weight", "out.bias"}
    c1 = next(s for s in steps if s.kind == "backward" and s.first.name == "c1")
    assert c1.options["sums"] == 1  # out's gradient alone


def test_the_plan_is_json_with_events_and_byte_identical(tmp_path):
    path = small_nets(tmp_path)["small_alexnet"]
    first = compile_training(path, Options(batch=4))
    again = compile_training(path, Options(batch=4))
    assert first.report == again.report
    text = json.dumps(first.plan, indent=2)
    assert text == json.dumps(again.plan, indent=2)
    launches = {e["step"]: e for d in first.plan["devices"].values() for e in d["launches"]}
    waits = [e for e in launches.values() if e.get("wait")]
    assert any(e["pass"] == "backward" for e in waits)  # a gradient crossing devices waits on an event ...
    for entry in waits:
        for event in entry["wait"]:
            assert launches[event.removeprefix("done:")].get("record") == event  # ... its producer records
    memory = first.plan["devices"]["gpu0"]["memory_bytes"]
    assert memory["peak"] == memory["static"] + memory["peak_live"] > memory["saved"] > 0


def test_peak_memory_grows_with_the_batch_and_static_memory_does_not(tmp_path):
    path = ROOT / "nets/lenet5.net"
    small, large = program(path, 2).graph["memory"]["gpu0"], program(path, 64).graph["memory"]["gpu0"]
    assert small.static == large.static == 3 * 4 * 61706
    assert large.saved == 32 * small.saved
    assert large.peak_live > 16 * small.peak_live


def test_each_training_pass_dumps(tmp_path):
    path = ROOT / "nets/lenet5.net"
    for name in TRAINING_PASS_NAMES:
        text = compile_training(path, Options(batch=2), dump_after=name).dump
        assert text.startswith("# net lenet5")
    text = compile_training(path, Options(batch=2), dump_after="plan_training_memory").dump
    assert "c1_conv_relu_backward = backward(" in text and "update_gpu0 = update(" in text
    assert "# saved for the backward" in text and "# memory per device" in text
    assert "runs netdsl (not measured)" in text
    assert dump_training(load_graph(path)).startswith("# net lenet5")  # a layer graph dumps as before


def test_compile_train_writes_the_plan_and_report(tmp_path, capsys):
    out = tmp_path / "build"
    args = ["compile", str(ROOT / "nets/lenet5.net"), "--train", "--no-sm90", "-o", str(out), "--batch", "8"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    steps = {"c1_conv_relu", "c1_maxpool", "c3_conv_relu", "c3_maxpool", "f5_fc_relu", "f6_fc_relu", "f7_fc", "loss",
             "update_gpu0"}  # fmt: skip
    assert set(first) == {"plan.json", "report.txt", *(f"{name}.py" for name in steps)}
    assert main(args) == 0
    assert first == {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    report = first["report.txt"].decode()
    assert "saved for backward" in report and "c3_conv_relu_backward" in report
    assert main([*args[:-2], "--dump-after", "backward"]) == 0
    assert "f7_fc_backward = backward(loss)" in capsys.readouterr().out


def test_compile_train_errors(tmp_path, capsys):
    net = ROOT / "nets/lenet5.net"
    assert main(["compile", str(net), "--train", "--no-sm90", "-o", str(tmp_path), "--dump-after", "bogus"]) == 1
    err = capsys.readouterr().err
    assert "unknown training pass `bogus`" in err and "backward" in err and "Traceback" not in err
    two = tmp_path / "two.net"
    two.write_text("net two\ninput x: 3 x 8 x 8\na = conv(x, 4, size=3) | relu\nb = fc(a, 5)\noutput a, b\n")
    assert main(["compile", str(two), "--train", "--no-sm90", "-o", str(tmp_path / "b")]) == 1
    assert "training needs one output" in capsys.readouterr().err
    assert main(["compile", str(net), "--train", "--no-sm90", "-o", str(tmp_path / "c"), "--precision", "tf32x3"]) == 1
    err = capsys.readouterr().err
    assert "--precision" in err and "not tf32x3" in err and "Traceback" not in err


# --- the choice between netdsl's backward and PyTorch's -------------------------------------------------------


def test_choices_follow_the_measurements(tmp_path):
    graph = load_graph(ROOT / "nets/lenet5.net")
    key = backward_key(layer(graph, "c3"))
    assert key == "6x14x14 w16x6x5x5 s1x1 p0x0x0x0 d1x1 g1"
    rows = [
        Measured("conv2d", key, "fp32", 32, netdsl_ms=0.30, torch_ms=0.20),
        Measured("conv2d", key, "fp32", 256, netdsl_ms=1.00, torch_ms=1.50),
        Measured("linear", backward_key(layer(graph, "f5")), "fp32", 32, netdsl_ms=0.1, torch_ms=0.2),
    ]
    table = tmp_path / "choices.json"
    write_table(rows, {"gpu": "test"}, table)
    assert load_table(table) == sorted(rows, key=lambda m: (m.kind, m.key, m.dtype, m.batch))
    chosen = backward_choices(graph, 16, "fp32", load_table(table))
    assert chosen["c3"].implementation == "torch" and "torch 0.200 ms at batch 32" in chosen["c3"].reason
    assert backward_choices(graph, 512, "fp32", load_table(table))["c3"].implementation == "netdsl"
    assert chosen["f5"].implementation == "netdsl" and chosen["c1"].reason == "not measured"
    assert choose("conv2d", key, "bf16", 16, rows).reason == "not measured"  # another dtype: not measured


def test_a_damaged_table_is_a_clean_error(tmp_path):
    table = tmp_path / "choices.json"
    table.write_text('{"format": 1, "measurements": [{"kind": "conv2d"}]}')
    with pytest.raises(NetError, match="cannot read the backward choices table"):
        load_table(table)
    table.write_text(
        json.dumps(
            {
                "format": 1,
                "measurements": [
                    {"kind": "conv2d", "key": "k", "dtype": "fp32", "batch": 1, "netdsl_ms": -1.0, "torch_ms": 1.0}
                ],
            }
        )
    )
    with pytest.raises(NetError, match="not a measurement"):
        load_table(table)
    for bad in ({"netdsl_ms": "1.2"}, {"torch_ms": None}, {"batch": True}):  # not numbers: no TypeError either
        row = {"kind": "linear", "key": "k", "dtype": "fp32", "batch": 1, "netdsl_ms": 1.0, "torch_ms": 1.0, **bad}
        table.write_text(json.dumps({"format": 1, "measurements": [row]}))
        with pytest.raises(NetError, match="not a measurement"):
            load_table(table)


def test_the_shipped_table_reads():
    """The table ships with the package (a missing file would read as no measurements) and every row is one."""
    assert TABLE.is_file()
    assert all(isinstance(row, Measured) for row in load_table())


@pytest.mark.slow
def test_a_layer_on_pytorchs_backward_gives_the_same_gradients(monkeypatch):
    """c3 on PyTorch's backward: the same gradients as netdsl's kernels (fp32, relative 1e-5), and netdsl's conv
    backward runs for c1 only."""
    graph = load_graph(ROOT / "nets/lenet5.net")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((3, 1, 32, 32), generator=generator)
    calls = []
    original = conv_backward.conv2d_backward

    def counting(*args, **kwargs):
        calls.append(tuple(args[3].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(conv_backward, "conv2d_backward", counting)
    grads = {}
    for choice in ({}, {"c3": "torch", "f5": "torch"}):
        calls.clear()
        module = GraphModule(graph, backend="triton", init="he", seed=3, backward=choice).train()
        module.logits(x).square().sum().backward()
        grads[bool(choice)] = {name: p.grad.clone() for name, p in module.named_parameters()}
        assert calls == ([(16, 6, 5, 5), (6, 1, 5, 5)] if not choice else [(6, 1, 5, 5)])  # backward order
    for name, value in grads[False].items():
        error = (grads[True][name] - value).norm() / value.norm()
        assert error < 1e-5, name


def test_pytorchs_conv_backward_with_uneven_padding():
    """The torch path pads the input itself where the ends of an axis differ, and cuts its gradient back."""
    from netdsl.runtime.kernel_ops import _torch_conv_backward

    generator = torch.Generator().manual_seed(5)
    x = torch.randn((2, 3, 9, 8), generator=generator, requires_grad=True)
    weight = torch.randn((4, 3, 4, 3), generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    pads = (1, 0, 2, 2)  # top, left, bottom, right
    padded = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    y = torch.relu(torch.nn.functional.conv2d(padded, weight, bias, stride=2))
    grad = torch.randn(y.shape, generator=generator)
    y.backward(grad)
    dx, dw, db = _torch_conv_backward(grad, x.detach(), weight.detach(), y.detach(), True, True, [2, 2], list(pads),
                                      [1, 1], 1, "relu", 0.0)  # fmt: skip
    for got, want in ((dx, x.grad), (dw, weight.grad), (db, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_choices_are_checked():
    graph = load_graph(ROOT / "nets/lenet5.net")
    with pytest.raises(NetError, match="not a conv or fc layer"):
        GraphModule(graph, backend="triton", backward={"c1.maxpool": "torch"})
    with pytest.raises(NetError, match="unknown backward `cudnn`"):
        GraphModule(graph, backend="triton", backward={"c1": "cudnn"})


# --- every kernel of the step, recorded and built for the H100 ------------------------------------------------

TINY = """\
net tiny
input image: 3 x 19 x 19
a = conv(image, 32, size=3, pad=1) | relu | lrn(size=5, alpha=1e-4, beta=0.75, k=2) | maxpool(3, stride=2)
b = conv(a, 32, size=3, stride=2) | relu | maxpool(2)
c = fc(b, 64) | relu | dropout(0.5)
d = fc(c, 10)
output d
"""


def emitted(path: Path, folder: Path, batch: int = 2, dtype: str = "fp32"):
    """The training program of a net and its step files, written to `folder`."""
    compiled = compile_training(path, Options(batch=batch, dtype=dtype))
    folder.mkdir()
    for name, source in compiled.kernels.items():
        (folder / name).write_text(source)
    return compiled


@pytest.mark.parametrize("which", ["lenet5", "simplenet", "small_alexnet"])
def test_the_recorded_launches_are_the_kernels_the_plan_names(tmp_path, which):
    from netdsl.compiler.train_launches import record_training_launches

    trained = emitted(small_nets(tmp_path)[which], tmp_path / "train", 16, "bf16").program
    launched: dict[str, set[str]] = {}
    for launch in record_training_launches(trained, tmp_path / "train", 16, "bf16"):
        step, kernel = launch.step.split(".", 1)
        launched.setdefault(step, set()).add(kernel)
    for name in trained.nodes:
        step = trained.nodes[name]["step"]
        named = step.options.get("kernels") or step.options.get("forward_kernels") or []
        named = {kernel.split(".")[1] for kernel in named if "." in kernel}
        optional = {"sum_splits_kernel", "conv2d_wgrad_reduce_kernel"}  # when the reduction is split
        if not step.options.get("input_gradient", True):
            optional |= {"conv2d_dgrad_kernel", "linear_dgrad_kernel"}  # the images need no gradient
        assert named - optional <= launched.get(name, set()) <= named, name


@pytest.mark.slow
def test_compile_train_builds_every_training_kernel_for_sm90(tmp_path, monkeypatch, capsys):
    """bf16 at batch 32: no kernel spills, and the conv dgrad and wgrad and the fc kernels run on tensor cores."""
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "cache"))
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    out = tmp_path / "build"
    assert main(["compile", str(net), "--train", "-o", str(out), "--batch", "32", "--dtype", "bf16"]) == 0
    report = (out / "train" / "report.txt").read_text()
    assert "kernels that spill: none" in report
    rows = {line.split()[0]: line for line in report.splitlines() if line.split() and "_kernel" in line.split()[0]}
    for kernel in ("b_conv_relu_backward.conv2d_dgrad_kernel", "b_conv_relu_backward.conv2d_wgrad_kernel",
                   "a_conv_relu_backward.conv2d_wgrad_kernel", "c_fc_relu_backward.linear_dgrad_kernel",
                   "c_fc_relu_backward.linear_wgrad_kernel"):  # fmt: skip
        assert kernel in rows, kernel
        assert "MMA" in rows[kernel].split()[-1], rows[kernel]  # HMMA, or wgmma's HGMMA
    plan = json.loads((out / "train" / "plan.json").read_text())
    entry = next(e for e in plan["devices"]["gpu0"]["launches"] if e["step"] == "b_conv_relu_backward")
    assert [k["kernel"] for k in entry["kernel_launches"]][:2] == ["conv2d_dgrad_kernel", "conv2d_wgrad_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lenet5", "simplenet", "small_alexnet", "mixed"])
def test_each_emitted_step_file_matches_autograd(tmp_path, which):
    """Every training step's file, imported and checked as a user would run it: its copies of the kernels, forward
    and backward, against PyTorch autograd in float64 (fp32, 1e-5 of the largest value)."""
    from netdsl.compiler.launches import load_kernel_file

    compiled = emitted(small_nets(tmp_path)[which], tmp_path / "train")
    checked = 0
    for name in compiled.kernels:
        module = load_kernel_file(tmp_path / "train" / name)
        if not hasattr(module, "check"):
            continue
        for what, error in module.check().items():
            assert error < 1e-5, (name, what, error)
        checked += 1
    assert checked == sum(1 for name in compiled.kernels if not name.startswith("update_"))


def test_the_update_file_is_the_papers_rule(tmp_path, capsys):
    from netdsl.compiler.launches import load_kernel_file

    emitted(ROOT / "nets/lenet5.net", tmp_path / "train")
    module = load_kernel_file(tmp_path / "train" / "update_gpu0.py")
    assert sum(size for _, size in module.PARAMETERS) == 61706
    generator = torch.Generator().manual_seed(1)
    w, g, v = (torch.randn(61706, generator=generator) for _ in range(3))
    want_v = 0.9 * v - 0.0005 * 0.01 * w - 0.01 * g
    want_w = w + want_v
    module.update(w, g, v, lr=0.01)
    torch.testing.assert_close(v, want_v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)


def test_step_files_are_deterministic(tmp_path):
    """The same net and options give the same bytes, every file valid Python named after its step."""
    import ast

    path = small_nets(tmp_path)["small_alexnet"]
    first = compile_training(path, Options(batch=2)).kernels
    assert first == compile_training(path, Options(batch=2)).kernels
    for name, source in first.items():
        ast.parse(source)
        assert f'STEP = "{name.removesuffix(".py")}"' in source


def test_a_compile_without_train_removes_an_earlier_train_folder_only_if_netdsl_wrote_it(tmp_path, capsys):
    """`compile --train` then `compile` into the same folder: the fp32 train/ of the first would sit beside the
    second's bf16 build, so it goes; a train/ netdsl did not write (a data set's images) stays untouched."""
    net = ROOT / "nets/lenet5.net"
    out = tmp_path / "build"
    assert main(["compile", str(net), "--train", "--no-sm90", "-o", str(out), "--batch", "4"]) == 0
    assert (out / "train" / "plan.json").is_file()
    assert main(["compile", str(net), "--no-sm90", "-o", str(out), "--batch", "4", "--dtype", "bf16"]) == 0
    assert "removed" in capsys.readouterr().out and not (out / "train").exists()
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # nothing left aside
    images = tmp_path / "project"
    (images / "train" / "cat").mkdir(parents=True)
    (images / "train" / "cat" / "0001.png").write_bytes(b"an image")
    (images / "train" / "plan.json").write_text('{"mine": true}')  # even with a plan.json of its own
    assert main(["compile", str(net), "--no-sm90", "-o", str(images), "--batch", "4"]) == 0
    assert (images / "train" / "cat" / "0001.png").read_bytes() == b"an image"


def test_a_step_over_the_memory_limit_says_in_how_many_parts_it_fits(tmp_path, capsys):
    """AlexNet at batch 128 peaks at about 710 MiB on gpu0: under a 500 MiB limit the plan is an error whose hint
    is the smallest number of parts that fits, checked against the plan at that part's batch and the next larger."""
    path = ROOT / "nets/alexnet.net"
    limit = 500 * 2**20
    peaks = {batch: program(path, batch).graph["memory"]["gpu0"].peak for batch in (128, 64, 32)}
    assert peaks[128] > peaks[64] > limit >= peaks[32]
    code = main(["compile", str(path), "--train", "--no-sm90", "--batch", "128", "--memory-limit", "500MiB", "-o",
                 str(tmp_path / "build")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "--memory-limit: error: training at batch 128 in fp32, device `gpu0` would need" in err, err
    assert "hint: train in parts: `accumulate = 4` runs 32 images at a time" in err
    assert not (tmp_path / "build").exists()


def test_a_devices_own_memory_is_the_limit_and_the_error_points_at_it(tmp_path, capsys):
    """LeNet-5's 61,706 weights with their gradients and momentum take 723 KiB: a device of 512 KiB holds not even
    those, and the error is at its declaration."""
    text = (ROOT / "nets/lenet5.net").read_text().replace("net lenet5\n", "net lenet5\ndevice gpu0 memory 512 KiB\n")
    net = tmp_path / "small.net"
    net.write_text(text)
    line = text.splitlines().index("device gpu0 memory 512 KiB") + 1
    with pytest.raises(NetError) as raised:
        compile_training(net, Options(batch=2))
    assert raised.value.span is not None and (raised.value.span.line, raised.value.span.col) == (line, 8)
    assert "not even one image at a time fits" in raised.value.hint
    assert compile_training(net, Options(batch=2, memory_limit=2**30)).program is not None  # the flag wins


def test_the_plan_with_layers_run_again(tmp_path, capsys):
    """AlexNet at batch 128 with `recompute = all`: each conv's and fc's chain keeps its input alone in the forward
    pass (what autograd keeps is checked above), and its steps' tensors live again during its backward; the peak
    falls from 710 to 649 MiB on gpu0. Under a 680 MiB limit the hint names that setting, with the plan's peak; the
    report gives the peak with each setting and the runs; plan.json records the setting."""
    path = ROOT / "nets/alexnet.net"
    plans = {mode: program(path, 128, mode).graph["memory"]["gpu0"] for mode in ("none", "cheap", "all")}
    assert plans["none"].saved > plans["all"].saved and plans["none"].peak > plans["all"].peak
    assert plans["cheap"] == plans["none"]  # AlexNet's chains after a conv are one step each: nothing to run again
    code = main(["compile", str(path), "--train", "--no-sm90", "--batch", "128", "--memory-limit", "680MiB", "-o",
                 str(tmp_path / "build")])  # fmt: skip
    err = capsys.readouterr().err
    peak = format_bytes(plans["all"].peak)
    assert code == 1 and f"hint: run layers again in the backward pass: `recompute = all` (peak {peak}); or train " \
        "in parts: `accumulate = 2`" in err, err  # fmt: skip
    out = tmp_path / "again"
    assert main(["compile", str(path), "--train", "--no-sm90", "--batch", "128", "--recompute", "all", "-o",
                 str(out)]) == 0  # fmt: skip
    report = (out / "train" / "report.txt").read_text()
    assert "one training step at batch 128, fp32, recompute all" in report
    row = next(line.split() for line in report.splitlines() if line.startswith("gpu0 ") and line.count("MiB") == 3)
    assert " ".join(row[1:]) == " ".join(format_bytes(plans[mode].peak) for mode in ("none", "cheap", "all"))
    assert "all: conv1_gpu0_conv_relu + conv1_norm_gpu0_lrn_maxpool;" in report
    assert json.loads((out / "train" / "plan.json").read_text())["recompute"] == "all"
    capsys.readouterr()
    assert main(["compile", str(path), "--recompute", "all", "-o", str(tmp_path / "inference")]) == 1
    assert capsys.readouterr().err.startswith("--recompute: error: --recompute plans a training step")


def test_a_run_computed_again_frees_its_steps_tensors_until_its_backward(tmp_path):
    """SimpleNet's stages with `cheap` (batch norm | relu | max-pool after each conv): the forward keeps only the
    conv's output in place of the stage's tensors, and the step's saved bytes and its peak fall."""
    path = small_nets(tmp_path)["simplenet"]
    none, cheap = program(path, 8), program(path, 8, "cheap")
    runs = cheap.graph["runs"]["cheap"]
    assert [len(run) for run in runs] == [3, 3, 3, 4]  # the last stage's dropout too
    for run in runs:
        first = cheap.nodes[run[0]]["step"]
        assert [t.name for t in cheap.graph["saved"][run[0]]] == first.inputs  # the conv's output
        assert all(cheap.graph["saved"][name] == [] for name in run[1:])
        assert all(none.graph["saved"][name] for name in run if not name.endswith("_dropout"))  # (which keeps none)
    assert cheap.graph["memory"]["gpu0"].saved < none.graph["memory"]["gpu0"].saved
    assert cheap.graph["memory"]["gpu0"].peak < none.graph["memory"]["gpu0"].peak
