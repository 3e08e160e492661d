"""`netdsl eval` on data other than the run's: classes matched by name, views as the run trained.

A tiny net trained a step on a folder of three named classes (random seeded images) is evaluated on a
folder holding two of them, in another order of labels: each image must be scored against the class it was
trained as, as evaluating the whole folder shows; a class the weights never saw is an error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_support import PLAIN, trained_on_folder
from train_support import THREE_CLASSES as TINY

from netdsl.cli.main import main
from netdsl.errors import NetError
from netdsl.lang.frontend import load_graph
from netdsl.train.data import labels_by_name


def test_labels_by_name():
    trained = ["cat", "dog", "owl"]
    assert labels_by_name(["dog", "owl"], trained, "d") == [1, 2]
    assert labels_by_name(trained, trained, "d") is None
    assert labels_by_name(["0", "1"], trained, "d") is None  # an .npz without names numbers its classes
    assert labels_by_name(["owl"], [], "d") is None  # weights without class names
    with pytest.raises(NetError, match="class emu is not among the 3") as caught:
        labels_by_name(["dog", "emu"], trained, "data/")
    assert caught.value.where == "data/" and "cat, dog, owl" in str(caught.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(net, run, data folder with classes cat, dog, owl, five images each): one training step."""
    return trained_on_folder(tmp_path_factory.mktemp("eval"), per_class=5, seed=7, steps=1)


def evaluate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def class_rows(report: str) -> dict[str, str]:
    """Per-class rows of eval's table by class name: `index name images top-1`."""
    rows = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and re.fullmatch(r"[\d.]+%|-", parts[3]):
            rows[parts[1]] = line.strip()
    return rows


def test_a_folder_of_some_of_the_classes(trained, tmp_path, capsys):
    net, run, folder = trained
    code, whole, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all")
    assert code == 0 and whole.startswith("images 15 ")
    some = tmp_path / "some"
    for name in ("dog", "owl"):  # labels 0 and 1 in this folder, 1 and 2 in training
        shutil.copytree(folder / name, some / name)
    code, out, err = evaluate(capsys, net, "--weights", run, "--data", some, "--split", "all")
    assert code == 0 and out.startswith("images 10 ")
    assert "matched by name" in err
    rows, want = class_rows(out), class_rows(whole)
    assert rows["dog"] == want["dog"] and rows["owl"] == want["owl"] and rows["cat"].split()[2] == "0"


def test_several_scales_average_the_softmax_of_every_scales_views(trained, capsys):
    """`--scales 9,12 --views 10`: each image's probabilities are the mean over both shorter sides of the mean
    over its ten views' softmax, written out here with the net and the weights' own preprocessing at each
    size; eval's loss and top-1 over the 15 images are those of the average (the loss to its 4 decimals)."""
    import dataclasses

    import torch

    import netdsl
    from netdsl.train.start import saved_preprocess

    net, run, folder = trained
    code, out, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--views", 10,
                            "--scales", "9,12")  # fmt: skip
    assert code == 0 and out.startswith("images 15 ")
    weights = run / "weights.safetensors"
    preprocess, model = saved_preprocess(weights), netdsl.load(net, weights=str(weights))
    assert preprocess.size == 9  # the run's own: round(8 * 256 / 224)
    losses, right = [], 0
    for label, name in enumerate(("cat", "dog", "owl")):
        for path in sorted((folder / name).glob("*.png")):
            probs = []
            for size in (9, 12):
                views = dataclasses.replace(preprocess, size=size).views(path, 10)
                probs.append(torch.softmax(torch.as_tensor(model(torch.from_numpy(views))).double(), 1).mean(0))
            mean = torch.stack(probs).mean(0)
            losses.append(-float(torch.log(mean[label])))
            right += int(mean.argmax()) == label
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    loss = float(out.split("loss ")[1].split()[0])
    assert top1 == pytest.approx(100 * right / 15, abs=0.006) and loss == pytest.approx(np.mean(losses), abs=6e-5)
    code, one, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--views", 10)
    code_again, same, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--views", 10,
                                   "--scales", "9")  # fmt: skip
    assert code == code_again == 0 and one == same  # the one size the weights were trained with: the default
    code, again, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--views", 10,
                              "--scales", "9,12", "--workers", "1", "--batch", "3")  # fmt: skip
    assert code == 0 and again.splitlines()[0] == out.splitlines()[0]  # a loading process, passes of one image


