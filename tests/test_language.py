"""Every feature of the .net language, checked on the graph it builds: layer names, ops, parameters,
inputs, devices and shapes. Shape rules are compared with independent arithmetic and with PyTorch's
own conv/pooling ops run on random tensors."""

import itertools
import math
import random
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

from netdsl import graph_from_text, load_graph
from netdsl.ir import layers

# --- helpers ----------------------------------------------------------------------------------------


def build(text: str, file: str = "t.net", **options):
    return graph_from_text(textwrap.dedent(text), file=file, **options)


def layer(graph, name: str):
    return graph.nodes[name]["layer"]


def names(graph) -> list[str]:
    return [item.name for item in layers(graph)]


def shape(graph, name: str) -> tuple[int, ...]:
    return layer(graph, name).shape


def conv_out(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """The textbook output length of a convolution: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out(n: int, k: int, s: int, p: int = 0, ceil: bool = False) -> int:
    """PyTorch's pooling rule, written out independently of netdsl.ir.ops."""
    top = n + 2 * p - k
    out = (-(-top // s) if ceil else top // s) + 1
    if ceil and (out - 1) * s >= n + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


# --- lexical structure ------------------------------------------------------------------------------


def test_comments_are_ignored_everywhere():
    graph = build(
        """\
        # a comment on the first line
        input x: 3 x 8 x 8   # after a statement
            # indented comment
        y = conv(x, 4, size=3) # trailing
            | relu             # inside a continued chain
        """
    )
    assert names(graph) == ["x", "y", "y.relu"]


def test_semicolons_separate_statements_at_top_level_and_in_bodies():
    graph = build("input x: 3 x 8 x 8; a = relu(x); b = relu(a)\ntowers g0, g1 { c = relu(b); d = relu(c) }\n")
    assert names(graph) == ["x", "a", "b", "c@g0", "c@g1", "d@g0", "d@g1"]
    assert layer(graph, "d@g1").inputs == ["c@g1"]


def test_last_statement_of_a_body_needs_no_terminator():
    graph = build("input x: 3 x 8 x 8\nblock b(v) { return relu(v) }\ny = b(x)\n")
    assert names(graph) == ["x", "y"]


def test_newline_inside_parentheses_continues_the_statement():
    graph = build(
        """\
        input x: 3 x 8 x 8
        y = conv(
            x,
            4,
            size=3,
            pad=1
        )
        """
    )
    assert layer(graph, "y").params["pad"] == (1, 1)
    assert shape(graph, "y") == (4, 8, 8)


def test_newline_after_pipe_continues_the_chain():
    graph = build("input x: 3 x 8 x 8\ny = conv(x, 4, size=3) |\n    relu |\n\n    maxpool(2)\n")
    assert names(graph) == ["x", "y", "y.relu", "y.maxpool"]
    assert shape(graph, "y.maxpool") == (4, 3, 3)


def test_line_starting_with_pipe_continues_the_chain_above():
    graph = build(
        """\
        input x: 3 x 8 x 8
        y = conv(x, 4, size=3)
            | relu
            # a comment between the lines of a chain

            | maxpool(2)
        z = relu(y)
        """
    )
    assert names(graph) == ["x", "y", "y.relu", "y.maxpool", "z"]
    assert layer(graph, "z").inputs == ["y.maxpool"]


def test_backslash_joins_lines():
    graph = build("input x: 3 x 8 x 8\ny = \\\n  relu(x)\n")
    assert names(graph) == ["x", "y"]


def test_windows_line_endings_and_missing_final_newline():
    graph = build("input x: 3 x 8 x 8\r\ny = relu(x)\r\nz = y | relu")
    assert names(graph) == ["x", "y", "z"]


# --- net name, inputs, outputs ----------------------------------------------------------------------


def test_net_statement_names_the_net():
    assert build("net lenet\ninput x: 1 x 28 x 28\n").graph["name"] == "lenet"


def test_net_name_defaults_to_the_file_stem(tmp_path):
    assert build("input x: 3 x 8 x 8\n", file=str(tmp_path / "tiny.net")).graph["name"] == "tiny"
    assert build("input x: 3 x 8 x 8\n", file="my-net.v2.net").graph["name"] == "my_net_v2"
    path = tmp_path / "from_disk.net"
    path.write_text("input x: 3 x 8 x 8\n")
    assert load_graph(path).graph["name"] == "from_disk"


def test_input_shapes_feature_map_and_flat():
    graph = build("const side = 4 * 2\ninput img: 3 x side x side + 1\ninput vec: 10\n")
    assert graph.graph["inputs"] == ["img", "vec"]
    assert layer(graph, "img").op == "input"
    assert shape(graph, "img") == (3, 8, 9)
    assert layer(graph, "img").params == {"shape": (3, 8, 9)}
    assert shape(graph, "vec") == (10,)


def test_x_is_an_ordinary_name_outside_shapes():
    graph = build(
        """\
        input x: 3 x 8 x 8
        y = relu(x)
        z = x | conv(4, size=3) | relu
        w = concat(x, y)
        const s = 2
        p = maxpool(x, s)
        """
    )
    assert layer(graph, "x").params == {"shape": (3, 8, 8)}
    assert layer(graph, "y").inputs == ["x"]
    assert layer(graph, "z").inputs == ["x"]
    assert shape(graph, "w") == (6, 8, 8)
    assert shape(graph, "p") == (3, 4, 4)


def test_explicit_outputs_in_the_order_listed():
    graph = build("input x: 3 x 8 x 8\na = relu(x)\nb = relu(a)\nc = relu(a)\noutput c, a\n")
    assert graph.graph["outputs"] == ["c", "a"]


def test_default_outputs_are_the_layers_nothing_reads():
    graph = build("input x: 3 x 8 x 8\ninput unused: 4\na = relu(x)\nb = relu(a) | relu\nc = relu(a)\n")
    assert graph.graph["outputs"] == ["b.relu", "c"]  # inputs are never outputs by default


def test_output_of_a_chain_is_its_last_layer():
    graph = build("input x: 3 x 8 x 8\na = conv(x, 4, size=3) | relu | maxpool(2)\noutput a\n")
    assert graph.graph["outputs"] == ["a.maxpool"]


# --- constants ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, value",
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("2 * 3 ** 2", 18),
        ("2 ** 3 ** 2", 512),  # right-associative
        ("-2 ** 2 + 5", 1),  # - binds looser than **
        ("1 - 2 - 3 + 10", 6),  # left-associative
        ("17 // 5 * 2", 6),
        ("17 % 5 + 1", 3),
        ("7 / 2", 3.5),
        ("2 * -3 + 7", 1),
        ("+4 - -1", 5),
        ("1_000 / 1e3", 1.0),
        (".5 * 4", 2.0),
        ("2.5e-1 * 8", 2.0),
    ],
)
def test_constant_arithmetic_and_precedence(expr, value):
    graph = build(f"const c = {expr}\ninput x: 4\ny = leaky_relu(x, c)\n")
    assert layer(graph, "y").params["slope"] == pytest.approx(value)
    assert value == pytest.approx(eval(expr.replace("_", "")))  # the same as Python's arithmetic


def test_constants_build_on_constants_and_size_layers():
    graph = build(
        """\
        const base = 16
        const wide = base * 2 + base // 4
        const k = 3
        input x: 3 x 8 x 8
        y = conv(x, wide, size=k, pad=k // 2)
        """
    )
    assert layer(graph, "y").params["filters"] == 36
    assert shape(graph, "y") == (36, 8, 8)


def test_whole_floats_are_accepted_where_integers_are_expected():
    graph = build("input x: 3 x 8 x 8\ny = conv(x, 8 / 2, size=6 / 2)\n")
    assert layer(graph, "y").params["filters"] == 4
    assert layer(graph, "y").params["size"] == (3, 3)


# --- presets ------------------------------------------------------------------------------------------


def test_presets_fill_in_parameters_and_calls_override_them():
    graph = build(
        """\
        input x: 3 x 8 x 8
        const norm = lrn(size=3, alpha=1e-3, k=1)
        const c3 = conv(size=3, pad=1, bias=false)
        const c3s = c3(stride=2)              # a preset of a preset
        a = x | norm                           # bare preset as a layer
        b = c3(a, 4)                           # positional filters, added at the use
        c = c3(b, filters=6, pad=0)            # named override
        d = b | c3s(8)
        """
    )
    assert layer(graph, "a").op == "lrn"
    assert layer(graph, "a").params == {"size": 3, "alpha": 1e-3, "beta": 0.75, "k": 1.0, "groups": 1}
    assert layer(graph, "b").op == "conv"
    assert layer(graph, "b").params["bias"] is False
    assert shape(graph, "b") == (4, 8, 8)
    assert layer(graph, "c").params["pad"] == (0, 0)
    assert shape(graph, "c") == (6, 6, 6)
    assert layer(graph, "d").params["stride"] == (2, 2)
    assert layer(graph, "d").params["pad"] == (1, 1)
    assert shape(graph, "d") == (8, 4, 4)


def test_preset_names_mean_what_they_meant_where_it_was_written():
    graph = build(
        """\
        const n = 4
        const c = conv(n, 1)
        block b(v, n) {
            return c(v)
        }
        input x: 3 x 8 x 8
        y = b(x, 8)
        """
    )
    assert layer(graph, "y").params["filters"] == 4


def test_preset_without_a_required_parameter_gets_it_at_each_use():
    graph = build("const c3 = conv(size=3, pad=same)\ninput x: 3 x 8 x 8\na = c3(x, 5)\nb = a | c3(filters=2)\n")
    assert shape(graph, "a") == (5, 8, 8)
    assert shape(graph, "b") == (2, 8, 8)


# --- chains -------------------------------------------------------------------------------------------


def test_chain_parts_are_named_after_the_chain_and_numbered():
    graph = build("input x: 3 x 8 x 8\na = conv(x, 4, size=3) | relu | maxpool(2) | relu | conv(2, 1)\n")
    assert names(graph) == ["x", "a", "a.relu", "a.maxpool", "a.relu_2", "a.conv"]
    assert [layer(graph, n).op for n in names(graph)] == ["input", "conv", "relu", "maxpool", "relu", "conv"]
    assert layer(graph, "a.relu").inputs == ["a"]
    assert layer(graph, "a.relu_2").inputs == ["a.maxpool"]


def test_chain_name_reads_the_last_layer_of_the_chain():
    graph = build("input x: 3 x 8 x 8\na = relu(x) | relu | relu\nb = relu(a)\nc = a | relu\n")
    assert names(graph) == ["x", "a", "a.relu", "a.relu_2", "b", "c"]
    assert layer(graph, "b").inputs == ["a.relu_2"]
    assert layer(graph, "c").inputs == ["a.relu_2"]


def test_chain_starting_with_a_name_feeds_it_to_the_first_layer():
    graph = build("input x: 3 x 8 x 8\nb = x | conv(4, size=3) | relu\n")
    assert names(graph) == ["x", "b", "b.relu"]
    assert layer(graph, "b").inputs == ["x"]
    assert layer(graph, "b").params["filters"] == 4


def test_single_layer_statement_is_named_by_the_statement():
    graph = build("input x: 3 x 8 x 8\nfeatures = conv(x, 4, size=3)\n")
    assert names(graph) == ["x", "features"]


# --- DAGs ---------------------------------------------------------------------------------------------


def test_concat_and_add_build_dags():
    graph = build(
        """\
        input x: 3 x 8 x 8
        a = conv(x, 4, size=1)
        b = conv(x, 6, size=3, pad=1)
        c = conv(x, 2, size=5, pad=2)
        d = conv(x, 4, size=1)
        cat = concat(a, b, c)
        piped = a | concat(b)
        s = add(a, d)
        t = a | add(d, s)
        """
    )
    assert layer(graph, "cat").op == "concat"
    assert layer(graph, "cat").inputs == ["a", "b", "c"]
    assert shape(graph, "cat") == (12, 8, 8)
    assert layer(graph, "piped").inputs == ["a", "b"]
    assert shape(graph, "piped") == (10, 8, 8)
    assert layer(graph, "s").op == "add"
    assert layer(graph, "s").inputs == ["a", "d"]
    assert shape(graph, "s") == (4, 8, 8)
    assert layer(graph, "t").inputs == ["a", "d", "s"]
    assert set(graph.predecessors("cat")) == {"a", "b", "c"}
    assert graph.has_edge("x", "a") and graph.has_edge("a", "cat")
    assert graph.graph["outputs"] == ["cat", "piped", "t"]


def test_layer_reading_several_inputs_joins_their_channels():
    graph = build(
        """\
        input x: 3 x 8 x 8
        towers g0, g1 {
            a = conv(x, 4, size=3, pad=1)
        }
        y = conv(all a, 5, size=1)
        z = fc(all a, 10)
        """
    )
    assert layer(graph, "y").inputs == ["a@g0", "a@g1"]
    assert layer(graph, "y").input_shape == (8, 8, 8)
    assert shape(graph, "y") == (5, 8, 8)
    assert layer(graph, "z").input_shape == (8, 8, 8)
    assert shape(graph, "z") == (10,)


def test_the_same_input_twice_counts_twice():
    graph = build("input x: 3 x 8 x 8\ny = concat(x, x)\nz = add(x, x)\n")
    assert layer(graph, "y").inputs == ["x", "x"]
    assert shape(graph, "y") == (6, 8, 8)
    assert shape(graph, "z") == (3, 8, 8)


# --- shape rules --------------------------------------------------------------------------------------


def test_every_shape_preserving_layer():
    graph = build(
        """\
        input x: 4 x 6 x 7
        input v: 12
        a = x | relu | leaky_relu(0.1) | lrn(3) | dropout(0.25) | batchnorm | softmax
        b = v | relu | dropout | softmax | batchnorm
        """
    )
    for name in ("a", "a.leaky_relu", "a.lrn", "a.dropout", "a.batchnorm", "a.softmax"):
        assert shape(graph, name) == (4, 6, 7), name
    for name in ("b", "b.dropout", "b.softmax", "b.batchnorm"):
        assert shape(graph, name) == (12,), name
    assert layer(graph, "a.leaky_relu").params == {"slope": 0.1}
    assert layer(graph, "a.dropout").params == {"rate": 0.25}
    assert layer(graph, "b.dropout").params == {"rate": 0.5}


def test_conv_defaults_and_normalized_parameters():
    graph = build("input x: 3 x 8 x 8\ny = conv(x, 4, 3)\n")
    assert layer(graph, "y").params == {
        "filters": 4,
        "size": (3, 3),
        "stride": (1, 1),
        "pad": (0, 0),
        "dilation": (1, 1),
        "groups": 1,
        "bias": True,
        "init_std": None,
        "init_bias": None,
    }
    assert shape(graph, "y") == (4, 6, 6)


def test_conv_rectangular_kernel_stride_pad_dilation_groups():
    graph = build(
        "input x: 4 x 9 x 11\n"
        "y = conv(x, 8, (3, 5), stride=(1, 2), pad=(1, 2), dilation=(2, 1), groups=2)\n"
        "z = conv(x, 6, size=(1, 3), pad=valid)\n"
    )
    p = layer(graph, "y").params
    assert (p["size"], p["stride"], p["pad"], p["dilation"], p["groups"]) == ((3, 5), (1, 2), (1, 2), (2, 1), 2)
    assert shape(graph, "y") == (8, conv_out(9, 3, 1, 1, 2), conv_out(11, 5, 2, 2, 1)) == (8, 7, 6)
    assert shape(graph, "z") == (6, 9, 9)


@pytest.mark.parametrize("size, dilation", [(1, 1), (3, 1), (5, 1), (3, 2), (3, 3), (7, 1), ((3, 5), 1), ((1, 3), 2)])
def test_conv_pad_same_keeps_the_spatial_size(size, dilation):
    size_text = f"({size[0]}, {size[1]})" if isinstance(size, tuple) else str(size)
    graph = build(f"input x: 2 x 9 x 12\ny = conv(x, 3, size={size_text}, dilation={dilation}, pad=same)\n")
    assert shape(graph, "y") == (3, 9, 12)
    kh, kw = size if isinstance(size, tuple) else (size, size)
    assert layer(graph, "y").params["pad"] == (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)


def _conv_cases():
    rng = random.Random(7)
    cases = []
    for _ in range(60):
        groups = rng.choice([1, 1, 2, 3])
        channels = groups * rng.randint(1, 3)
        filters = groups * rng.randint(1, 3)
        h, w = rng.randint(5, 20), rng.randint(5, 20)
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, 3), rng.randint(0, 3)
        dh, dw = rng.randint(1, 3), rng.randint(1, 3)
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue
        cases.append((channels, h, w, filters, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups))
    return cases


