"""Byte-identical builds across processes: `netdsl compile` (and `--train`) writes the same kernels, plan.json
and report.txt for the same net and flags in any process, whatever Python's string hashing.

test_compile.py compares two builds made in one process, where every set and dict of strings iterates in the
same order both times. Here two processes with different PYTHONHASHSEED each build the same nets: the bundled
ones and random nets from the two fuzzers' generators (groups, towers, concat/add, shuffle, blocks and
`repeat`), with the compile options drawn for them, forward and training step. A pass that walks a set of
names, or a name made from `id()` or `hash()`, shows up as a difference, named by file and first line.
NETDSL_FUZZ_SCALE and NETDSL_FUZZ_SEED make more or other random nets.
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

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
RANDOM_NETS = max(1, int(4 * SCALE))  # of each generator
HASH_SEEDS = ("1", "4242")

# Run in each child: compile every job through the command line, as a user would; a job is (net, output, flags).
CHILD = """
import json, sys
from netdsl.cli.main import main

for net, out, flags in json.loads(sys.argv[1]):
    status = main(["compile", net, "-o", out, "--no-sm90", *flags])
    if status:
        sys.exit(f"compile {net} {' '.join(flags)} exited {status}")
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


def test_builds_are_byte_identical_across_hash_seeds(tmp_path: Path) -> None:
    found = jobs(tmp_path)
    children = []
    for hash_seed in HASH_SEEDS:
        out = tmp_path / f"hash{hash_seed}"
        listing = json.dumps([(net, str(out / name), flags) for net, name, flags in found])
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-c", CHILD, listing]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        children.append(subprocess.Popen(command, env=environment, cwd=tmp_path, **quiet))
    for child in children:
        _, errors = child.communicate(timeout=600)
        assert child.returncode == 0, errors[-3000:]
    for _, name, flags in found:
        one, other = (files_of(tmp_path / f"hash{seed}" / name) for seed in HASH_SEEDS)
        assert sorted(one) == sorted(other), f"{name} {flags}: other files"
        assert any(key.startswith("kernels/") for key in one), f"{name}: no kernels written"
        if "--train" in flags:
            assert "train/plan.json" in one, f"{name}: no training plan"
        for file in one:
            if one[file] != other[file]:
                pytest.fail(f"{name} {' '.join(flags)}: " + first_difference(file, one[file], other[file]))
