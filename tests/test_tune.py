"""`netdsl tune`: each tunable kernel's candidate tiles timed, the fastest correct one that builds for sm_90
without spills written to a tuning file, and `--tuning` building those tiles into the kernels.

Under the interpreter the times mean nothing for a GPU, so most tests time with a clock that prefers one
candidate per step (the mechanism, not the GPU, is under test); the tiles themselves are checked against
PyTorch wherever they run.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from netdsl.cli.main import main
from netdsl.codegen import conv, conv_lrn_pool, conv_nhwc, fc, lrn
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.emit import literal
from netdsl.compiler.launches import Recorder, load_kernel_file
from netdsl.compiler.passes import Options
from netdsl.compiler.tuning import TUNING_FORMAT, read_tuning, signature
from netdsl.errors import NetError
from netdsl.runtime import tune as tuner
from netdsl.runtime.net import Net

# Every tunable family: conv1 (3 channels) on conv.py, an LRN alone, conv2 channels-last, conv3 with its LRN and
# max-pool in one kernel, an fc.
TINY = """\
net tiny
input image: 3 x 13 x 13
const norm = lrn(size=5, alpha=1e-4, beta=0.75, k=2)
conv1 = conv(image, 16, size=3, stride=2) | relu | norm
conv2 = conv(conv1, 32, size=3, pad=1) | relu | maxpool(2, stride=2)
conv3 = conv(conv2, 24, size=3, pad=1) | relu | norm | maxpool(2, stride=2)
fc4 = fc(conv3, 10)
output fc4
"""
BATCH = 2
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # the CPU: Triton's interpreter
TUNABLE = {  # step -> family
    "conv1_gpu0_conv_bias_relu": "conv",
    "conv1_norm_gpu0_lrn": "lrn",
    "conv2_gpu0_conv_bias_relu": "conv_nhwc",
    "conv3_gpu0_conv_bias_relu_lrn_maxpool": "conv_lrn_maxpool",
    "fc4_gpu0_fc_bias": "fc",
}
PICK = 1  # the candidate the test clock makes fastest, by its index in the step's candidates()


def favouring(index: int):
    """A clock under which, in every step, candidate `index` takes 1 ms and everything else (the launcher's own
    tiles included) 5 ms; each launch still runs once."""
    chosen: list[dict] = []

    def timer(launch, config):
        launch()
        if config is None:
            chosen.clear()  # a new step: its default is timed first
            return 5.0
        chosen.append(config)
        return 1.0 if len(chosen) == index + 1 else 5.0

    return timer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "tiny.net"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def tuned(tiny):
    """One tuning of the tiny net, with the spill check of the winners on sm_90."""
    tuning, found = tuner.tune(tiny, batch=BATCH, dtype="fp32", device=DEVICE, timer=favouring(PICK))
    path = tiny.parent / "tuning.json"
    tuner.write_tuning(path, tuning)
    return path, tuning, found


def candidates_module(build: Path, step: str):
    return load_kernel_file(build / "kernels" / f"{step}.py")


def candidates_of(build: Path, step: str) -> list[dict]:
    return candidates_module(build, step).candidates()


def test_tune_times_every_tunable_step_and_keeps_the_fastest_correct_tiles(tiny, tuned, tmp_path):
    path, tuning, found = tuned
    assert tuning["format"] == TUNING_FORMAT and tuning["net"] == "tiny" and tuning["dtype"] == "fp32"
    assert set(tuning["steps"]) == set(TUNABLE)
    plain = write_build(compile_net(tiny, Options(BATCH, "fp32")), tmp_path / "plain")
    for result in found:
        entry = tuning["steps"][result.step]
        # the signature is the kernel file as built without tuning
        kernel = (plain / "kernels" / f"{result.step}.py").read_text()
        assert entry["signature"] == signature(kernel)
        row = entry["batches"][str(BATCH)]
        assert row["config"] == candidates_of(plain, result.step)[PICK] == result.best
        assert row["ms"] == 1.0 and row["default_ms"] == 5.0 and row["timed"] >= 2
        assert row["default"] == result.default
        if DEVICE == "cpu":  # under the interpreter the launcher's own tiles are its few big ones
            if TUNABLE[result.step] == "conv_lrn_maxpool":  # its channel block holds a conv group: 24 -> 32
                want = {"BLOCK_N": 32, "BLOCK_P": 256, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
            else:
                family = {"conv": conv, "conv_nhwc": conv_nhwc, "lrn": lrn, "fc": fc}[TUNABLE[result.step]]
                want = family.INTERPRETER_CONFIG
            assert row["default"] == want
        assert not result.dropped
    assert read_tuning(path).configs("fc4_gpu0_fc_bias", tuning["steps"]["fc4_gpu0_fc_bias"]["signature"]) == {
        BATCH: fc.tuning_candidates(4)[PICK]
    }


def test_the_tuned_tiles_reach_the_kernels_and_the_net_computes_the_same(tiny, tuned, tmp_path):
    path, tuning, _ = tuned
    options = Options(BATCH, "fp32", tuning=str(path))
    compiled = compile_net(tiny, options)
    build = write_build(compiled, tmp_path / "build", options)
    for step in TUNABLE:
        module_text = (build / "kernels" / f"{step}.py").read_text()
        want = tuning["steps"][step]["batches"][str(BATCH)]["config"]
        assert f"TUNED = {{{BATCH}: " in module_text
        assert {BATCH: want} == candidates_module(build, step).TUNED
    assert "tiles tuned by netdsl tune" in compiled.report
    assert "fc4_gpu0_fc_bias at batch 2: " in compiled.report
    # the launch grids in plan.json follow the tuned tiles (fc: one program per BLOCK_M x BLOCK_N tile)
    plan = json.loads((build / "plan.json").read_text())
    fc_launch = next(e for e in plan["devices"]["gpu0"]["launches"] if e["step"] == "fc4_gpu0_fc_bias")
    tile = tuning["steps"]["fc4_gpu0_fc_bias"]["batches"][str(BATCH)]["config"]
    assert fc_launch["constexprs"]["BLOCK_N"] == tile["BLOCK_N"]
    assert fc_launch["grid"] == [-(-BATCH // tile["BLOCK_M"]) * -(-10 // tile["BLOCK_N"])]
    # the file is recorded relative to the folder (they move together) with its SHA-256, as the net is
    assert plan["options"]["tuning"] == os.path.relpath(path, build) and len(plan["tuning_sha256"]) == 64
    # the same input gives the same bytes
    again = write_build(compile_net(tiny, options), tmp_path / "again", options)
    for name in sorted((build / "kernels").iterdir()):
        assert name.read_bytes() == (again / "kernels" / name.name).read_bytes()
    # with the tuned tiles the kernels compute what PyTorch computes (fp32: 1e-5 of the largest output)
    x = torch.randn(BATCH, 3, 13, 13, generator=torch.Generator().manual_seed(3))
    got = Net(tiny, backend="triton", init="he", tuning=path, devices=DEVICE)(x.to(DEVICE)).cpu()
    want = Net(tiny, backend="torch", init="he")(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_step_changed_since_tuning_keeps_its_own_tiles(tiny, tuned, tmp_path):
    path, _, _ = tuned
    edited = tmp_path / "tiny.net"
    edited.write_text(TINY.replace("fc(conv3, 10)", "fc(conv3, 12)"))  # fc4's kernel changes, the convs do not
    compiled = compile_net(edited, Options(BATCH, "fp32", tuning=str(path)))
    assert "TUNED = {}" in compiled.kernels["fc4_gpu0_fc_bias.py"]
    assert "TUNED = {}" not in compiled.kernels["conv2_gpu0_conv_bias_relu.py"]
    assert "changed since it was tuned (run netdsl tune again): fc4_gpu0_fc_bias" in compiled.report
    # another batch size than the one tuned: the launcher's own tiles at that size
    module_text = compiled.kernels["conv2_gpu0_conv_bias_relu.py"]
    assert "TUNED = {2: " in module_text and "config = config or TUNED.get(inputs[0].shape[0])" in module_text


def test_candidates_that_fail_or_compute_wrongly_are_dropped(tiny, monkeypatch):
    good = fc.tuning_candidates(4)[1]
    unbuildable = {**good, "BLOCK_N": 24}  # not a power of two: tl.arange refuses it
    monkeypatch.setattr(fc, "tuning_candidates", lambda element_bytes: [unbuildable, good])
    # favouring(0): the first of those timed (the unbuildable one never is)
    _, found = tuner.tune(tiny, batch=BATCH, device=DEVICE, timer=favouring(0), check_sm90=False, steps="fc4*")
    result = next(r for r in found if r.step == "fc4_gpu0_fc_bias")
    assert list(result.dropped) == ["16x24x64 w4 s4"] and result.best == good and result.timed == 1

    class Wrong:
        """A step whose kernel, given tiles of the tuner's, computes something else."""

        KERNEL = Recorder()  # stands for the Triton kernel; the tuner swaps in its own recorder to read the tiles

        @staticmethod
        def launch(inputs, weights, out=None, config=None):
            tiles = config or {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
            Wrong.KERNEL[(1,)](**tiles)
            y = inputs[0] * 2 if config is None else inputs[0] * 3
            return y if out is None else out.copy_(y)

        @staticmethod
        def candidates():
            return [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}]

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(7))
    result = tuner._tune_step("wrong", Wrong, [x], {}, favouring(0), 1e-4)
    assert result.best is None and result.default == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
    assert "differs from the launcher's tiles' by 5.0e-01" in result.dropped["32x32x32"]


