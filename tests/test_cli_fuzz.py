"""Fuzzing the command line and every file netdsl reads: whatever a user types or hands it, `netdsl` does what
it says (exit status 0) or reports a netdsl error (status 1: `WHERE: error: ...` naming the file or flag, with a
hint, and no traceback). Status 2 ("internal error: this is a bug"), an exception escaping `main`, a stray
temporary file, a half-written output or a user's file executed as code is a bug.

Every case runs `netdsl.cli.main.main(argv)` in this process (no start-up per case), in a fresh copy of a small
world made by netdsl itself once per module: a tiny conv/pool/fc net (3 x 8 x 8 images, 3 classes) whose own
`train` block keeps training to one step of four images, a recipe file, an .npz data set, a folder of small PNG
images, .npy inputs, a labels file, the run folder and checkpoint of a one-step training, a build folder of
`netdsl compile`, a weights file, a tuning file and an ONNX export. Two sources of input:

  * random command lines for each subcommand: valid and invalid flag values (zero, negative, nan, inf, huge,
    empty, unicode, undecodable bytes, the wrong type, files of the wrong kind), repeated and conflicting flags;
  * mutants of every file kind, each run by a command that reads it: bytes truncated, flipped, inserted; empty
    files; non-UTF-8 text; JSON fields of plan.json, recipe.json, tuning files and safetensors headers (and the
    JSON records inside those) set to wrong types, shapes, dtypes, huge and negative numbers; .npy headers and
    .npz members rewritten; files deleted from folders, a file swapped for a folder; pickles that would
    create a file if loaded (a canary: nothing a user writes may run as code).

Each case is seeded by (NETDSL_FUZZ_SEED, case number), so a failure names the case that reproduces it. Set
NETDSL_FUZZ_SCALE (e.g. 10) for a larger campaign. Every defect a campaign found is a named test at the end.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import random
import re
import shutil
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import Hang, time_limit

from netdsl.cli.main import main
from netdsl.train.runs import TEMPORARY

SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
COMMAND_CASES = max(1, int(70 * SCALE))
FILE_CASES = max(1, int(60 * SCALE))
CASE_LIMIT_S = 60.0  # one command; nearly all take well under a second
CANARY = "PWNED"  # the file a user's input would create if netdsl ran it as code

TINY = """\
net tiny
input image: 3 x 8 x 8
c1 = conv(image, 4, size=3, pad=1) | relu | maxpool(2)
out = fc(c1, 3)
train { batch = 4; steps = 1; workers = 0; log_every = 1; val_fraction = 0.25 }
"""
RECIPE = """\
const rate = 0.05
train {
    lr = rate
    momentum = 0.5
    schedule = cosine
    decay_mult "*.bias" = 0
    crop = 8
    mean = (120, 110, 100)
}
"""
CLASSES = ("cat", "dog", "owl")


# --- the world: one of every file netdsl reads, made by netdsl -------------------------------------------


@dataclass
class Result:
    status: int
    out: str
    err: str


def invoke(argv: list[str]) -> Result:
    """`main(argv)` with stdout and stderr as a UTF-8 terminal has them (stdout strict, stderr backslashreplace);
    any exception escaping `main`, or a case over the time limit, fails the test."""
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    problem = None
    try:
        with time_limit(CASE_LIMIT_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(argv))
            except SystemExit as exit:  # argparse's --help and --version
                status = exit.code if isinstance(exit.code, int) else 1
    except Hang:
        problem = f"no answer within {CASE_LIMIT_S} s"
    except BaseException as error:
        problem = f"{type(error).__name__} escaped main: {str(error)[:300]}"
    if problem:
        pytest.fail(f"{problem}\nargv: {argv!r}", pytrace=False)
    return Result(status, out_bytes.getvalue().decode("utf-8"), err_bytes.getvalue().decode("utf-8"))


def png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).convert(mode).save(path)


@pytest.fixture(scope="module", autouse=True)
def no_pictures():
    """The run folder's curves.png, drawn at each epoch's end, takes matplotlib most of a second and is read by no
    command: drawn as where matplotlib is not installed (nothing), which netdsl handles too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("netdsl.train.runs.plot_curves", lambda path, epochs: False)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, no_pictures) -> Path:
    """The pristine files every case starts from (copied per case), made once per module."""
    root = tmp_path_factory.mktemp("cli_fuzz") / "world"
    root.mkdir()
    rng = np.random.default_rng(7)
    (root / "tiny.net").write_text(TINY, encoding="utf-8")
    (root / "recipe.net").write_text(RECIPE, encoding="utf-8")
    np.savez(root / "data.npz", x=rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8), y=np.arange(12) % 3)
    for label, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            png(root / "images" / name / f"{i}.png", (9 + i, 10), seed=10 * label + i)
    png(root / "photo.png", (12, 9), seed=99)
    np.save(root / "one.npy", rng.standard_normal((3, 8, 8)).astype(np.float32))
    np.save(root / "batch.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    listed = [f"images/{name}/{i}.png {label}" for label, name in enumerate(CLASSES) for i in range(3)]
    (root / "list.txt").write_text("\n".join(listed) + "\n", encoding="utf-8")  # an image list, as Caffe's
    with contextlib.chdir(root):
        made = [
            ["train", "tiny.net", "--data", "data.npz", "--out", "run"],
            ["compile", "tiny.net", "-o", "build", "--no-sm90"],
        ]
        if _has_onnx():
            made.append(["export", "tiny.net", "-o", "model.onnx", "--weights", "run"])
        for argv in made:
            result = invoke(argv)
            assert result.status == 0, f"{argv}: {result.err}"
        shutil.copy(root / "run" / "weights.safetensors", root / "weights.safetensors")
        _make_tuning(root)
    for stale in ("curves.png", "tensorboard"):  # not read by any command: less to copy per case
        path = root / "run" / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return root


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _make_tuning(root: Path) -> None:
    """A tuning file of the fc step only, the launcher's tiles against a made-up clock (no timing, no sm_90)."""
    from netdsl.runtime import tune as tuner

    def clock(launch, config):
        launch()
        return 1.0 if config is not None else 5.0

    tuning, _ = tuner.tune(root / "tiny.net", batch=1, device="cpu", timer=clock, check_sm90=False, steps="out*")
    tuner.write_tuning(root / "tuning.json", tuning)


@dataclass
class Case:
    """One command to run in a fresh copy of the world: `prepare` changes the copy first; `outputs` are the
    files (or folders) the command writes, checked whole when they exist."""

    argv: list[str]
    what: str = ""
    prepare: list = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def run_case(world: Path, scratch: Path, case: Case, tally: Counter) -> Result:
    folder = scratch / "case"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(world, folder)
    with contextlib.chdir(folder):
        for change in case.prepare:
            change(folder)
        before = {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
        result = invoke(case.argv)
        check_result(case, result, folder, before)
    tally[(case.argv[0] if case.argv else "-", result.status)] += 1
    return result


ANSI = re.compile(r"\033\[[0-9;]*m")
COMMAND_NAMES = ("check", "info", "graph", "compile", "export", "import", "run", "train", "eval", "tune", "fmt",
                 "filters", "neighbours", "runs")  # fmt: skip
ERROR_LINE = re.compile(r"^(?P<where>.+?): error: (?P<message>.+)$", re.M)


def check_result(case: Case, result: Result, folder: Path, before: dict) -> None:
    context = f"argv: {case.argv!r}\n{case.what}\nstdout: {result.out[-1500:]}\nstderr: {result.err[-3000:]}"
    assert result.status in (0, 1), f"exit status {result.status}\n{context}"
    assert "Traceback (most recent call last)" not in result.err, f"a traceback\n{context}"
    assert not (folder / CANARY).exists(), f"a user's file ran as code\n{context}"
    stray = [str(path.relative_to(folder)) for path in folder.rglob(".*") if TEMPORARY.match(path.name)]
    assert not stray, f"temporary files left behind: {stray}\n{context}"
    if result.status == 1 and case.argv[:1] == ["fmt"] and {"--check", "--diff"} & set(case.argv) and result.out:
        return  # `fmt --check` and `--diff`: status 1 says a file would change, as black's does
    if result.status == 1:
        err = ANSI.sub("", result.err)
        match = ERROR_LINE.search(err)
        assert match, f"status 1 without a netdsl error\n{context}"
        command = case.argv[0] if case.argv else None  # `netdsl` itself is to blame for a command it has not
        assert match["where"] != "netdsl" or command not in COMMAND_NAMES, f"an error naming no file or flag\n{context}"
        assert re.search(r"^hint: \S", err, re.M), f"an error without a hint\n{context}"
    for name in case.outputs:
        check_whole(folder / name, before, context)
    if result.status == 0:
        for name in case.outputs:
            assert (folder / name).exists() or name.endswith("?"), f"status 0 but no {name}\n{context}"


def check_whole(path: Path, before: dict, context: str) -> None:
    """An output netdsl wrote is complete: every file of it that the command made or changed reads back as its kind
    (the files `before` lists, with their times, as they were before the command)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        if before.get(file) == file.stat().st_mtime_ns:
            continue
        suffix = file.suffix.lower()
        try:
            if suffix in (".json",):
                json.loads(file.read_text(encoding="utf-8"))
            elif suffix == ".jsonl":
                for line in file.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
            elif suffix in (".safetensors", ".ckpt"):
                from safetensors.numpy import load_file

                load_file(str(file))
            elif suffix == ".npy":
                np.load(file, allow_pickle=False)
            elif suffix == ".npz":
                with np.load(file, allow_pickle=False) as data:
                    [data[key] for key in data.files]
            elif suffix == ".onnx":
                import onnx

                onnx.load(str(file), load_external_data=False)
            elif suffix in (".net", ".py", ".txt", ".dot"):
                file.read_text(encoding="utf-8")
            elif suffix == ".png":
                from PIL import Image

                with Image.open(file) as picture:
                    picture.load()
        except Exception as error:
            pytest.fail(f"{file} is not whole: {type(error).__name__}: {error}\n{context}", pytrace=False)


# --- (a) random command lines ----------------------------------------------------------------------------

WHOLE = ["1", "2", "3"]
WHOLE_BAD = ["0", "-1", "-0", "nan", "inf", "1.5", "1e3", "", " ", "x", "\u00e9", "\u0663", "\u00b2", "0x10", "1_0"]
WHOLE_BAD += ["9" * 30, "\udcff", "4294967296", "+1", "--", "-"]
LONG = ("9" * 30, "\u0663", "4294967296")  # of WHOLE_BAD, valid as a number of epochs or steps: runs that long
NUMBER = ["0.01", "0.5", "1e-3", "0.9"]
NUMBER_BAD = ["0", "-1", "nan", "inf", "-inf", "1e400", "-0", "", "x", "1,2", "1e-400", "NaN", "Infinity", "0x1p-3"]
NUMBER_BAD += ["1" + "0" * 400, "\u0663.5", "\udcff", "1e308"]
WORDS_BAD = ["", " ", "\u00e9", "\udcff", "-", "none", "auto", "true", "FP32", "a" * 300]
NETS = ["tiny.net"] * 6 + ["missing.net", "", ".", "images", "data.npz", "photo.png", "run", "labels.txt"]
NETS += ["weights.safetensors", "\udcff.net", "\u00e9t\u00e9.net", "tiny.net/x", "one.npy", "recipe.net"]
ONNX = ["model.onnx"] if _has_onnx() else []
WEIGHTS = ["run"] * 3 + ["weights.safetensors", "run/checkpoints/last.ckpt", "missing.safetensors", "", "."]
WEIGHTS += ["images", "data.npz", "tiny.net", "build", "run/checkpoints", "\udcff"]
DATA = ["data.npz"] * 4 + ["images"] * 3 + ["list.txt"] * 2 + ["missing", "", "photo.png", "tiny.net", ".", "run"]
DATA += ["images/cat", "labels.txt"]
DATA += ["one.npy", "\udcff", "DIGITS"]
INPUTS = ["one.npy", "batch.npy", "photo.png", "missing.npy", "tiny.net", "images", "list.txt", "", "labels.txt",
          "data.npz"]  # fmt: skip
DTYPES = ["fp32", "tf32", "fp16", "bf16", "fp8", "float32", ""]
MEMORY = ["16GiB", "1KB", "1 B", "0", "-1", "1.5 MiB", "1 XB", "nan", "inf", "1" + "0" * 400, "1e3GiB", "", "9" * 40]
PLAN = {
    "--layout": ["auto", "nchw", "nhwc", ""],
    "--precision": ["ieee", "tf32x3", "tf32", ""],
    "--space-to-depth": None,
    "--merge-towers": None,
    "--split-k": None,
}
DEVICES = ["gpu0=cpu", "gpu0=cuda:0", "gpu0=cpu,gpu1=cpu", "gpu0", "=", "gpu0=", "gpu9=cpu", "gpu0=tpu:0", ""]
DEVICES += ["gpu0=cpu,gpu0=cpu", "gpu0=cpu:99", "gpu0=cuda:-1", "\udcff=cpu"]


BAD = [0.3]  # how often a draw is a bad value: set per case, so that some cases are mostly valid and do the work


def pick(rng: random.Random, good: list[str], bad: list[str]) -> str:
    return rng.choice(bad) if rng.random() < BAD[0] else rng.choice(good)


def choose(rng: random.Random, pool: list[str]) -> str:
    """The pool's first (a valid value) but for a bad draw, which takes any."""
    return rng.choice(pool) if rng.random() < BAD[0] else pool[0]


def flags(rng: random.Random, table: dict, count: int) -> list[str]:
    """`count` flags drawn from `table` (flag -> values, None for a switch), repeats allowed, in random order;
    now and then a value glued on with `=`, or a flag without its value."""
    argv: list[str] = []
    names = list(table)
    for _ in range(count):
        name = rng.choice(names)
        values = table[name]
        if values is None:
            argv.append(name)
            continue
        value = choose(rng, values) if not callable(values) else values(rng)
        roll = rng.random()
        if roll < 0.1 and name.startswith("--"):
            argv.append(f"{name}={value}")
        elif roll < 0.13:
            argv.append(name)  # its value left out
        else:
            argv += [name, value]
    return argv


def net_flags(rng: random.Random) -> dict:
    return {
        "--batch": lambda r: pick(r, WHOLE, WHOLE_BAD),
        "--dtype": DTYPES,
        "--memory-limit": MEMORY,
    }


def command_check(rng: random.Random) -> Case:
    command = rng.choice(["check", "info"])
    return Case([command, choose(rng, NETS + ONNX), *flags(rng, net_flags(rng), rng.randrange(4))])


def command_graph(rng: random.Random) -> Case:
    out = choose(rng, ["out.dot"] * 4 + ["out.svg", "sub/out.dot", "tiny.net", "images", "", "\udcff.dot", "o.xyz"])
    argv = ["graph", choose(rng, NETS + ONNX), "-o", out, *flags(rng, net_flags(rng), rng.randrange(3))]
    return Case(argv, outputs=[out] if out in ("out.dot", "out.svg") and "-o" not in argv[4:] else [])


def command_compile(rng: random.Random) -> Case:
    table = {
        **net_flags(rng),
        **PLAN,
        "--tuning": ["tuning.json"] * 3 + ["missing.json", "", "tiny.net", "images", "recipe.net"],
        "--dump-after": ["fuse", "shapes", "plan_memory", "nope", ""],
        "--train": None,
        "-o": ["out"] * 4 + ["build", "tiny.net", "images/cat", "", "run"],  # "\udcff": see test_known_...
    }
    argv = ["compile", choose(rng, NETS + ONNX), *flags(rng, table, rng.randrange(6))]
    if rng.random() < 0.98:
        argv.append("--no-sm90")  # the sm_90 builds take seconds; --no-sm90 is plain in test_compile.py
    out = next((argv[i + 1] for i in range(len(argv) - 2, 0, -1) if argv[i] == "-o"), None)
    return Case(argv, outputs=[out] if out == "out" else [])


def command_export(rng: random.Random) -> Case:
    out = choose(rng, ["out.onnx"] * 4 + ["tiny.net", "images", "", "sub/out.onnx", "run/weights.safetensors"])
    table = {
        **net_flags(rng),
        "--weights": WEIGHTS,
        "--seed": ["0", "1", "4294967295", "4294967296", "-1", "x", ""],
        "--external-data": None,
    }
    argv = ["export", choose(rng, NETS), "-o", out, *flags(rng, table, rng.randrange(4))]
    return Case(argv, outputs=["out.onnx"] if out == "out.onnx" else [])


def command_import(rng: random.Random) -> Case:
    model = choose(rng, ONNX * 4 + ["missing.onnx", "tiny.net", "images", "", "weights.safetensors"])
    out = choose(rng, ["m.net"] * 4 + ["tiny.net", "model.onnx", "images", "", "sub/m.net", "m"])
    table = {"--weights-out": ["w.safetensors", "model.onnx", "images", "", "m.net"], "--towers": None}
    argv = ["import", model, "-o", out, *flags(rng, table, rng.randrange(3))]
    return Case(argv, outputs=["m.net"] if out == "m.net" else [])


def command_run(rng: random.Random) -> Case:
    table = {
        **PLAN,
        "--weights": WEIGHTS,
        "--seed": ["0", "7", "-1", "x", "4294967296"],
        "--init": ["paper", "he", "xavier", ""],
        "--devices": DEVICES,
        "--dtype": DTYPES,
        "--batch": lambda r: pick(r, WHOLE, [*WHOLE_BAD, "10" + "0" * 12]),
        "--random": lambda r: pick(r, WHOLE, [*WHOLE_BAD, "10" + "0" * 12]),
        "--tuning": ["tuning.json", "missing.json", "tiny.net", ""],
        "--cuda-graph": None,
        "--top": lambda r: pick(r, ["1", "3", "1000"], WHOLE_BAD),
        "--views": ["1", "10", "2", "0", "x"],
        "--scales": ["8", "8,10", "6,8,12", "8,8", "0,8", "x", "", "8,", "99999", "65536"],
        "--dense": None,
        "--labels": ["labels.txt"] * 2 + ["missing.txt", "images", "photo.png", "data.npz", ""],
        "--save": ["out.npy"] * 3 + ["out.npz", "one.npy", "tiny.net", "images", "", "sub/o.npy", "o.txt"],
        "--distributed": None,
        "--time": None,
    }
    argv = ["run", choose(rng, NETS + ["build"] * 3 + ONNX), *flags(rng, table, rng.randrange(6))]
    if rng.random() < 0.15:  # an ensemble (the run's weights carry a preprocessing, weights.safetensors none)
        argv += ["--weights", *(choose(rng, WEIGHTS) for _ in range(2))]
    if rng.random() < 0.4:
        argv += ["--input", *rng.choices(INPUTS, k=rng.randint(1, 3))]
    argv += ["--backend", "triton" if rng.random() < 0.05 else "torch"]
    saved = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--save"]
    return Case(argv, outputs=[saved[-1]] if saved and saved[-1] in ("out.npy", "out.npz") else [])


SETTINGS = {
    "--batch": lambda r: pick(r, ["2", "4", "12"], [*WHOLE_BAD, "100000"]),
    "--accumulate": lambda r: pick(r, ["1", "2", "4"], [*WHOLE_BAD, "3"]),
    "--recompute": ["none", "cheap", "all", "some", ""],
    # a valid huge count, or `none` (the default 90 epochs), trains for as long as it says: not drawn
    "--epochs": lambda r: pick(r, ["1"], [value for value in WHOLE_BAD if value not in LONG]),
    "--steps": lambda r: pick(r, ["1", "2"], [value for value in WHOLE_BAD if value not in LONG]),
    "--early-stop": lambda r: pick(r, ["1", "2", "none"], WHOLE_BAD),
    "--ema": lambda r: pick(r, ["0.5", "0.999", "none"], [*NUMBER_BAD, "1", "1.5"]),
    "--mixup": lambda r: pick(r, ["0", "0.2", "1"], ["-1", "nan", "inf", "", "x"]),
    "--cutmix": lambda r: pick(r, ["0", "1"], ["-1", "nan", "inf", "", "x"]),
    "--checkpoint-every": lambda r: pick(r, ["1", "2", "none"], WHOLE_BAD),
    "--seed": ["0", "3", "4294967295", "4294967296", "-1", "x"],
    "--optimizer": ["sgd", "adamw", "adam", ""],
    "--lr": lambda r: pick(r, NUMBER, NUMBER_BAD),
    "--momentum": lambda r: pick(r, NUMBER, [*NUMBER_BAD, "1"]),
    "--nesterov": None,
    "--no-nesterov": None,
    "--weight-decay": lambda r: pick(r, NUMBER, NUMBER_BAD),
    "--betas": ["0.9,0.999", "0.5,0.5", "1,1", "0.9", "0.9,nan", "", "a,b", "0.9,0.99,0.9"],
    "--eps": lambda r: pick(r, NUMBER, NUMBER_BAD),
    "--lr-mult": ["*.bias=2", "c1.*=0", "*=0", "=1", "*.bias", "x=nan", "[=1", "*=-1", "\u00e9=1", ""],
    "--decay-mult": ["*.bias=0", "out.weight=2", "*=inf", "a b=1", "**=1"],
    "--clip-grad": lambda r: pick(r, ["0", "1"], NUMBER_BAD),
    "--schedule": ["constant", "step", "multistep", "cosine", "poly", "exp", "inv", "plateau", "linear", ""],
    "--gamma": lambda r: pick(r, NUMBER, [*NUMBER_BAD, "2"]),
    "--step-epochs": lambda r: pick(r, WHOLE, WHOLE_BAD),
    "--milestones": ["1,2", "2,1", "1", "", "0,1", "1,1", "a", "1,,2", "9" * 30],
    "--patience": lambda r: pick(r, ["0", "1"], WHOLE_BAD),
    "--max-drops": lambda r: pick(r, ["0", "none"], WHOLE_BAD),
    "--threshold": lambda r: pick(r, NUMBER, NUMBER_BAD),
    "--cosine-floor": lambda r: pick(r, ["0", "0.5", "1"], NUMBER_BAD),
    "--power": lambda r: pick(r, ["1", "0.9", "2"], NUMBER_BAD),
    "--warmup-epochs": lambda r: pick(r, ["0", "0.5", "2"], NUMBER_BAD),
    "--label-smoothing": lambda r: pick(r, ["0", "0.1"], [*NUMBER_BAD, "1"]),
    "--data": DATA,
    "--val-fraction": lambda r: pick(r, ["0", "0.25", "0.5"], [*NUMBER_BAD, "1", "0.99"]),
    "--val-data": ["list.txt", "images", "data.npz", "none", "missing", "", "photo.png", "labels.txt", "digits"],
    "--resize": lambda r: pick(
        r, ["8", "auto", "12", "8,12", "6,16"], [*WHOLE_BAD, "99999", "12,8", "8,8", "8,9,10", "8,99999", "0,8", "8,"]
    ),
    "--crop": lambda r: pick(r, ["8", "8,8", "auto"], ["7", "9", "8,9", "0", "-8", "8,8,8", "", "x", "1e9"]),
    "--crop-area": lambda r: pick(r, ["0.08,1", "0.5,0.9", "none"], ["0,1", "0.5", "0.9,0.5", "1,2", "nan,1", ""]),
    "--crop-aspect": lambda r: pick(r, ["0.75,1.3333", "0.5,2"], ["0,1", "2,0.5", "1", "1,inf", "x,y"]),
    "--flip": None,
    "--no-flip": None,
    "--pca-noise": lambda r: pick(r, ["0", "0.1"], NUMBER_BAD),
    "--saturation": lambda r: pick(r, ["1", "1.5"], [*NUMBER_BAD, "0.5"]),
    "--exposure": lambda r: pick(r, ["1", "1.5"], [*NUMBER_BAD, "0"]),
    "--hue": lambda r: pick(r, ["0", "0.1", "0.5"], [*NUMBER_BAD, "0.6"]),
    "--angle": lambda r: pick(r, ["0", "7", "180"], [*NUMBER_BAD, "181"]),
    "--mean": ["auto", "none", "127", "1,2,3", "1,2", "nan", "", "x,y,z", "1e400,0,0", "-5"],
    "--std": ["false", "auto", "64", "1,2,3", "0", "0,1,1", "-1", "nan", "1,2", "inf"],
    "--workers": ["0", "-1", "x", "nan", ""],
    "--skip-corrupt": None,
    "--no-skip-corrupt": None,
    "--val-every": lambda r: pick(r, WHOLE, WHOLE_BAD),
    "--views": ["1", "10", "2", "0", "x"],
    "--keep-best": lambda r: pick(r, ["0", "1", "3"], WHOLE_BAD),
    "--log-every": lambda r: pick(r, WHOLE, WHOLE_BAD),
    "--dtype": ["fp32", "bf16", "fp16", "tf32", "fp8", ""],
    "--channels-last": None,
    "--no-channels-last": None,
    "--no-compile": None,
    "--init": ["paper", "he", "xavier", ""],
    "--weights": ["run", "weights.safetensors", "none", "missing.safetensors", "tiny.net", "data.npz", "images", ""],
    "--timeout": lambda r: pick(r, ["300", "0.5"], NUMBER_BAD),
    "--learning-rate": ["0.1"],
    "--recipe": ["recipe.net"] * 3 + ["missing.net", "tiny.net", "data.npz", "images", "", "labels.txt"],
    "--devices": DEVICES,
}


def command_train(rng: random.Random) -> Case:
    table = dict(SETTINGS)
    if rng.random() < 0.03:
        table["--backend"] = ["triton"]  # netdsl's own training kernels under the interpreter: seconds, so rarely
    argv = ["train"]
    resume = rng.random() < 0.2
    if resume:
        argv += ["--resume", choose(rng, ["run"] * 5 + ["missing", "", "images", "build", "run/checkpoints"])]
        if rng.random() < 0.3:
            argv.append(choose(rng, NETS))
    else:
        argv.append(choose(rng, NETS))
        if rng.random() < 0.85:
            argv += ["--data", choose(rng, DATA)]
        argv += ["--out", choose(rng, ["new"] * 6 + ["run", "", "tiny.net", "images/cat", "\udcff", "a/b/c"])]
    argv += flags(rng, table, rng.randrange(6))
    if rng.random() < 0.05:
        argv.append("--check-grads")  # compares gradients, writes nothing
    elif rng.random() < 0.03:
        argv += ["--find-lr", pick(rng, ["5", "12"], ["4", "0", "x", ""])]  # sweeps the rate, writes nothing
    outs = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--out"]
    out = "run" if resume else (outs[-1] if outs else None)
    out = None if "--check-grads" in argv or "--find-lr" in argv else out
    return Case(argv, outputs=[out] if out in ("new", "run") else [])


def command_eval(rng: random.Random) -> Case:
    table = {
        "--split": ["val", "train", "all", "test", ""],
        "--views": ["1", "10", "2", "x"],
        "--scales": ["8", "8,10", "6,8,12", "8,8", "0,8", "x", "", "8,", "99999", "65536"],
        "--batch": lambda r: pick(r, ["1", "5", "64"], WHOLE_BAD),
        "--val-fraction": lambda r: pick(r, ["0.25", "0.5"], [*NUMBER_BAD, "1", "0"]),
        "--seed": ["0", "5", "-1", "4294967296"],
        "--workers": ["0", "-1", "x", "-5"],
        "--skip-corrupt": None,
        "--no-skip-corrupt": None,
        "--backend": ["torch"] * 8 + ["triton", "jax"],
        "--devices": DEVICES,
        "--confusion": ["c.png", "images", "", "sub/c.png", "tiny.net"],
        "--dense": None,
        "--dtype": ["fp32", "bf16", "fp16", "tf32", ""],
        "--save": ["m.npz"] * 3 + ["m.npy", "images", "", "data.npz", "sub/m.npz", "tiny.net"],
        "--mistakes": lambda r: pick(r, ["1", "5"], WHOLE_BAD),
        "--timeout": lambda r: pick(r, ["300", "0.5"], [*NUMBER_BAD, "604801", "1e9"]),
    }
    argv = ["eval", choose(rng, NETS + ONNX)]
    if rng.random() < 0.9:
        argv += ["--weights", *(choose(rng, WEIGHTS) for _ in range(1 if rng.random() < 0.8 else 2))]  # an ensemble
    if rng.random() < 0.9:
        argv += ["--data", choose(rng, DATA)]
    return Case(argv + flags(rng, table, rng.randrange(5)))


def command_tune(rng: random.Random) -> Case:
    table = {
        **net_flags(rng),
        **PLAN,
        "--device": ["cpu", "cuda:0", "tpu", "", "cpu:0", "cuda:-1", "\udcff"],
        "--runs": lambda r: pick(r, ["1"], WHOLE_BAD),
        "-o": ["t.json", "tuning.json", "tiny.net", "images", "", "sub/t.json", "data.npz", "build/plan.json"],
    }
    argv = ["tune", choose(rng, NETS), *flags(rng, table, rng.randrange(5))]
    if rng.random() < 0.7:  # the whole net under the interpreter takes seconds: mostly steps that match nothing
        argv += ["--steps", rng.choice(["nothing*", ",", "[", "\udcff", "c1*x"])]  # "": every step
    else:
        argv += ["--steps", "out*", "--runs", "1", "--device", "cpu"]
    return Case(argv)


def command_filters(rng: random.Random) -> Case:
    table = {
        "--weights": WEIGHTS,
        "--layer": ["c1", "out", "c1x", "", "image", "\udcff"],
        "--columns": lambda r: pick(r, ["1", "4"], WHOLE_BAD),
        "--zoom": lambda r: pick(r, ["1", "3"], [*WHOLE_BAD, "10" + "0" * 6]),
        "-o": ["f.png"] * 3 + ["f.jpg", "images", "", "sub/f.png", "photo.png", "tiny.net"],
    }
    argv = ["filters", choose(rng, NETS + ONNX), *flags(rng, table, rng.randrange(5))]
    written = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-o"]
    return Case(argv, outputs=[written[-1]] if written and written[-1] == "f.png" else [])


def command_neighbours(rng: random.Random) -> Case:
    table = {
        "--input": ["photo.png"] * 4 + INPUTS,
        "--queries": lambda r: pick(r, ["1", "3"], WHOLE_BAD),
        "--layer": ["c1", "out", "c1.relu", "c1x", "", "image", "\udcff"],
        "-k": lambda r: pick(r, ["1", "4", "1000"], WHOLE_BAD),
        "-o": ["n.png"] * 3 + ["n.jpg", "images", "", "sub/n.png", "photo.png", "tiny.net"],
        "--batch": lambda r: pick(r, ["1", "64"], WHOLE_BAD),
        "--backend": ["torch"] * 8 + ["triton", "jax"],
        "--devices": DEVICES,
        "--val-fraction": lambda r: pick(r, ["0.25", "0", "0.5"], [*NUMBER_BAD, "1"]),
        "--seed": ["0", "5", "-1"],
        "--workers": ["0", "-1", "x"],
        "--skip-corrupt": None,
    }
    argv = ["neighbours", choose(rng, NETS + ONNX)]
    if rng.random() < 0.9:
        argv += ["--weights", choose(rng, WEIGHTS)]
    if rng.random() < 0.9:
        argv += ["--data", choose(rng, DATA)]
    argv += flags(rng, table, rng.randrange(5))
    written = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-o"]
    return Case(argv, outputs=[written[-1]] if written and written[-1] == "n.png" else [])


def command_runs(rng: random.Random) -> Case:
    folders = ["run"] * 3 + [".", "run/checkpoints", "images", "missing", "", "tiny.net", "run/recipe.json", "new"]
    table = {
        "--sort": ["best", "name", "worst", ""],
        "-o": ["r.png"] * 3 + ["r.jpg", "images", "", "sub/r.png", "photo.png", "run/recipe.json"],
    }
    argv = ["runs", *rng.choices(folders, k=rng.randrange(3)), *flags(rng, table, rng.randrange(3))]
    written = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-o"]
    return Case(argv, outputs=[written[-1]] if written and written[-1] == "r.png" else [])


def command_fmt(rng: random.Random) -> Case:
    files = rng.choices(["tiny.net", "recipe.net", "missing.net", "images", "data.npz", "photo.png", "run", ""], k=2)
    return Case(["fmt", *files[: rng.randint(1, 2)], *rng.sample(["--check", "--diff", "--check"], rng.randint(0, 2))])


def command_top(rng: random.Random) -> Case:
    """No command, an unknown one, global flags in odd places."""
    return Case(
        rng.choice(
            [
                [],
                ["--version"],
                ["nope"],
                ["--color", "never", "check", "tiny.net"],
                ["--color", "sometimes", "check"],
                ["check", "tiny.net", "--color=always"],
                ["--", "check"],
                ["check", "tiny.net", "extra"],
                ["check", "tiny.net", "--bogus"],
                ["train", "tiny.net", "--data", "data.npz", "--out", "new", "--learning_rate", "1"],
                ["run", "--input"],
                ["run", "--input", "one.npy", "--random", "2"],
                ["\udcff"],
                ["check", "-"],
            ]
        )
    )


COMMANDS = [
    (command_check, 10), (command_graph, 5), (command_compile, 10), (command_export, 4), (command_import, 3),
    (command_run, 22), (command_train, 26), (command_eval, 10), (command_tune, 3), (command_fmt, 3),
    (command_filters, 4), (command_neighbours, 5), (command_runs, 3), (command_top, 4),
]  # fmt: skip


def random_command(rng: random.Random) -> Case:
    BAD[0] = rng.choice([0.03, 0.1, 0.4])
    makers, weights = zip(*COMMANDS, strict=True)
    maker = rng.choices(makers, weights=weights)[0]
    if maker in (command_export, command_import) and not ONNX:
        maker = command_check
    return maker(rng)


def run_cases(world: Path, tmp_path: Path, kind: str, count: int, draw) -> Counter:
    """Runs `count` cases drawn by `draw(rng)`, each from its own seeded generator; (command, status) -> count."""
    tally: Counter = Counter()
    for number in range(count):
        case = draw(random.Random(f"{SEED}:{kind}:{number}"))
        case.what = f"{kind} case {number} (NETDSL_FUZZ_SEED={SEED})"
        run_case(world, tmp_path, case, tally)
    print(sorted(tally.items()))
    return tally


def test_random_command_lines(world, tmp_path):
    tally = run_cases(world, tmp_path, "command", COMMAND_CASES, random_command)
    assert sum(count for (_, status), count in tally.items() if status == 0) >= COMMAND_CASES // 10


# --- (b) mutated files -----------------------------------------------------------------------------------

RUN_CODE = f"__import__('pathlib').Path('{CANARY}').touch()"
HOSTILE = [None, True, False, 0, 1, -1, 2**63, 10**30, -(10**30), 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5]
HOSTILE += ["", "x", "\u00e9\udcff", "../../tiny.net", "/", "a" * 5000, RUN_CODE, [], {}, [1, 2], {"a": 1}, [[[[]]]]]
HOSTILE += ["fp32", "F32", "nan", "1", [3, 8, 8], [-1], [0], [2**40, 2**40]]


class Canary:
    """A pickle that would create the canary file when loaded."""

    def __reduce__(self):
        return (Path.touch, (Path(CANARY),))


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    how = rng.randrange(8)
    if how == 0 or not data:
        return bytes(data[: rng.randrange(len(data) + 1)])  # truncated (perhaps to nothing)
    if how == 1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if how == 2:
        at = rng.randrange(len(data) + 1)
        return bytes(data[:at]) + rng.randbytes(rng.randint(1, 64)) + bytes(data[at:])
    if how == 3:
        at = rng.randrange(len(data))
        return bytes(data[:at]) + bytes(data[at + rng.randint(1, 64) :])
    if how == 4:
        return b""
    if how == 5:
        return b"\xff\xfe\x00\xc3(" + rng.randbytes(rng.randint(0, 40))  # not UTF-8, not anything
    if how == 6:
        at = rng.randrange(len(data))
        return bytes(data) + bytes(data[at : at + rng.randint(1, 256)])
    for _ in range(rng.randint(1, 4)):  # one bit
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def json_paths(value, path=()) -> list[tuple]:
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += json_paths(item, (*path, index))
    return paths


def mutate_json(rng: random.Random, value):
    """`value` (parsed JSON) with one field set to a hostile value, deleted, or given a neighbour; JSON held in
    a string (the records inside a safetensors header) is mutated as JSON."""
    path = rng.choice(json_paths(value))
    if not path:
        return rng.choice(HOSTILE)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    how = rng.random()
    if isinstance(old, str) and old[:1] in "{[" and how < 0.6:
        with contextlib.suppress(ValueError):
            parent[key] = json.dumps(mutate_json(rng, json.loads(old)))
            return value
    if how < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif how < 0.2 and isinstance(parent, list):
        parent.insert(key, rng.choice(HOSTILE))
    elif how < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["extra", "\u00e9", "__metadata__", ""])] = rng.choice(HOSTILE)
    elif how < 0.32 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([-old, old * 1000, old + 1, old - 1, 0, 2**64, float(old), str(old)])
    else:
        parent[key] = rng.choice(HOSTILE)
    return value


