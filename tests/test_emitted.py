"""Every generated kernel file computes what its layers mean: each step's `launch` (the copied Triton
kernel, run under the interpreter on the CPU) against PyTorch ops on fresh random inputs."""

import ast
import inspect
import io
import os
import subprocess
import sys
import textwrap
import tokenize
from importlib import import_module
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from netdsl.codegen import conv_nhwc
from netdsl.codegen.layouts import to_layout
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.launches import load_kernel_file
from netdsl.compiler.passes import Options

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {"fp32": 1e-4}  # relative to the largest output magnitude; exact fp32 math inside the kernels

# Small nets that together produce every kind of fused step: conv (one and two inputs, folded batch
# norm, leaky ReLU epilogue), fc (one and two inputs), lrn alone and fused with max-pool, pooling of
# every kind, softmax, the element-wise kernels (relu, batch norm, add), concat and the channel shuffle.
MINI_ALEXNET = """
net mini_alexnet
input image: 3 x 35 x 35
towers gpu0, gpu1 {
    conv1 = conv(image, 8, size=5, stride=2) | relu | lrn(size=5, alpha=1e-2, beta=0.75, k=2) | maxpool(3, stride=2)
    conv2 = conv(all conv1, 12, size=3, pad=1) | relu
    fc6 = fc(all conv2, 20) | relu | dropout(0.5)
}
fc7 = fc(all fc6, 10) on gpu0
prob = softmax(fc7)
"""

ZOO = """
net zoo
input x: 6 x 13 x 11
a = conv(x, 8, size=(3, 5), pad=same, dilation=1, bias=false) | batchnorm | leaky_relu(0.1)
b = conv(x, 8, size=1, groups=2) | relu
c = add(a, b)
d = batchnorm(c)
e = concat(d, c)
output e
f = lrn(e, size=3, alpha=1e-3, beta=0.5, k=1)
g = avgpool(f, 3, stride=2, pad=1, ceil=true, count_pad=false)
h = maxpool(g, 2, ceil=true) | global_avgpool | flatten
i = fc(h, 7) | softmax
j = relu(k)              # reads a layer defined below
k = avgpool(e, 2)
s = shuffle(e, 4) | relu  # a kernel: its reader is no conv or fc
"""


def build_dir(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.net"
    path.write_text(text)
    out = tmp_path / name
    write_build(compile_net(path, Options()), out)
    return out


def _random(shape, generator):
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("text, name", [(MINI_ALEXNET, "mini_alexnet"), (ZOO, "zoo")])
def test_every_generated_kernel_matches_pytorch(tmp_path, text, name):
    out = build_dir(tmp_path, text, name)
    generator = torch.Generator().manual_seed(1234)
    files = sorted((out / "kernels").glob("*.py"))
    for path in files:
        module = load_kernel_file(path)
        # laid out as the runtime lays them out (channels-last where the plan says so)
        inputs = [
            to_layout(_random((2, *shape), generator), layout)
            for shape, layout in zip(module.INPUT_SHAPES, module.INPUT_LAYOUTS, strict=True)
        ]
        weights = {
            n: to_layout(_random(s, generator) * 0.2, module.WEIGHT_LAYOUTS.get(n, "nchw"))
            for n, s in module.WEIGHT_SHAPES.items()
        }
        if "running_var" in weights:
            weights["running_var"] = weights["running_var"].abs() + 0.5
        got = module.launch(inputs, weights)
        want = module.reference(inputs, weights)
        assert got.shape == (2, *module.OUTPUT_SHAPE), path.name
        scale = want.abs().max().clamp_min(1e-6)
        error = ((got - want).abs().max() / scale).item()
        assert error <= TOLERANCE["fp32"], f"{path.name}: relative error {error:.2e}"
    assert files, "no kernels were generated"


def test_the_nets_cover_every_kernel_family(tmp_path):
    from netdsl.compiler.emit import FAMILIES, family_of

    seen = set()
    for text, name in [(MINI_ALEXNET, "mini_alexnet"), (ZOO, "zoo")]:
        program = compile_net(_write(tmp_path, text, name), Options()).program
        seen |= {family_of(program.nodes[n]["step"]) for n in program.nodes}
    # conv_lrn_maxpool is chosen by the cost model (tested below), space_to_depth by an option (test_space_to_depth.py)
    assert set(FAMILIES) - {"conv_lrn_maxpool", "space_to_depth"} <= seen


def _write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.net"
    path.write_text(text)
    return path


def test_a_kernel_travels_with_the_device_functions_it_calls(tmp_path):
    """conv_nhwc's kernel calls conv.py's pixel decoding and epilogue: the file holds copies of all three."""
    from netdsl.codegen.source import device_functions

    called = [f"{fn.__module__}.{fn.__name__}" for fn in device_functions(conv_nhwc.conv2d_nhwc_kernel)]
    assert called == [
        "netdsl.codegen.conv_nhwc.conv2d_nhwc_kernel",
        "netdsl.codegen.conv.conv_pixels",
        "netdsl.codegen.conv.conv_epilogue",
    ]
    kernels = build_dir(tmp_path, MINI_ALEXNET, "mini_alexnet") / "kernels"
    source = (kernels / "conv2_gpu1_conv_bias_relu.py").read_text()
    for name in ("conv2d_nhwc_kernel", "conv_pixels", "conv_epilogue"):
        assert source.count(f"\ndef {name}(") == 1, name


SCALE = 2.0


@triton.jit
def _scale_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * SCALE)