def test_eval_decodes_each_image_once_for_all_its_scales(trained, tmp_path, capsys, monkeypatch):
    """Three scales decode no more files than one (views and --dense alike): each image once for all its sizes;
    an ensemble of models that prepare images alike (here the run and its last checkpoint) once for all; and so
    does one whose models prepare them otherwise (another mean; a 10 x 10 net, its own size and crop), each
    model's probabilities (--save of it alone) as they are without the others."""
    from netdsl.train import data
    from netdsl.train.start import saved_preprocess

    net, run, folder = trained
    big, mean, large = tmp_path / "big.net", tmp_path / "mean", tmp_path / "large"
    big.write_text(TINY.replace("1 x 8 x 8", "1 x 10 x 10"))
    for model, out, extra in ((net, mean, ["--mean", "90"]), (big, large, [])):
        assert main(["train", str(model), "--data", str(folder), "--batch", "4", "--steps", "1", *PLAIN, *extra,
                     "--out", str(out)]) == 0  # fmt: skip
    prepared = [saved_preprocess(each / "weights.safetensors") for each in (run, mean, large)]
    assert len({each.to_json() for each in prepared}) == 3 and prepared[2].crop == (10, 10)
    decoded = []
    image = data.ImageFiles.image
    monkeypatch.setattr(data.ImageFiles, "image", lambda self, index: decoded.append(index) or image(self, index))
    ensembles = [([net], [run]), ([net], [run, run / "checkpoints/last.ckpt"]), ([net, net, big], [run, mean, large])]
    for extra in ((), ("--dense",)):
        counts = []
        for scales, (nets, weights) in zip(("9", "9,10,12", "9,10,12", "9,10,12"), [ensembles[0], *ensembles]):
            decoded.clear()
            save = tmp_path / f"all{len(counts)}.npz"
            code, out, _ = evaluate(capsys, *nets, "--weights", *weights, "--data", folder, "--split", "all",
                                    "--scales", scales, "--save", save, "--batch", 4, *extra)  # fmt: skip
            assert code == 0 and "images 15 " in out and (f"ensemble of {len(weights)}" in out) == (len(weights) > 1)
            counts.append(len(decoded))
        assert counts[0] == counts[1] == counts[2] == counts[3] >= 15, (extra, counts)
        together = np.load(save)["probabilities"]  # the last ensemble's: the mean of its models'
        alone = []
        for model, weights in zip(*ensembles[2], strict=True):
            code, _, _ = evaluate(capsys, model, "--weights", weights, "--data", folder, "--split", "all",
                                  "--scales", "9,10,12", "--save", tmp_path / "alone.npz", *extra)  # fmt: skip
            assert code == 0
            alone.append(np.load(tmp_path / "alone.npz")["probabilities"])
        np.testing.assert_allclose(together, np.mean(alone, axis=0), rtol=0, atol=1e-6)
        assert np.abs(alone[0] - alone[1]).max() > 1e-4 and np.abs(alone[0] - alone[2]).max() > 1e-4


def test_an_ensemble_of_gray_and_colour_nets_decodes_each_image_once_for_each(trained, tmp_path, capsys, monkeypatch):
    """A gray net and an RGB net trained on the same gray images: each image is decoded as gray as often as for
    the gray net alone, and once as RGB (as the RGB net alone reads it); the ensemble's probabilities are the
    mean of theirs alone."""
    from netdsl.train import data

    net, run, folder = trained
    colour, out = tmp_path / "colour.net", tmp_path / "colour"
    colour.write_text(TINY.replace("1 x 8 x 8", "3 x 8 x 8"))
    assert main(["train", str(colour), "--data", str(folder), "--batch", "4", "--steps", "1", *PLAIN,
                 "--out", str(out)]) == 0  # fmt: skip
    decoded = []
    image = data.ImageFiles.image
    monkeypatch.setattr(data.ImageFiles, "image", lambda self, index: decoded.append(self.preprocess.channels)
                        or image(self, index))  # fmt: skip
    alone = []
    for model, weights in ((net, run), (colour, out)):
        code, _, _ = evaluate(capsys, model, "--weights", weights, "--data", folder, "--split", "all", "--save",
                              tmp_path / "alone.npz")  # fmt: skip
        assert code == 0
        alone.append(np.load(tmp_path / "alone.npz")["probabilities"])
    counts = []
    for nets, weights in (([net], [run]), ([net, colour], [run, out])):
        decoded.clear()
        code, _, _ = evaluate(capsys, *nets, "--weights", *weights, "--data", folder, "--split", "all", "--views", 10)
        assert code == 0
        counts.append((decoded.count(1), decoded.count(3)))
    assert counts[1] == (counts[0][0], 15) and counts[0][1] == 0, counts  # the gray ones as alone, and 15 in RGB
    code, _, _ = evaluate(capsys, net, colour, "--weights", run, out, "--data", folder, "--split", "all", "--save",
                          tmp_path / "both.npz")  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "both.npz")["probabilities"], np.mean(alone, axis=0), atol=1e-6)