def dumps(value) -> bytes:
    return json.dumps(value, indent=rng_indent(value)).encode("utf-8", "surrogatepass")


def rng_indent(value) -> int | None:
    return 2 if isinstance(value, dict) else None


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    header, body = split_safetensors(data)
    how = rng.random()
    tensors = [name for name in header if name != "__metadata__"]
    length = None
    if how < 0.3:
        header = mutate_json(rng, header)
    elif how < 0.45 and tensors:
        entry = header[rng.choice(tensors)]
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "x"])
    elif how < 0.6 and tensors:
        entry = header[rng.choice(tensors)]
        shape = entry["shape"]
        entry["shape"] = rng.choice([[], [0], [2**40], [-1], shape[::-1], [*shape, 1], shape[1:], [1, *shape]])
    elif how < 0.7 and tensors:
        entry = header[rng.choice(tensors)]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [0, 4], [begin, 2**62], [-4, end]])
    elif how < 0.8 and tensors:  # a NaN or an infinity in a float32 tensor
        name = rng.choice([name for name in tensors if header[name]["dtype"] == "F32"] or tensors)
        begin, end = header[name]["data_offsets"]
        if end - begin >= 4:
            at = begin + 4 * rng.randrange((end - begin) // 4)
            value = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf, 3e38]))
            body = body[:at] + value + body[at + 4 :]
    elif how < 0.88:
        length = rng.choice([0, 1, 2**63 - 1, 2**40, len(data) + 1])
    else:
        return mutate_bytes(rng, data)
    text = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def npy_bytes(header: dict, body: bytes) -> bytes:
    text = repr(header).encode("latin1")
    text += b" " * ((64 - (len(text) + 11) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body


def mutate_npy(rng: random.Random, data: bytes) -> bytes:
    how = rng.random()
    if how < 0.15:
        buffer = io.BytesIO()
        np.save(buffer, np.array([Canary(), 1], dtype=object), allow_pickle=True)
        return buffer.getvalue()
    if how < 0.6:
        array = np.load(io.BytesIO(data))
        descr = rng.choice(["<f4", "<f8", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "|S4", "<f2", ">f4", "<m8", "|V4"])
        shape = rng.choice(
            [(), (3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8), (0, 3, 8, 8), (3, 8), (10**12, 3, 8, 8), (3, 8, 9), (4, 8, 8)]
        )
        header = {"descr": descr, "fortran_order": rng.random() < 0.2, "shape": shape}
        return npy_bytes(header, array.tobytes())
    if how < 0.8:
        array = np.load(io.BytesIO(data))
        array = array.astype(rng.choice([np.float64, np.float16, np.int64, np.uint8, bool, np.complex64]))
        with contextlib.suppress(ValueError, OverflowError), np.errstate(all="ignore"):  # NaN into an int: no
            array.flat[rng.randrange(array.size)] = rng.choice([np.nan, np.inf, 1e30, -1])
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()
    return mutate_bytes(rng, data)


def mutate_npz(rng: random.Random, path: Path) -> None:
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf, on purpose
        _mutate_arrays(rng, arrays, path)


def _mutate_arrays(rng: random.Random, arrays: dict, path: Path) -> None:
    how = rng.random()
    key = rng.choice(["x", "y", "x_val", "y_val", "classes"])
    x, y = arrays["x"], arrays["y"]
    if how < 0.1:
        arrays.pop(key, None)
    elif how < 0.35:
        arrays[key] = rng.choice(
            [
                x.astype(np.float64) * np.float64(rng.choice([1.0, np.nan, np.inf, 1e300])),
                x[:0], x[:1], x[..., :4], x.transpose(0, 2, 3, 1), x[:, :1], x[:, 0], np.concatenate([x, x[:, :1]], 1),
                x[None], x.astype(bool), x.astype(np.complex64), x.astype("<U3"), np.float32(1.0), x[:, :, :1, :1],
            ]
        )  # fmt: skip
    elif how < 0.6:
        arrays[key] = rng.choice(
            [
                y + 3, y - 1, y.astype(np.float64) + 0.5, y[:5], y.reshape(3, 4), y.astype(bool), y * 10**12,
                np.array(["a"] * len(y)), y[:0], np.full_like(y, 2**62), y.astype(np.float32) * np.nan,
            ]
        )  # fmt: skip
    elif how < 0.75:
        arrays["classes"] = rng.choice(
            [np.array(["a", "b"]), np.array(list(CLASSES)), np.array([1, 2, 3]), np.array(["", "", ""]), np.array([])]
        )
    elif how < 0.85:
        arrays["x_val"], arrays["y_val"] = rng.choice(
            [(x[:3], y[:3]), (x[:3], y[:2]), (x[:0], y[:0]), (x[:3], y[:3] + 5)]
        )
    elif how < 0.92:
        arrays[key] = np.array([Canary()], dtype=object)
    else:
        path.write_bytes(mutate_bytes(rng, path.read_bytes()))
        return
    with zipfile.ZipFile(path, "w") as archive:  # as np.savez writes, objects pickled
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=True)


def huge_png(path: Path) -> None:
    """A PNG whose header claims 100000 x 100000 pixels (a decompression bomb), its checksum right."""
    import zlib

    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 100000, 100000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def mutate_image(rng: random.Random, path: Path) -> None:
    from PIL import Image

    how = rng.random()
    if how < 0.35:
        path.write_bytes(mutate_bytes(rng, path.read_bytes()))
    elif how < 0.45:
        huge_png(path)
    elif how < 0.8:
        image = Image.open(path)
        mode = rng.choice(["L", "LA", "RGBA", "P", "I", "F", "1", "I;16", "CMYK", "YCbCr"])
        size = rng.choice([image.size, (1, 1), (1, 300), (300, 1), (2, 2)])
        converted = image.resize(size).convert(mode if mode != "I;16" else "I")
        if mode == "I;16":
            converted = Image.fromarray(np.asarray(converted, dtype=np.uint16))
        if mode in ("CMYK", "YCbCr"):
            converted.save(path, format="JPEG")
        elif mode in ("F", "I"):  # Pillow writes these as TIFF only; the name keeps its .png
            converted.save(path, format="TIFF")
        else:  # sometimes with an EXIF orientation (in range or not), or a palette's transparency
            exif = converted.getexif()
            exif[0x0112] = rng.choice([0, 1, 3, 6, 8, 9, 65535])
            extra = {"exif": exif.tobytes()} if rng.random() < 0.4 else {}
            if mode == "P" and rng.random() < 0.5:
                extra["transparency"] = bytes(rng.choice([0, 255]) for _ in range(256))
            converted.save(path, format="PNG", **extra)
    else:
        frames = [Image.open(path).convert("RGB"), Image.new("RGB", (5, 5))]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])


