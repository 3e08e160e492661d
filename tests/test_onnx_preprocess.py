"""Trained preprocessing through ONNX (netdsl/interop/onnx_metadata.py): `netdsl export` keeps the weights'
"netdsl.preprocess" record (size, crop, channels, mean, std, class names) in the model's metadata_props, the
class names also as "names"; `netdsl import` and `netdsl run model.onnx` bring it back, so an image goes
through the ONNX model exactly as through the .net file and its weights. A damaged record is an error that
names the file it is in, and nothing is written."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from netdsl.cli.main import main  # noqa: E402
from netdsl.errors import NetError  # noqa: E402
from netdsl.interop.onnx_export import build_onnx, export_onnx  # noqa: E402
from netdsl.interop.onnx_import import import_onnx  # noqa: E402
from netdsl.lang.frontend import graph_from_text  # noqa: E402
from netdsl.runtime.weights import init_weights, save_weights, weights_metadata  # noqa: E402
from netdsl.train.augment import Preprocess  # noqa: E402

TINY = """
net tiny
input image: 1 x 12 x 12
c1 = conv(image, 4, size=3) | relu | maxpool(2)
f2 = fc(c1, 5)
output f2
"""
CLASSES = ["ant", "bee", "cat", "dog", "eel's"]  # a quote in a name: "names" must still read back
PREPROCESS = Preprocess(size=16, crop=(12, 12), channels=1, mean=(90.0,), std=(40.0,), classes=CLASSES)


@pytest.fixture
def trained(tmp_path):
    """A tiny net, a run folder holding its weights with a preprocessing record (as `netdsl train` leaves
    one), and a gray image of another size than the net's input."""
    from PIL import Image

    net = tmp_path / "tiny.net"
    net.write_text(TINY, encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    weights = init_weights(graph_from_text(TINY), seed=3, scheme="he")
    save_weights(run / "weights.safetensors", weights, metadata={"netdsl.preprocess": PREPROCESS.to_json()})
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(7).integers(0, 256, (18, 20), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return net, run, image


def _run(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["run", *map(str, argv), "--backend", "torch"]) == 0
    return capsys.readouterr().out


def _props(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


def test_export_keeps_the_preprocessing_and_run_uses_it(trained, tmp_path, capsys):
    """Export from a run folder; `netdsl run model.onnx` prints the classes and scores `netdsl run` of the
    .net with the weights prints, and `netdsl import` writes the record into its weights file."""
    net, run, image = trained
    model = tmp_path / "tiny.onnx"
    assert main(["export", str(net), "-o", str(model), "--weights", str(run)]) == 0
    props = _props(model)
    assert props["netdsl.preprocess"] == PREPROCESS.to_json()
    assert ast.literal_eval(props["names"]) == dict(enumerate(CLASSES))  # a Python literal, as Ultralytics writes it

    expected = _run(capsys, net, "--weights", run, "--input", image, "--top", "5")
    assert all(name in expected for name in CLASSES)
    assert _run(capsys, model, "--input", image, "--top", "5") == expected

    assert main(["import", str(model), "-o", str(tmp_path / "back.net")]) == 0
    back = tmp_path / "back.safetensors"
    assert weights_metadata(back) == {"netdsl.preprocess": PREPROCESS.to_json()}
    assert _run(capsys, tmp_path / "back.net", "--weights", back, "--input", image, "--top", "5") == expected


def test_weights_without_a_record_or_classes(trained, tmp_path):
    """Untrained weights give a model without metadata; a record without class names gives no "names"."""
    net, _, _ = trained
    assert main(["export", str(net), "-o", str(tmp_path / "plain.onnx")]) == 0
    assert _props(tmp_path / "plain.onnx") == {}
    assert import_onnx(tmp_path / "plain.onnx").metadata == {}

    graph = graph_from_text(TINY)
    nameless = Preprocess(size=None, crop=(12, 12), channels=1, mean=(0.5,)).to_json()
    export_onnx(graph, init_weights(graph), tmp_path / "nameless.onnx", preprocess=nameless)
    assert _props(tmp_path / "nameless.onnx") == {"netdsl.preprocess": nameless}
    assert import_onnx(tmp_path / "nameless.onnx").metadata == {"netdsl.preprocess": nameless}
    with pytest.raises(NetError, match="not a JSON object"):
        build_onnx(graph, init_weights(graph), preprocess="[1, 2]")


def _edited(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == "netdsl.preprocess":
            prop.value = edit(prop.value)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[:-5], "the saved preprocessing is damaged"),
        (lambda text: text.replace('"std": [40.0]', '"std": [0.0]'), "the saved preprocessing is damaged"),
        (lambda text: text.replace('"crop": [12, 12]', '"crop": [10, 12]'), "trained on 1 x 10 x 12 inputs"),
    ],
    ids=["truncated", "zero-std", "other-input"],
)
def test_a_damaged_record_in_a_model_names_the_model(edit, message, trained, tmp_path, capsys):
    net, run, image = trained
    assert main(["export", str(net), "-o", str(tmp_path / "good.onnx"), "--weights", str(run)]) == 0
    model = _edited(tmp_path / "good.onnx", tmp_path / "bad.onnx", edit)
    capsys.readouterr()
    assert main(["run", str(model), "--input", str(image), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{model}: error: ") and message in err and "Traceback" not in err
    assert main(["import", str(model), "-o", str(tmp_path / "bad.net")]) == 1
    assert err == capsys.readouterr().err
    assert not (tmp_path / "bad.net").exists() and not (tmp_path / "bad.safetensors").exists()


def test_a_damaged_record_in_the_weights_is_not_exported(trained, tmp_path, capsys):
    net, _, _ = trained
    record = json.loads(PREPROCESS.to_json())
    weights = dict(init_weights(graph_from_text(TINY)))
    for name, value in [("damaged.safetensors", "{"), ("other.safetensors", json.dumps({**record, "crop": [10, 10]}))]:
        save_weights(tmp_path / name, weights, metadata={"netdsl.preprocess": value})
        model = tmp_path / f"{name}.onnx"
        capsys.readouterr()
        assert main(["export", str(net), "-o", str(model), "--weights", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"{tmp_path / name}: error: ") and "Traceback" not in err
        assert not model.exists()


def test_a_run_folder_without_weights(trained, tmp_path, capsys):
    net, _, _ = trained
    (tmp_path / "empty").mkdir()
    assert main(["export", str(net), "-o", str(tmp_path / "x.onnx"), "--weights", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty' / 'weights.safetensors'}: error: weights file not found" in err
