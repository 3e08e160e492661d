"""The compiler: passes, fusion rules, placement, memory planning, emission, determinism and safety."""

import ast
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import netdsl
from netdsl import NetError, graph_from_text
from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.launches import _read_cache, _record_checksum, _write_cache
from netdsl.compiler.passes import PASS_NAMES, Options, run_passes, run_pipeline
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file, parse_text

ROOT = Path(__file__).resolve().parent.parent
NETS = sorted((ROOT / "nets").glob("*.net"))


def program_of(path: Path, **options):
    program, _ = run_pipeline(build(parse_file(path)), Options(**options))
    return program


def steps(program):
    return [program.nodes[name]["step"] for names in program.graph["partitions"].values() for name in names]


def test_pipeline_is_one_named_list():
    forward = ["validate", "shapes", "limits", "fold", "merge_towers", "fuse", "place", "space_to_depth", "layout",
               "split_k", "plan_memory"]  # fmt: skip
    assert forward == PASS_NAMES


@pytest.mark.parametrize("name", PASS_NAMES)
def test_dump_after_every_pass(name, capsys, tmp_path):
    assert main(["compile", str(ROOT / "nets/lenet5.net"), "-o", str(tmp_path), "--no-sm90", "--dump-after", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# net lenet5")
    if PASS_NAMES.index(name) >= PASS_NAMES.index("fuse"):
        assert "conv(" in out and "@gpu0" in out
    else:
        assert "c1 = conv(image" in out


def test_unknown_pass_is_a_user_error(capsys, tmp_path):
    assert main(["compile", str(ROOT / "nets/lenet5.net"), "-o", str(tmp_path), "--dump-after", "fusion"]) == 1
    err = capsys.readouterr().err
    assert "--dump-after: error: unknown pass `fusion`" in err and "Traceback" not in err


def test_alexnet_fuses_conv_relu_and_lrn_pool():
    program = program_of(ROOT / "nets/alexnet.net")
    kinds = [step.kind for step in steps(program)]
    assert kinds.count("conv") == 10 and kinds.count("lrn_maxpool") == 4 and kinds.count("fc") == 5
    assert "eltwise" not in kinds  # every ReLU is an epilogue
    conv2 = program.nodes["conv2_gpu1_conv_bias_relu"]["step"]
    assert [item.name for item in conv2.layers] == ["conv2@gpu1", "conv2.relu@gpu1"]
    assert conv2.options["activation"] == "relu"
    norm = program.nodes["conv1_norm_gpu0_lrn_maxpool"]["step"]
    assert [item.op for item in norm.layers] == ["lrn", "maxpool"]


def test_cross_device_reads_become_transfers_and_inputs_are_uploaded_everywhere():
    program = program_of(ROOT / "nets/alexnet.net")
    conv3 = program.nodes["conv3_gpu0_conv_bias_relu"]["step"]
    assert conv3.inputs == ["conv2_norm_gpu0_lrn_maxpool", "conv2_norm_gpu1_lrn_maxpool_to_gpu0"]
    transfer = program.nodes["conv2_norm_gpu1_lrn_maxpool_to_gpu0"]["step"]
    assert transfer.kind == "transfer" and transfer.options["source_device"] == "gpu1"
    assert program.nodes["image_gpu1_input"]["step"].kind == "input"
    for u, v in program.edges:
        a, b = program.nodes[u]["step"], program.nodes[v]["step"]
        assert a.device == b.device or b.kind == "transfer"


def test_dropout_disappears_and_batch_norm_folds_into_the_conv():
    program = program_of(ROOT / "nets/simplenet.net")
    covered = [item.op for step in steps(program) for item in step.layers]
    assert "dropout" not in covered and "batchnorm" not in covered
    s1 = next(step for step in steps(program) if step.first.name == "s1")
    assert s1.name == "s1_gpu0_conv_bn_bias_relu" and s1.first.fields["folded"] == ["s1.batchnorm"]


def test_batch_norm_stays_when_its_conv_has_other_readers():
    graph = build(parse_text("input x: 3 x 8 x 8\na = conv(x, 4, size=3)\nb = batchnorm(a)\nc = add(a, b)\n", "t.net"))
    program, _ = run_pipeline(graph, Options())
    assert any(step.kind == "eltwise" and step.first.op == "batchnorm" for step in steps(program))


def test_concat_read_only_by_a_conv_costs_no_kernel():
    text = (
        "input x: 3 x 8 x 8\na = conv(x, 4, size=1)\nb = conv(x, 4, size=1)\nc = concat(a, b)\nd = conv(c, 2, size=1)\n"
    )
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options())
    assert [step.kind for step in steps(program)].count("concat") == 0
    assert program.nodes["d_gpu0_conv_bias"]["step"].inputs == ["a_gpu0_conv_bias", "b_gpu0_conv_bias"]


def test_concat_that_is_an_output_is_a_kernel():
    text = "input x: 3 x 8 x 8\na = conv(x, 4, size=1)\nb = conv(x, 4, size=1)\nc = concat(a, b)\noutput c\n"
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options())
    assert [step.kind for step in steps(program)].count("concat") == 1