def mutate_folder(rng: random.Random, folder: Path) -> None:
    """One change to a folder: a file deleted, emptied, swapped for a folder, its parts mutated; a stray file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    how = rng.random()
    if how < 0.25 and files:
        rng.choice(files).unlink()
    elif how < 0.4 and files:
        victim = rng.choice(files)
        victim.unlink()
        victim.mkdir()
    elif how < 0.5 and files:
        rng.choice(files).write_bytes(b"")
    elif how < 0.6:
        (folder / rng.choice(["notes.txt", ".hidden", "x.png", "\u00e9.jpg"])).write_bytes(rng.randbytes(20))
    elif how < 0.7:
        subs = sorted(p for p in folder.rglob("*") if p.is_dir())
        if subs:
            shutil.rmtree(rng.choice(subs))
    elif how < 0.8:
        subs = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
        with contextlib.suppress(OSError):
            (rng.choice(subs) / "loop").symlink_to("..", target_is_directory=True)
    elif files:
        mutate_file(rng, rng.choice(files))


def mutate_file(rng: random.Random, path: Path) -> None:
    """A mutation fit for the file's kind (structured where the kind has a structure, else its bytes)."""
    suffix = path.suffix.lower()
    data = path.read_bytes()
    if rng.random() < 0.2:
        path.write_bytes(mutate_bytes(rng, data))
    elif suffix in (".safetensors", ".ckpt"):
        path.write_bytes(mutate_safetensors(rng, data))
    elif suffix == ".json":
        path.write_bytes(json.dumps(mutate_json(rng, json.loads(data)), indent=2).encode("utf-8", "surrogatepass"))
    elif suffix == ".jsonl":
        lines = data.decode().splitlines()
        at = rng.randrange(len(lines))
        lines[at] = json.dumps(mutate_json(rng, json.loads(lines[at])))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    elif suffix == ".npy":
        path.write_bytes(mutate_npy(rng, data))
    elif suffix == ".npz":
        mutate_npz(rng, path)
    elif suffix in (".png", ".jpg"):
        mutate_image(rng, path)
    elif suffix in (".net", ".txt", ".py"):
        path.write_bytes(mutate_text(rng, data.decode("utf-8")))
    else:
        path.write_bytes(mutate_bytes(rng, data))


