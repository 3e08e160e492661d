"""`netdsl run`: inputs in, top classes out; every bad input is a clear error with exit status 1."""

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import netdsl
from netdsl.cli.main import main
from netdsl.runtime.net import Net

ROOT = Path(__file__).resolve().parent.parent
LENET = str(ROOT / "nets/lenet5.net")


def top_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("input ")]


def test_random_inputs_print_the_top_classes_and_save_the_outputs(tmp_path, capsys):
    out = tmp_path / "out.npy"
    assert main(["run", LENET, "--random", "3", "--top", "4", "--init", "he", "--save", str(out), "--time"]) == 0
    printed = capsys.readouterr().out
    assert len(top_lines(printed)) == 3 and "input(s) in" in printed
    saved = np.load(out)
    assert saved.shape == (3, 10)
    # the same inputs and weights through the Python API give the same numbers
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    want = Net(LENET, backend="torch", init="he")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(saved, want, rtol=1e-4, atol=1e-5)


def test_small_scores_are_printed_to_four_significant_digits(tmp_path, capsys):
    """LeNet-5 with the paper's initialisation (weights ~ N(0, 0.01)) scores ~1e-5: printed to four decimal
    places every score read 0.0000; the printed scores are the saved ones to four significant digits."""
    out = tmp_path / "scores.npy"
    assert main(["run", LENET, "--top", "3", "--backend", "torch", "--save", str(out)]) == 0
    line = top_lines(capsys.readouterr().out)[0]
    printed = [float(item.split(": ")[1]) for item in line.split("top 3: ")[1].split(", ")]
    want = np.sort(np.load(out)[0])[::-1][:3]
    assert 0 < abs(want[0]) < 1e-3  # the case this is about
    np.testing.assert_allclose(printed, want, rtol=1e-3)


def test_npy_inputs_single_image_or_batch(tmp_path, capsys):
    rng = np.random.default_rng(7)
    one, batch = tmp_path / "one.npy", tmp_path / "batch.npy"
    np.save(one, rng.standard_normal((1, 32, 32)).astype(np.float32))
    np.save(batch, rng.standard_normal((2, 1, 32, 32)).astype(np.float32))
    assert main(["run", LENET, "--input", str(one), str(batch), "--backend", "torch"]) == 0
    lines = top_lines(capsys.readouterr().out)  # each named by its file (and row, in a batch)
    assert [line.split(":")[0] for line in lines] == [f"input 0 ({one})", f"input 1 ({batch}[0])",
                                                      f"input 2 ({batch}[1])"]  # fmt: skip


def test_triton_and_torch_backends_agree(tmp_path, capsys):
    outs = {}
    for backend in ("triton", "torch"):
        path = tmp_path / f"{backend}.npy"
        assert main(["run", LENET, "--random", "2", "--init", "he", "--backend", backend, "--save", str(path)]) == 0
        outs[backend] = np.load(path)
    scale = np.abs(outs["torch"]).max()
    assert np.abs(outs["triton"] - outs["torch"]).max() <= 1e-4 * scale


def _lying_npy() -> bytes:
    """A .npy header promising 400 TB of float32 over 64 bytes: read naively, a MemoryError."""
    import io

    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**11, 1, 32, 32)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(64)


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: None, ["--input", "{d}/missing.npy"], "no such file"),
        (lambda d: (d / "bad.npy").write_bytes(b"not numpy"), ["--input", "{d}/bad.npy"], "neither an image nor"),
        (lambda d: np.save(d / "obj.npy", np.array([{}], dtype=object), allow_pickle=True), ["--input", "{d}/obj.npy"],
         "holds Python objects"),
        (lambda d: (d / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'"), ["--input", "{d}/cut.npy"],
         "not a readable .npy array"),
        (lambda d: (d / "big.npy").write_bytes(_lying_npy()),
         ["--input", "{d}/big.npy"], "is cut short: its header says 100000000000 x 1 x 32 x 32"),
        (lambda d: np.save(d / "shape.npy", np.ones((3, 32, 32))), ["--input", "{d}/shape.npy"], "has shape 3 x 32"),
        (lambda d: np.save(d / "text.npy", np.array(["a"])), ["--input", "{d}/text.npy"], "not numbers"),
        (lambda d: np.save(d / "one.npy", np.float32(3)), ["--input", "{d}/one.npy"], "holds a single number, but"),
        (lambda d: np.save(d / "none.npy", np.ones((0, 1, 32, 32))), ["--input", "{d}/none.npy", "{d}/none.npy"],
         "--input: error: the inputs hold no images"),
        (lambda d: None, ["--devices", "gpu0"], "cannot read `gpu0`"),
        (lambda d: None, ["--weights", "{d}/none.safetensors"], "none.safetensors"),
        (lambda d: None, ["--random", "0"], "not a positive whole number"),
        (lambda d: None, ["--random", "1", "--seed", "-1"], "--seed: not a seed"),
        (lambda d: None, ["--batch", "0"], "not a positive whole number"),
        (lambda d: None, ["--dtype", "fp64"], "invalid choice"),
        (lambda d: None, ["--cuda-graph", "--backend", "torch"], "--cuda-graph: error: CUDA-graph capture needs"),
        (lambda d: None, ["--distributed", "--cuda-graph"], "--cuda-graph: error: CUDA-graph capture runs in one"),
        (lambda d: None, ["--distributed", "--random", "3", "--batch", "2"], "--batch: error: --distributed runs"),
    ],
    ids=["missing", "corrupt", "pickled", "truncated", "lying", "shape", "strings", "number", "empty", "devices",
         "weights", "random", "seed", "batch", "dtype", "graph", "distributed-graph", "distributed-batch"],
)
def test_bad_inputs_are_clear_errors(tmp_path, capsys, make, args, message):
    make(tmp_path)
    assert main(["run", LENET, *(a.replace("{d}", str(tmp_path)) for a in args)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "hip:0", "vulkan", "xla"])