@pytest.mark.parametrize("path", NETS, ids=lambda p: p.stem)
def test_memory_plan_never_overlaps_live_buffers_and_reuses(path):
    program = program_of(path)
    buffers = program.graph["buffers"]
    for device in program.graph["partitions"]:
        mine = [b for b in buffers.values() if b.device == device]
        for a, b in itertools.combinations(mine, 2):
            if a.first <= b.last and b.first <= a.last:  # alive together
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
        assert program.graph["arena"][device] <= program.graph["arena_without_reuse"][device]
    if path.stem in ("alexnet", "vgg16"):
        assert sum(program.graph["arena"].values()) < 0.7 * sum(program.graph["arena_without_reuse"].values())


def test_a_buffer_another_device_copies_through_a_view_lives_to_the_end(tmp_path):
    """gpu1's input is flattened and the flatten sent to gpu0: the copy reads the input's buffer (a view shares
    it) at a time gpu1's order does not show, so no later gpu1 buffer may take its place (the relu did, and gpu0
    received the softmax's values). Checked on the plan and on the numbers, against numpy."""
    text = (
        "input image: 2 x 2 x 2\ntowers gpu0, gpu1 {\n    l1 = flatten(image)\n    l2 = softmax(image) | relu\n}\n"
        "l3 = relu(all l1)\noutput all l2, l3\n"
    )
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options())
    buffers, order = program.graph["buffers"], program.graph["partitions"]["gpu1"]
    assert buffers["image_gpu1_input"].last == len(order)
    x = np.random.default_rng(3).standard_normal((2, 2, 2, 2)).astype(np.float32)
    (tmp_path / "t.net").write_text(text)
    got = netdsl.load(tmp_path / "t.net", backend="torch")(x)["l3"]
    np.testing.assert_allclose(got.numpy(), np.maximum(np.concatenate([x.reshape(2, -1)] * 2, 1), 0), rtol=1e-6)


def test_report_compares_fused_and_unfused(tmp_path):
    compiled = compile_net(ROOT / "nets/alexnet.net", Options(batch=128, dtype="bf16"))
    report = compiled.report
    assert "fused " in report and "unfused (one kernel per layer)" in report
    saving = float(report.split("fusion saves ")[1].split("%")[0])
    assert saving > 20  # LRN+pool fusion and ReLU epilogues remove whole passes over the activations
    assert "gpu0: peak" in report and "without reuse" in report
    verdicts = report.split("the roofline floors decide:")[1].split("memory plan")[0]
    assert verdicts.count("conv1@gpu0: two kernels") == 1 and "-> two kernels" in verdicts


