"""bench/train_gpu.py between GPU leases: its --smoke run (LeNet-5 at batch 2, the CPU, Triton's interpreter)
takes every code path the GPU run takes; the keys it writes to the choice table are the layers' geometry.
No timing is judged."""

import contextlib
import importlib.util
import itertools
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

import netdsl
from netdsl.compiler.backward_choice import TABLE, load_table

ROOT = Path(__file__).resolve().parent.parent


def bench():
    """The script as a module (registered by name: its dataclasses look their module up)."""
    if "bench_train_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_train_gpu", ROOT / "bench" / "train_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_train_gpu"]


def shipped_table() -> bytes | None:
    return TABLE.read_bytes() if TABLE.exists() else None


def test_smoke_prints_every_row_and_writes_a_choices_table(tmp_path, capsys):
    before = shipped_table()
    switches = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    choices, tsv = tmp_path / "choices.json", tmp_path / "rows.tsv"
    argv = ["--smoke", "--write-choices", "--choices-file", str(choices), "--tsv", str(tsv)]
    assert bench().main(argv) == 0
    out = capsys.readouterr().out
    assert f"reproduce: python bench/train_gpu.py {' '.join(argv)}" in out
    assert "Traceback" not in out and "failed" not in out and "DIFFER" not in out

    number = r"[\d,]+\.\d+"
    for dtype in ("bf16", "tf32"):
        for system in ("netdsl, triton kernels", "netdsl, torch backend", "PyTorch eager"):
            assert re.search(rf"^ +2 +{dtype} +{system} +{number} +[\d,]+ ", out, re.MULTILINE), (dtype, system)
        assert re.search(rf"^ +2 +{dtype} +torch\.compile +n/a .*skipped by --smoke", out, re.MULTILINE)

    keys = bench().layer_keys(netdsl.load_graph(ROOT / "nets" / "lenet5.net"))
    for dtype in ("bf16", "tf32"):
        for layer, (_kind, key) in keys.items():
            figures = rf"(?: +{number}){{6}}"  # dgrad, wgrad and the step's, netdsl's and PyTorch's
            row = rf"^ +2 +{dtype} +{re.escape(layer)}{figures} +(netdsl|torch) +[\d.e+-]+ +{re.escape(key)}"
            assert re.search(row, out, re.MULTILINE), (dtype, layer)

    rows = load_table(choices)
    assert len(rows) == 2 * len(keys) == 10  # one per conv and fc layer, per dtype
    assert sorted((m.key, m.dtype) for m in rows) == sorted((k, d) for _, k in keys.values() for d in ("bf16", "tf32"))
    assert {m.kind for m in rows} == {"conv2d", "linear"} and {m.batch for m in rows} == {2}
    assert f"wrote 10 measurements to {choices}" in out
    lines = tsv.read_text().splitlines()
    # the column names, then the run's command and machine, then its rows
    assert lines[2] == f"# python bench/train_gpu.py {' '.join(argv)}"
    assert lines[3].startswith("# none (--smoke on the CPU: no measurement), torch ")
    assert sum(line.startswith("#") for line in lines) == 4
    assert sum(line.startswith("step\t") for line in lines) == 8
    assert sum(line.startswith("backward\t") for line in lines) == 10
    assert shipped_table() == before
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == switches  # put back


def test_smoke_never_writes_the_shipped_table(capsys):
    before = shipped_table()
    with pytest.raises(SystemExit):
        bench().main(["--smoke", "--write-choices"])
    assert "--choices-file other than the shipped table" in capsys.readouterr().err
    assert shipped_table() == before


def test_alexnet_keys_are_the_layers_geometry():
    """The key of each layer, as a compiler pass computes it from the shaped graph: the joined per-image input,
    the weight's shape, stride, padding as four sides, dilation, groups; an fc's input flattened."""
    module = bench()
    graph = netdsl.load_graph(ROOT / "nets" / "alexnet.net")
    keys = module.layer_keys(graph)
    assert keys["conv1@gpu0"] == keys["conv1@gpu1"] == ("conv2d", "3x227x227 w48x3x11x11 s4x4 p0x0x0x0 d1x1 g1")
    assert keys["conv2@gpu0"] == ("conv2d", "48x27x27 w128x48x5x5 s1x1 p2x2x2x2 d1x1 g1")
    assert keys["conv3@gpu1"] == ("conv2d", "256x13x13 w192x256x3x3 s1x1 p1x1x1x1 d1x1 g1")  # both towers' maps
    assert keys["fc6@gpu0"] == ("linear", "9216 w2048x9216")
    assert keys["fc8"] == ("linear", "4096 w1000x4096")
    assert len(keys) == 15
    found = module.backward_layers(graph)  # one per geometry: the towers' copies share theirs
    towers = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
    assert [layer.label for layer in found] == [f"{name}@gpu0 (+1)" for name in towers] + ["fc8"]
    assert [layer.input_grad for layer in found] == [False] + [True] * 7  # conv1 reads the image
    assert [layer.activation for layer in found] == ["relu"] * 7 + ["none"]


