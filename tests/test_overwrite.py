"""No command writes its output over a file it reads: `export -o NET`, `graph -o NET`, `import -o MODEL`,
`run --save INPUT`, `tune -o NET` are refused before anything is written, and the file is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from netdsl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "nets" / "lenet5.net", "net.net")
    np.save("x.npy", np.random.default_rng(3).standard_normal((1, 1, 32, 32)).astype(np.float32))
    return tmp_path


def _refused(argv, victim: Path, flag: str, capsys) -> None:
    if not victim.exists():
        victim.write_text("\n".join(str(i) for i in range(10)) + "\n")
    before = victim.read_bytes()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{flag}: error:" in err and "writing it would destroy it" in err and "Traceback" not in err
    assert victim.read_bytes() == before, "the file read was left as it was"


@pytest.mark.parametrize(
    "argv, victim, flag",
    [
        (["export", "net.net", "-o", "net.net"], "net.net", "--output"),
        (["graph", "net.net", "-o", "./net.net"], "net.net", "--output"),
        (["run", "net.net", "--backend", "torch", "--input", "x.npy", "--save", "x.npy"], "x.npy", "--save"),
        (["run", "net.net", "--backend", "torch", "--random", "1", "--save", "net.net"], "net.net", "--save"),
        (["tune", "net.net", "--device", "cpu", "-o", "net.net"], "net.net", "--output"),
        (["run", "net.net", "--backend", "torch", "--random", "1", "--labels", "names.txt", "--save", "names.txt"],
         "names.txt", "--save"),
    ],
    ids=["export", "graph", "run-input", "run-net", "tune", "run-labels"],
)
def test_an_output_over_an_input_is_refused(files, capsys, argv, victim, flag):
    _refused(argv, files / victim, flag, capsys)


def test_import_refuses_to_write_over_its_model(files, capsys):
    pytest.importorskip("onnx")
    assert main(["export", "net.net", "-o", "m.onnx"]) == 0
    capsys.readouterr()
    model = (files / "m.onnx").read_bytes()
    for argv in (["import", "m.onnx", "-o", "m.onnx"], ["import", "m.onnx", "-o", "n.net", "--weights-out", "m.onnx"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "m.onnx is a file this command reads: writing it would destroy it" in err and "Traceback" not in err
        assert (files / "m.onnx").read_bytes() == model
    assert not (files / "n.net").exists()


def test_graph_is_written_whole(files, capsys):
    """`graph -o` goes through a temporary file: no stray temporary is left, and the file is complete."""
    assert main(["graph", "net.net", "-o", "g.dot"]) == 0
    text = (files / "g.dot").read_text()
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == []


def test_run_does_not_save_over_the_onnx_model_or_the_build_it_runs(files, capsys):
    """The ONNX model is imported into a temporary folder and a build folder read for its net before the run:
    --save is checked against what the user named, not only what it became."""
    pytest.importorskip("onnx")
    assert main(["export", "net.net", "-o", "m.onnx"]) == 0
    assert main(["compile", "net.net", "-o", "build"]) == 0
    capsys.readouterr()
    run = ["run", "--backend", "torch", "--random", "1", "--save"]
    _refused([run[0], "m.onnx", *run[1:], "m.onnx"], files / "m.onnx", "--save", capsys)
    _refused([run[0], "build", *run[1:], "build/plan.json"], files / "build" / "plan.json", "--save", capsys)
    _refused(["graph", "m.onnx", "-o", "m.onnx"], files / "m.onnx", "--output", capsys)
    assert main([run[0], "build", *run[1:], "build/out.npy"]) == 0  # beside the build's own files: allowed