def test_a_device_function_may_not_name_other_globals():
    """A generated file defines only Triton's modules and the copied functions: a kernel naming anything
    else is refused when the file is written, not when it runs."""
    from netdsl.codegen.source import device_functions

    with pytest.raises(TypeError, match="'SCALE'"):
        device_functions(_scale_kernel)


def _run_by_hand(path: Path) -> str:
    """Runs a generated file as a script the way a user on a machine without a GPU would: no TRITON_INTERPRET in
    its environment (the file chooses the interpreter itself) and no GPU visible; its stdout."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_generated_file_runs_by_hand(tmp_path, dtype):
    """Run as a script, a kernel file checks itself in its build's dtype against float64 PyTorch (the
    two-input channels-last conv; bf16 within 2e-2: the output is rounded to 8 bits of mantissa), under
    Triton's interpreter where there is no GPU, its bf16 dots widened by netdsl.codegen."""
    path = tmp_path / "mini_alexnet.net"
    path.write_text(MINI_ALEXNET)
    out = write_build(compile_net(path, Options(dtype=dtype)), tmp_path / "mini_alexnet")
    source = out / "kernels" / "conv2_gpu1_conv_bias_relu.py"
    assert "def conv2d_nhwc_kernel(" in source.read_text()
    stdout = _run_by_hand(source)
    assert f"({'torch.float32' if dtype == 'fp32' else 'torch.bfloat16'}, float64 reference)" in stdout
    error = float(stdout.rsplit("max error ", 1)[1].split()[0])
    assert error < (TOLERANCE["fp32"] if dtype == "fp32" else 2e-2)


def test_a_training_step_file_runs_by_hand(tmp_path):
    """A train/ step file run as a script without a GPU checks its forward and backward against autograd, and
    the update file its SGD against the paper's rule."""
    from netdsl.compiler.train_plan import compile_training

    compiled = compile_training(ROOT / "nets/lenet5.net", Options(batch=2))
    for name in ("c3_conv_relu.py", "update_gpu0.py"):
        (tmp_path / name).write_text(compiled.kernels[name])
    errors = [line for line in _run_by_hand(tmp_path / "c3_conv_relu.py").splitlines() if "max error" in line]
    assert [line.split()[1] for line in errors] == ["output:", "input:", "weight:", "bias:"]
    assert all(float(line.split("max error ")[1].split()[0]) < 1e-5 for line in errors), errors
    stdout = _run_by_hand(tmp_path / "update_gpu0.py")
    assert float(stdout.split("max error ")[1].split()[0]) < 1e-6


def _jit_functions() -> dict[str, object]:
    """Every @triton.jit function a generated file may copy, by name, as netdsl.codegen defines it."""
    from netdsl.codegen.source import device_functions
    from netdsl.compiler.backward import KERNELS
    from netdsl.compiler.emit import FAMILIES

    names = {f"{family.module}.{family.kernel}" for family in FAMILIES.values()}
    names |= {name for forward, backward in KERNELS.values() for name in (*forward, *backward)}
    functions = {}
    for name in sorted(names):
        module, kernel = name.split(".")
        for fn in device_functions(getattr(import_module(f"netdsl.codegen.{module}"), kernel)):
            functions[fn.__name__] = fn
    return functions


def _parsed(fn) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]


