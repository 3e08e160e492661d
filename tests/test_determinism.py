"""Byte-identical builds across processes: `netdsl compile` (and `--train`) writes the same kernels, plan.json
and report.txt for the same net and flags in any process, whatever Python's string hashing.

test_compile.py compares two builds made in one process, where every set and dict of strings iterates in the
same order both times. Here two processes with different PYTHONHASHSEED each build the same nets: the bundled
ones and random nets from the two fuzzers' generators (groups, towers, concat/add, shuffle, blocks and
`repeat`), with the compile options drawn for them, forward and training step. A pass that walks a set of
names, or a name made from `id()` or `hash()`, shows up as a difference, named by file and first line.
The same holds for what `netdsl train` and `netdsl export` write: a short seeded training run (weights, checkpoint,
metrics less the clock's images/s) and the ONNX model exported from it. NETDSL_FUZZ_SCALE and NETDSL_FUZZ_SEED
make more or other random nets.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compiler_fuzz import draw_case, generate
from test_train_fuzz import random_net

from netdsl.train.runs import MEASURED

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
RANDOM_NETS = max(1, int(4 * SCALE))  # of each generator
HASH_SEEDS = ("1", "4242")

# Run in each child, in its own folder: every command line, as a user would type it.
CHILD = """
import json, sys
from netdsl.cli.main import main

for argv in json.loads(sys.argv[1]):
    status = main(argv)
    if status:
        sys.exit(f"netdsl {' '.join(argv)} exited {status}")
"""


def option_flags(options: dict) -> list[str]:
    flags = []
    for name, value in sorted(options.items()):
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def jobs(folder: Path) -> list[tuple[str, str, list[str]]]:
    """(net file, output folder name, flags) of every build: the bundled nets whole (two of them with --train),
    then the random nets."""
    found = [
        (str(ROOT / "nets/alexnet.net"), "alexnet", ["--batch", "128", "--dtype", "bf16", "--space-to-depth"]),
        (str(ROOT / "nets/alexnet.net"), "alexnet_merged", ["--merge-towers", "--split-k", "--batch", "1"]),
        (str(ROOT / "nets/simplenet.net"), "simplenet", ["--train", "--batch", "32"]),
        (str(ROOT / "nets/lenet5.net"), "lenet5", ["--train", "--dtype", "bf16"]),
        (str(ROOT / "nets/vgg16.net"), "vgg16", ["--layout", "nchw"]),
    ]
    for i in range(RANDOM_NETS):
        seed = SEED * 100_000 + i
        case = draw_case(seed)
        path = folder / f"forward{seed}.net"
        path.write_text(generate(seed).text, encoding="utf-8")
        found.append((str(path), path.stem, ["--dtype", case.dtype, "--batch", "3", *option_flags(case.options)]))
        path = folder / f"train{seed}.net"
        path.write_text(random_net(seed).text, encoding="utf-8")
        found.append((str(path), path.stem, ["--train", "--batch", "4"]))
    return found


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def first_difference(name: str, one: bytes, other: bytes) -> str:
    lines = difflib.unified_diff(
        one.decode("utf-8", "replace").splitlines(), other.decode("utf-8", "replace").splitlines(), lineterm="", n=1
    )
    return f"{name} differs:\n" + "\n".join(list(lines)[:12])


# A short seeded training run on the bundled digits (flips, dropout, a validation split, a rate drop) and the model
# exported from its weights: (command line, what it writes) with {out} the child's folder.
TRAIN_AND_EXPORT = [
    ["train", str(ROOT / "nets/lenet5.net"), "--data", "digits", "--steps", "4", "--batch", "32", "--seed", "5",
     "--flip", "--val-every", "2", "--schedule", "step", "--step-epochs", "1", "--out", "{out}/run"],
    ["export", str(ROOT / "nets/lenet5.net"), "--weights", "{out}/run", "-o", "{out}/lenet5.onnx"],
]  # fmt: skip


def without_clock(files: dict[str, bytes]) -> dict[str, bytes]:
    """metrics.jsonl less images/s, the one thing in a run folder that depends on the clock."""
    metrics = "run/metrics.jsonl"
    if metrics in files:
        lines = [json.loads(line) for line in files[metrics].decode("utf-8").splitlines()]
        kept = [{key: value for key, value in line.items() if key not in MEASURED} for line in lines]
        files = {**files, metrics: json.dumps(kept, sort_keys=True).encode("utf-8")}
    return files


def test_builds_are_byte_identical_across_hash_seeds(tmp_path: Path) -> None:
    found = jobs(tmp_path)
    children = []
    for hash_seed in HASH_SEEDS:
        out = tmp_path / f"hash{hash_seed}"
        compiles = [["compile", net, "-o", str(out / name), "--no-sm90", *flags] for net, name, flags in found]
        others = [[arg.replace("{out}", str(out / "other")) for arg in argv] for argv in TRAIN_AND_EXPORT]
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-c", CHILD, json.dumps(compiles + others)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        children.append(subprocess.Popen(command, env=environment, cwd=tmp_path, **quiet))
    for child in children:
        _, errors = child.communicate(timeout=600)
        assert child.returncode == 0, errors[-3000:]
    one, other = (without_clock(files_of(tmp_path / f"hash{seed}" / "other")) for seed in HASH_SEEDS)
    assert sorted(one) == sorted(other)
    assert {"run/weights.safetensors", "run/checkpoints/last.ckpt", "lenet5.onnx"} <= set(one)
    for file in one:
        if one[file] != other[file]:
            pytest.fail(first_difference(file, one[file], other[file]))
    for _, name, flags in found:
        one, other = (files_of(tmp_path / f"hash{seed}" / name) for seed in HASH_SEEDS)
        assert sorted(one) == sorted(other), f"{name} {flags}: other files"
        assert any(key.startswith("kernels/") for key in one), f"{name}: no kernels written"
        if "--train" in flags:
            assert "train/plan.json" in one, f"{name}: no training plan"
        for file in one:
            if one[file] != other[file]:
                pytest.fail(f"{name} {' '.join(flags)}: " + first_difference(file, one[file], other[file]))


def test_a_safetensors_header_in_any_key_order_is_written_sorted(tmp_path: Path) -> None:
    """safetensors' writer orders the header's metadata by a hash that changes from process to process (two
    checkpoints of one run differed in 3 of 4 tries): netdsl rewrites the header sorted, the data untouched."""
    import struct

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save

    from netdsl.files import sorted_safetensors_header

    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(5, dtype=np.int64)}
    data = save(tensors, metadata={"netdsl.z": "1", "netdsl.a": '{"x": [1, 2]}', "m": "\u00e9"})
    size = 8 + struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:size])
    orders = []
    for keys in (sorted(header), sorted(header, reverse=True)):  # the same header, its keys in two orders
        shuffled = {key: header[key] for key in keys}
        shuffled["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
        text = json.dumps(shuffled, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (size - 8 - len(text))
        orders.append(sorted_safetensors_header(struct.pack("<Q", len(text)) + text) + data[size:])
    assert orders[0] == orders[1]
    (tmp_path / "t.safetensors").write_bytes(orders[0])
    loaded = load_file(tmp_path / "t.safetensors")
    assert all(np.array_equal(loaded[name], value) for name, value in tensors.items())
    with safe_open(str(tmp_path / "t.safetensors"), framework="np") as file:
        assert file.metadata() == {"netdsl.z": "1", "netdsl.a": '{"x": [1, 2]}', "m": "\u00e9"}