def test_a_winner_that_spills_on_sm90_gives_way_to_the_next(tiny, monkeypatch):
    from netdsl.compiler import launches

    spilling = fc.tuning_candidates(4)[0]
    real = launches.sm90_resources

    def resources(recorded):
        report = real(recorded)
        for launch in recorded:
            if launch.step == "fc4_gpu0_fc_bias" and launch.constexprs["BLOCK_M"] == spilling["BLOCK_M"]:
                report[launch.step] = {**report[launch.step], "spill_stores": 64}
        return report

    monkeypatch.setattr(tuner, "sm90_resources", resources)
    chosen = {"fc4_gpu0_fc_bias": 0}

    def timer(launch, config):  # fc's candidate 0 the fastest, candidate 1 the next; the default the slowest
        launch()
        if config is None:
            return 9.0
        order = fc.tuning_candidates(4)
        return {0: 1.0, 1: 2.0}.get(order.index(config) if config in order else -1, 5.0)

    _, found = tuner.tune(tiny, batch=BATCH, device=DEVICE, timer=timer, steps="fc4*")
    result = next(r for r in found if r.step in chosen)
    assert result.best == fc.tuning_candidates(4)[1] and result.best_ms == 2.0
    assert result.dropped["64x64x32 w8 s3"] == "spills registers on sm_90"