def test_generated_files_read_like_the_repository_code(tmp_path):
    """Lines of at most 120 characters, strings in double quotes, no formatter markers (`# fmt: skip`), and each
    copied @triton.jit function the same code as netdsl.codegen's, comments aside."""
    from netdsl.compiler.train_plan import compile_training

    files = sorted((build_dir(tmp_path, MINI_ALEXNET, "mini_alexnet") / "kernels").glob("*.py"))
    files += sorted((build_dir(tmp_path, ZOO, "zoo") / "kernels").glob("*.py"))
    (tmp_path / "train").mkdir()
    for name, source in compile_training(ROOT / "nets/lenet5.net", Options(batch=2)).kernels.items():
        (tmp_path / "train" / name).write_text(source)
        files.append(tmp_path / "train" / name)
    originals = {name: _parsed(fn) for name, fn in _jit_functions().items()}
    for path in files:
        source = path.read_text()
        assert "fmt:" not in source, path.name
        assert max(len(line) for line in source.splitlines()) <= 120, path.name
        strings = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.STRING]
        assert not [t.string for t in strings if t.string.lstrip("bfruBFRU").startswith("'")], path.name
        copies = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.decorator_list]
        assert copies, path.name
        for copy in copies:
            assert ast.dump(copy) == ast.dump(originals[copy.name]), (path.name, copy.name)


@pytest.mark.parametrize(
    "value",
    [
        'a "quoted" layer\'s \\ back\nslash \u00e9',
        {"one": (1,), "none": None, "flags": [True, False], "float": 1e-05},
        [(f"layer{i}.weight", i * 1000) for i in range(40)],
        {"nested": {f"key{i}": (i, (i,), [f"{i}" * 30]) for i in range(8)}},
        (),
    ],
)
def test_a_literal_is_python_of_the_same_value_in_lines_that_fit(value):
    from netdsl.compiler.emit import assignment

    text = assignment("NAME", value, "a comment")
    assert text.startswith("NAME = ") and ast.literal_eval(text.removeprefix("NAME = ")) == value
    assert max(len(line) for line in text.splitlines()) <= 120 and text.isascii()
    strings = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.STRING]
    assert all(string.startswith('"') for string in strings)
    assert "# a comment" in text.splitlines()[0]


def test_grouped_lrn_equals_lrn_per_group(tmp_path):
    text = "input x: 8 x 9 x 9\ny = lrn(x, 5, alpha=0.5, beta=0.75, k=1, groups=2) | maxpool(3, stride=2)\n"
    out = build_dir(tmp_path, text, "grouped")
    (path,) = (out / "kernels").glob("*.py")
    module = load_kernel_file(path)
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(5))
    got = module.launch([x], {})
    halves = [torch.nn.functional.local_response_norm(h, 5, alpha=0.5 * 5, beta=0.75, k=1) for h in x.chunk(2, 1)]
    want = torch.nn.functional.max_pool2d(torch.cat(halves, 1), 3, 2)
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE["fp32"]


def test_the_one_kernel_stage_matches_pytorch(tmp_path, monkeypatch):
    import netdsl.compiler.fuse

    monkeypatch.setattr(netdsl.compiler.fuse, "stage_fusion_wins", lambda stage, batch, dtype: True)
    out = build_dir(tmp_path, MINI_ALEXNET, "staged")
    (path,) = [p for p in (out / "kernels").glob("*.py") if p.stem.endswith("conv_bias_relu_lrn_maxpool")][:1]
    module = load_kernel_file(path)
    generator = torch.Generator().manual_seed(99)
    inputs = [_random((2, *shape), generator) for shape in module.INPUT_SHAPES]
    weights = {n: _random(s, generator) * 0.2 for n, s in module.WEIGHT_SHAPES.items()}
    got, want = module.launch(inputs, weights), module.reference(inputs, weights)
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE["fp32"]


def test_a_kernel_with_helpers_travels_to_the_sm90_compile_as_source():
    """The sm_90 build's child process gets a kernel and its device functions as one file (it need not
    import torch); a function naming another global would not travel."""
    from netdsl.codegen import conv
    from netdsl.codegen.target import _standalone_source

    source = _standalone_source(conv.conv2d_kernel)
    assert source is not None and source.startswith("import triton\nimport triton.language as tl\n")
    for name in ("conv2d_kernel", "conv_pixels", "conv_epilogue"):
        assert f"\n@triton.jit\ndef {name}(" in source
    namespace: dict = {}
    exec(compile(source, "standalone.py", "exec"), namespace)  # a file of its own: nothing else needed
    assert callable(namespace["conv2d_kernel"])