def test_dense_evaluation_averages_each_whole_images_scores_over_positions(trained, capsys, monkeypatch):
    """`--dense --scales 9,12`: each whole image scaled to 9 and to 12, the net's fc as a 3 x 3 convolution over
    its pooled map (one position at 9, 3 x 3 at 12), the scores averaged over the positions, their softmax
    averaged over the sizes; written out by hand with F.conv2d and the run's weights (trained without flips:
    no mirror), against eval's top-1 and loss over the 15 images."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from safetensors.numpy import load_file

    from netdsl.train.start import saved_preprocess

    net, run, folder = trained
    code, out, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--dense",
                            "--scales", "9,12")  # fmt: skip
    assert code == 0 and out.startswith("images 15 ")
    weights = {name: torch.from_numpy(value) for name, value in load_file(run / "weights.safetensors").items()}
    preprocess = saved_preprocess(run / "weights.safetensors")
    losses, right, positions = [], 0, set()
    for label, name in enumerate(("cat", "dog", "owl")):
        for path in sorted((folder / name).glob("*.png")):
            probs = []
            for size in (9, 12):
                view = dataclasses.replace(preprocess, size=size)
                x = torch.from_numpy(view.normalize(view.pixels(path)))[None]
                x = F.max_pool2d(F.relu(F.conv2d(x, weights["c1.weight"], weights["c1.bias"])), 2, 2)
                scores = F.conv2d(x, weights["f2.weight"].view(3, 4, 3, 3), weights["f2.bias"])
                positions.add(scores.shape[2:])
                probs.append(torch.softmax(scores.double().mean(dim=(2, 3)), dim=1)[0])
            mean = torch.stack(probs).mean(0)
            losses.append(-float(torch.log(mean[label])))
            right += int(mean.argmax()) == label
    assert positions == {(1, 1), (3, 3)}
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    loss = float(out.split("loss ")[1].split()[0])
    assert top1 == pytest.approx(100 * right / 15, abs=0.006) and loss == pytest.approx(np.mean(losses), abs=6e-5)
    code, again, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--dense",
                              "--scales", "9,12", "--workers", "1", "--batch", "2")  # fmt: skip
    assert code == 0 and again.splitlines()[0] == out.splitlines()[0]  # a loading process, passes of other sizes
    code, centre, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--scales", "12")
    assert code == 0 and centre.split("loss ")[1].split()[0] != out.split("loss ")[1].split()[0]
    code, _, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--dense", "--views", 10)
    assert code == 1 and err.startswith("--views: error: ") and "Traceback" not in err
    from netdsl.runtime.module import GraphModule

    built, init = [], GraphModule.__init__  # the backends the dense nets were built for
    monkeypatch.setattr(GraphModule, "__init__", lambda net, *a, **k: built.append(k["backend"]) or init(net, *a, **k))
    code, kernels, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--dense",
                                "--scales", "9,12", "--backend", "triton")  # fmt: skip
    assert built == ["triton", "triton"]  # one net for each size
    assert code == 0 and kernels.split("top-1 ")[1].split("%")[0] == out.split("top-1 ")[1].split("%")[0]
    assert float(kernels.split("loss ")[1].split()[0]) == pytest.approx(loss, abs=6e-5)  # netdsl's kernels, fp32


@pytest.mark.parametrize("way", ["views", "dense"])
def test_sixteen_bit_measuring_is_close_to_fp32(trained, capsys, monkeypatch, way):
    """`--dtype bf16|fp16`: the views through a Net in that dtype, the dense nets under autocast in it (as training
    computes); the loss within the 16-bit rounding of fp32's (bf16 keeps 8 significant bits, fp16 11)."""
    from netdsl.runtime.net import Net
    from netdsl.train import evaluate as measuring

    net, run, folder = trained
    extra = ["--views", "10", "--scales", "8,12"] if way == "views" else ["--dense", "--scales", "9,12"]
    code, out, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", *extra)
    assert code == 0
    loss = float(out.split("loss ")[1].split()[0])
    used, init, autocast = [], Net.__init__, measuring.autocast  # what the measuring computed in
    monkeypatch.setattr(Net, "__init__", lambda net, *a, **k: used.append(k["dtype"]) or init(net, *a, **k))
    monkeypatch.setattr(measuring, "autocast", lambda dtype, devices: used.append(dtype) or autocast(dtype, devices))
    for dtype, tolerance in (("bf16", 2e-2), ("fp16", 3e-3)):
        used.clear()
        code, out, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", *extra,
                                "--dtype", dtype)  # fmt: skip
        assert code == 0 and set(used) == {dtype}
        assert float(out.split("loss ")[1].split()[0]) == pytest.approx(loss, rel=tolerance)