def test_candidate_tiles_compute_what_pytorch_does():
    """Every family's candidates on shapes small enough for the interpreter, fp32 (1e-5 of the largest output)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, generator=gen, dtype=torch.float64) * 0.1
    want = F.relu(F.conv2d(x, w, padding=1))
    xs, ws = x.float().to(DEVICE), w.float().to(DEVICE)
    for config in conv.tuning_candidates(4):
        got = conv.conv2d([xs], ws, None, padding=(1, 1), activation="relu", config=config).double().cpu()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), config
    for config in conv_nhwc.tuning_candidates(16, 4):
        got = conv_nhwc.conv2d_nhwc(
            [xs.contiguous(memory_format=torch.channels_last)], ws.contiguous(memory_format=torch.channels_last),
            None, padding=(1, 1), activation="relu", config=config,
        ).double().cpu()  # fmt: skip
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), config
    rows, weight = torch.randn(3, 40, generator=gen, dtype=torch.float64), torch.randn(20, 40, generator=gen).double()
    for config in fc.tuning_candidates(4):
        got = fc.linear([rows.float().to(DEVICE)], weight.float().to(DEVICE), None, config=config).double().cpu()
        assert (got - rows @ weight.T).abs().max() <= 1e-5 * (rows @ weight.T).abs().max(), config
    # the paper's LRN: its alpha is not divided by the window's size, PyTorch's is
    b = torch.randn(24, generator=gen, dtype=torch.float64) * 0.1
    staged = F.max_pool2d(F.local_response_norm(F.relu(F.conv2d(x, w, b, padding=1)), 5, 5 * 1e-4, 0.75, 2.0), 3, 2)
    for config in conv_lrn_pool.tuning_candidates(24, 4):
        got = conv_lrn_pool.conv_lrn_maxpool(
            xs, ws, b.float().to(DEVICE), 1, 1, 1, 1, 5, 1e-4, 0.75, 2.0, 3, 2, config=config
        ).double().cpu()
        assert (got - staged).abs().max() <= 1e-5 * staged.abs().max(), config
    norm = F.local_response_norm(x * x.abs(), 5, alpha=1e-4 * 5, beta=0.75, k=2.0)  # the paper's alpha, per window
    for config in lrn.tuning_candidates(16):
        got = lrn.lrn((x * x.abs()).float().to(DEVICE), 5, 1e-4, 0.75, 2.0, config=config).double().cpu()
        assert (got - norm).abs().max() <= 1e-5 * norm.abs().max(), config


def test_candidates_fit_their_maps():
    from netdsl.codegen.limits import MAX_SHARED_BYTES
    from netdsl.codegen.target import SM90_MAX_SHARED_BYTES

    assert MAX_SHARED_BYTES == SM90_MAX_SHARED_BYTES  # one number, written twice (target.py also runs alone)
    assert fc.TUNING_TILES[3] not in fc.tuning_candidates(4) and fc.TUNING_TILES[3] in fc.tuning_candidates(2)
    assert {tile["BLOCK_K"] for tile in conv_nhwc.tuning_candidates(3, 2)} == {16}
    assert len(conv_nhwc.tuning_candidates(3, 2)) < len(conv.TUNING_TILES)  # duplicates once K is clamped
    assert {tile["BLOCK_K"] for tile in conv_nhwc.tuning_candidates(256, 2)} == {32, 64}
    assert max(tile["BLOCK_C"] for tile in lrn.tuning_candidates(48)) == 64
    assert max(tile["BLOCK_C"] for tile in lrn.tuning_candidates(5)) == 8


def _tuned(source: str) -> dict:
    """A kernel file's TUNED table, read from its text (one line or several)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TUNED"]:
            return ast.literal_eval(node.value)
    raise AssertionError("no TUNED table")