@pytest.mark.parametrize("channels, h, w, filters, size, stride, pad, dilation, groups", _conv_cases())
def test_conv_shape_matches_torch(channels, h, w, filters, size, stride, pad, dilation, groups):
    graph = build(
        f"input x: {channels} x {h} x {w}\n"
        f"y = conv(x, {filters}, size={size}, stride={stride}, pad={pad}, dilation={dilation}, groups={groups})\n"
    )
    generator = torch.Generator().manual_seed(0)  # only the shape is compared
    weight = torch.randn(filters, channels // groups, *size, generator=generator)
    x = torch.randn(1, channels, h, w, generator=generator)
    expected = nnf.conv2d(x, weight, None, stride, pad, dilation, groups).shape[1:]
    assert shape(graph, "y") == tuple(expected)
    assert shape(graph, "y")[1:] == tuple(
        conv_out(n, k, s, p, d) for n, k, s, p, d in zip((h, w), size, stride, pad, dilation)
    )


def _pool_cases():
    cases = []
    for n, k, s, p, ceil in itertools.product((5, 6, 7, 8, 13), (1, 2, 3, 4), (1, 2, 3), (0, 1, 2), (False, True)):
        if 2 * p <= k:
            cases.append((n, k, s, p, ceil))
    return cases


@pytest.mark.parametrize("op", ["maxpool", "avgpool"])
@pytest.mark.parametrize("n, k, s, p, ceil", _pool_cases())
def test_pool_shape_matches_torch(op, n, k, s, p, ceil):
    width = n + 3  # a non-square input
    graph = build(f"input x: 2 x {n} x {width}\ny = {op}(x, {k}, stride={s}, pad={p}, ceil={str(ceil).lower()})\n")
    pool = nnf.max_pool2d if op == "maxpool" else nnf.avg_pool2d
    x = torch.randn(1, 2, n, width, generator=torch.Generator().manual_seed(0))  # only the shape is compared
    expected = pool(x, k, s, p, ceil_mode=ceil).shape[1:]
    assert shape(graph, "y") == tuple(expected)
    assert shape(graph, "y") == (2, pool_out(n, k, s, p, ceil), pool_out(width, k, s, p, ceil))


def test_ceil_mode_drops_a_last_window_that_would_start_in_the_padding():
    # 5 wide, window 2, stride 2, pad 1: rounding up gives 4 windows, but the 4th would start at 6,
    # past the input and its left padding, so PyTorch (and netdsl) make 3.
    graph = build(
        "input x: 1 x 5 x 5\nfloor = maxpool(x, 2, stride=2, pad=1)\nup = maxpool(x, 2, stride=2, pad=1, ceil=true)\n"
    )
    assert shape(graph, "floor") == (1, 3, 3)
    assert shape(graph, "up") == (1, 3, 3)
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    assert tuple(nnf.max_pool2d(x, 2, 2, 1, ceil_mode=True).shape[1:]) == (1, 3, 3)
    # where the extra window does start inside, ceil mode adds it
    graph = build("input x: 1 x 6 x 6\nfloor = maxpool(x, 3, stride=2)\nup = maxpool(x, 3, stride=2, ceil=true)\n")
    assert shape(graph, "floor") == (1, 2, 2)
    assert shape(graph, "up") == (1, 3, 3)


def test_pool_stride_defaults_to_the_window_and_rectangular_windows():
    graph = build("input x: 3 x 12 x 9\na = maxpool(x, 3)\nb = avgpool(x, (2, 3), stride=(2, 1), count_pad=false)\n")
    params = {"size": (3, 3), "stride": (3, 3), "pad": (0, 0), "dilation": (1, 1), "ceil": False}
    assert layer(graph, "a").params == params
    assert shape(graph, "a") == (3, 4, 3)
    assert shape(graph, "b") == (3, 6, 7)
    assert layer(graph, "b").params["count_pad"] is False


def test_global_avgpool_fc_and_flatten():
    graph = build(
        """\
        input x: 5 x 7 x 3
        g = global_avgpool(x)
        f = fc(x, 10)
        flat = flatten(x)
        f2 = flat | fc(4, bias=false)
        h = g | flatten
        """
    )
    assert shape(graph, "g") == (5, 1, 1)
    assert shape(graph, "f") == (10,)
    assert layer(graph, "f").input_shape == (5, 7, 3)
    assert layer(graph, "f").params == {"units": 10, "bias": True, "init_std": None, "init_bias": None}
    assert shape(graph, "flat") == (5 * 7 * 3,)
    assert shape(graph, "f2") == (4,)
    assert shape(graph, "h") == (5,)
    x = torch.randn(1, 5, 7, 3, generator=torch.Generator().manual_seed(0))
    ref = torch.flatten(nnf.adaptive_avg_pool2d(x, 1), 1)
    assert tuple(ref.shape[1:]) == shape(graph, "h")


# --- towers and devices -------------------------------------------------------------------------------


TOWERS = """\
input img: 3 x 16 x 16
towers gpu0, gpu1 {
    c = conv(img, 4, size=3, pad=1) | relu
    d = conv(all c, 2, size=1)      # both towers' c
    e = relu(d)                     # this tower's d
}
f = concat(d@gpu0, e@gpu1)
g = conv(all e, 3, size=1) on gpu1
h = relu(g)
"""


def test_towers_make_one_copy_per_tower_on_its_device():
    graph = build(TOWERS)
    assert names(graph) == [
        "img",
        "c@gpu0",
        "c.relu@gpu0",
        "c@gpu1",
        "c.relu@gpu1",
        "d@gpu0",
        "d@gpu1",
        "e@gpu0",
        "e@gpu1",
        "f",
        "g",
        "h",
    ]
    for tower in ("gpu0", "gpu1"):
        for base in ("c", "c.relu", "d", "e"):
            item = layer(graph, f"{base}@{tower}")
            assert item.device == tower and item.tower == tower
    assert layer(graph, "c@gpu1").inputs == ["img"]


def test_plain_name_inside_towers_reads_the_towers_own_copy():
    graph = build(TOWERS)
    assert layer(graph, "c.relu@gpu1").inputs == ["c@gpu1"]
    assert layer(graph, "e@gpu0").inputs == ["d@gpu0"]
    assert layer(graph, "e@gpu1").inputs == ["d@gpu1"]


def test_all_reads_every_towers_copy_in_tower_order():
    graph = build(TOWERS)
    assert layer(graph, "d@gpu1").inputs == ["c.relu@gpu0", "c.relu@gpu1"]
    assert shape(graph, "d@gpu1") == (2, 16, 16)
    assert layer(graph, "d@gpu1").input_shape == (8, 16, 16)
    assert layer(graph, "g").inputs == ["e@gpu0", "e@gpu1"]


def test_tower_reference_reads_one_copy():
    graph = build(TOWERS)
    assert layer(graph, "f").inputs == ["d@gpu0", "e@gpu1"]
    assert shape(graph, "f") == (4, 16, 16)
    assert graph.graph["devices"].keys() == {"gpu0", "gpu1"}


def test_on_places_a_layer_and_readers_inherit_the_device():
    graph = build(TOWERS)
    assert layer(graph, "g").device == "gpu1"
    assert layer(graph, "h").device == "gpu1"  # its first input's device
    assert layer(graph, "f").device == "gpu0"  # d@gpu0 is its first input
    assert layer(graph, "img").device == "gpu0"  # inputs: the first device named in the file


def test_default_device_is_gpu0_without_any_device_named():
    graph = build("input x: 3 x 8 x 8\ny = relu(x)\n")
    assert layer(graph, "x").device == layer(graph, "y").device == "gpu0"
    assert list(graph.graph["devices"]) == ["gpu0"]


@pytest.mark.parametrize(
    "first_line, device",
    [
        ("device d1, d2", "d1"),
        ("device big memory 2 GiB", "big"),
        ("towers t1, t2 { }", "t1"),
        ("z = relu(x) on side", "side"),
    ],
)
def test_inputs_default_to_the_first_device_named_in_the_file(first_line, device):
    text = f"input x: 3 x 8 x 8\n{first_line}\ny = relu(x)\n"
    if first_line.startswith("device big"):
        text = text.replace("device big", "device big, d9")
    graph = build(text)
    assert layer(graph, "x").device == device
    assert layer(graph, "y").device == device


def test_input_can_be_placed_and_layers_follow_their_first_input():
    graph = build(
        """\
        device a, b, c
        input x: 3 x 8 x 8 on b
        input v: 3 x 8 x 8
        p = relu(x)
        q = concat(v, p)
        r = concat(p, v)
        s = relu(r) | relu on c
        """
    )
    assert layer(graph, "x").device == "b"
    assert layer(graph, "v").device == "a"
    assert layer(graph, "p").device == "b"
    assert layer(graph, "q").device == "a"
    assert layer(graph, "r").device == "b"
    assert layer(graph, "s").device == layer(graph, "s.relu").device == "c"  # `on` places the whole chain


def test_forward_reference_inherits_the_device_of_the_layer_defined_later():
    graph = build(
        """\
        input img: 3 x 8 x 8 on gpu0
        a = relu(b) | relu
        c = relu(a)
        b = relu(img) on gpu1
        """
    )
    assert layer(graph, "a").device == layer(graph, "a.relu").device == layer(graph, "c").device == "gpu1"


def test_device_memory_statement_records_the_limit():
    graph = build("device gpu0, gpu1 memory 1.5 GiB\ninput x: 3 x 8 x 8\ny = relu(x) on gpu1\n")
    devices = graph.graph["devices"]
    assert devices["gpu0"].memory == devices["gpu1"].memory == int(1.5 * 2**30)


# --- blocks -------------------------------------------------------------------------------------------


BLOCKS = """\
input img: 3 x 16 x 16
block unit(v, n) {
    a = conv(v, n, size=3, pad=1)
    return a | relu
}
block stage(v, n) {
    left = unit(v, n)
    right = v | unit(n=n)
    return concat(left, right) | maxpool(2)
}
s1 = stage(img, 4)
s2 = s1 | stage(8) | relu
s3 = stage(n=2, v=s1)
"""


def test_block_layers_are_named_after_the_instance():
    graph = build(BLOCKS)
    assert names(graph)[:7] == ["img", "s1/left/a", "s1/left", "s1/right/a", "s1/right", "s1", "s1.maxpool"]


def test_block_returned_chain_is_named_after_the_instance():
    graph = build(BLOCKS)
    assert layer(graph, "s1").op == "concat"
    assert layer(graph, "s1").inputs == ["s1/left", "s1/right"]
    assert layer(graph, "s1.maxpool").inputs == ["s1"]
    assert shape(graph, "s1.maxpool") == (8, 8, 8)


def test_block_arguments_by_position_and_by_name():
    graph = build(BLOCKS)
    assert layer(graph, "s1/left/a").params["filters"] == 4
    assert layer(graph, "s1/right/a").params["filters"] == 4  # unit(n=n): the block's own n
    assert layer(graph, "s3/left/a").params["filters"] == 2
    assert layer(graph, "s3/left/a").inputs == ["s1.maxpool"]


def test_block_as_a_chain_element():
    graph = build(BLOCKS)
    assert layer(graph, "s2/left/a").inputs == ["s1.maxpool"]
    assert layer(graph, "s2/left/a").params["filters"] == 8
    assert layer(graph, "s2").op == "concat"  # the block's returned chain takes the instance's name
    assert layer(graph, "s2.relu").inputs == ["s2.maxpool"]
    assert shape(graph, "s2.relu") == (16, 4, 4)


def test_nested_block_layers_record_the_expansion_trace():
    graph = build(BLOCKS)
    inner = layer(graph, "s1/left/a")
    assert [frame.block for frame in inner.trace] == ["stage", "unit"]
    assert inner.trace[0].call.line == 11  # s1 = stage(img, 4)
    assert inner.trace[1].call.line == 7  # left = unit(v, n)
    assert inner.span.line == 3  # the conv inside `unit`


def test_block_argument_can_be_a_number_expression_or_several_tensors():
    graph = build(
        """\
        input img: 3 x 8 x 8
        const w = 3
        towers g0, g1 { t = relu(img) }
        block mix(v, n) { return conv(v, n * 2, size=1) }
        y = mix(all t, w + 1)
        """
    )
    assert layer(graph, "y").params["filters"] == 8
    assert layer(graph, "y").inputs == ["t@g0", "t@g1"]
    assert shape(graph, "y") == (8, 8, 8)


def test_block_used_inside_towers():
    graph = build(
        """\
        input img: 3 x 8 x 8
        block unit(v) { a = conv(v, 2, size=1); return relu(a) }
        towers g0, g1 { u = unit(img) }
        """
    )
    assert names(graph) == ["img", "u/a@g0", "u@g0", "u/a@g1", "u@g1"]
    assert layer(graph, "u/a@g1").device == "g1"
    assert layer(graph, "u@g1").inputs == ["u/a@g1"]


def test_block_without_parameters_reading_globals():
    graph = build("input img: 3 x 8 x 8\nblock stem() { return conv(img, 4, size=3) }\ny = stem() | relu\n")
    assert names(graph) == ["img", "y", "y.relu"]
    assert layer(graph, "y").inputs == ["img"]


# --- repeat -------------------------------------------------------------------------------------------


def test_repeat_rebinds_a_name_and_indexes_layer_names():
    graph = build(
        """\
        input img: 3 x 8 x 8
        x = relu(img)
        repeat 3 {
            x = conv(x, 4, size=3, pad=1) | relu
        }
        y = relu(x)
        """
    )
    assert names(graph) == [
        "img",
        "x",
        "x[1]",
        "x[1].relu",
        "x[2]",
        "x[2].relu",
        "x[3]",
        "x[3].relu",
        "y",
    ]
    assert layer(graph, "x[1]").inputs == ["x"]
    assert layer(graph, "x[2]").inputs == ["x[1].relu"]
    assert layer(graph, "y").inputs == ["x[3].relu"]


def test_repeat_count_is_an_expression_and_zero_repeats_nothing():
    graph = build(
        "const n = 2\ninput img: 3 x 8 x 8\nx = relu(img)\nrepeat n * 2 - 1 { x = relu(x) }\nrepeat 0 { x = relu(x) }\n"
    )
    assert names(graph) == ["img", "x", "x[1]", "x[2]", "x[3]"]


def test_nested_repeat_indexes_twice():
    graph = build("input img: 3 x 8 x 8\nrepeat 2 {\n  repeat 2 { y = relu(img) }\n}\n")
    assert names(graph) == ["img", "y[1][1]", "y[1][2]", "y[2][1]", "y[2][2]"]


def test_repeat_inside_a_block():
    graph = build(
        """\
        input img: 3 x 8 x 8
        block deep(v, n) {
            repeat n { v = conv(v, 4, size=3, pad=1) | relu }
            return maxpool(v, 2)
        }
        d = deep(img, 2)
        """
    )
    assert names(graph) == ["img", "d/v[1]", "d/v[1].relu", "d/v[2]", "d/v[2].relu", "d"]
    assert layer(graph, "d").inputs == ["d/v[2].relu"]
    assert shape(graph, "d") == (4, 4, 4)


def test_repeat_inside_towers():
    graph = build("input img: 3 x 8 x 8\ntowers a, b {\n  v = relu(img)\n  repeat 2 { v = relu(v) }\n}\n")
    assert names(graph) == ["img", "v@a", "v@b", "v[1]@a", "v[2]@a", "v[1]@b", "v[2]@b"]  # a statement, tower by tower
    assert layer(graph, "v[2]@b").inputs == ["v[1]@b"]


# --- includes -----------------------------------------------------------------------------------------


def test_include_is_relative_to_the_including_file_and_can_nest(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "common.net").write_text('const width = 4\ninclude "blocks/unit.net"\n')
    (tmp_path / "lib" / "blocks").mkdir()
    (tmp_path / "lib" / "blocks" / "unit.net").write_text(
        "block unit(v) {\n    return conv(v, width, size=3, pad=1) | relu\n}\n"
    )
    main = tmp_path / "main.net"
    main.write_text('include "lib/common.net"\ninput img: 3 x 8 x 8\na = unit(img)\n')
    graph = load_graph(main)
    assert graph.graph["name"] == "main"
    assert names(graph) == ["img", "a", "a.relu"]
    assert shape(graph, "a") == (4, 8, 8)
    assert Path(layer(graph, "a").span.file).name == "unit.net"  # spans point into the included file
    assert layer(graph, "a").trace[0].call.file == str(main)


def test_include_through_graph_from_text_resolves_next_to_the_named_file(tmp_path):
    (tmp_path / "consts.net").write_text("const n = 6\n")
    graph = build('include "consts.net"\ninput x: 3 x 8 x 8\ny = conv(x, n, size=1)\n', file=str(tmp_path / "m.net"))
    assert shape(graph, "y") == (6, 8, 8)


def test_each_included_file_is_parsed_once(tmp_path, monkeypatch):
    """The device pre-scan and each run of the `include` (here three, inside `repeat`) share one parse."""
    from netdsl.lang import includes

    parsed = []
    parse_file = includes.parse_file
    monkeypatch.setattr(includes, "parse_file", lambda path: parsed.append(path.name) or parse_file(path))
    (tmp_path / "devices.net").write_text("device a, b\n")
    (tmp_path / "step.net").write_text("h = h | relu\n")
    text = 'include "devices.net"\ninput x: 4\nh = x\nrepeat 3 { include "step.net" }\n'
    graph = build(text, file=str(tmp_path / "main.net"))
    assert sorted(parsed) == ["devices.net", "step.net"]
    assert layer(graph, "h[3]").inputs == ["h[2]"] and layer(graph, "h[3]").device == "a"


# --- forward references -------------------------------------------------------------------------------


def test_a_layer_can_read_a_name_defined_later():
    graph = build(
        """\
        input img: 3 x 8 x 8
        head = fc(body, 10)
        both = concat(body, stem)
        body = stem | conv(4, size=3, pad=1) | relu
        stem = conv(img, 2, size=1)
        output head, both
        """
    )
    assert layer(graph, "head").inputs == ["body.relu"]
    assert layer(graph, "both").inputs == ["body.relu", "stem"]
    assert layer(graph, "body").inputs == ["stem"]
    assert shape(graph, "head") == (10,)
    assert shape(graph, "both") == (6, 8, 8)
    assert names(graph).index("stem") < names(graph).index("body") < names(graph).index("head")


def test_forward_references_through_towers():
    graph = build(
        """\
        input img: 3 x 8 x 8
        y = conv(all t, 2, size=1)
        z = relu(t@g1)
        towers g0, g1 { t = relu(img) }
        output y, z
        """
    )
    assert layer(graph, "y").inputs == ["t@g0", "t@g1"]
    assert layer(graph, "z").inputs == ["t@g1"]
    assert layer(graph, "z").device == "g1"


def test_alias_of_a_name_defined_later():
    graph = build("input img: 3 x 8 x 8\na = b\nc = relu(a)\nb = relu(img)\n")
    assert layer(graph, "c").inputs == ["b"]


def test_loaded_alexnet_is_consistent():
    graph = load_graph(Path(__file__).resolve().parent.parent / "nets" / "alexnet.net")
    assert graph.graph["name"] == "alexnet"
    assert shape(graph, "conv1.maxpool@gpu0") == (48, 27, 27)
    assert shape(graph, "fc8") == (1000,)
    assert graph.graph["outputs"] == ["prob"]
    assert math.prod(shape(graph, "conv5.maxpool@gpu1")) == 128 * 6 * 6


# --- placement and scoping corner cases -----------------------------------------------------------


def test_on_places_every_layer_a_block_creates():
    graph = build(
        "device gpu0, gpu1\ninput x: 3 x 8 x 8\n"
        "block b(v) { h = conv(v, 4, size=3) | relu\n return conv(h, 4, size=1) }\n"
        "y = b(x) on gpu1\n"
    )
    assert {item.name: item.device for item in layers(graph) if item.op != "input"} == {
        "y/h": "gpu1",
        "y/h.relu": "gpu1",
        "y": "gpu1",
    }


def test_default_device_comes_from_an_included_declaration(tmp_path):
    (tmp_path / "devices.net").write_text("device a, b\n")
    graph = build('include "devices.net"\ninput x: 4\ny = fc(x, 2)\n', file=str(tmp_path / "main.net"))
    assert layer(graph, "x").device == "a" and layer(graph, "y").device == "a"


def test_placement_before_the_device_declaration_is_still_checked():
    from netdsl import NetError

    with pytest.raises(NetError, match="`y` runs on device `gpu5`, which is not declared"):
        build("input x: 4\ny = fc(x, 2) on gpu5\ndevice gpu0, gpu1\n")


def test_towers_inside_repeat_read_the_outer_binding_first():
    graph = build(
        "input image: 2 x 4 x 4\nx = image\nrepeat 2 { towers g0, g1 { x = relu(x) } }\nout = concat(all x)\n"
    )
    assert layer(graph, "x[1]@g1").inputs == ["image"]
    assert layer(graph, "x[2]@g1").inputs == ["x[1]@g1"]
    assert layer(graph, "out").inputs == ["x[2]@g0", "x[2]@g1"]


def test_repeat_counter_is_scoped_to_the_loop():
    from netdsl import NetError

    graph = build("input x: 4\nh = x\nrepeat 3 as i { h = fc(h, 8 * i) }\nout = fc(h, 2)\n")
    assert [shape(graph, f"h[{i}]") for i in (1, 2, 3)] == [(8,), (16,), (24,)]
    with pytest.raises(NetError, match="`i` is not defined"):
        build("input x: 4\nrepeat 2 as i { h = fc(x, 8) }\nconst j = i\n")
    with pytest.raises(NetError, match="`i` is already defined"):
        build("const i = 3\ninput x: 4\nrepeat 2 as i { h = fc(x, 8) }\n")


def test_constant_defined_per_tower_reports_its_towers():
    from netdsl import NetError

    with pytest.raises(NetError, match="has one value per tower"):
        build("input x: 4\ntowers a, b { const n = 3 }\ny = fc(x, n)\n")


def test_lrn_groups_normalize_each_group_apart():
    graph = build("input x: 8 x 4 x 4\ny = lrn(x, 3, groups=2)\n")
    assert layer(graph, "y").params["groups"] == 2
    from netdsl import NetError

    with pytest.raises(NetError, match="6 channels cannot be split into 4 groups"):
        build("input x: 6 x 4 x 4\ny = lrn(x, 3, groups=4)\n")
