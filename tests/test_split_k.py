"""Split-K convs (issue 13, `--split-k`): channels-last convs whose output tiles are too few to fill the GPU share each
tile's taps among programs (codegen/conv_nhwc.py; the kernel itself is tested in tests/test_kernel_conv_nhwc.py and
built for sm_90 in tests/test_sm90_conv_nhwc.py).

Here: the option reaches every channels-last conv step and only those, the emitted files and plan.json (three-axis
grids at batch 1), and AlexNet with it (towers apart and merged) meets the float64 golden of the hand-written model on
the triton backend (under the interpreter its big tiles are few, so the convs do split), built for sm_90 at batch 1
without spills.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden.regenerate import golden_path
from kernel_support import DEVICE

import netdsl
from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.passes import Options, run_passes
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file

ROOT = Path(__file__).resolve().parent.parent
ALEXNET = ROOT / "nets" / "alexnet.net"


def test_only_channels_last_convs_are_marked():
    after = run_passes(build(parse_file(ALEXNET)), Options(batch=1, dtype="bf16", split_k=True))
    steps = [after["split_k"].nodes[name]["step"] for name in after["split_k"].nodes]
    marked = sorted(step.name for step in steps if step.options.get("split_k"))
    assert marked == sorted(f"conv{i}_gpu{t}_conv_bias_relu" for i in range(2, 6) for t in range(2))
    plain = run_passes(build(parse_file(ALEXNET)), Options(batch=1, dtype="bf16"))["split_k"]
    assert not any(plain.nodes[name]["step"].options.get("split_k") for name in plain.nodes)


def test_emitted_files_and_plan(tmp_path):
    compiled = compile_net(ALEXNET, Options(batch=1, dtype="bf16", split_k=True, merge_towers=True))
    source = compiled.kernels["conv3_gpu0_conv_bias_relu.py"]
    assert '"split_k": True' in source and 'split_k=OPTIONS["split_k"]' in source
    assert '"split_k"' not in compiled.kernels["conv1_gpu0_conv_bias_relu.py"]  # conv1 runs on conv.py
    out = write_build(compiled, tmp_path / "b", Options(batch=1, dtype="bf16", split_k=True), sm90=True)
    launches = json.loads((out / "plan.json").read_text(encoding="utf-8"))["devices"]["gpu0"]["launches"]
    conv3 = next(launch for launch in launches if launch["step"] == "conv3_gpu0_conv_bias_relu")
    assert conv3["grid"] == [9, 1, 9] and (conv3["constexprs"]["SPLIT_K"], conv3["constexprs"]["TAPS_PER_SPLIT"]) == (
        9,
        1,
    )
    report = (out / "report.txt").read_text(encoding="utf-8")
    conv_rows = [line for line in report.splitlines() if line.startswith("conv3_gpu0_conv_bias_relu ") and "/" in line]
    assert conv_rows and all(" 0/0 " in line for line in conv_rows), conv_rows


@pytest.mark.parametrize("merge_towers", [False, True])
def test_alexnet_with_split_convs_matches_golden(weights, merge_towers):
    with np.load(golden_path("alexnet")) as stored:
        x, want = stored["input"], stored["output"]
    net = netdsl.load(ALEXNET, backend="triton", weights=weights("alexnet"), devices=DEVICE, split_k=True,
                      merge_towers=merge_towers)  # fmt: skip
    got = net(torch.from_numpy(x).to(DEVICE)).double().cpu().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_command_line(capsys, tmp_path):
    assert (
        main(["compile", str(ALEXNET), "--split-k", "--no-sm90", "-o", str(tmp_path), "--dump-after", "split_k"]) == 0
    )
    assert "conv3_gpu0_conv_bias_relu = conv(" in capsys.readouterr().out
    assert '"split_k": true' in (tmp_path / "plan.json").read_text(encoding="utf-8")
    assert main(["run", str(ALEXNET), "--split-k", "--merge-towers", "--backend", "torch", "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith("input 0: top 1: ")