def test_tuning_another_batch_adds_to_the_file(tiny, tmp_path):
    path = tmp_path / "tuning.json"
    for batch in (2, 3):
        tuning, _ = tuner.tune(tiny, batch=batch, device=DEVICE, timer=favouring(0), check_sm90=False, steps="fc*,*lrn")
        tuner.write_tuning(path, tuning)
    data = json.loads(path.read_text())
    assert sorted(data["steps"]) == ["conv1_norm_gpu0_lrn", "fc4_gpu0_fc_bias"]
    assert all(list(entry["batches"]) == ["3", "2"] for entry in data["steps"].values())
    compiled = compile_net(tiny, Options(1, "fp32", tuning=str(path)))
    assert sorted(_tuned(compiled.kernels["fc4_gpu0_fc_bias.py"])) == [2, 3]
    # a file holds one device's tunings: another's is refused before anything is timed
    path.write_text(json.dumps({**data, "device": "some other GPU"}))
    with pytest.raises(NetError, match="holds tunings for device some other GPU, and these are for "):
        tuner.check_output(path, torch.device(DEVICE))
    with pytest.raises(NetError, match="no folder"):
        tuner.check_output(tmp_path / "missing" / "t.json", torch.device(DEVICE))
    (tmp_path / "garbage.json").write_text("{")
    with pytest.raises(NetError, match="cannot add to it"):
        tuner.check_output(tmp_path / "garbage.json", torch.device(DEVICE))


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "cannot read the tuning file"),
        ('{"format": "something else", "steps": {}}', "not a tuning file"),
        (f'{{"format": "{TUNING_FORMAT}", "steps": []}}', "steps is not a table of steps"),
        (f'{{"format": "{TUNING_FORMAT}", "steps": {{"a": {{"batches": {{}}}}}}}}', "needs a `signature`"),
        (
            f'{{"format": "{TUNING_FORMAT}", "steps": {{"a": {{"signature": "s", "batches": {{"x": {{}}}}}}}}}}',
            "which is not a batch size",
        ),
        (
            f'{{"format": "{TUNING_FORMAT}", "steps": {{"a": {{"signature": "s", "batches": '
            '{"2": {"config": {"__import__": 1}}}}}}',
            "has '__import__', which no kernel takes",
        ),
        (
            f'{{"format": "{TUNING_FORMAT}", "steps": {{"a": {{"signature": "s", "batches": '
            '{"2": {"config": {"BLOCK_M": "64"}}}}}}',
            "BLOCK_M is '64', not a whole number",
        ),
        (
            f'{{"format": "{TUNING_FORMAT}", "steps": {{"a": {{"signature": "s", "batches": '
            '{"2": {"config": {"num_stages": 9}}}}}}',
            "num_stages is 9, not a whole number from 1 to 8",
        ),
    ],
)
def test_bad_tuning_files_are_errors_naming_the_file(tiny, tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(NetError, match=message):
        read_tuning(path)
    assert main(["compile", str(tiny), "-o", str(tmp_path / "b"), "--tuning", str(path), "--no-sm90"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: error: ") and "Traceback" not in err and "hint: " in err


def test_tiles_the_tuner_would_not_try_are_errors(tiny, tuned, tmp_path):
    """Only a step's own candidates reach its kernel, whatever the file says: another family's tiles, or a
    channels-last conv's tiles without the warps (which its split-K path reads)."""
    _, tuning, _ = tuned
    for step, config in (
        ("conv1_norm_gpu0_lrn", {"BLOCK_M": 64, "BLOCK_N": 64}),
        ("conv2_gpu0_conv_bias_relu", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}),
    ):
        data = json.loads(json.dumps(tuning))
        data["steps"][step]["batches"]["2"]["config"] = config
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(NetError, match=f"steps.{step}.batches.2.config .* is not one of the tiles"):
            compile_net(tiny, Options(BATCH, "fp32", tuning=str(bad)))


def test_a_build_with_other_flags_than_the_tuning_says_which(tiny, tuned):
    path, _, _ = tuned
    compiled = compile_net(tiny, Options(BATCH, "bf16", tuning=str(path), split_k=True))
    assert "TUNED = {}" in compiled.kernels["fc4_gpu0_fc_bias.py"]
    assert "the file was tuned with `--dtype fp32`, this build is `--dtype bf16 --split-k`" in compiled.report


def test_the_tune_command(tiny, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["tune", str(tiny), "--batch", "2", "--runs", "1", "-o", str(out), "--steps", "conv2*,fc4*"]) == 0
    printed = capsys.readouterr()
    assert ("timing on the CPU under Triton's interpreter" in printed.err) == (DEVICE == "cpu")
    assert "launcher's tiles" in printed.out and "fc4_gpu0_fc_bias" in printed.out
    assert f"build with it: netdsl compile {tiny} --batch 2 --dtype fp32 --tuning {out}" in printed.out
    clock = json.loads(out.read_text())["clock"]
    assert clock == "wall clock per launch" if DEVICE == "cpu" else clock.startswith("CUDA events around a CUDA graph")
    # the command it prints has the compile options the tuning was made with (the kernels differ with them)
    other = tmp_path / "split.json"
    argv = ["tune", str(tiny), "--batch", "2", "--runs", "1", "-o", str(other), "--steps", "fc4*", "--split-k"]
    assert main(argv) == 0
    assert f"--batch 2 --dtype fp32 --split-k --tuning {other}" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["steps"]) == {"conv2_gpu0_conv_bias_relu", "fc4_gpu0_fc_bias"}
    # a build folder made with the file keeps it; a contradicting one is an error
    build = tmp_path / "build"
    assert main(["compile", str(tiny), "-o", str(build), "--batch", "2", "--tuning", str(out), "--no-sm90"]) == 0
    assert main(["run", str(build), "--batch", "2", "--init", "he"]) == 0
    capsys.readouterr()
    assert main(["run", str(build), "--batch", "2", "--tuning", str(tmp_path / "other.json")]) == 1
    assert "was compiled with --tuning" in capsys.readouterr().err
    # tuned again since: the folder's kernels no longer say what the file does, and the run says so
    out.write_text(out.read_text().replace('"timed"', '"timed" ', 1))
    assert main(["run", str(build), "--batch", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{out} changed since this folder was compiled" in err and "--tuning FILE" in err


@pytest.mark.parametrize(
    "argv, where, message",
    [
        (["--tuning", "x.json"], "netdsl tune", "unknown flag --tuning"),
        (["--device", "cuda:0"], "--device", "no CUDA GPU"),
        (["--device", "nonsense"], "--device", "unknown device"),
        (["--steps", "conv9*"], "--steps", "no step with tiles to tune matches 'conv9*'"),
    ],
)
def test_tune_command_errors(tiny, tmp_path, capsys, argv, where, message):
    if "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    assert main(["tune", str(tiny), "-o", str(tmp_path / "t.json"), *argv]) == 1
    err = capsys.readouterr().err  # (after the note on timing under the interpreter, where the CPU is timed)
    assert any(line.startswith(f"{where}: error: ") for line in err.splitlines())
    assert message in err and "Traceback" not in err


def test_the_towers_copies_are_tuned_once_and_progress_is_saved_step_by_step(tmp_path):
    """gpu1's copy of a layer is gpu0's kernel on the same shapes: it takes gpu0's findings without being timed;
    after each step the caller gets the tuning so far (the CLI writes it: a run cut short keeps it)."""
    from kernel_support import SMALL_ALEXNET

    net = tmp_path / "small_alexnet.net"
    net.write_text(SMALL_ALEXNET)
    timed: list[dict | None] = []

    def timer(launch, config):
        launch()
        timed.append(config)
        return 1.0 if config == fc.tuning_candidates(4)[1] else 5.0

    saved: list[list[str]] = []
    tuning, found = tuner.tune(
        net, batch=BATCH, device=DEVICE, timer=timer, check_sm90=False, steps="fc6*",
        on_step=lambda so_far: saved.append(list(so_far["steps"])),
    )  # fmt: skip
    assert [r.step for r in found] == ["fc6_gpu0_fc_bias_relu", "fc6_gpu1_fc_bias_relu"]
    assert saved == [["fc6_gpu0_fc_bias_relu"], ["fc6_gpu0_fc_bias_relu", "fc6_gpu1_fc_bias_relu"]]
    # one step's candidates and its launcher's tiles (before and after them), not two steps'
    assert len(timed) == 2 + len(fc.tuning_candidates(4))
    twin = found[1]
    assert twin.same_as == "fc6_gpu0_fc_bias_relu" and twin.best == found[0].best == fc.tuning_candidates(4)[1]
    rows = {name: entry["batches"][str(BATCH)] for name, entry in tuning["steps"].items()}
    assert rows["fc6_gpu1_fc_bias_relu"]["same_as"] == "fc6_gpu0_fc_bias_relu"
    signatures = {entry["signature"] for entry in tuning["steps"].values()}
    assert len(signatures) == 2  # each file its own: the step's name is in it
    # each tower's kernel gets the tiles
    compiled = compile_net(net, Options(BATCH, "fp32", tuning=str(_saved(tmp_path, tuning))))
    for name in ("fc6_gpu0_fc_bias_relu.py", "fc6_gpu1_fc_bias_relu.py"):
        assert f"TUNED = {{2: {literal(dict(sorted(fc.tuning_candidates(4)[1].items())))}}}" in compiled.kernels[name]


def _saved(folder: Path, tuning: dict) -> Path:
    path = folder / "tuning.json"
    tuner.write_tuning(path, tuning)
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_on_the_gpu(tiny, tmp_path):
    """The real clock: CUDA graphs of launches timed by CUDA events, every winner built without spills, and the
    net with the tuned tiles computing what PyTorch computes (fp32 products exact: 1e-5)."""
    tuning, found = tuner.tune(tiny, batch=8, dtype="fp32", device="cuda:0", runs=5)
    assert {result.step for result in found} == set(TUNABLE)
    assert tuning["graphs"] > 0 and tuning["timed launch by launch (not capturable)"] == 0
    for result in found:
        assert result.default_ms > 0 and result.best_ms > 0  # measured (how fast is bench/'s business)
    fc_step = next(result for result in found if result.step == "fc4_gpu0_fc_bias")
    assert fc_step.default == fc.pick_config(8, torch.float32)  # the launcher's GPU choice, read from its launch
    path = _saved(tmp_path, tuning)
    x = torch.randn(8, 3, 13, 13, generator=torch.Generator().manual_seed(4))
    got = Net(tiny, backend="triton", init="he", tuning=path, devices="cuda:0")(x.cuda()).cpu()
    want = Net(tiny, backend="torch", init="he")(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_tiles_tuned_on_another_device_are_a_warning(tiny, tuned, tmp_path, capsys):
    from netdsl.runtime.net import TuningWarning

    _, tuning, _ = tuned
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({**tuning, "device": "some other GPU"}))
    with pytest.warns(TuningWarning, match="timed on some other GPU, and this net runs on "):
        Net(tiny, backend="triton", tuning=elsewhere, devices=DEVICE)
    assert main(["run", str(tiny), "--batch", "2", "--tuning", str(elsewhere), "--devices", f"gpu0={DEVICE}"]) == 0
    assert "note: the tuned tiles were timed on some other GPU" in capsys.readouterr().err