SETTING_NAMES = [flag[2:].replace("-", "_") for flag in SETTINGS if not flag.startswith("--no-")]
SETTING_VALUES = ["0", "-1", "1e400", "10**400", "(1, 2)", '"x"', "true", "none", "auto", "()", "sgd", "2**64"]
SETTING_VALUES += ["-(2**63)", "1/3", "0.5", "1", '""', '"data.npz"', '"images"', "(8, 8)", "(0, 0, 0)", "99999999"]
# valid values that train for as long as they say (the world's net takes `steps = 1`; `none` leaves 90 epochs):
# not drawn for the run's length, as LONG is not for its flags
ENDLESS = {"steps": {"99999999", "none"}, "epochs": {"99999999"}}


def mutate_text(rng: random.Random, text: str) -> bytes:
    how = rng.random()
    if how < 0.5:  # a training setting with a hostile value, in a block of its own
        name = rng.choice(SETTING_NAMES)
        pattern = ' "*.bias"' if name in ("lr_mult", "decay_mult") else ""
        value = rng.choice([value for value in SETTING_VALUES if value not in ENDLESS.get(name, ())])
        text += f"\ntrain {{ {name}{pattern} = {value} }}\n"
        return text.encode("utf-8")
    if how < 0.6:
        return text.encode("utf-8") + b"\n# \xff\xfe not UTF-8\n"
    if how < 0.7:
        return text.replace("\n", "\r\n").encode("utf-8")
    if how < 0.8:
        return ("\ufeff" + text + "\x00").encode("utf-8")
    lines = text.split("\n")
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines).encode("utf-8")