def test_compile_writes_kernels_plan_and_report(tmp_path):
    compiled = compile_net(ROOT / "nets/alexnet.net", Options())
    write_build(compiled, tmp_path)
    files = sorted(p.name for p in (tmp_path / "kernels").glob("*.py"))
    assert len(files) == 22 and "conv2_gpu1_conv_bias_relu.py" in files
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan["devices"]) == {"gpu0", "gpu1"}
    launches = plan["devices"]["gpu0"]["launches"]
    conv3 = next(entry for entry in launches if entry["step"] == "conv3_gpu0_conv_bias_relu")
    assert conv3["kernel"] == "kernels/conv3_gpu0_conv_bias_relu.py"
    assert conv3["inputs"] == ["conv2_norm_gpu0_lrn_maxpool", "conv2_norm_gpu1_lrn_maxpool_to_gpu0"]
    copy = next(entry for entry in launches if entry["step"] == "conv2_norm_gpu1_lrn_maxpool_to_gpu0")
    assert copy["kind"] == "transfer" and copy["wait"] == ["done:conv2_norm_gpu1_lrn_maxpool"]
    producer = next(e for e in plan["devices"]["gpu1"]["launches"] if e["step"] == "conv2_norm_gpu1_lrn_maxpool")
    assert producer["record"] == "done:conv2_norm_gpu1_lrn_maxpool"
    assert plan["inputs"][0]["steps"] == {"gpu0": "image_gpu0_input", "gpu1": "image_gpu1_input"}
    for source in compiled.kernels.values():
        ast.parse(source)  # every file is valid Python