def test_an_onnx_model_is_measured_with_its_own_weights(trained, tmp_path, capsys):
    """`eval model.onnx`: the model written by `netdsl export` (its weights, preprocessing and class names inside)
    measures as the net and its run do, views and dense; a .net file without --weights is refused."""
    pytest.importorskip("onnx")
    net, run, folder = trained
    model = tmp_path / "tiny.onnx"
    assert main(["export", str(net), "--weights", str(run), "-o", str(model)]) == 0
    for extra in ([], ["--dense", "--scales", "9,12"]):
        code, want, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", *extra)
        assert code == 0 and want.startswith("images 15 ") and "cat" in want
        assert evaluate(capsys, model, "--data", folder, "--split", "all", *extra)[:2] == (0, want)
    code, _, err = evaluate(capsys, net, "--data", folder)
    assert code == 1 and err.startswith("--weights: error: eval measures trained weights") and "Traceback" not in err


def test_an_ensemble_averages_the_softmax_of_its_models(trained, tmp_path, capsys):
    """`--weights A B`: each image's softmax averaged over the two models (as the paper averaged five nets), by
    hand here with F.conv2d and each run's weights on each image's centre view; each model's own figures are
    printed first, as eval of it alone gives them; a model trained on other classes is refused, naming it."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.numpy import load_file

    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.weights import init_weights, save_weights
    from netdsl.train.start import saved_preprocess

    net, run, folder = trained
    wide, other = tmp_path / "wide.net", tmp_path / "other"  # another net: six filters where TINY has four
    wide.write_text(TINY.replace("conv(image, 4,", "conv(image, 6,"))
    args = ["--data", str(folder), "--batch", "4", "--steps", "2", "--seed", "9", *PLAIN]
    assert main(["train", str(wide), *args, "--out", str(other)]) == 0
    saved = tmp_path / "measured.npz"
    code, out, _ = evaluate(capsys, net, wide, "--weights", run, other, "--data", folder, "--split", "all",
                            "--save", saved, "--mistakes", 3)  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and lines[2] == "ensemble of 2, the softmax averaged:" and lines[3].startswith("images 15 ")
    for line, model, weights in zip(lines[:2], (net, wide), (run, other), strict=True):
        alone = evaluate(capsys, model, "--weights", weights, "--data", folder, "--split", "all")[1].splitlines()[0]
        assert line == f"{weights} ({model}): {alone.split('   ', 1)[1]}"
    models = []
    for weights in (run / "weights.safetensors", other / "weights.safetensors"):
        tensors = {name: torch.from_numpy(value) for name, value in load_file(weights).items()}
        models.append((tensors, saved_preprocess(weights)))
    losses, right, by_file = [], 0, {}
    for label, name in enumerate(("cat", "dog", "owl")):
        for path in sorted((folder / name).glob("*.png")):
            probs = []
            for w, preprocess in models:
                x = torch.from_numpy(preprocess.apply(path))[None]
                x = F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"])), 2, 2)
                probs.append(torch.softmax(F.linear(x.flatten(1), w["f2.weight"], w["f2.bias"]).double(), 1)[0])
            mean = (probs[0] + probs[1]) / 2
            losses.append(-float(torch.log(mean[label])))
            right += int(mean.argmax()) == label
            by_file[str(path)] = (mean.numpy(), label)
    assert float(lines[3].split("top-1 ")[1].split("%")[0]) == pytest.approx(100 * right / 15, abs=0.006)
    assert float(lines[3].split("loss ")[1].split()[0]) == pytest.approx(np.mean(losses), abs=6e-5)
    arrays = np.load(saved)  # --save: every image's figures, by its file
    assert sorted(arrays["files"]) == sorted(by_file) and list(arrays["classes"]) == ["cat", "dog", "owl"]
    for file, probs, label, predicted in zip(*(arrays[key] for key in ("files", "probabilities", "labels",
                                                                       "predicted")), strict=True):  # fmt: skip
        np.testing.assert_allclose(probs, by_file[file][0], rtol=0, atol=1e-6)
        assert label == by_file[file][1] and predicted == probs.argmax()
    wrong = np.flatnonzero(arrays["predicted"] != arrays["labels"])  # --mistakes 3: the surest wrong ones first
    sure = arrays["probabilities"][wrong, arrays["predicted"][wrong]]
    start = next(i for i, line in enumerate(lines) if line.startswith("the most confident mistakes"))
    assert lines[start] == f"the most confident mistakes ({min(3, len(wrong))} of {len(wrong)})" and len(wrong) >= 3
    assert [line.split()[0] for line in lines[start + 3 :]] == list(arrays["files"][wrong[np.argsort(-sure)][:3]])
    assert models[0][0]["c1.weight"].shape[0] == 4 and models[1][0]["c1.weight"].shape[0] == 6
    strange = tmp_path / "strange"
    for index, name in enumerate(("ant", "bee", "cat")):
        (strange / name).mkdir(parents=True)
        for image in range(5):
            Image.fromarray(np.full((8, 8), 40 * index + image, dtype=np.uint8)).save(strange / name / f"{image}.png")
    assert main(["train", str(net), *args, "--data", str(strange), "--out", str(tmp_path / "ants")]) == 0
    four = tmp_path / "four.net"  # a net of four classes, with weights of its own
    four.write_text(TINY.replace("fc(c1, 3)", "fc(c1, 4)"))
    save_weights(tmp_path / "four.safetensors", init_weights(load_graph(four)))
    big = tmp_path / "big.net"  # 10 x 10 inputs, and weights that do not say how to prepare images for them
    big.write_text(TINY.replace("1 x 8 x 8", "1 x 10 x 10"))
    save_weights(tmp_path / "big.safetensors", init_weights(load_graph(big)))
    for nets, weights, message in [
        ([net], [run, tmp_path / "ants"], "ants/weights.safetensors: error: "),
        ([net, four], [run, tmp_path / "four.safetensors"], "four.net: error: "),
        ([net, big], [run, tmp_path / "big.safetensors"], "does not say how to prepare images for it"),
        ([net, wide, net], [run, other], "--weights: error: 3 nets and 2 weights files"),
        ([net], [], "expected at least one argument"),
    ]:
        code, _, err = evaluate(capsys, *nets, "--weights", *weights, "--data", folder)
        assert code == 1 and message in err and "Traceback" not in err, err


def test_an_ensemble_takes_weights_that_do_not_name_their_classes(trained, tmp_path, capsys):
    """Weights saved without a preprocessing (from Python) name no classes: in an ensemble they are measured
    with the data's own preprocessing, and the images labelled by the classes of the model that names them,
    on a folder of two of the three classes too (the data's own names would have made them another model's)."""
    from netdsl.runtime.weights import load_weights, save_weights

    net, run, folder = trained
    bare = tmp_path / "bare.safetensors"
    save_weights(bare, load_weights(run / "weights.safetensors", load_graph(net)))
    some = tmp_path / "some"
    for name in ("dog", "owl"):
        shutil.copytree(folder / name, some / name)
    for data, count in ((folder, 15), (some, 10)):
        for weights in ([run, bare], [bare, run], [bare, run, run]):  # the same weights twice: two models
            code, out, err = evaluate(capsys, net, "--weights", *weights, "--data", data, "--split", "all")
            assert code == 0 and f"ensemble of {len(weights)}" in out and f"images {count} " in out, err
            assert f"note: {bare} carries no preprocessing" in err and "owl" in out  # the named model's classes


def test_what_eval_cannot_save_is_refused_before_measuring(trained, tmp_path, capsys):
    net, run, folder = trained
    arrays = tmp_path / "images.npz"  # data to measure (never read: the refusal comes first)
    arrays.write_bytes(b"PK")
    for data, target, message in [
        (folder, tmp_path / "out.npy", "out.npy is not an .npz file"),
        (folder, tmp_path, "is a folder, not a file to write"),
        (arrays, arrays, "is a file this command reads"),
    ]:
        code, out, err = evaluate(capsys, net, "--weights", run, "--data", data, "--save", target)
        assert code == 1 and "--save: error: " in err and message in err and out == "" and "Traceback" not in err, err
    code, _, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--mistakes", 0)
    assert code == 1 and "--mistakes" in err and "Traceback" not in err


def test_the_commands_training_suggests_run_as_written(tmp_path, capsys, monkeypatch):
    """The end of `netdsl train` suggests `netdsl run` and `netdsl eval` on the run: both work as printed (a run
    folder whose name holds a space, quoted)."""
    import shlex

    from PIL import Image

    folder = tmp_path / "images"
    rng = np.random.default_rng(8)
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / name / f"{index}.png")
    net, run = tmp_path / "tiny.net", tmp_path / "my run"
    net.write_text(TINY.replace("fc(c1, 3)", "fc(c1, 2)"))
    args = ["train", str(net), "--data", str(folder), "--batch", "4", "--steps", "1", "--out", str(run), *PLAIN]
    capsys.readouterr()
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("try: netdsl run "))
    suggested = [shlex.split(lines[start][len("try: ") :]), shlex.split(lines[start + 1])]
    assert suggested[0][:4] == ["netdsl", "run", str(net), "--weights"] and suggested[1][:2] == ["netdsl", "eval"]
    suggested[0][suggested[0].index("IMAGE")] = str(folder / "cat" / "0.png")
    monkeypatch.chdir(tmp_path)
    for command in suggested:
        assert main(command[1:]) == 0, command
    assert "mistakes" in capsys.readouterr().out  # eval ran to its end, --mistakes and all


def test_a_folder_with_a_class_the_weights_never_saw(trained, tmp_path, capsys):
    net, run, folder = trained
    other = tmp_path / "other"
    shutil.copytree(folder / "cat", other / "cat")
    shutil.copytree(folder / "dog", other / "emu")
    code, out, err = evaluate(capsys, net, "--weights", run, "--data", other, "--split", "all")
    assert code == 1 and out == "" and "class emu is not among the 3" in err and "Traceback" not in err


@pytest.mark.parametrize("flip", [True, False])
def test_ten_views_mirror_only_for_a_net_trained_with_flips(flip):
    """The paper's ten views: five crops, then the same five mirrored; unmirrored again for a net trained
    without flips. The choice travels in the saved record (older records, without it, flip)."""
    from netdsl.train.augment import Preprocess

    preprocess = Preprocess(size=None, crop=(6, 6), channels=1, mean=(0.0,), classes=["a"], flip=flip)
    image = np.random.default_rng(3).integers(0, 256, (9, 10), dtype=np.uint8)
    views = preprocess.views(image, 10)
    assert views.shape == (10, 1, 6, 6)
    crops = [image[top : top + 6, left : left + 6] for top, left in ((1, 2), (0, 0), (0, 4), (3, 0), (3, 4))]
    np.testing.assert_array_equal(views[:5, 0], np.stack(crops).astype(np.float32))
    np.testing.assert_array_equal(views[5:, 0], views[:5, 0, :, ::-1] if flip else views[:5, 0])
    again = Preprocess.from_json(preprocess.to_json())
    assert again == preprocess
    older = json.loads(preprocess.to_json())
    del older["flip"]
    assert Preprocess.from_json(json.dumps(older)).flip is True
    with pytest.raises(NetError, match="flip 'no' is not true or false"):
        Preprocess.from_json(json.dumps({**older, "flip": "no"}))


def test_a_run_without_flips_records_it(trained):
    from netdsl.runtime.weights import weights_metadata
    from netdsl.train.augment import Preprocess

    _, run, _ = trained  # trained with --no-flip
    record = weights_metadata(run / "weights.safetensors")["netdsl.preprocess"]
    assert Preprocess.from_json(record).flip is False


# --- the report of many classes ---------------------------------------------------------------------------------


def tally_of(confusion: np.ndarray):
    from netdsl.train.evaluate import Tally

    count, right = int(confusion.sum()), int(np.trace(confusion))
    return Tally(len(confusion), count=count, top1=right, top5=right, loss=0.5 * count, confusion=confusion)


@pytest.mark.parametrize("classes", [3, 5, 6, 12])
def test_top5_is_counted_against_torch_and_left_out_where_every_image_is_in_it(classes):
    """With five classes or fewer every image is in its top five: the report and the epoch line leave top-5
    out rather than print 100%; with more, top-5 is the share of images whose class is among the five highest
    scores, as torch.topk counts it on random scores."""
    import torch

    from netdsl.train.evaluate import Tally
    from netdsl.train.progress import epoch_line

    generator = torch.Generator().manual_seed(classes)
    tally = Tally(classes)
    probs, labels = torch.rand(40, classes, generator=generator), torch.randint(0, classes, (40,), generator=generator)
    for rows in (slice(0, 17), slice(17, 40)):
        tally.add(probs[rows].softmax(1), labels[rows])
    report = tally.report([f"c{i}" for i in range(classes)]).splitlines()[0]
    record = dict(epoch=1, train_loss=1.0, train_top1=0.5, lr=0.1, val_loss=tally.mean_loss,
                  val_top1=tally.accuracy, val_top5=tally.top5_accuracy)  # fmt: skip
    if classes <= 5:
        assert tally.top5_accuracy is None and "top-5" not in report and "top-5" not in epoch_line(record, 2)
        assert f"top-1 {100 * tally.accuracy:.2f}%" in report
        return
    want = int((probs.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()) / 40
    assert tally.top5_accuracy == pytest.approx(want, abs=1e-12) and 0 < want < 1
    assert f"top-5 {100 * want:.2f}%" in report and f"top-5 {100 * want:.2f}%" in epoch_line(record, 2)


def test_many_classes_print_the_most_confused_pairs_not_the_matrix():
    """A matrix of 1,000 classes would print a million numbers: beyond 20 classes the report lists the 20
    largest off-diagonal counts (against a sort of every pair by hand), the class's share of each, and no
    matrix; up to 20 it prints the matrix."""
    rng = np.random.default_rng(3)
    confusion = rng.integers(0, 80, (30, 30)) * (rng.random((30, 30)) < 0.2) + np.diag(rng.integers(50, 300, 30))
    names = [f"class{i}" for i in range(27)]  # a net may score more classes than the data names
    report = tally_of(confusion).report(names)
    assert "confusion matrix (rows" not in report and "most confused classes (of the 30 x 30" in report
    pairs = sorted((-confusion[t, p], t, p) for t in range(30) for p in range(30) if t != p and confusion[t, p])
    lines = report.splitlines()
    rows = [line.split() for line in lines[[i for i, line in enumerate(lines) if line.startswith("----")][-1] + 1 :]]
    want = [(t, p, -c, f"{100 * -c / confusion[t].sum():.1f}%") for c, t, p in pairs[:20]]
    assert [(int(row[0]), int(row[2]), int(row[4]), row[5]) for row in rows] == want
    assert len({row[4] for row in rows}) > 3  # counts that differ: the order is tested, not only ties
    shown = [*names, "27", "28", "29"]  # the classes the data does not name, by number
    assert all(row[1] == shown[int(row[0])] and row[3] == shown[int(row[2])] for row in rows)
    small = tally_of(confusion[:12, :12]).report(names)
    assert "confusion matrix (rows: true class, columns: predicted)" in small and "most confused" not in small


def test_the_printed_matrix_of_fewer_classes_than_outputs_counts_the_rest_as_other():
    """Three named classes on a 1,000-way net print a 3 x 3 matrix and a column `other` (the predictions of
    the 997 outputs no image is of), not the 1,000 x 1,000 one's most confused pairs; a class beyond the names
    that has images (numbered data on weights that name fewer classes) keeps its row and column, and its line of
    the per-class table."""
    rng = np.random.default_rng(6)
    confusion = np.zeros((1000, 1000), dtype=np.int64)
    confusion[:3] = rng.integers(0, 3, (3, 1000)) * (rng.random((3, 1000)) < 0.01)
    confusion[:3, :3] += rng.integers(5, 20, (3, 3))
    lines = tally_of(confusion).report(["cat", "dog", "fox"]).splitlines()
    start = lines.index("confusion matrix (rows: true class, columns: predicted)")
    rows = [line.split() for line in lines[start + 1 :]]
    assert rows[0] == ["0", "1", "2", "other"] and len(rows) == 5
    for i in range(3):
        want = [str(i), *map(str, confusion[i, :3]), str(confusion[i, 3:].sum())]
        assert rows[2 + i] == want
    assert confusion[:3, 3:].sum() > 0  # the column is not all zeros
    confusion[7, 1], confusion[7, 7], confusion[2, 7] = 4, 3, 2
    lines = tally_of(confusion).report(["cat", "dog", "fox"]).splitlines()
    start = lines.index("confusion matrix (rows: true class, columns: predicted)")
    rows = [line.split() for line in lines[start + 1 :]]
    assert rows[0] == ["0", "1", "2", "7", "other"] and len(rows) == 6
    assert rows[-1] == ["7", "0", "4", "0", "3", str(confusion[7].sum() - 7)]
    assert rows[-2][4:] == ["2", str(confusion[2, 3:].sum() - 2)]
    assert lines[7].split() == ["7", "-", str(confusion[7].sum()), f"{100 * 3 / confusion[7].sum():.1f}%"]


def test_the_drawn_matrix_takes_more_outputs_than_names(tmp_path):
    """simplenet (15 scores) evaluated on the digits (10 names) stopped `eval --confusion` with matplotlib's
    'number of locations (15) does not match the number of labels (10)'; a matrix of 60 classes is numbered
    at about ten places instead of named at each."""
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(4)
    for classes, named in ((15, 10), (60, 60)):
        confusion = rng.integers(0, 5, (classes, classes))
        path = tmp_path / f"confusion{classes}.png"
        assert tally_of(confusion).plot_confusion(path, [f"c{i}" for i in range(named)])
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_timeout_that_is_no_wait_is_refused(trained, capsys):
    """--timeout (how long a process waits for the others under torchrun): above 0 and at most a week."""
    net, run, folder = trained
    for bad in ("0", "-5", "nan", "inf", "604801", "x"):
        code, out, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--timeout", bad)
        assert code == 1 and out == "" and "argument --timeout: not a time in seconds" in err, (bad, err)
    code, out, _ = evaluate(capsys, net, "--weights", run, "--data", folder, "--timeout", "604800")
    assert code == 0 and out.startswith("images ")


def test_a_negative_number_of_workers_is_refused_before_reading(trained, capsys):
    net, run, folder = trained
    for extra in ((), ("--dense",)):
        code, out, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--workers", "-2", *extra)
        assert code == 1 and out == "" and err.startswith("--workers: error: the number of loader workers must be "
                                                          "at least 0, not -2"), err  # fmt: skip


def test_mistakes_list_the_surest_wrong_images_first():
    """`Measured.mistakes`: wrong images by the probability given to the wrong class, highest first, at most N;
    an image scored right never listed; a set with none wrong says so."""
    import torch

    from netdsl.train.evaluate import Measured

    class Named:  # the one thing of a Samples that Measured reads: where each image came from
        def __init__(self, count: int) -> None:
            self.count = count

        def __len__(self) -> int:
            return self.count

        def source(self, index: int) -> str:
            return f"img{index}.png"

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    measured = Measured()
    measured.add(Named(5), probs, torch.tensor([0, 0, 0, 0, 1]))
    lines = measured.mistakes(["cat", "dog"], 3)
    assert lines[0] == "the most confident mistakes (3 of 4)"
    assert [line.split() for line in lines[3:]] == [["img3.png", "cat", "dog", "0.950"],
                                                    ["img1.png", "cat", "dog", "0.800"],
                                                    ["img4.png", "dog", "cat", "0.700"]]  # fmt: skip
    right = Measured()
    right.add(Named(2), probs[:2], torch.tensor([0, 1]))
    assert right.mistakes(["cat", "dog"], 3) == ["no mistakes"]
    arrays = right.arrays(["cat", "dog"])
    assert list(arrays["files"]) == ["img0.png", "img1.png"] and list(arrays["predicted"]) == [0, 1]