def swap_for_folder(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()


# kind -> (the path to mutate, the commands that read it; "{}" stands for the path)
READERS = {
    "weights": ("weights.safetensors", [
        ["run", "tiny.net", "--backend", "torch", "--weights", "{}"],
        ["run", "tiny.net", "--backend", "torch", "--weights", "{}", "--input", "photo.png", "--views", "10"],
        ["eval", "tiny.net", "--weights", "{}", "--data", "data.npz"],
        ["eval", "tiny.net", "--weights", "{}", "--data", "images", "--split", "all"],
        ["export", "tiny.net", "-o", "out.onnx", "--weights", "{}"],
    ]),
    "checkpoint": ("run/checkpoints/last.ckpt", [
        ["train", "--resume", "run", "--steps", "2"],
        ["train", "--resume", "run", "--steps", "2"],
        ["run", "tiny.net", "--backend", "torch", "--weights", "{}"],
        ["eval", "tiny.net", "--weights", "{}", "--data", "data.npz"],
    ]),
    "run": ("run", [
        ["train", "--resume", "{}", "--steps", "2"],
        ["train", "--resume", "{}", "--steps", "2", "--lr", "0.5"],
        ["train", "tiny.net", "--resume", "{}", "--steps", "3"],
        ["eval", "tiny.net", "--weights", "{}", "--data", "data.npz"],
        ["run", "tiny.net", "--backend", "torch", "--weights", "{}"],
        ["runs", "{}", "-o", "r.png"],
    ]),
    "run recipe": ("run/recipe.json", [["train", "--resume", "run", "--steps", "2"],
                                       ["eval", "tiny.net", "--weights", "run", "--data", "data.npz"],
                                       ["runs", "."]]),
    "run metrics": ("run/metrics.jsonl", [["train", "--resume", "run", "--steps", "4", "--batch", "3"],
                                          ["runs", "run", "-o", "r.png"]]),
    "recipe": ("recipe.net", [["train", "tiny.net", "--recipe", "{}", "--data", "data.npz", "--out", "new"]]),
    "net": ("tiny.net", [
        ["train", "{}", "--data", "data.npz", "--out", "new"],
        ["run", "{}", "--backend", "torch"],
        ["compile", "{}", "-o", "out", "--no-sm90"],
        ["eval", "{}", "--weights", "run", "--data", "data.npz"],
    ]),
    "tuning": ("tuning.json", [
        ["compile", "tiny.net", "--tuning", "{}", "-o", "out", "--no-sm90"],
        ["compile", "tiny.net", "--tuning", "{}", "-o", "out", "--no-sm90"],
        ["run", "tiny.net", "--backend", "torch", "--tuning", "{}"],
        ["run", "build", "--backend", "torch", "--tuning", "{}"],
    ]),
    "build": ("build", [
        ["run", "{}", "--backend", "torch"],
        ["run", "{}", "--backend", "torch", "--dtype", "fp32", "--save", "out.npy"],
        ["compile", "tiny.net", "-o", "{}", "--no-sm90"],
    ]),
    "plan": ("build/plan.json", [["run", "build", "--backend", "torch"], ["run", "build", "--backend", "torch"]]),
    "kernel": ("build/kernels/c1_gpu0_conv_bias_relu.py", [["run", "build", "--backend", "triton"]]),
    "data": ("data.npz", [
        ["train", "tiny.net", "--data", "{}", "--out", "new"],
        ["train", "tiny.net", "--data", "{}", "--out", "new", "--std", "auto", "--val-fraction", "0"],
        ["eval", "tiny.net", "--weights", "run", "--data", "{}", "--split", "all"],
    ]),
    "images": ("images", [
        ["train", "tiny.net", "--data", "{}", "--out", "new"],
        ["train", "tiny.net", "--data", "{}", "--out", "new", "--skip-corrupt"],
        ["eval", "tiny.net", "--weights", "run", "--data", "{}", "--split", "all"],
    ]),
    "list": ("list.txt", [
        ["train", "tiny.net", "--data", "{}", "--out", "new"],
        ["eval", "tiny.net", "--weights", "run", "--data", "{}", "--split", "all"],
        ["run", "tiny.net", "--backend", "torch", "--input", "{}", "--batch", "3"],
    ]),
    "image": ("photo.png", [
        ["run", "tiny.net", "--backend", "torch", "--input", "{}"],
        ["run", "tiny.net", "--backend", "torch", "--weights", "run", "--input", "{}", "--views", "10"],
        ["run", "tiny.net", "--backend", "torch", "--input", "{}", "one.npy"],
    ]),
    "npy": ("one.npy", [
        ["run", "tiny.net", "--backend", "torch", "--input", "{}"],
        ["run", "tiny.net", "--backend", "torch", "--input", "batch.npy", "{}", "--batch", "2"],
    ]),
    "labels": ("labels.txt", [["run", "tiny.net", "--backend", "torch", "--labels", "{}", "--top", "3"]]),
    "onnx": ("model.onnx", [
        ["import", "{}", "-o", "m.net"],
        ["check", "{}"],
        ["run", "{}", "--backend", "torch"],
        ["compile", "{}", "-o", "out", "--no-sm90"],
    ]),
}  # fmt: skip
OUTPUTS = {"train": "new", "compile": "out", "export": "out.onnx", "import": "m.net", "runs": "r.png"}


def random_file_case(rng: random.Random) -> Case:
    kinds = [kind for kind in READERS if kind != "onnx" or ONNX]
    kind = rng.choice(kinds)
    target, readers = READERS[kind]
    argv = [target if item == "{}" else item for item in rng.choice(readers)]
    seed = rng.random()

    def prepare(folder: Path) -> None:
        local = random.Random(seed)
        path = folder / target
        if local.random() < 0.08:
            swap_for_folder(path)
        elif path.is_dir():
            mutate_folder(local, path)
        else:
            mutate_file(local, path)

    out = OUTPUTS.get(argv[0])
    if argv[0] == "train" and "--resume" in argv:
        out = "run"
    if "--save" in argv:
        out = argv[argv.index("--save") + 1]
    return Case(argv, prepare=[prepare], outputs=[out] if (out and out in argv) or out == "run" else [])


def test_mutated_files(world, tmp_path):
    tally = run_cases(world, tmp_path, "file", FILE_CASES, random_file_case)
    assert sum(count for (_, status), count in tally.items() if status == 1) >= FILE_CASES // 10


# --- defects the fuzzer found, each a named case ---------------------------------------------------------


def in_world(world: Path, tmp_path: Path, argv: list[str], prepare=None) -> Result:
    """One command in a fresh copy of the world, checked as every fuzz case is; its result."""
    return run_case(world, tmp_path, Case(argv, prepare=[prepare] if prepare else []), Counter())


def error_of(result: Result) -> str:
    assert result.status == 1, result.out + result.err
    return ANSI.sub("", result.err)


def test_a_flag_number_beyond_floating_point_is_an_error_of_the_flag(world, tmp_path):
    """`--weight-decay 1000...0` (401 digits) overflowed converting to float: an internal error."""
    for flag in (["--weight-decay", "1" + "0" * 400], ["--betas", "1" + "0" * 400 + ",0.5"]):
        result = in_world(world, tmp_path, ["train", "tiny.net", "--data", "data.npz", "--out", "new", *flag])
        assert f"{flag[0]}: error:" in error_of(result) and "beyond floating point's range" in result.err


def test_a_json_string_that_is_half_a_character_is_an_error_of_its_file(world, tmp_path):
    """A tuning file whose `device` was `"\\u00e9\\udcff"` (a lone surrogate: json reads it, nothing can write it)
    compiled, then failed writing report.txt: an internal UnicodeEncodeError (the campaign of seed 949, file case
    265). Every JSON netdsl reads refuses such a string (`parse_json`), naming the file."""
    import json

    from netdsl.files import parse_json

    def prepare(folder: Path) -> None:
        record = json.loads((folder / "tuning.json").read_text())
        record["device"] = "\u00e9\udcff"
        (folder / "tuning.json").write_text(json.dumps(record))  # ensure_ascii: the escapes as written

    result = in_world(world, tmp_path, ["compile", "tiny.net", "--tuning", "tuning.json", "-o", "out"], prepare)
    assert "tuning.json: error: cannot read the tuning file" in error_of(result) and "half of a UTF-16" in result.err
    with pytest.raises(ValueError, match="half of a UTF-16 pair"):
        parse_json('{"a": [1, {"\\ud800x": 2}]}')  # a key, nested
    assert parse_json('["\\ud83d\\ude00", "\\u00e9"]') == ["\U0001f600", "\u00e9"]  # a whole pair is one character


def test_a_name_longer_than_the_file_system_takes_is_an_error_naming_it(world, tmp_path):
    """A build folder whose plan.json named its net by a 5,000-character path: `run build` was an internal
    OSError (File name too long), raised by pathlib's is_file (the campaign of seed 956, file case 2472). So was
    any path of a name past 255 bytes, given on the command line (a net, an input, weights, data, a run folder
    to write or resume, a folder to compile into): each is now an error naming the path."""
    import json

    long = "a" * 300

    def prepare(folder: Path) -> None:
        record = json.loads((folder / "build" / "plan.json").read_text())
        record["source"] = "a" * 5000
        (folder / "build" / "plan.json").write_text(json.dumps(record))

    result = in_world(world, tmp_path, ["run", "build", "--backend", "torch"], prepare)
    assert "is longer than the file system takes" in error_of(result) and "hint: choose a shorter name" in result.err
    for argv in (
        ["run", long],
        ["run", "tiny.net", "--backend", "torch", "--input", long],
        ["run", "tiny.net", "--backend", "torch", "--weights", long],
        ["train", "tiny.net", "--data", long, "--out", "new"],
        ["train", "tiny.net", "--data", "data.npz", "--steps", "1", "--out", f"new/{long}"],
        ["train", "--resume", long],
        ["eval", "tiny.net", "--weights", "run", "--data", long],
        ["compile", "tiny.net", "-o", f"out/{long}", "--no-sm90"],
        ["neighbours", "tiny.net", "--weights", "run", "--data", "data.npz", "--input", long],
    ):
        assert "hint: choose a shorter name" in error_of(in_world(world, tmp_path, argv)), argv


@pytest.mark.parametrize(
    "error, status, message",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/x.png"), 1, "/data/x.png: error: cannot use the "
         "path /data/x.png: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device", "runs/a"), 1, "runs/a: error: cannot use the path runs/a"),
        (OSError(errno.EROFS, "Read-only file system"), 1, "netdsl: error: cannot use a path: Read-only file system"),
        (OSError(errno.EIO, "Input/output error", "x"), 2, "internal error: OSError"),
    ],
    ids=["permission", "disk-full", "read-only-no-name", "other"],
)
def test_what_the_system_says_of_a_path_is_a_users_error_wherever_it_surfaces(monkeypatch, capsys, error, status,
                                                                             message):  # fmt: skip
    """No permission, a full or read-only disk, a name too long: the user's path or machine, never a bug, even
    where no command foresaw it (exit 1, the path named, a hint); any other OSError stays an internal error."""
    from netdsl.cli import main as cli

    def fail(argv):
        raise error

    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(["check", "x.net"]) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert status == 2 or "hint: " in err


