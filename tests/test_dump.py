"""What `netdsl compile` prints and writes. `--dump-after PASS`: after `plan_memory` the listing also
shows the memory plan, each step's buffer (offset and size in elements per image, or the buffer a view
shares) and each device's arena with and without reuse, read here against the plan itself. The build
files get the mode any new file gets (0666 less the umask), though each is written to a temporary
name first."""

import os
import re
import stat
from pathlib import Path

import pytest

from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.passes import PASS_NAMES, Options, run_pipeline
from netdsl.files import write_atomic
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file

ROOT = Path(__file__).resolve().parent.parent
BEFORE_MEMORY = PASS_NAMES[PASS_NAMES.index("plan_memory") - 1]  # the pass that runs just before it

# One device, a flatten (a view: no buffer of its own) and two outputs.
VIEWS = """
net views
input x: 2 x 6 x 6
a = conv(x, 4, size=3) | relu | flatten
b = fc(a, 3)
output a, b
"""


def dump_of(path: Path, tmp_path: Path, capsys, after: str) -> str:
    assert main(["compile", str(path), "-o", str(tmp_path / "build"), "--no-sm90", "--dump-after", after]) == 0
    out = capsys.readouterr().out
    return out[: out.index(f"net {path.stem}:")]  # the dump, without the report that follows it


def net_file(name: str, tmp_path: Path) -> Path:
    if name == "views":
        path = tmp_path / "views.net"
        path.write_text(VIEWS, encoding="utf-8")
        return path
    return ROOT / "nets" / f"{name}.net"


@pytest.mark.parametrize("name", ["alexnet", "views"])
def test_dump_after_plan_memory_shows_every_buffer_and_arena(name, tmp_path, capsys):
    path = net_file(name, tmp_path)
    dump = dump_of(path, tmp_path, capsys, "plan_memory")
    program, _ = run_pipeline(build(parse_file(path)), Options())
    assert "# buffers and arenas in elements per image" in dump
    lines = {line.split(" = ")[0].strip(): line for line in dump.splitlines() if " = " in line}
    assert set(lines) == set(program.nodes)
    buffers, views = program.graph["buffers"], program.graph["views"]
    assert set(buffers) | set(views) == set(program.nodes)
    for step, buffer in buffers.items():
        assert lines[step].endswith(f"  buffer offset {buffer.offset} size {buffer.size}"), lines[step]
    for step, root in views.items():
        assert lines[step].endswith(f"  view of {root}"), lines[step]
    arenas = dict(re.findall(r"^  arena (\w+): (peak \d+ with reuse, \d+ without reuse)$", dump, re.MULTILINE))
    assert arenas == {
        device: f"peak {peak} with reuse, {program.graph['arena_without_reuse'][device]} without reuse"
        for device, peak in program.graph["arena"].items()
    }
    if name == "alexnet":
        assert set(arenas) == {"gpu0", "gpu1"}
        # Each device's arena line closes its own listing.
        for device in arenas:
            section = dump.split(f"device {device}:\n")[1].split("device ")[0]
            assert section.rstrip("\n").splitlines()[-1].startswith(f"  arena {device}: ")
    else:
        assert views == {"a_flatten_gpu0_flatten": "a_gpu0_conv_bias_relu"}


def test_dump_after_plan_memory_differs_from_the_pass_before_only_by_the_plan(tmp_path, capsys):
    path = ROOT / "nets" / "alexnet.net"
    before = dump_of(path, tmp_path, capsys, BEFORE_MEMORY)
    after = dump_of(path, tmp_path, capsys, "plan_memory")
    assert before != after
    assert "buffer offset" not in before and "arena" not in before
    stripped = [
        re.sub(r"  (buffer offset \d+ size \d+|view of \w+)$", "", line)
        for line in after.splitlines()
        if not line.startswith(("# buffers", "  arena "))
    ]
    assert stripped == before.splitlines()


def test_dump_of_the_layer_graph_has_no_memory_plan(tmp_path, capsys):
    dump = dump_of(ROOT / "nets" / "lenet5.net", tmp_path, capsys, "shapes")
    assert "c1 = conv(image" in dump and "buffer" not in dump and "arena" not in dump


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_build_files_honour_the_umask(umask, tmp_path):
    compiled = compile_net(ROOT / "nets" / "lenet5.net", Options())
    previous = os.umask(umask)
    try:
        out = write_build(compiled, tmp_path / "build")
        write_atomic(out / "report.txt", "rewritten\n")  # a file replaced keeps the new file's mode
    finally:
        os.umask(previous)
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) == len(compiled.kernels) + 2  # kernels, plan.json, report.txt: no temporaries left
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_every_file_a_user_gets_honours_the_umask(tmp_path):
    """Not only the build folder: an exported model, an imported net and its weights, saved outputs."""
    previous = os.umask(0o027)
    try:
        model, imported, outputs = tmp_path / "m.onnx", tmp_path / "m.net", tmp_path / "y.npy"
        assert main(["export", str(ROOT / "nets" / "lenet5.net"), "-o", str(model)]) == 0
        assert main(["import", str(model), "-o", str(imported)]) == 0
        args = ["run", str(ROOT / "nets" / "lenet5.net"), "--backend", "torch", "--random", "2", "--save", str(outputs)]
        assert main(args) == 0
    finally:
        os.umask(previous)
    written = sorted(tmp_path.iterdir())
    assert [path.name for path in written] == ["m.net", "m.onnx", "m.safetensors", "y.npy"]  # no temporaries
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name