def test_devices_netdsl_does_not_run_on_are_named(capsys, device):
    assert main(["run", LENET, "--backend", "torch", "--devices", f"gpu0={device}"]) == 1
    err = capsys.readouterr().err
    assert "--devices: error:" in err and "Traceback" not in err and "internal error" not in err
    assert "netdsl runs on cpu and cuda devices" in err or "is not a torch device" in err


def test_nan_input_is_refused(tmp_path, capsys):
    path = tmp_path / "nan.npy"
    array = np.random.default_rng(5).standard_normal((1, 1, 32, 32), dtype=np.float32)
    array[0, 0, 3, 4] = np.nan
    np.save(path, array)
    assert main(["run", LENET, "--input", str(path), "--backend", "torch", "--save", str(tmp_path / "o.npy")]) == 1
    err = capsys.readouterr().err
    assert "contains NaN" in err and "Traceback" not in err  # refused for the NaN, not for anything else
    assert not (tmp_path / "o.npy").exists()  # nothing written half-way


def test_images_are_prepared_as_in_the_paper_and_labels_name_the_classes(tmp_path, capsys):
    from PIL import Image

    from netdsl.cli.run import IMAGENET_MEAN, input_passes

    rng = np.random.default_rng(3)
    pixels = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    ((batch,),) = list(input_passes([tmp_path / "wide.png"], (3, 227, 227), [None]))  # one pass, one model
    (x,) = batch  # the paper's preprocessing: weights that carry none
    assert x.shape == (3, 227, 227) and x.dtype == np.float32
    # shorter side 300 -> 256 (so 400 -> 341), then the centre 227 x 227; the mean subtracted per channel
    resized = np.asarray(Image.fromarray(pixels).resize((341, 256), Image.BILINEAR), dtype=np.float32)
    top, left = (256 - 227) // 2, (341 - 227) // 2
    want = resized[top : top + 227, left : left + 227] - np.asarray(IMAGENET_MEAN, dtype=np.float32)
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), rtol=0, atol=1e-4)

    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "gray.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(10)))
    assert (
        main(["run", LENET, "--input", str(tmp_path / "gray.png"), "--labels", str(labels), "--backend", "torch"]) == 0
    )
    assert "top 5: digit " in capsys.readouterr().out