def test_an_output_file_flag_naming_a_folder_is_an_error_before_any_work(world, tmp_path):
    """`export -o ''` and `import -o .` raised ValueError (Path('.').with_suffix); `run --save .` and
    `eval --confusion .` ran the whole command and then failed to write ("Device or resource busy")."""
    cases = [
        (["export", "tiny.net", "-o", ""], "--output"),
        (["export", "tiny.net", "-o", ".."], "--output"),
        (["import", "model.onnx", "-o", "."], "--output"),
        (["import", "model.onnx", "-o", "m.net", "--weights-out", "images"], "--weights-out"),
        (["run", "tiny.net", "--backend", "torch", "--save", "."], "--save"),
        (["eval", "tiny.net", "--weights", "run", "--data", "data.npz", "--confusion", ""], "--confusion"),
    ]
    for argv, flag in cases:
        if "onnx" in " ".join(argv) and not ONNX:
            continue
        result = in_world(world, tmp_path, argv)
        assert f"{flag}: error:" in error_of(result) and "is a folder, not a file to write" in result.err, argv
        assert "top" not in result.out and "images" not in result.out  # refused before running or measuring


@pytest.mark.skipif(not ONNX, reason="needs onnx")
def test_an_undecodable_file_name_is_printed_escaped(world, tmp_path):
    """A name of bytes that are not UTF-8 (lone surrogates in Python) made `print` fail on a strict UTF-8 stdout
    (a UTF-8 locale's) after the files were written: an internal error."""
    result = in_world(world, tmp_path, ["import", "model.onnx", "-o", "\udcff.net"])
    assert result.status == 0, result.err
    assert "wrote \\udcff.net and \\udcff.safetensors" in result.out


