"""The benchmark scripts keep working between GPU leases: their CPU paths run here (no timing is judged); the
GPU ones, without a GPU, exit with NO_GPU; every count flag refuses what cannot be measured; the command each
echoes is the one that reproduces its table."""

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import netdsl

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
NO_GPU = 4  # bench/timing.py's exit status where there is no GPU
SCRIPTS = (
    "alexnet_gpu", "compile", "conv_sweep", "dense", "export", "frontend", "step_sweep", "train", "train_data",
    "train_gpu", "train_memory",
)  # fmt: skip


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # train_gpu's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def echoed(out: str) -> list[str]:
    """The arguments of the command a script printed first (`# python bench/NAME.py ARGS`)."""
    first = out.splitlines()[0]
    assert first.startswith("# python bench/"), first
    return shlex.split(first.removeprefix("# "))[2:]


def test_conv_sweep_smoke(capsys):
    """Every layer's shape at a tiny size under the interpreter: the kernel agrees with F.conv2d. The command it
    echoes is what ran: --smoke's batch 1 and single tile, not the defaults of --batch and --configs."""
    assert script("conv_sweep").main(["--smoke", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert echoed(out) == ["--dtypes", "fp32", "--layers", "conv1,conv2,conv3,conv4,conv5", "--smoke"]
    assert "\nfp32, batch 1 " in out
    assert "WRONG" not in out and "Error" not in out
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert f"\n{layer} " in out
    assert out.count(" nhwc ") == 4  # the channels-last variant for every layer but conv1 (3 channels)
    # ... which has the space-to-depth rewrite instead, checked against F.conv2d too
    assert len(re.findall(r"^conv1 +s2d \d+x\d+x\d+ ", out, flags=re.MULTILINE)) == 1


def test_step_sweep_smoke(capsys):
    """The fc and LRN + max-pool steps at tiny sizes under the interpreter: today's tiles agree with PyTorch."""
    assert script("step_sweep").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert echoed(out) == ["--steps", "fc6,fc7,fc8,norm1,norm2", "--smoke"]  # what ran: batch 1, fp32
    assert "\nfp32 (GB/s" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+1\s+(fc|norm)\d\s+PyTorch", line)]
    assert [row[1] for row in rows] == ["fc6", "fc7", "fc8", "norm1", "norm2"]
    for row in rows:
        assert float(row[5]) <= 1e-5, row  # relative error of today's tile against PyTorch, fp32


@pytest.mark.parametrize(
    "name, argv",
    [
        ("alexnet_gpu", ["--runs", "1", "--batches", "1"]),
        ("alexnet_gpu", ["--batches", "1", "--net", "vgg16"]),
        ("conv_sweep", []),
        ("step_sweep", []),
        ("train_gpu", ["--batches", "1"]),
        ("train", ["--gpu"]),
        ("train_memory", ["--gpu"]),
    ],
)
def test_gpu_benchmarks_without_a_gpu_say_so_and_fail(name, argv, monkeypatch, capsys):
    """Nothing was timed: not exit status 0, so bench/gpu_session.sh and CI notice; one line on stderr."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    module = script(name)
    if name == "train":  # --gpu without a GPU stops before its CPU table, which takes minutes

        def cpu_table(*args):
            raise AssertionError("the CPU table ran")

        monkeypatch.setattr(module, "cpu_table", cpu_table)
    assert module.main(argv) == NO_GPU
    error = capsys.readouterr().err
    assert error.startswith("no CUDA GPU here: nothing to time (") and error.count("\n") == 1


def test_a_gpu_benchmark_run_as_a_command_exits_with_no_gpu():
    """The status reaches the shell: `python bench/alexnet_gpu.py` on a machine without a GPU."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "alexnet_gpu.py"), "--runs", "1", "--batches", "1"],
        capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == NO_GPU, done.stderr
    assert done.stdout == "# python bench/alexnet_gpu.py --runs 1 --batches 1 --precisions fp32,tf32x3,tf32,bf16 " \
        "--systems netdsl,netdsl-graph,eager,compile,max-autotune --net alexnet\n"  # fmt: skip
    assert done.stderr == "no CUDA GPU here: nothing to time (run this on a machine with one)\n"


@pytest.mark.parametrize(
    "name, argv",
    [
        ("alexnet_gpu", ["--runs", "3", "--batches", "32,1", "--net", "vgg16", "--warm-only", "--tsv", "a b/t.tsv"]),
        ("alexnet_gpu", ["--systems", "netdsl-tuned-graph", "--tuning", "tuning.json", "--precisions", "bf16"]),
        ("conv_sweep", ["--batch", "8", "--dtypes", "tf32", "--configs", "0,2"]),
        ("step_sweep", ["--batches", "4", "--dtype", "fp16", "--steps", "fc6"]),
    ],
)
def test_the_echoed_command_reproduces_the_run(name, argv, monkeypatch, capsys):
    """Every flag given is in the command echoed (--warm-only and --tsv too), and the echoed command, run again,
    echoes itself: it asks for the very same run, its defaults spelt out."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    module = script(name)
    assert module.main(argv) == NO_GPU
    words = echoed(capsys.readouterr().out)
    for flag in (word for word in argv if word.startswith("--")):
        assert flag in words
    assert module.main(words) == NO_GPU
    assert echoed(capsys.readouterr().out) == words


@pytest.mark.parametrize(
    "name, argv",
    [
        ("conv_sweep", ["--smoke", "--batch", "4"]),
        ("conv_sweep", ["--smoke", "--configs", "all"]),
        ("step_sweep", ["--smoke", "--batches", "128"]),
        ("step_sweep", ["--smoke", "--dtype", "bf16"]),
        ("train", ["--smoke", "--steps", "5"]),
        ("train", ["--smoke", "--batch", "8"]),
        ("train", ["--smoke", "--nets", "alexnet"]),
        ("train_memory", ["--smoke", "--batch", "4"]),
    ],
)
def test_smoke_refuses_the_flags_it_sets_itself(name, argv, capsys):
    """A value --smoke would override is not what would run, nor what the echoed command would say."""
    with pytest.raises(SystemExit) as stopped:
        script(name).main(argv)
    assert stopped.value.code == 2
    assert f"leave out {argv[1]}" in capsys.readouterr().err


ZERO_COUNTS = [
    ("alexnet_gpu", ["--runs", "0"]),
    ("alexnet_gpu", ["--batches", "1,0"]),
    ("alexnet_gpu", ["--batches", "1,x"]),
    ("conv_sweep", ["--batch", "0"]),
    ("step_sweep", ["--batches", "0"]),
    ("frontend", ["--runs", "0", "--sizes", "20"]),
    ("export", ["--runs", "0"]),
    ("dense", ["--runs", "0"]),
    ("dense", ["--images", "0"]),
    ("dense", ["--batch", "0"]),
    ("dense", ["--workers", "-1"]),
    ("train", ["--steps", "0"]),
    ("train", ["--repeats", "0"]),
    ("train", ["--warmup", "-1"]),
    ("train", ["--batch", "0"]),
    ("train", ["--gpu-batch", "0"]),
    ("train_data", ["--epochs", "0"]),
    ("train_data", ["--images", "0"]),
    ("train_data", ["--batch", "0"]),
    ("train_data", ["--crop", "0"]),
    ("train_data", ["--workers", "0,-1"]),
    ("train_data", ["--processes", "2,0"]),
    ("train_gpu", ["--steps", "0"]),
    ("train_gpu", ["--warmup", "-1"]),
    ("train_gpu", ["--layer-runs", "0"]),
    ("train_gpu", ["--layer-warmup", "-1"]),
    ("train_gpu", ["--batches", "0"]),
]


@pytest.mark.parametrize("name, argv", ZERO_COUNTS, ids=[f"{name} {' '.join(argv)}" for name, argv in ZERO_COUNTS])
def test_counts_below_what_can_be_measured_are_refused(name, argv, capsys):
    """No runs to take a median of, no steps to divide by, no epochs to take the best of: argparse says so
    (exit status 2) before anything is built, instead of a traceback or an `inf` in the table."""
    with pytest.raises(SystemExit) as stopped:
        script(name).main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {argv[0]}: must be " in error and "whole number" in error and "Traceback" not in error


def test_count_types():
    arguments = script("arguments")
    assert arguments.positive_int("3") == 3 and arguments.non_negative_int("0") == 0
    assert arguments.positive_ints("128,1") == (128, 1) and arguments.non_negative_ints("0,2") == (0, 2)
    assert arguments.joined((128, 1)) == "128,1"
    for bad in ("0", "-1", "1.5", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            arguments.positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        arguments.non_negative_ints("1,,2")


def test_alexnet_tsv_rows_come_under_the_command_and_the_machine(tmp_path):
    """bench.tsv, table.tsv: the column names once, then each run's command and machine above its rows."""
    module = script("alexnet_gpu")
    path = tmp_path / "rows.tsv"
    first = module.TsvFile(str(path), ["python bench/alexnet_gpu.py --runs 3", "GPU X, torch 1; 2026-01-01"])
    first.append(("alexnet", "1", "bf16", "netdsl", "1.000", "1,000", "2.0", "0.1"))
    first.append(("alexnet", "32", "bf16", "netdsl", "2.000", "16,000", "2.0", "0.1"))
    module.TsvFile(str(path), ["python bench/alexnet_gpu.py --runs 5", "GPU X"]).append(("vgg16",) + ("1",) * 7)
    module.TsvFile(str(path), ["a run that measured nothing writes nothing"])
    assert path.read_text().splitlines() == [
        "# " + "\t".join(module.HEADER),
        "# python bench/alexnet_gpu.py --runs 3",
        "# GPU X, torch 1; 2026-01-01",
        "alexnet\t1\tbf16\tnetdsl\t1.000\t1,000\t2.0\t0.1",
        "alexnet\t32\tbf16\tnetdsl\t2.000\t16,000\t2.0\t0.1",
        "# python bench/alexnet_gpu.py --runs 5",
        "# GPU X",
        "vgg16\t1\t1\t1\t1\t1\t1\t1",
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_script_in_whole_sentences(name, capsys):
    """--help opens with the docstring's first paragraph, not its first line cut mid-sentence."""
    module = script(name)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    paragraph = module.__doc__.split("\n\n")[0].strip()
    assert paragraph[-1] in ".?", paragraph
    # argparse wraps the text to the terminal's width, breaking lines at spaces and after hyphens
    assert "".join(paragraph.split()) in "".join(capsys.readouterr().out.split())


def test_export_smoke(capsys):
    """The export benchmark on LeNet-5 and SimpleNet, one run each: a row per net with its file's size (the
    weights' float32 bytes and a little more), every stage timed, nothing left behind."""
    assert script("export").main(["--nets", "lenet5,simplenet", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert echoed(out) == ["--nets", "lenet5,simplenet", "--runs", "1"]
    rows = {row[0]: row[1:] for row in (line.split() for line in out.splitlines()) if row[0] in ("lenet5", "simplenet")}
    for name, parameters in (("lenet5", 61_706), ("simplenet", None)):
        megabytes, *times, ratio = rows[name]
        assert all(float(t) >= 0 for t in times) and ratio.endswith("x") and len(times) == 6
        if parameters is not None:
            assert parameters * 4e-6 < float(megabytes) < parameters * 4e-6 + 0.01
    with pytest.raises(SystemExit) as stopped:
        script("export").main(["--nets", "lenet5,resnet"])
    assert stopped.value.code == 2 and "not a bundled net: 'resnet'" in capsys.readouterr().err


def test_dense_smoke(capsys):
    """The dense-evaluation benchmark on LeNet-5, four photos at two scales, one run: both passes timed, the
    same probabilities from each, 8 view sizes (4 shapes x 2 scales). A scale below the net's input is refused."""
    argv = ["--net", "lenet5", "--images", "4", "--scales", "32,40", "--batch", "2", "--workers", "0", "--runs", "1"]
    assert script("dense").main(argv) == 0
    out = capsys.readouterr().out
    assert echoed(out) == argv
    rows = {line.rsplit(maxsplit=3)[0].strip(): line.split()[-3:] for line in out.splitlines()
            if line.lstrip().startswith(("one at a time ", "grouped "))}  # fmt: skip
    assert set(rows) == {"one at a time", "grouped (eval --dense)"}
    assert all(float(seconds) > 0 and speed.endswith("x") for seconds, _, speed in rows.values())
    assert float(out.split("largest difference in a probability: ")[1].split(";")[0]) < 1e-5 and " 8 view sizes" in out
    for argv, message in ((["--net", "lenet5", "--scales", "24"], "scale photos to at least 32"),
                          (["--net", "resnet"], "not a bundled net: 'resnet'")):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            script("dense").main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_frontend_smoke(capsys):
    """The front-end benchmark at two small sizes, one run each: its table lists every net with the
    layer count asked for."""
    frontend = script("frontend")
    assert frontend.main(["--sizes", "20,200", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: python bench/frontend.py --runs 1 --sizes 20,200" in out
    rows = re.findall(r"^(alexnet\.net|generated [\d,]+) +([\d,]+) ", out, re.MULTILINE)  # net, layers
    assert rows == [("alexnet.net", "45"), ("generated 20", "20"), ("generated 200", "200")]
    assert "stages of generated 200:" in out
    assert "target: AlexNet" in out and "Traceback" not in out


@pytest.mark.parametrize("layers", [20, 21, 25, 26, 27, 100, 1_000])
def test_frontend_generated_net_has_exactly_the_layers_asked_for(layers):
    text = script("frontend").generated_net(layers)
    assert netdsl.graph_from_text(text, f"generated_{layers}.net").number_of_nodes() == layers


def test_frontend_rejects_sizes_below_its_smallest_net(capsys):
    frontend = script("frontend")
    with pytest.raises(ValueError, match="at least 20 layers"):
        frontend.generated_net(19)
    with pytest.raises(SystemExit):
        frontend.main(["--sizes", "10,100"])
    assert "each size must be at least 20 layers" in capsys.readouterr().err


def test_train_step_benchmark_smoke(capsys):
    """netdsl's training step and the hand-written loop's, one tiny step each: the table has its row."""
    assert script("train").main(["--smoke", "--gpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lenet5 +2 +none +[\d,.]+ +[\d,]+ +[\d,.]+ +[\d,]+ +[\d.]+x$", out, re.MULTILINE), out
    if not torch.cuda.is_available():
        assert "no CUDA GPU here" in out


def test_train_memory_smoke(capsys):
    """A step's memory, LeNet-5's batch whole and in 2 parts, without and with recompute, each in a process of
    its own: the table has the four rows, the first the whole batch's (against itself, 1.00)."""
    assert script("train_memory").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert echoed(out) == ["--smoke"]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\w+) \| [\d,]+ \| ([\d.]+|-) \| [\d.]+ \|$", out, re.MULTILINE)
    assert [row[:3] for row in rows] == [("1", "8", "none"), ("1", "8", "all"), ("2", "4", "none"), ("2", "4", "all")]
    assert rows[0][3] in ("1.00", "-")


def test_train_memory_refuses_an_unknown_recompute(capsys):
    with pytest.raises(SystemExit):
        script("train_memory").main(["--recompute", "none,some"])
    assert "recompute settings are none, cheap and all, not 'some'" in capsys.readouterr().err


def test_train_memory_refuses_parts_that_do_not_divide_the_batch(capsys):
    with pytest.raises(SystemExit):
        script("train_memory").main(["--batch", "10", "--parts", "1,4"])
    assert "a batch of 10 does not split into 4 equal parts" in capsys.readouterr().err