def test_an_unreadable_image_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_text("not an image")
    assert main(["run", LENET, "--input", str(tmp_path / "bad.jpg")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "as an image" in err and "Traceback" not in err


def test_time_reports_partitions_kernels_and_memory(capsys):
    assert main(["run", str(ROOT / "nets/alexnet.net"), "--backend", "torch", "--time"]) == 0
    out = capsys.readouterr().out
    assert "activations (arena)" in out and "124.1 MiB" in out  # gpu0's weights: half the towers and fc8
    assert "conv3_gpu1_conv_bias_relu" in out and "conv2_norm_gpu1_lrn_maxpool_to_gpu0" in out


def saved_run(tmp_path, capsys, *args) -> np.ndarray:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.npy')))}.npy"
    assert main(["run", *args, "--init", "he", "--save", str(out)]) == 0, capsys.readouterr().err
    return np.load(out)


def test_batches_of_n_give_the_same_outputs_as_one_pass(tmp_path, capsys):
    whole = saved_run(tmp_path, capsys, LENET, "--random", "5", "--backend", "torch")
    chunked = saved_run(tmp_path, capsys, LENET, "--random", "5", "--batch", "2", "--backend", "torch")
    assert whole.shape == chunked.shape == (5, 10)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert saved_run(tmp_path, capsys, LENET, "--batch", "3", "--backend", "torch").shape == (3, 10)


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 5e-3), ("bf16", 3e-2)])
def test_half_precision_runs_close_to_fp32(tmp_path, capsys, dtype, tolerance):
    """Tolerances relative to the largest |output|: fp16 keeps 11 significant bits, bf16 8."""
    want = saved_run(tmp_path, capsys, LENET, "--random", "2", "--backend", "torch")
    got = saved_run(tmp_path, capsys, LENET, "--random", "2", "--backend", "torch", "--dtype", dtype)
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_a_build_folder_runs_like_its_net(tmp_path, capsys):
    net = tmp_path / "lenet5.net"
    net.write_text(Path(LENET).read_text())
    build = tmp_path / "build"
    assert main(["compile", str(net), "-o", str(build), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    from_net = saved_run(tmp_path, capsys, str(net), "--random", "2", "--backend", "torch", "--dtype", "bf16")
    from_build = saved_run(tmp_path, capsys, str(build), "--random", "2", "--backend", "torch")
    np.testing.assert_array_equal(from_build, from_net)  # the build's dtype (bf16) is used

    assert main(["run", str(build), "--dtype", "fp32"]) == 1
    assert "was compiled for bf16, not fp32" in capsys.readouterr().err

    net.write_text(net.read_text() + "\n# edited\n")
    assert main(["run", str(build)]) == 1
    err = capsys.readouterr().err
    assert "changed since this folder was compiled" in err and "Traceback" not in err

    net.unlink()
    assert main(["run", str(build)]) == 1
    assert "is gone" in capsys.readouterr().err

    assert main(["run", str(tmp_path)]) == 1
    assert "not a build of `netdsl compile`" in capsys.readouterr().err


def test_a_build_folder_keeps_its_compile_options(tmp_path, capsys):
    """plan.json records the options the folder was compiled with: `run DIR` takes them, and a flag that says
    otherwise is an error naming it (it was silently recompiled without them)."""
    import argparse

    from netdsl.cli.run import resolve_build_dir

    net = tmp_path / "alexnet.net"
    net.write_text((Path(LENET).parent / "alexnet.net").read_text())
    build = tmp_path / "build"
    flags = ["--precision", "tf32x3", "--merge-towers", "--split-k"]
    assert main(["compile", str(net), "-o", str(build), "--no-sm90", *flags]) == 0
    capsys.readouterr()
    args = argparse.Namespace(dtype=None, layout="auto", precision=None, space_to_depth=False, merge_towers=False,
                              split_k=False, tuning=None)  # fmt: skip
    assert resolve_build_dir(build, args) == (net.resolve(), "fp32")
    assert (args.precision, args.merge_towers, args.split_k, args.layout) == ("tf32x3", True, True, "auto")
    for flag, value in (("--precision", "ieee"), ("--layout", "nchw"), ("--space-to-depth", None)):
        assert main(["run", str(build), flag, *([value] if value else []), "--backend", "torch"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"{flag}: error: {build} was compiled with {flag} ") and "Traceback" not in err
    assert main(["run", str(build), "--precision", "tf32x3", "--backend", "torch", "--top", "1"]) == 0  # the same


def test_a_build_folder_whose_kernels_are_not_its_plans_says_so(tmp_path, capsys):
    """A compile killed between swapping in its kernels and renaming plan.json into place leaves kernels of
    one compile beside the plan of another (as does a kernel edited by hand): `run DIR` names the files, says
    it runs the kernels compiled from the plan's net, and how to bring the folder up to date."""
    import shutil

    build, other = tmp_path / "build", tmp_path / "other"
    assert main(["compile", LENET, "-o", str(build), "--no-sm90", "--dtype", "bf16"]) == 0
    assert main(["compile", LENET, "-o", str(other), "--no-sm90", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    before = saved_run(tmp_path, capsys, str(build), "--random", "2", "--backend", "torch")
    assert "note:" not in capsys.readouterr().err  # a whole build: nothing to say

    shutil.rmtree(build / "kernels")
    shutil.copytree(other / "kernels", build / "kernels")  # the fp32 compile's kernels, the bf16 plan
    (build / "kernels" / "c1_gpu0_conv_bias_relu.py").unlink()
    (build / "kernels" / "stray.py").write_text("# not netdsl's\n")
    after = saved_run(tmp_path, capsys, str(build), "--random", "2", "--backend", "torch")
    err = capsys.readouterr().err
    assert f"note: {build / 'kernels'} is not what {build / 'plan.json'} compiles to" in err
    assert "differ: " in err and "1 missing: c1_gpu0_conv_bias_relu.py" in err and "not the plan's: stray.py" in err
    assert f"netdsl compile {Path(LENET).resolve()} -o {build} --dtype bf16" in err and "Traceback" not in err
    np.testing.assert_array_equal(after, before)  # the plan's kernels ran, not the folder's


def test_a_flag_given_as_its_default_is_compared_by_meaning(tmp_path, capsys):
    """`--layout auto` given is not `--layout` left out: against a build compiled with nchw it contradicts it;
    `--precision ieee` is what a build without a precision computes, so it agrees."""
    nchw, plain = tmp_path / "nchw", tmp_path / "plain"
    assert main(["compile", LENET, "-o", str(nchw), "--no-sm90", "--layout", "nchw"]) == 0
    assert main(["compile", LENET, "-o", str(plain), "--no-sm90"]) == 0
    capsys.readouterr()
    assert main(["run", str(nchw), "--layout", "auto", "--backend", "torch"]) == 1
    assert f"--layout: error: {nchw} was compiled with --layout nchw, not auto" in capsys.readouterr().err
    assert main(["run", str(plain), "--precision", "ieee", "--backend", "torch", "--top", "1"]) == 0
    assert main(["run", str(nchw), "--backend", "torch", "--top", "1"]) == 0


TWO_OUTPUTS = """\
net two
input image: 1 x 8 x 8
features = conv(image, 4, size=3, pad=1) | relu
scores = fc(features, 5)
output features, scores
"""


def test_every_output_is_shown_and_saved_whole(tmp_path, capsys):
    """A map and class scores: top classes for the scores, shape and summary for the map; .npz by name with
    full shapes; the Python API's outputs are what is saved."""
    net = tmp_path / "two.net"
    net.write_text(TWO_OUTPUTS)
    saved = tmp_path / "out.npz"
    args = ["run", str(net), "--random", "3", "--backend", "torch", "--init", "he"]
    assert main([*args, "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "output features: N x C x H x W = 3 x 4 x 8 x 8: mean" in out  # the chain's name, as `output` wrote it
    assert "output scores: 3 x 5 scores" in out and out.count("top 5:") == 3
    with np.load(saved) as arrays:
        assert sorted(arrays) == ["features", "scores"]
        assert arrays["features"].shape == (3, 4, 8, 8) and arrays["scores"].shape == (3, 5)
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
        want = netdsl.load(net, backend="torch", init="he")(torch.from_numpy(x))
        np.testing.assert_array_equal(arrays["features"], want["features"].numpy())
        np.testing.assert_array_equal(arrays["scores"], want["scores"].numpy())
    assert main([*args, "--save", str(tmp_path / "out.npy")]) == 1
    err = capsys.readouterr().err
    assert "the net has 2 outputs (features, scores), and a .npy file holds one" in err and "out.npz" in err
    assert not (tmp_path / "out.npy").exists()


def test_a_map_output_saves_with_its_shape(tmp_path, capsys):
    net = tmp_path / "map.net"
    net.write_text("net m\ninput image: 1 x 8 x 8\nc = conv(image, 2, size=3) | relu\noutput c\n")
    assert main(["run", str(net), "--random", "2", "--backend", "torch", "--save", str(tmp_path / "c.npy")]) == 0
    assert "N x C x H x W = 2 x 2 x 6 x 6" in capsys.readouterr().out
    assert np.load(tmp_path / "c.npy").shape == (2, 2, 6, 6)


def test_a_batch_the_machine_cannot_hold_is_named(capsys):
    assert main(["run", LENET, "--random", "100000000", "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert "--random: error: 100,000,000 random images of 1 x 32 x 32 take 381.5 GiB" in err
    assert "Traceback" not in err and "MemoryError" not in err


def test_the_nan_hint_names_nothing_a_command_line_user_cannot_do(tmp_path, capsys):
    path = tmp_path / "nan.npy"
    array = np.random.default_rng(6).standard_normal((1, 1, 32, 32), dtype=np.float32)
    array[0, 0, 1, 1] = np.nan
    np.save(path, array)
    assert main(["run", LENET, "--input", str(path), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert "contains NaN" in err and "check_inputs" not in err


def test_a_thin_image_is_refused_before_it_is_scaled(tmp_path, capsys):
    """A 40,000 x 1 PNG (a few hundred bytes) scaled to a shorter side of 256 would be 2.6 billion pixels."""
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (1, 40_000), dtype=np.uint8)).save(path)
    assert main(["run", LENET, "--backend", "torch", "--input", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: error: an image of 1 x 40000, its shorter side scaled to" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"size": 0}, "the saved preprocessing is damaged"),
        ({"crop": [-5, -5]}, "the saved preprocessing is damaged"),
        ({"std": [0.0]}, "the saved preprocessing is damaged"),
        ({"size": 10**6}, "the saved preprocessing is damaged"),
        ({"crop": [20, 20]}, "the weights were trained on 1 x 20 x 20 inputs, and the net takes 1 x 32 x 32"),
        ({"channels": 3, "mean": [0, 0, 0], "std": None}, "the weights were trained on 3 x 32 x 32 inputs"),
    ],
    ids=["size-0", "crop-negative", "std-0", "size-huge", "another-crop", "another-channels"],
)
def test_a_weights_files_preprocessing_is_checked_against_the_net(tmp_path, capsys, change, message):
    """The preprocessing record in a weights file is read, not trusted: out of range, or for another input
    than the net's, it is an error naming the weights file (not the net, not Python's)."""
    import json

    from PIL import Image

    from netdsl.runtime.weights import init_weights, save_weights

    record = {"format": 1, "size": 36, "crop": [32, 32], "channels": 1, "mean": [120.0], "std": [60.0],
              "classes": []}  # fmt: skip
    weights = tmp_path / "w.safetensors"
    save_weights(weights, init_weights(netdsl.load_graph(LENET)), metadata={"netdsl.preprocess": json.dumps(
        {**record, **change})})  # fmt: skip
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40), dtype=np.uint8)).save(image)
    assert main(["run", LENET, "--backend", "torch", "--weights", str(weights), "--input", str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{weights}: error: {message}" in err and "Traceback" not in err and "Warning" not in err


def test_time_with_ten_views_sizes_the_tables_by_the_views_run(tmp_path, capsys):
    """--views 10 runs ten rows per image: the arena --time reports is that of ten images, not one."""
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (40, 40), dtype=np.uint8)).save(image)

    def arena(*args) -> str:
        assert main(["run", LENET, "--backend", "torch", "--time", *args]) == 0
        lines = capsys.readouterr().out.splitlines()
        return next(lines[i + 2] for i, line in enumerate(lines) if "activations (arena)" in line).split()[2:4]

    assert arena("--input", str(image), "--views", "10") == arena("--random", "10") != arena("--random", "1")


def _gray_images(folder: Path, shapes, seed: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for number, shape in enumerate(shapes):
        paths.append(str(folder / f"image{number}.png"))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


def _trained_like(folder: Path, seed: int):
    """LeNet-5's He-initialized weights saved as training saves them, with a preprocessing that scales the
    shorter side to 36 and brings pixels to about unit size (so the class scores are apart, not saturated)."""
    from netdsl.runtime.weights import init_weights, save_weights
    from netdsl.train.augment import Preprocess

    preprocess = Preprocess(size=36, crop=(32, 32), channels=1, mean=(120.0,), std=(60.0,))
    weights = init_weights(netdsl.load_graph(LENET), seed=seed, scheme="he")
    save_weights(folder / "w.safetensors", weights, metadata={"netdsl.preprocess": preprocess.to_json()})
    return folder / "w.safetensors", weights, preprocess


def test_scales_average_the_views_of_each_size(tmp_path, capsys):
    """--scales S1,S2 with --views 10: the softmax averaged over the ten views at both sizes, the mean of the two
    runs at one size each (as many views at each); --scales at the weights' own size (36) is the plain run."""
    images = _gray_images(tmp_path, [(40, 52), (36, 36)], seed=12)
    file, _, _ = _trained_like(tmp_path, seed=3)
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", "--weights", str(file), "--input", *images)
    both = run("--views", "10", "--scales", "36,48")
    alone = [run("--views", "10", "--scales", size) for size in ("36", "48")]
    assert both.shape == (2, 10) and np.abs(alone[0] - alone[1]).max() > 1e-2
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run("--scales", "36"), run(), rtol=0, atol=0)


def test_dense_runs_each_whole_image_at_each_scale(tmp_path, capsys):
    """--dense: the net's class scores averaged over every 32 x 32 window of the scaled image (LeNet-5's fc layers
    as convolutions step 4 pixels, its two pools' stride), their softmax, averaged with the mirror image's and over
    --scales; by hand here with the net run on each window, for two images of other shapes, 2 passes of one."""
    from dataclasses import replace

    images = _gray_images(tmp_path, [(40, 52), (33, 45)], seed=13)
    file, weights, preprocess = _trained_like(tmp_path, seed=4)
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", "--weights", str(file), "--input", *images)
    net = Net(LENET, backend="torch", weights=weights)

    def by_hand(sizes) -> np.ndarray:
        want = np.zeros((2, 10))
        for number, path in enumerate(images):
            for size in sizes:
                at = replace(preprocess, size=size)
                x = at.normalize(at.pixels(path))
                for image in (x, x[:, :, ::-1]):
                    windows = np.stack([image[:, i : i + 32, j : j + 32] for i in range(0, image.shape[1] - 31, 4)
                                        for j in range(0, image.shape[2] - 31, 4)])  # fmt: skip
                    scores = torch.as_tensor(net(torch.from_numpy(np.ascontiguousarray(windows)))).float()
                    want[number] += torch.softmax(scores.mean(dim=0), dim=0).numpy() / (2 * len(sizes))
        return want

    want = by_hand((32, 40))
    assert want.std(axis=1).min() > 1e-2 and want.max() < 0.99  # scores apart, neither uniform nor saturated
    np.testing.assert_allclose(run("--dense", "--scales", "32,40", "--batch", "1"), want, rtol=0, atol=1e-5)
    own = by_hand((36,))  # the weights' own size
    np.testing.assert_allclose(run("--dense"), own, rtol=0, atol=1e-5)
    kernels = saved_run(tmp_path, capsys, LENET, "--weights", str(file), "--input", *images, "--dense")  # run's default
    np.testing.assert_allclose(kernels, own, rtol=0, atol=1e-5)  # netdsl's kernels (interpreted), fp32
    for dtype, tolerance in (("bf16", 2e-2), ("fp16", 3e-3)):  # under autocast: probabilities to 8 or 11 bits
        sixteen = run("--dense", "--dtype", dtype)
        assert np.abs(sixteen - own).max() <= tolerance and not np.allclose(sixteen, own, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--views", "10"], "--views: error: --views does not apply to --dense"),
        (["--dtype", "tf32"], "--dtype: error: --dtype does not apply to --dense"),
        (["--layout", "nchw"], "--layout: error: --layout does not apply"),
        (["--space-to-depth"], "--space-to-depth: error: --space-to-depth does not apply"),
        (["--time"], "--time: error: --time does not apply"),
        (["--cuda-graph"], "--cuda-graph: error: --cuda-graph does not apply"),
        (["--distributed"], "--distributed: error: --distributed does not apply"),
    ],
)
def test_flags_dense_cannot_honour_are_refused(tmp_path, capsys, args, message):
    images = _gray_images(tmp_path, [(40, 40)], seed=14)
    assert main(["run", LENET, "--backend", "torch", "--input", *images, "--dense", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "leave out" in err and "Traceback" not in err


def test_what_dense_and_scales_cannot_read_is_a_clear_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(15).standard_normal((1, 32, 32), dtype=np.float32))
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["compile", LENET, "-o", str(tmp_path / "build"), "--no-sm90"]) == 0
    capsys.readouterr()
    for args, message in [
        (["--dense"], "--dense: error: --dense takes images"),
        (["--scales", "40"], "--scales: error: --scales takes images"),
        (["--dense", "--input", f"{tmp_path}/x.npy"], "--dense: error: --dense takes images, and"),
        (["--scales", "40", "--input", f"{tmp_path}/x.npy"], "--scales: error: --scales takes images, and"),
        (["--dense", "--input", f"{tmp_path}/bad.png"], "bad.png: error: cannot read"),
        (["--dense", "--input", f"{tmp_path}/none.png"], "none.png: error: no such file"),
        (["--scales", "0"], "--scales: not sizes in pixels"),
    ]:
        assert main(["run", LENET, "--backend", "torch", *args]) == 1, args
        err = capsys.readouterr().err
        assert message in err and "--skip-corrupt" not in err and "Traceback" not in err, (args, err)
    assert main(["run", str(tmp_path / "build"), "--dense", "--input", f"{tmp_path}/bad.png"]) == 1
    err = capsys.readouterr().err
    assert "--dense: error: --dense builds a net for each size of image" in err and f"run {LENET} --dense" in err


def test_several_weights_average_the_softmax_of_each_net(tmp_path, capsys):
    """--weights A B: an ensemble, each input's softmax averaged over the two nets, as the paper averaged its
    five: the mean of the two runs' probabilities (one view, ten views, dense), also where they prepare images
    otherwise (weights without a preprocessing of their own: the paper's size and mean); flags that run one net,
    weights trained on other classes, and a net whose output is a map are refused by name."""
    from netdsl.runtime.weights import init_weights, load_weights, save_weights
    from netdsl.train.augment import Preprocess

    images = _gray_images(tmp_path, [(40, 52), (36, 36)], seed=16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _trained_like(tmp_path / "a", seed=5)[0], _trained_like(tmp_path / "b", seed=6)[0]
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", "--input", *images)
    alone = [torch.softmax(torch.from_numpy(run("--weights", str(file))), dim=1).numpy() for file in (first, second)]
    assert np.abs(alone[0] - alone[1]).max() > 1e-2  # two nets apart
    np.testing.assert_allclose(run("--weights", str(first), str(second)), (alone[0] + alone[1]) / 2, atol=1e-6)
    for flags in (["--views", "10"], ["--dense"]):
        each = [run("--weights", str(file), *flags) for file in (first, second)]
        np.testing.assert_allclose(run("--weights", str(first), str(second), *flags), (each[0] + each[1]) / 2,
                                   rtol=0, atol=1e-6)  # fmt: skip
    other = tmp_path / "other.safetensors"  # the second's weights, another preprocessing (none: the paper's)
    save_weights(other, load_weights(second, netdsl.load_graph(LENET)))
    for flags in ([], ["--views", "10"], ["--dense"], ["--dense", "--scales", "36,48"]):
        each = [run("--weights", str(file), *flags) for file in (first, other)]  # one view: class scores
        each = [torch.softmax(torch.from_numpy(one), dim=1).numpy() for one in each] if not flags else each
        assert np.abs(each[0] - each[1]).max() > 1e-2
        np.testing.assert_allclose(run("--weights", str(first), str(other), *flags), (each[0] + each[1]) / 2,
                                   rtol=0, atol=1e-6)  # fmt: skip
    named = []  # the first's weights and preprocessing, saved with the names of two sets of classes
    for classes in ("0123456789", "0123456798"):
        named.append(tmp_path / f"classes{classes}.safetensors")
        preprocess = Preprocess(size=36, crop=(32, 32), channels=1, mean=(120.0,), std=(60.0,), classes=list(classes))
        save_weights(named[-1], load_weights(first, netdsl.load_graph(LENET)),
                     metadata={"netdsl.preprocess": preprocess.to_json()})  # fmt: skip
    maps = tmp_path / "maps.net"
    maps.write_text("net maps\ninput x: 1 x 8 x 8\ny = conv(x, 2, size=3)\noutput y\n")
    for file in ("m1.safetensors", "m2.safetensors"):
        save_weights(tmp_path / file, init_weights(netdsl.load_graph(maps)))
    for net, args, message in [
        (LENET, [str(first), str(second), "--time"], "--time: error: --time runs one net, and --weights gives 2"),
        (LENET, [str(first), str(second), "--distributed"], "--distributed: error: --distributed runs one net"),
        (LENET, [str(first), *map(str, named), "--input", *images],
         f"{named[1]}: error: {named[1]} was trained on other classes than {named[0]}"),
        (str(maps), [str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors")], "--weights: error: an "
         "ensemble averages class scores"),
    ]:
        assert main(["run", net, "--backend", "torch", "--weights", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_folder_of_inputs_is_its_images_in_order(tmp_path, capsys):
    """--input FOLDER: the images in it and its subfolders, sorted by path, hidden ones (a dot) and other files
    left out: the same outputs, row by row, as the files named one by one (with --dense too), and `--save
    out.npz` names each row's file; a folder without images is an error naming it."""
    folder = tmp_path / "photos"
    (folder / "b" / ".cache").mkdir(parents=True)
    (folder / ".git").mkdir()
    images = _gray_images(folder, [(40, 52), (36, 36)], seed=21)  # photos/image0.png, photos/image1.png
    images += _gray_images(folder / "b", [(33, 40)], seed=22)  # photos/b/image0.png: sorted before the others
    for hidden in (folder / "._image0.png", folder / "b" / ".cache" / "x.png", folder / ".git" / "y.png"):
        hidden.write_bytes(b"not an image")  # read, these would fail
    (folder / "notes.txt").write_text("not an input")
    file, _, _ = _trained_like(tmp_path, seed=4)
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", "--weights", str(file))
    named = [images[2], images[0], images[1]]
    for flags in ([], ["--dense"]):
        np.testing.assert_array_equal(run("--input", str(folder), *flags), run("--input", *named, *flags))
    capsys.readouterr()
    saved = tmp_path / "saved.npz"  # .npz: each row's file beside the scores
    flags = ["--input", str(folder), "--weights", str(file), "--backend", "torch", "--save", str(saved)]
    assert main(["run", LENET, *flags]) == 0
    out = capsys.readouterr().out
    with np.load(saved) as arrays:
        assert sorted(arrays) == ["files", "output"] and list(arrays["files"]) == named
        np.testing.assert_array_equal(arrays["output"], run("--input", *named))
    assert [line.split(" ")[2] for line in out.splitlines() if line.startswith("input ")] == [f"({n}):" for n in named]
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "z.png").write_bytes(b"x")
    assert main(["run", LENET, "--input", images[0], str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: error: the folder {empty} holds no images" in err and "Traceback" not in err


def test_an_image_list_of_inputs_is_its_images_in_its_order(tmp_path, capsys):
    """--input LIST.txt: the images it names, in its order, relative to its folder, a line with an image alone
    (spaces in its name) or with a class (a training or validation list: the class passed over): the same
    outputs, row by row, as the files named one by one; a list's mistakes are errors at their line."""
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    images = _gray_images(folder, [(40, 52), (36, 36)], seed=23)
    images += _gray_images(folder / "b", [(33, 40)], seed=24)
    spaced = folder / "my photo.png"
    Path(images[1]).rename(spaced)
    listed = tmp_path / "queries.txt"
    listed.write_text(f"# queries\nphotos/b/image0.png 3\n\n  photos/my photo.png\r\n{images[0]} owl\n")
    file, _, _ = _trained_like(tmp_path, seed=5)
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", "--weights", str(file))
    named = [images[2], str(spaced), images[0]]
    for flags in ([], ["--batch", "2"]):  # (in passes of 2, against passes of 2: a batch's size moves fp32 sums)
        np.testing.assert_array_equal(run("--input", str(listed), *flags), run("--input", *named, *flags))
    for text, message in (
        ("photos/b/image0.png\nphotos/gone.png 1\n", "queries.txt:2:1: error: no such image: "),
        ("photos/b/image0.png\nnotes\n", "queries.txt:2:1: error: notes is not an image file"),
        ("# nothing yet\n", "queries.txt: error: the list "),
    ):
        listed.write_text(text)
        capsys.readouterr()
        assert main(["run", LENET, "--input", str(listed), "--backend", "torch"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_inputs_are_read_a_pass_at_a_time(tmp_path, capsys, monkeypatch):
    """--batch N: each file is read when its rows are next, so a folder of any size holds a pass's images in
    memory (an ensemble runs each pass through every model); an array of several images fills passes across
    files. The outputs are those of one pass of everything."""
    from netdsl.cli import run as run_module

    images = _gray_images(tmp_path, [(36, 40), (40, 36), (36, 36), (44, 36), (36, 50)], seed=30)
    np.save(tmp_path / "three.npy", np.random.default_rng(31).normal(size=(3, 1, 32, 32)).astype(np.float32))
    file, _, _ = _trained_like(tmp_path, seed=7)
    events = []
    read, call = run_module._prepared_image, Net.__call__
    monkeypatch.setattr(run_module, "_prepared_image", lambda path, *rest: events.append("read") or read(path, *rest))
    monkeypatch.setattr(Net, "__call__", lambda net, x, *rest: events.append(f"run {len(x)}") or call(net, x, *rest))
    inputs = ["--input", *images[:3], str(tmp_path / "three.npy"), *images[3:]]
    run = partial(saved_run, tmp_path, capsys, LENET, "--backend", "torch", *inputs)
    whole = run("--weights", str(file))
    events.clear()
    scale = np.abs(whole).max()  # fp32: another batch size sums in another order (about 1e-7 of the scores' scale)
    np.testing.assert_allclose(run("--weights", str(file), "--batch", "2"), whole, rtol=0, atol=1e-5 * scale)
    assert events == ["read", "read", "run 2", "read", "run 2", "run 2", "read", "read", "run 2"], events
    events.clear()
    run("--weights", str(file), str(file), "--batch", "4")  # an ensemble: each pass through both
    assert events == ["read", "read", "read", "run 4", "run 4", "read", "read", "run 4", "run 4"], events