def test_a_folder_for_metrics_jsonl_is_an_error_naming_it(world, tmp_path):
    """`train --resume` over a run folder whose metrics.jsonl is a folder failed with IsADirectoryError."""
    result = in_world(world, tmp_path, ["train", "--resume", "run", "--steps", "2"],
                      lambda folder: swap_for_folder(folder / "run" / "metrics.jsonl"))  # fmt: skip
    assert "run/metrics.jsonl: error:" in error_of(result) and "is a folder" in result.err


def test_metrics_lines_that_are_not_utf8_are_skipped(world, tmp_path):
    """Bytes that are not UTF-8 in metrics.jsonl made `train --resume` fail with UnicodeDecodeError."""

    def spoil(folder: Path) -> None:
        with open(folder / "run" / "metrics.jsonl", "ab") as file:
            file.write(b'\xff\xfe{"step": 1}\n')

    result = in_world(world, tmp_path, ["train", "--resume", "run", "--steps", "2"], spoil)
    assert result.status == 0, result.err


def test_npz_images_with_nan_or_beyond_float32_stop_the_first_step_naming_the_input(world, tmp_path):
    """x of float64 with 1e300 (an infinity in float32) or NaN failed in the PCA of the training colours
    (LinAlgError "Eigenvalues did not converge"); as documented, the first step now stops, naming the input."""
    for value in (1e300, np.nan, -np.inf):

        def spoil(folder: Path, value=value) -> None:
            with np.load(folder / "data.npz") as data:
                x, y = data["x"].astype(np.float64), data["y"]
            x[5, 1, 2, 3] = value
            np.savez(folder / "data.npz", x=x, y=y)

        result = in_world(world, tmp_path, ["train", "tiny.net", "--data", "data.npz", "--out", "new"], spoil)
        assert "step 1 (epoch 1)" in error_of(result) and "in the net's input `image`" in result.err