def test_same_input_gives_byte_identical_output(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_build(compile_net(ROOT / "nets/vgg16.net", Options()), first)
    write_build(compile_net(ROOT / "nets/vgg16.net", Options()), second)
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


HOSTILE = """
net __import__
input os: 3 x 8 x 8
__import__ = conv(os, 4, size=3) | relu
eval = maxpool(__import__, 2)
exec = fc(eval, 3)
"""


def test_hostile_names_never_become_code(tmp_path):
    weird = tmp_path / 'we"ird\\n\u00e9\u200b .net'
    weird.write_text(HOSTILE)
    compiled = compile_net(weird, Options())
    for name, source in compiled.kernels.items():
        assert name.isascii() and name.replace("_", "a").removesuffix(".py").isalnum()
        tree = ast.parse(source)
        calls = {
            node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert not calls & {"eval", "exec", "__import__", "compile"}
        docstring = ast.get_docstring(tree)
        assert '"' not in docstring and "\\" not in docstring
        assert source.isascii()


def test_unicode_names_are_rejected_by_the_grammar():

    with pytest.raises(NetError):
        graph_from_text("input x: 3\n\u00e9t\u00e9 = fc(x, 2)\n")


def test_compile_cli_refuses_an_unwritable_output(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("not a directory")
    assert main(["compile", str(ROOT / "nets/lenet5.net"), "-o", str(target), "--no-sm90"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_cache_entries_are_atomic_and_corrupt_ones_are_ignored(tmp_path):
    entry = {
        "name": "k",
        "registers": 40,
        "spill_stores": 0,
        "spill_loads": 0,
        "stack_bytes": 0,
        "shared_bytes": 0,
        "local_bytes": 0,
        "mma": [],
        "cubin_sha256": "0" * 64,
        "ptx_sha256": "1" * 64,
        "key": "key",  # the file's name
    }
    entry["sha256"] = _record_checksum(entry)
    path = tmp_path / "cache" / "key.json"
    _write_cache(path, entry)
    assert _read_cache(path) == entry
    renamed = path.rename(path.with_name("other.json"))  # whole, but not the entry of that key
    assert _read_cache(renamed) is None
    renamed.rename(path)
    path.write_text(json.dumps({**entry, "registers": 7}))  # edited: no longer its checksum
    assert _read_cache(path) is None
    assert not list(path.parent.glob(".*"))  # no temporary left behind
    path.write_text('{"name": "k", "regis')  # a torn or corrupt entry
    assert _read_cache(path) is None
    path.write_text('{"name": "k"}')  # an entry from an older netdsl
    assert _read_cache(path) is None


def _compile_into(out: str) -> None:
    write_build(compile_net(ROOT / "nets/alexnet.net", Options(batch=8)), out, Options(batch=8))


def test_two_compiles_into_one_directory_do_not_collide(tmp_path):
    import multiprocessing

    out = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_compile_into, args=(str(out),)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    single = tmp_path / "single"
    _compile_into(str(single))
    for path in single.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(single)).read_bytes() == path.read_bytes(), path.name
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_a_folder_swapped_in_by_another_writer_meanwhile_is_moved_aside_too(tmp_path, monkeypatch):
    """The race the test above can lose: after `swap_folder` moved the old folder aside, another writer puts
    its own in place just before our rename; ours is renamed in on the next try, and neither the old folder
    nor the other writer's is left behind."""
    from netdsl.compiler.compile import swap_folder

    current, new = tmp_path / "kernels", tmp_path / "staged"
    for folder, text in ((current, "old"), (new, "ours")):
        folder.mkdir()
        (folder / "k.py").write_text(text)
    real_rename, raced = Path.rename, []

    def rename(self, target):
        if self == new and not raced:  # the other writer is quicker, once
            raced.append(True)
            Path(target).mkdir()
            (Path(target) / "k.py").write_text("theirs")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    swap_folder(current, new)
    assert raced and (current / "k.py").read_text() == "ours" and not new.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kernels"]


def test_plan_records_each_launch_grid(tmp_path):
    _compile_into(str(tmp_path))
    plan = json.loads((tmp_path / "plan.json").read_text())
    kernels = [e for d in plan["devices"].values() for e in d["launches"] if "kernel" in e]
    assert kernels and all(e["grid"] and all(g > 0 for g in e["grid"]) and e["num_warps"] for e in kernels)
    conv1 = next(e for e in kernels if e["step"] == "conv1_gpu0_conv_bias_relu")
    assert conv1["constexprs"]["KH"] == 11 and conv1["constexprs"]["NUM_INPUTS"] == 1


def test_dropout_reading_every_tower_becomes_the_join():
    text = "input x: 4\ntowers a, b { h = fc(x, 3) }\nd = dropout(all h)\ny = softmax(d)\n"
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options())
    assert [step.kind for step in steps(program)].count("concat") == 1


def test_every_mutant_that_builds_also_compiles():
    from test_fuzz import mutants

    from netdsl.compiler.emit import emit_program
    from netdsl.compiler.plan import build_plan
    from netdsl.compiler.report import cost_report

    compiled = 0
    for path in NETS:
        for text in mutants(path.read_text(), 11, 40):
            try:
                graph = build(parse_text(text, "mutant.net"))
            except (NetError, RecursionError):
                continue
            try:
                after = run_passes(graph, Options())
            except NetError:
                continue  # e.g. a shape error, reported as such
            program = after["plan_memory"]
            emit_program(program)
            build_plan(program, Options())
            cost_report(program, after["shapes"], 2, "bf16")
            compiled += 1
    assert compiled > 20


def test_the_cost_model_picks_the_one_kernel_stage_where_it_wins():
    from netdsl.compiler.cost import stage_floors

    for dtype, batch in [("fp32", 1), ("bf16", 128), ("tf32", 128)]:
        program = program_of(ROOT / "nets/alexnet.net", batch=batch, dtype=dtype)
        for step in steps(program):
            if step.kind == "conv_lrn_maxpool":
                apart, together = stage_floors(step.layers, batch, dtype)
                assert together < apart
            elif step.kind == "lrn_maxpool":
                conv = program.nodes[step.inputs[0]]["step"]
                apart, together = stage_floors(conv.layers + step.layers, batch, dtype)
                assert together >= apart
    fused = [s.name for s in steps(program_of(ROOT / "nets/alexnet.net", batch=128, dtype="tf32"))]
    assert "conv1_gpu0_conv_bias_relu_lrn_maxpool" in fused  # conv1 at TF32: one kernel wins


def test_a_build_that_fails_midway_leaves_the_earlier_build_whole(tmp_path, monkeypatch):
    """Recompiling into a build folder: the kernels are written beside the old ones and swapped in only
    when all of them (and the recorded launches) are there; a failure on the way changes nothing."""
    import netdsl.compiler.compile as compile_module

    out = tmp_path / "build"
    write_build(compile_net(ROOT / "nets/lenet5.net", Options()), out, Options())
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    (out / "mine.txt").write_text("a user's file")
    real, calls = compile_module.write_atomic, []

    def fail_on_the_third(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise NetError(f"cannot write {path}: No space left on device", where=str(path))
        return real(path, text)

    monkeypatch.setattr(compile_module, "write_atomic", fail_on_the_third)
    with pytest.raises(NetError, match="No space left"):
        write_build(compile_net(ROOT / "nets/simplenet.net", Options()), out, Options())
    monkeypatch.undo()
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after.pop(Path("mine.txt")) == b"a user's file"
    assert after == before  # the earlier build, every byte, and nothing left half-written beside it
    assert sorted(path.name for path in out.iterdir()) == ["kernels", "mine.txt", "plan.json", "report.txt"]
    write_build(compile_net(ROOT / "nets/simplenet.net", Options()), out, Options())  # and then it succeeds
    kernels = sorted(path.name for path in (out / "kernels").iterdir())
    assert kernels and all(name.startswith(("s1", "s2", "s3", "s4", "logits", "image", "prob")) for name in kernels)
    assert (out / "mine.txt").exists()


@pytest.mark.parametrize("failing", ["plan.json", "report.txt"])
def test_a_plan_or_report_that_cannot_be_written_leaves_the_earlier_build_whole(tmp_path, monkeypatch, failing):
    """plan.json and report.txt are written whole before the kernels are swapped in: a disk that fills up
    on either leaves the earlier build's kernels, plan and report as they were (not new kernels beside an
    old plan that names another net)."""
    import netdsl.compiler.compile as compile_module

    out = tmp_path / "build"
    write_build(compile_net(ROOT / "nets/lenet5.net", Options()), out, Options())
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    real = compile_module.write_temporary

    def full_disk(path, data):
        if path.name == failing:
            raise NetError(f"cannot write {path}: No space left on device", where=str(path))
        return real(path, data)

    monkeypatch.setattr(compile_module, "write_temporary", full_disk)
    with pytest.raises(NetError, match="No space left"):
        write_build(compile_net(ROOT / "nets/simplenet.net", Options()), out, Options())
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before
    assert sorted(path.name for path in out.iterdir()) == ["kernels", "plan.json", "report.txt"]


@pytest.mark.parametrize(
    "chain, channels, layout, refused",
    [
        ("", 3, "auto", True),  # few channels: the NCHW kernel
        (" | relu | lrn(3) | maxpool(2)", 3, "auto", True),  # never the fused stage: conv.py, which refuses
        (" | relu | lrn(3) | maxpool(2)", 16, "auto", False),  # not fused either: channels-last, then LRN + pool
        ("", 16, "nchw", True),
        ("", 16, "auto", False),  # channels-last: any size
    ],
)
def test_a_filter_too_large_for_the_nchw_kernels_is_an_error_at_the_layer(tmp_path, chain, channels, layout, refused):
    """codegen/conv.py marks a pixel's taps in one int32 (KH + KW <= 31): a 16 x 16 filter there is an error at
    its layer when the kernels are built (it was an internal error at launch); the torch backend runs it."""
    net = tmp_path / "big.net"
    net.write_text(f"input image: {channels} x 20 x 20\na = conv(image, 4, size=(16, 16), pad=same){chain}\n")
    compiled = compile_net(net, Options(layout=layout))
    assert not any(compiled.program.nodes[name]["step"].kind == "conv_lrn_maxpool" for name in compiled.program)
    if refused:
        with pytest.raises(NetError, match=r"a 16 x 16 filter is too large for the NCHW conv kernel") as info:
            write_build(compiled, tmp_path / "build")
        assert (info.value.span.line, info.value.span.col) == (2, 5)
        assert not (tmp_path / "build" / "kernels").exists()
    else:
        write_build(compiled, tmp_path / "build", Options(layout=layout))
    x = np.random.default_rng(6).standard_normal((1, channels, 20, 20)).astype(np.float32)
    assert np.isfinite(netdsl.load(net, backend="torch", layout=layout)(x).numpy()).all()