def test_uneven_padding_is_keyed_by_four_sides_and_timed_against_the_same_gradients():
    """`pad=same` with an even kernel pads the bottom and right more: the key says so, and PyTorch's side
    (which pads both ends alike) pads the input itself, so both compute the same gradients."""
    module = bench()
    graph = netdsl.graph_from_text(
        "net uneven\ninput x: 3 x 9 x 9\nc = conv(x, 4, size=2, stride=2, pad=same) | relu\n"
        "d = conv(c, 4, size=3, pad=(0, 1, 2, 1)) | relu\noutput d\n",
        "uneven.net",
    )
    layers = module.backward_layers(graph)
    assert [layer.key for layer in layers] == [
        "3x9x9 w4x3x2x2 s2x2 p0x0x1x1 d1x1 g1",
        "4x5x5 w4x4x3x3 s1x1 p0x1x2x1 d1x1 g1",
    ]
    second = layers[1]
    assert second.input_grad
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter without a GPU
    calls = module.layer_calls(second, 2, "fp32", device)
    assert module.gradient_error(calls) <= 1e-5
    for part in ("dgrad", "wgrad"):
        ours, theirs = calls[("netdsl", part)](), calls[("torch", part)]()
        for mine, want in zip(ours, theirs, strict=True):
            assert (mine is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)


class CountingClock:
    """A clock that never waits: the n-th call it times reads n ms."""

    def __init__(self) -> None:
        self.calls = 0

    def sync(self) -> None:
        pass

    def time(self, fn) -> float:
        fn()
        self.calls += 1
        return float(self.calls)


def interrupted_on_call(number: int, expired: type[Exception]):
    """A step whose call `number` (from 0) the box's alarm interrupts: it raises `expired` there, as the real
    box's SIGALRM handler raises BoxExpired in whatever runs when the time is up."""
    calls = itertools.count()

    def step():
        if next(calls) == number:
            raise expired

    return step


def test_a_time_box_cuts_a_slow_build_and_keeps_what_was_timed(monkeypatch):
    """Where the box runs out decides what is reported: in the build or the warm-up nothing; in timing the
    median of the calls finished before it, once MIN_RUNS (3) of them have. The alarm is raised by the calls
    themselves (no clock, no sleep), so every run cuts at the same call."""
    module = bench()
    monkeypatch.setattr(module, "time_box", lambda seconds: contextlib.nullcontext())
    expired = module.BoxExpired

    def expired_build():
        raise expired

    cut = module.measure(expired_build, warmup=1, runs=3, box=0.2, clock=CountingClock())
    assert (cut.ms, cut.runs, cut.note) == (None, 0, "n/a (time box of 0.2 s ran out in build)")
    cut = module.measure(lambda: interrupted_on_call(1, expired), warmup=3, runs=3, box=0.2, clock=CountingClock())
    assert (cut.ms, cut.runs, cut.note) == (None, 0, "n/a (time box of 0.2 s ran out in warm-up)")

    step = interrupted_on_call(7, expired)
    partial = module.measure(lambda: step, warmup=0, runs=1000, box=0.5, clock=CountingClock())
    assert (partial.ms, partial.runs, partial.note) == (4.0, 7, "time box: 7 of 1000 timed")  # the median of 1..7
    step = interrupted_on_call(2, expired)
    too_few = module.measure(lambda: step, warmup=0, runs=1000, box=0.5, clock=CountingClock())
    assert (too_few.ms, too_few.runs, too_few.note) == (None, 2, "n/a (time box of 0.5 s ran out in timing)")
    whole = module.measure(lambda: lambda: None, warmup=2, runs=5, box=0.5, clock=CountingClock())
    assert (whole.ms, whole.runs, whole.note) == (3.0, 5, "")


def test_the_time_box_interrupts_what_runs_when_its_alarm_goes_off():
    """The real box: its SIGALRM raises BoxExpired inside the code it boxes (signal.pause returns only on a
    signal, so nothing here depends on how long anything takes); a box of 0 s is no box."""
    module = bench()
    handler = signal.getsignal(signal.SIGALRM)
    with pytest.raises(module.BoxExpired), module.time_box(0.05):
        signal.pause()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is handler
    with module.time_box(0):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_without_a_gpu_it_says_so_and_fails(monkeypatch, capsys):
    """Nothing was timed: exit status 4 (bench/timing.py's NO_GPU), not 0, and one line on stderr."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert bench().main(["--batches", "1"]) == 4
    assert capsys.readouterr().err == "no CUDA GPU here: nothing to time (run this on a machine with one, or --smoke)\n"