def test_memory_sizes_beyond_a_float_or_below_a_byte_are_errors_of_the_flag(world, tmp_path):
    """`--memory-limit 1000...0` (401 digits) raised OverflowError (int of an infinite float); `0.0000001 B`
    became 0 bytes, refused with `memory_limit` (no flag) to blame."""
    for size in ("1" + "0" * 400, "0.0000001 B"):
        result = in_world(world, tmp_path, ["check", "tiny.net", "--memory-limit", size])
        assert "argument --memory-limit: not a memory size" in error_of(result)


def npy_header_numpy_cannot_tokenize(folder: Path) -> bytes:
    body = np.zeros((3, 8, 8), np.float32).tobytes()
    return npy_bytes({"descr": "<f4"}, body).replace(b"{'descr': '<f4'}", b"{'descr': '<f4', (3, ")


def test_an_npy_header_numpy_cannot_tokenize_is_an_error_naming_the_file(world, tmp_path):
    """numpy reads a header it cannot parse again through `tokenize`, whose TokenError ("EOF in multi-line
    statement") escaped `run --input` and the .npz reader as an internal error."""

    def spoil(folder: Path) -> None:
        data = npy_header_numpy_cannot_tokenize(folder)
        (folder / "one.npy").write_bytes(data)
        with zipfile.ZipFile(folder / "data.npz", "w") as archive:
            archive.writestr("x.npy", data)
            archive.writestr("y.npy", data)

    result = in_world(world, tmp_path, ["run", "tiny.net", "--backend", "torch", "--input", "one.npy"], spoil)
    assert "one.npy: error: one.npy is not a readable .npy array" in error_of(result)
    result = in_world(world, tmp_path, ["train", "tiny.net", "--data", "data.npz", "--out", "new"], spoil)
    assert "data.npz: error: cannot read data.npz as an .npz file" in error_of(result)


# Found by the fuzzer outside the CLI's own files (the build writer, the kernel loader, the ONNX export).


def test_a_build_whose_report_is_a_folder_leaves_no_temporary(world, tmp_path):
    """`compile -o build` over a build whose report.txt is a folder: an error, and no `build/.report.txt.<hex>`
    left behind (write_build dropped a temporary from its list before its os.replace, which failed)."""
    shutil.copytree(world, tmp_path / "case")
    with contextlib.chdir(tmp_path / "case"):
        swap_for_folder(Path("build/report.txt"))
        assert error_of(invoke(["compile", "tiny.net", "-o", "build", "--no-sm90"]))
        assert not [path for path in Path("build").glob(".*") if TEMPORARY.match(path.name)]


def test_a_build_folder_named_by_undecodable_bytes(world, tmp_path):
    """`compile -o $'\\xff'` builds (load_kernel_file hashed the path as strict UTF-8: UnicodeEncodeError)."""
    assert in_world(world, tmp_path, ["compile", "tiny.net", "-o", "\udcff", "--no-sm90"]).status == 0


@pytest.mark.skipif(not ONNX, reason="needs onnx")
def test_an_onnx_export_named_by_undecodable_bytes_is_an_error(world, tmp_path):
    """`export -o $'\\xff'.onnx`: refused before any work, naming the file (onnx.checker raised TypeError on the
    path, a str that is not UTF-8, after the model was written)."""
    assert "error: the model's file name is not UTF-8 text" in error_of(
        in_world(world, tmp_path, ["export", "tiny.net", "-o", "\udcff.onnx"])
    )


def edited_in_checkpoint(name: str, **entry):
    """A `prepare` step: the run's last checkpoint with tensor `name`'s header entry changed (another shape of as
    many elements, another dtype of the same width: a file safetensors still reads)."""

    def prepare(folder: Path) -> None:
        path = folder / "run" / "checkpoints" / "last.ckpt"
        header, body = split_safetensors(path.read_bytes())
        header[name].update(entry)
        text = json.dumps(header).encode("utf-8")
        path.write_bytes(struct.pack("<Q", len(text)) + text + body)

    return prepare


@pytest.mark.parametrize(
    ("name", "entry", "message"),
    [
        ("c1.weight", {"shape": [4, 3, 3, 3, 1]}, "the checkpoint's `c1.weight` is 4 x 3 x 3 x 3 x 1, the net's 4 x 3"),
        ("optim:c1.weight:velocity", {"shape": [4, 3, 3, 3, 1]}, "`velocity` of `c1.weight` is 4 x 3 x 3 x 3 x 1"),
        ("optim:c1.weight:velocity", {"dtype": "I32"}, "state `velocity` of `c1.weight` holds torch.int32 values"),
        ("rng:rank0/torch", {"dtype": "I8"}, "random state `rank0/torch` is torch.int8 of"),
    ],
)
def test_a_checkpoint_tensor_of_another_shape_or_dtype_is_an_error_naming_it(world, tmp_path, name, entry, message):
    """A weight, a velocity or a random state given another shape or dtype in the checkpoint's header (a file
    safetensors still reads): `train --resume` failed inside load_state_dict, the first SGD step or
    torch.set_rng_state (size mismatch, a cast, "RNG state must be a torch.ByteTensor": internal errors)."""
    argv = ["train", "--resume", "run", "--steps", "2"]
    result = in_world(world, tmp_path, argv, edited_in_checkpoint(name, **entry))
    assert message in error_of(result) and "last.ckpt: error:" in result.err


def test_npz_images_that_are_not_an_array_of_images_are_an_error_naming_the_shape(world, tmp_path):
    """An .npz whose `x` is a scalar (or a vector): `eval` and `train` failed on len() of it (an internal error)."""

    def scalar_images(folder: Path) -> None:
        with np.load(folder / "data.npz") as data:
            labels = data["y"]
        np.savez(folder / "data.npz", x=np.float32(1.0), y=labels)

    for argv in (["eval", "tiny.net", "--weights", "run", "--data", "data.npz"], ["train", "tiny.net", "--out", "new"]):
        result = in_world(world, tmp_path, argv + (["--data", "data.npz"] if argv[0] == "train" else []), scalar_images)
        assert "x has shape (), which does not hold 3-channel images" in error_of(result)


def test_a_flag_given_the_value_dashes_takes_it(world, tmp_path):
    """`--max-drops=--`: Python 3.11's argparse handed the flag an empty list for the value `--`, which netdsl
    then read as text (AttributeError, an internal error) or as a path; the flag gets `--`, like any value."""
    result = in_world(world, tmp_path, ["train", "tiny.net", "--data", "data.npz", "--out", "new", "--max-drops=--"])
    assert "`max_drops` must be a whole number at least 0, or none, got `--`" in error_of(result)
    result = in_world(world, tmp_path, ["run", "tiny.net", "--top=--"])
    assert "argument --top: not a positive whole number: '--'" in error_of(result)


def test_eval_checks_the_seed_and_split_it_reads_from_the_run(world, tmp_path):
    """`eval --weights run` splits the data with the run's saved seed and fraction: a recipe.json whose seed is
    text reached numpy's generator (ValueError: unrecognized seed string, an internal error)."""

    def text_seed(folder: Path) -> None:
        path = folder / "run" / "recipe.json"
        record = json.loads(path.read_text(encoding="utf-8"))
        record["recipe"]["settings"]["seed"]["value"] = "abc"
        path.write_text(json.dumps(record), encoding="utf-8")

    result = in_world(world, tmp_path, ["eval", "tiny.net", "--weights", "run", "--data", "data.npz"], text_seed)
    assert "recipe.json: seed: error: `seed` must be a whole number" in error_of(result)


def test_a_learning_rate_beyond_float32_is_an_error_of_the_flag(world, tmp_path):
    """`--lr 1e308`: the SGD step converted lr times the decay to float32 and failed (an internal error)."""
    for optimizer in ("sgd", "adamw"):
        argv = ["train", "tiny.net", "--data", "data.npz", "--out", "new", "--lr", "1e308", "--optimizer", optimizer]
        assert "a learning rate of 1e+308 is beyond float32" in error_of(in_world(world, tmp_path, argv))


def test_a_count_beyond_what_torch_holds_is_an_error_of_the_flag(world, tmp_path):
    """`compile --batch` of 30 digits reached torch.empty while recording the launches (an internal error)."""
    argv = ["compile", "tiny.net", "--batch", "9" * 30, "--no-sm90"]
    assert "argument --batch: '999999999999999999999999999999' is more than 2,147,483,647" in error_of(
        in_world(world, tmp_path, argv)
    )


def test_the_net_mutator_draws_no_endless_run():
    """Campaign 925 appended `train { steps = 99999999 }` to the world's net: a valid run of a hundred million
    steps, which no limit on a case's time should be asked to tell from a hang."""
    rng = random.Random(925)
    texts = [mutate_text(rng, TINY).decode("utf-8", "replace") for _ in range(4000)]
    assert not any(re.search(r"train \{ (steps = (99999999|none)|epochs = 99999999) \}", text) for text in texts)
    assert any("train { steps = " in text for text in texts) and any("train { epochs = " in text for text in texts)
