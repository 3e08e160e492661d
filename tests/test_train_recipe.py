"""The training recipe: `train { }` blocks in the language (grammars/net.lark, netdsl/lang/settings.py),
recipe files (`load_recipe`), and the table of settings with its checks, flags and precedence
(netdsl/train/recipe.py). docs/training.md stays true: its settings table is the code's, and its
examples are run (conventions at the top of that page).

To print the settings table after changing the table in recipe.py: `python tests/test_train_recipe.py`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netdsl
from netdsl import NetError
from netdsl.errors import Span
from netdsl.ir.graph import Setting, copy_graph
from netdsl.lang.frontend import load_recipe
from netdsl.train.recipe import SETTINGS, Recipe, _checked, add_flags, resolve
from netdsl.train.spec import flag_of, show, type_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
NET = "input image: 3 x 8 x 8\ny = conv(image, 4, size=3) | relu | fc(2)\n"


def recipe_of(text: str, tmp_path: Path, name: str = "main.net") -> list[Setting]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return netdsl.load_graph(path).graph["recipe"]


def values(settings: list[Setting]) -> list[tuple]:
    return [(s.name, s.pattern, s.value, s.word) for s in settings]


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def resolve_text(text: str, tmp_path: Path, *argv: str) -> Recipe:
    return resolve(recipe_of(NET + text, tmp_path), [], flags(*argv))


def error_of(call) -> NetError:
    with pytest.raises(NetError) as caught:
        call()
    return caught.value


# --- the language: train blocks ---------------------------------------------------------------------


def test_values_of_every_form(tmp_path):
    text = (
        "const base = 0.1\nconst word = same\n"
        "train {\n"
        "    batch = 64; epochs = 2 ** 3\n"
        "    lr = base / 10\n"
        "    momentum = -(-0.5)\n"
        "    milestones = (30, 60)\n"
        "    crop = (3, 4)\n"
        '    data = "some dir/x.npz"\n'
        "    flip = false\n"
        "    optimizer = adamw\n"
        "    schedule = word\n"
        '    decay_mult "*.bias" = 0\n'
        "}\n"
        "train { }\n"
        "train { seed = 1 }\n"
    )
    assert values(recipe_of(NET + text, tmp_path)) == [
        ("batch", None, 64, False),
        ("epochs", None, 8, False),
        ("lr", None, 0.01, False),
        ("momentum", None, 0.5, False),
        ("milestones", None, (30, 60), False),
        ("crop", None, (3, 4), False),
        ("data", None, "some dir/x.npz", False),
        ("flip", None, False, False),
        ("optimizer", None, "adamw", True),
        ("schedule", None, "same", True),
        ("decay_mult", "*.bias", 0, False),
        ("seed", None, 1, False),
    ]


def test_spans_of_name_value_and_pattern(tmp_path):
    (item,) = recipe_of(NET + 'train {\n  lr_mult "fc*" = 2 * 5\n}\n', tmp_path)
    file = str(tmp_path / "main.net")
    assert item.span == Span(file, 4, 3, 4, 24)
    assert item.pattern_span == Span(file, 4, 11, 4, 16)
    assert item.value_span == Span(file, 4, 19, 4, 24)
    assert item.value == 10


def test_a_net_without_train_blocks_has_an_empty_recipe(tmp_path):
    graph = netdsl.graph_from_text(NET)
    assert graph.graph["recipe"] == []
    with_recipe = netdsl.graph_from_text(NET + "train { lr = 0.1 }\n")
    assert copy_graph(with_recipe).graph["recipe"] == with_recipe.graph["recipe"]
    assert [layer.name for layer in netdsl.ir.layers(with_recipe)] == [layer.name for layer in netdsl.ir.layers(graph)]


def test_blocks_of_included_files_apply_where_they_run(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "base.net").write_text(
        'const rate = 0.5\ntrain { lr = rate; batch = 32 }\ninclude "more.net"\n'
    )
    (tmp_path / "lib" / "more.net").write_text("train { batch = 16; epochs = 3 }\n")
    text = 'train { lr = 1; epochs = 9 }\ninclude "lib/base.net"\n' + NET + "train { epochs = rate * 10 }\n"
    settings = recipe_of(text, tmp_path)
    assert [(s.name, s.value) for s in settings] == [
        ("lr", 1),
        ("epochs", 9),
        ("lr", 0.5),
        ("batch", 32),
        ("batch", 16),
        ("epochs", 3),
        ("epochs", 5.0),
    ]
    assert [Path(s.span.file).name for s in settings] == ["main.net"] * 2 + ["base.net"] * 2 + ["more.net"] * 2 + [
        "main.net"
    ]
    recipe = resolve(settings, [], None)
    assert (recipe.lr, recipe.batch, recipe.epochs) == (0.5, 16, 5)
    assert recipe.source("batch") == f"{(tmp_path / 'lib' / 'more.net').resolve()}:1:9"
    assert recipe.source("epochs") == f"{tmp_path / 'main.net'}:5:9"


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("block b(x) {\n train { lr = 1 }\n return relu(x)\n}\nz = b(image)\n", "not inside a block", (4, 2)),
        ("towers g0, g1 {\n train { lr = 1 }\n}\n", "not inside a towers block", (4, 2)),
        ("repeat 2 { train { lr = 1 } }\n", "not inside `repeat`", (3, 12)),
        ("train {\n lr = 1\n batch = 2; lr = 2 }\n", "`lr` is set twice in this train block", (5, 13)),
        ('train { lr_mult "a" = 1\n lr_mult "a" = 2 }\n', '`lr_mult "a"` is set twice', (4, 2)),
        ("train { lr = bse * 2 }\n", "`bse` is not defined", (3, 14)),
        ("train { lr = image }\n", "`image` is a layer's output", (3, 14)),
        ("train { lr: 2 }\n", "unexpected `:`", (3, 11)),
        ("train { lr 2 }\n", "unexpected `2`", (3, 12)),
        ("train { lr = conv(image, 2) }\n", "unexpected `(`", (3, 18)),
        ("train { input x: 3 }\n", "unexpected `x`", (3, 15)),
        ("train = 2\n", "`train` is a reserved word", (3, 1)),
        ("train { lr = 1 ", "unexpected end of file", (3, 16)),
    ],
)
def test_errors_in_train_blocks(text, message, where):
    error = error_of(lambda: netdsl.graph_from_text(NET + text, file="main.net"))
    assert message in error.message
    assert (error.span.line, error.span.col) == where


def test_syntax_errors_inside_a_train_block_say_what_it_holds():
    for text in ("train { lr: 2 }", "train {\n const x = 1\n}", "train { lr = conv(image) }"):
        error = error_of(lambda text=text: netdsl.graph_from_text(NET + text))
        assert "a train block holds settings" in error.hint, text
    error = error_of(lambda: netdsl.graph_from_text(NET + "repeat 2 { y = conv(image 2) }"))
    assert "train" not in error.hint


def test_train_block_included_inside_repeat_is_an_error(tmp_path):
    (tmp_path / "t.net").write_text("train { lr = 1 }\n")
    error = error_of(lambda: recipe_of(NET + 'repeat 2 { include "t.net" }\n', tmp_path))
    assert "not inside `repeat`" in error.message and error.span.file.endswith("t.net")
    assert error.notes and error.notes[0][1] == "included from here"


# --- recipe files ------------------------------------------------------------------------------------


def test_recipe_file_holds_train_blocks_constants_and_includes(tmp_path):
    (tmp_path / "common.net").write_text("const base = 0.2\ntrain { batch = 8 }\n")
    path = tmp_path / "r.net"
    path.write_text('include "common.net"\nconst k = conv(size=3)\ntrain { lr = base / 2 }\n')
    assert [(s.name, s.value) for s in load_recipe(path)] == [("batch", 8), ("lr", 0.1)]
    (tmp_path / "empty.net").write_text("# nothing\n")
    assert load_recipe(tmp_path / "empty.net") == []


@pytest.mark.parametrize(
    ("statement", "what"),
    [
        ("input x: 3 x 8 x 8", "an input"),
        ("y = relu(x)", "a layer"),
        ("device gpu0", "`device`"),
        ("net n", "`net`"),
        ("output y", "`output`"),
        ("block b(x) { return x }", "a block"),
        ("repeat 2 { train { lr = 1 } }", "`repeat`"),
        ("towers a, b { y = relu(x) }", "`towers`"),
    ],
)
def test_net_statements_in_a_recipe_file_are_errors(tmp_path, statement, what):
    path = tmp_path / "r.net"
    path.write_text(f"train {{ lr = 1 }}\n{statement}\n")
    error = error_of(lambda: load_recipe(path))
    assert error.message == f"a recipe file holds `train` blocks, constants and includes only, not {what}"
    assert (error.span.file, error.span.line, error.span.col) == (str(path), 2, 1)
    assert "--recipe" in error.hint


def test_net_statements_in_a_file_a_recipe_includes_are_errors(tmp_path):
    (tmp_path / "net.net").write_text(NET)
    (tmp_path / "r.net").write_text('include "net.net"\n')
    error = error_of(lambda: load_recipe(tmp_path / "r.net"))
    assert "not an input" in error.message and error.span.file.endswith("net.net")
    missing = error_of(lambda: load_recipe(tmp_path / "nothing.net"))
    assert missing.message.startswith("no such file")


# --- checking settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "hint", "where"),
    [
        ("momentun = 0.9", "unknown training setting `momentun`", "did you mean `momentum`?", (3, 9, 17)),
        ("learning_rate = 0.1", "unknown training setting `learning_rate`", "netdsl calls it `lr`", (3, 9, 22)),
        ("base_lr = 0.1", "unknown training setting `base_lr`", "netdsl calls it `lr`", (3, 9, 16)),
        ("subdivisions = 4", "unknown training setting `subdivisions`", "netdsl calls it `accumulate`", (3, 9, 21)),
        ("accumulate = 0", "`accumulate` must be at least 1, got 0", None, (3, 22, 23)),
        ("weights = 3", "`weights` must be a non-empty string, got 3", 'e.g. weights = "runs/lenet5"', (3, 19, 20)),
        ("zzz = 1", "unknown training setting `zzz`", "docs/training.md", (3, 9, 12)),
        ("lr = 0", "`lr` must be above 0, got 0", None, (3, 14, 15)),
        ("lr = sgd", "`lr` must be a number above 0, got `sgd`", "not a constant defined", (3, 14, 17)),
        ('lr = "0.1"', "`lr` must be a number above 0, got `0.1`", None, (3, 14, 19)),
        ("lr = (1, 2)", "`lr` must be a number above 0, got (1, 2)", None, (3, 14, 20)),
        ("lr = true", "`lr` must be a number above 0, got true", None, (3, 14, 18)),
        ("batch = 0", "`batch` must be at least 1, got 0", None, (3, 17, 18)),
        ("batch = 1.5", "`batch` must be a whole number, got 1.5", None, (3, 17, 20)),
        ("momentum = 1", "`momentum` must be at least 0 and below 1, got 1", None, (3, 20, 21)),
        ("seed = -1", "`seed` must be from 0 to 4294967295, got -1", None, (3, 16, 18)),
        ("flip = 1", "`flip` must be true or false, got 1", None, (3, 16, 17)),
        ("flip = yes", "`flip` must be true or false, got `yes`", "not a constant", (3, 16, 19)),
        ("optimizer = adam", "`optimizer` must be sgd or adamw, got `adam`", "did you mean `adamw`?", (3, 21, 25)),
        ("optimizer = 1", "`optimizer` must be sgd or adamw, got 1", None, (3, 21, 22)),
        ("schedule = plateu", "multistep, cosine, poly, exp, inv or", "did you mean `plateau`?", None),
        ('data = ""', "`data` must be a non-empty string", None, (3, 16, 18)),
        ("data = 3", "`data` must be a non-empty string, got 3", None, None),
        ("views = 3", "`views` must be 1 or 10, got 3", None, None),
        ("milestones = (30, 30)", "`milestones` must increase, got (30, 30)", None, (3, 22, 30)),
        ("milestones = (0, 30)", "`milestones` must be at least 1, got 0", None, None),
        ("milestones = auto", "must be whole numbers (a, b, ...), each at least 1, increasing, got `auto`", None, None),
        ("betas = (0.9, 0.99, 0.9)", "`betas` must be two numbers (a, b), each at least 0 and below 1", None, None),
        ("betas = 0.9", "`betas` must be two numbers (a, b)", None, None),
        ("mean = (1, 2)", "`mean` must be one number per channel (1 or 3), or auto or none, got (1, 2)", None, None),
        ("std = (1, 0, 1)", "`std` must be above 0, got 0", None, None),
        ("std = atuo", "got `atuo`", "did you mean `auto`?", None),
        ("crop = (1, 2, 3)", "`crop` must be a whole number or (h, w), at least 1, or auto, got 3 numbers", None, None),
        ("crop = 0", "`crop` must be at least 1, got 0", None, None),
        ("resize = 2.5", "`resize` must be a whole number, got 2.5", None, None),
        ("resize = (512, 256)", "`resize`: a range's low must be below its high, got (512, 256)", "resize = 512", None),
        ("resize = (256, 256)", "`resize`: a range's low must be below its high", None, None),
        ("resize = (0, 256)", "`resize` must be at least 1, got 0", None, None),
        ("crop_area = (0, 1)", "`crop_area` must be above 0 and at most 1, got 0", None, None),
        ("crop_area = (0.5, 0.2)", "`crop_area` must not decrease, got (0.5, 0.2)", None, None),
        ("crop_aspect = (0, 1)", "`crop_aspect` must be from 0.001 to 1000, got 0", None, None),
        ("crop_aspect = (1, 1e6)", "`crop_aspect` must be from 0.001 to 1000, got 1000000", None, None),
        ("crop_area = 0.5", "`crop_area` must be two numbers (a, b), each above 0 and at most 1", None, None),
        ("crop_aspect = (2, 0.5)", "`crop_aspect` must not decrease", None, None),
        ("resize = (1, 2, 3)", "`resize` must be a whole number or (low, high), at least 1, or auto", None, None),
        ("steps = 0", "`steps` must be at least 1, got 0", None, None),
        ("gamma = 0", "`gamma` must be above 0 and at most 1, got 0", None, None),
        ("timeout = 0", "`timeout` must be above 0 and at most 604800, got 0", None, None),
        ("timeout = 1e9", "`timeout` must be above 0 and at most 604800, got 1000000000", None, None),  # overflows
        ("lr_mult = 2", "`lr_mult` needs a pattern of weight names", 'lr_mult "*.bias" = 2', (3, 9, 16)),
        ('lr "*" = 0.1', "`lr` takes no pattern", "only lr_mult and decay_mult", (3, 12, 15)),
        ('decay_mult "" = 0', "`decay_mult`: the pattern is empty", "weight names are", (3, 20, 22)),
        ('decay_mult "a b" = 0', "`decay_mult`: a weight name cannot contain ' '", None, (3, 20, 25)),
        ('lr_mult "x[1" = 2', "`lr_mult`: the pattern's `[` has no closing `]`", "x[[]1].weight", (3, 17, 22)),
        ('lr_mult "*" = -1', "`lr_mult` must be at least 0, got -1", None, (3, 23, 25)),
    ],
)
def test_setting_errors(tmp_path, text, message, hint, where):
    error = error_of(lambda: resolve_text(f"train {{ {text} }}\n", tmp_path))
    assert message in error.message
    if hint is not None:
        assert hint in error.hint
    assert error.span.file == str(tmp_path / "main.net")
    if where is not None:
        assert (error.span.line, error.span.col, error.span.end_col) == where


def test_accepted_forms_of_values(tmp_path):
    text = (
        'train { lr = 1; steps = none; max_drops = none; crop = 24; resize = "auto"; mean = none; std = false\n'
        'betas = (0.5, 0.6); lr_mult "conv[12]@gpu?.*" = 3; lr_mult "[]]" = 1; views = 10.0; data = digits }\n'
    )
    recipe = resolve_text(text, tmp_path)
    assert recipe.lr == 1.0 and isinstance(recipe.lr, float)
    assert recipe.views == 10 and isinstance(recipe.views, int)
    assert (recipe.steps, recipe.max_drops, recipe.crop, recipe.resize) == (None, None, (24, 24), "auto")
    assert (recipe.mean, recipe.std, recipe.betas, recipe.data) == (None, None, (0.5, 0.6), "digits")
    assert recipe.lr_mults == (("conv[12]@gpu?.*", 3.0), ("[]]", 1.0))
    assert resolve_text("train { mean = (1, 2, 3); std = 2; crop = (3, 4) }", tmp_path).std == (2.0,)
    cropped = resolve_text("train { crop_area = (0.08, 1); crop_aspect = (0.5, 2) }", tmp_path)
    assert (cropped.crop_area, cropped.crop_aspect) == ((0.08, 1.0), (0.5, 2.0))
    assert (Recipe().crop_area, Recipe.from_json(cropped.to_json())) == (None, cropped)
    square = resolve_text("train { crop_area = (1, 1); crop_aspect = (1, 1) }", tmp_path)  # bounds may be equal
    assert (square.crop_area, square.crop_aspect, Recipe().crop_aspect) == ((1.0, 1.0), (1.0, 1.0), (3 / 4, 4 / 3))
    jittered = resolve_text("train { resize = (256, 512) }", tmp_path)
    assert jittered.resize == (256, 512) and Recipe.from_json(jittered.to_json()) == jittered
    assert resolve_text("train { resize = (300) }", tmp_path).resize == 300  # one number: a fixed size, an int


# --- the table ---------------------------------------------------------------------------------------


def test_the_table():
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) for name in SETTINGS)
    assert len({flag_of(spec).split()[0] for spec in SETTINGS.values()}) == len(SETTINGS)
    for spec in SETTINGS.values():
        if spec.kind != "mult" and spec.default is not None:
            assert _checked(spec, spec.default, False, None) == spec.default, spec.name
            assert type(_checked(spec, spec.default, False, None)) is type(spec.default), spec.name
        assert spec.doc and not spec.doc.endswith("."), spec.name
    assert Recipe() == resolve([], [], None) == resolve([], [], flags())
    paper = Recipe()
    assert (paper.batch, paper.lr, paper.momentum, paper.weight_decay, paper.optimizer) == (
        128,
        0.01,
        0.9,
        0.0005,
        "sgd",
    )
    assert (paper.schedule, paper.gamma, paper.max_drops, paper.epochs, paper.pca_noise) == ("plateau", 0.1, 3, 90, 0.1)
    assert paper.data is None and paper.source("lr") == "default" and paper.source("lr_mult", "*") == "default"
    with pytest.raises(KeyError):
        paper.source("learning_rate")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table() -> str:
    """The Markdown table of every setting, as docs/training.md shows it."""
    lines = ["| setting | flag | type | default | unit | meaning |", "|---|---|---|---|---|---|"]
    for spec in SETTINGS.values():
        name = f'`{spec.name} "PATTERN"`' if spec.kind == "mult" else f"`{spec.name}`"
        if spec.kind == "mult":
            default = "`1`"
        elif spec.default is None and not spec.words:
            default = "none"
        else:
            default = f"`{show(spec.default, spec)}`"
        cells = [name, f"`{flag_of(spec)}`", type_text(spec), default, spec.unit, spec.doc]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def test_docs_table_is_the_code_table():
    assert settings_table() in DOC.read_text(encoding="utf-8"), f"see `python {__file__}`"


def test_docs_describe_resume_and_leave_room_for_the_trainer():
    text = DOC.read_text(encoding="utf-8")
    words = " ".join(text.split())
    assert "At `--resume` the run's saved recipe is the base and flags given at resume override it, each" in words
    assert "optimizer state such as momentum is kept" in words
    assert "\n## Running a training\n" in text


# --- flags ---------------------------------------------------------------------------------------------


def test_every_setting_has_its_flag():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    help_text = parser.format_help()
    for spec in SETTINGS.values():
        assert flag_of(spec).split()[0].split("/")[0] in help_text
    args = flags()
    assert all(getattr(args, name) is None for name in SETTINGS)


def test_flags_of_every_kind():
    argv = [
        *("--weight-decay", "0.001", "--no-flip", "--nesterov", "--milestones", "10,20,30", "--betas", "(0.8, 0.9)"),
        *("--steps", "none", "--crop", "224", "--mean", "1,2,3", "--std", "auto", "--optimizer", "adamw"),
        *("--data", "runs/x.npz", "--batch", "32", "--lr", "1e-3", "--views", "10", "--decay-mult", "*.bias=0"),
        *("--lr-mult", "*.bias=2", "--lr-mult", "fc8.*=10", "--resize", "256,512"),
    ]
    recipe = resolve([], [], flags(*argv))
    expected = {
        "weight_decay": 0.001, "flip": False, "nesterov": True, "milestones": (10, 20, 30), "betas": (0.8, 0.9),
        "steps": None, "crop": (224, 224), "mean": (1.0, 2.0, 3.0), "std": "auto", "optimizer": "adamw",
        "data": "runs/x.npz", "batch": 32, "lr": 0.001, "views": 10, "decay_mults": (("*.bias", 0.0),),
        "lr_mults": (("*.bias", 2.0), ("fc8.*", 10.0)), "resize": (256, 512),
    }  # fmt: skip
    assert {name: getattr(recipe, name) for name in expected} == expected
    sources = [recipe.source(n) for n in ("weight_decay", "flip", "nesterov", "momentum")]
    assert sources == ["--weight-decay", "--no-flip", "--nesterov", "default"]
    assert recipe.source("lr_mult", "fc8.*") == "--lr-mult"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "`lr` must be above 0, got -1"),
        (["--lr", "0"], "`lr` must be above 0, got 0"),
        (["--lr", "fast"], "`lr` must be a number above 0, got `fast`"),
        (["--lr", "nan"], "`lr` must be a number above 0, got nan"),
        (["--lr", "inf"], "`lr` must be a number above 0, got inf"),
        (["--batch", "0"], "`batch` must be at least 1, got 0"),
        (["--batch", "2.5"], "`batch` must be a whole number, got 2.5"),
        (["--optimizer", "adam"], "`optimizer` must be sgd or adamw, got `adam`"),
        (["--views", "3"], "`views` must be 1 or 10, got 3"),
        (["--milestones", "30,20"], "`milestones` must increase, got (30, 20)"),
        (["--milestones", "30,,60"], "`milestones` must be whole numbers"),
        (["--crop", "1,2,3"], "`crop` must be a whole number or (h, w)"),
        (["--resize", "512,256"], "`resize`: a range's low must be below its high, got (512, 256)"),
        (["--resize", "256,x"], "`resize` must be a whole number or (low, high), at least 1, or auto, got (256, x)"),
        (["--mean", "1,2"], "`mean` must be one number per channel (1 or 3)"),
        (["--data", ""], "`data` must be a non-empty string"),
        (["--lr-mult", "fc8"], "--lr-mult takes PATTERN=X, got `fc8`"),
        (["--lr-mult", "fc8=x"], "`lr_mult` must be a number at least 0, per pattern of weight names, got `x`"),
        (["--decay-mult", "a,b=0"], "`decay_mult`: a weight name cannot contain ','"),
        (["--decay-mult", "=0"], "`decay_mult`: the pattern is empty"),
    ],
)
def test_bad_flag_values_name_the_flag(argv, message):
    error = error_of(lambda: resolve([], [], flags(*argv)))
    assert message in error.message
    assert error.span is None and error.where == argv[0]
    assert str(error).startswith(f"{argv[0]}: error: ")


def test_channels_last_is_not_for_the_triton_backend():
    """The triton backend's fused update views every weight in a flat buffer; a change of memory format would
    leave the model training weights the update never writes."""
    error = error_of(lambda: resolve([], [], flags("--backend", "triton", "--channels-last")))
    assert error.where == "--channels-last" and "torch backend" in error.message
    assert resolve([], [], flags("--channels-last")).channels_last  # the torch backend takes it


# --- precedence and resume ------------------------------------------------------------------------------


def test_defaults_then_net_then_recipe_file_then_flags(tmp_path):
    net = recipe_of(
        NET + 'train { lr = 0.1; batch = 16; epochs = 5; lr_mult "*" = 2; lr_mult "*.bias" = 3 }\n', tmp_path
    )
    (tmp_path / "r.net").write_text('train { lr = 0.2; batch = 8; lr_mult "*" = 4 }\n')
    file = load_recipe(tmp_path / "r.net")
    recipe = resolve(net, file, flags("--lr", "0.3", "--lr-mult", "*.bias=5"))
    assert (recipe.lr, recipe.batch, recipe.epochs, recipe.momentum) == (0.3, 8, 5, 0.9)
    # a later value for a pattern replaces the earlier one and moves to the end: the last match wins
    assert recipe.lr_mults == (("*", 4.0), ("*.bias", 5.0))
    main, r = tmp_path / "main.net", tmp_path / "r.net"
    assert [recipe.source(n) for n in ("lr", "batch", "epochs", "momentum")] == [
        "--lr", f"{r}:1:19", f"{main}:3:31", "default",
    ]  # fmt: skip
    assert (recipe.source("lr_mult", "*"), recipe.source("lr_mult", "*.bias")) == (f"{r}:1:30", "--lr-mult")
    assert resolve(net, [], None).lr == 0.1 and resolve(net, file, None).lr == 0.2


def test_resume_starts_from_the_saved_recipe_and_flags_override_it(tmp_path):
    net = recipe_of(NET + "train { lr = 0.1; batch = 16 }\n", tmp_path)
    saved = Recipe.from_json(resolve(net, [], flags("--epochs", "7")).to_json())
    edited = recipe_of(NET + "train { lr = 0.5; batch = 4 }\n", tmp_path, "edited.net")
    resumed = resolve(edited, [], flags("--lr", "0.01", "--lr-mult", "*=2"), saved=saved)
    assert (resumed.lr, resumed.batch, resumed.epochs) == (0.01, 16, 7)  # the edited net is not read again
    assert resumed.source("batch") == f"{tmp_path / 'main.net'}:3:19" and resumed.source("lr") == "--lr"
    assert resumed.changes_from(saved) == ["lr = 0.01 (--lr; was 0.1)", 'lr_mult "*" = 2 (--lr-mult; was 1)']
    assert resolve(edited, [], None, saved=saved) == saved
    assert resolve(edited, [], None, saved=saved).changes_from(saved) == []
    # the settings of the net are still checked
    bad = recipe_of(NET + "train { lr = -1 }\n", tmp_path, "bad.net")
    assert "`lr` must be above 0" in error_of(lambda: resolve(bad, [], None, saved=saved)).message
    (tmp_path / "r.net").write_text("train { lr = 0.2 }\n")
    error = error_of(lambda: resolve(net, load_recipe(tmp_path / "r.net"), None, saved=saved))
    assert error.where == "--recipe" and "cannot be given when a run is resumed" in error.message
    assert "flag" in error.hint


@pytest.mark.parametrize(("flag", "value"), [("--optimizer", "adamw"), ("--schedule", "cosine")])
def test_the_optimizer_and_the_schedule_are_kept_at_resume(flag, value):
    saved = resolve([], [], None)
    error = error_of(lambda: resolve([], [], flags(flag, value), saved=saved))
    assert error.where == flag and "cannot change when a run is resumed" in error.message
    assert resolve([], [], flags(flag, value)).source(flag[2:]) == flag  # a new run may choose
    assert resolve([], [], flags("--optimizer", "sgd", "--schedule", "plateau"), saved=saved) == saved


# --- the run folder's copy --------------------------------------------------------------------------------


def test_json_round_trip_keeps_values_types_and_sources(tmp_path):
    net = recipe_of(
        NET + 'train { lr = 1; crop = (3, 4); mean = none; std = auto; decay_mult "*.bias" = 0 }\n', tmp_path
    )
    recipe = resolve(net, [], flags("--milestones", "5,9", "--steps", "100", "--no-flip", "--lr-mult", "a?=0.5"))
    text = recipe.to_json()
    again = Recipe.from_json(text)
    assert again == recipe and again._sources == recipe._sources
    assert again.to_json() == text
    assert type(again.crop) is tuple and type(again.lr) is float and again.mean is None
    record = json.loads(text)
    assert record["settings"]["lr"] == {"value": 1.0, "from": f"{tmp_path / 'main.net'}:3:9"}
    assert record["settings"]["lr_mult"] == [{"pattern": "a?", "value": 0.5, "from": "--lr-mult"}]
    del record["settings"]["epochs"]  # written by a netdsl that did not know it: the default
    assert Recipe.from_dict(record).epochs == 90


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["settings"].update(lrr={"value": 1, "from": "default"}), "unknown setting `lrr`"),
        (lambda r: r["settings"]["lr"].update(value=-1), "`lr` must be above 0, got -1"),
        (lambda r: r["settings"]["lr"].pop("value"), "the recipe's `lr` is malformed"),
        (lambda r: r["settings"].update(lr_mult=[{"pattern": "a b", "value": 1, "from": "x"}]), "cannot contain"),
        (lambda r: r["settings"].update(lr_mult=3), "the recipe's `lr_mult` is malformed"),
        (lambda r: r.clear(), "not a netdsl recipe"),
    ],
)
def test_a_damaged_saved_recipe_is_an_error(change, message):
    record = json.loads(Recipe().to_json())
    change(record)
    error = error_of(lambda: Recipe.from_json(json.dumps(record), where="runs/a/recipe.json"))
    assert message in error.message and error.where.startswith("runs/a/recipe.json")
    assert "not valid JSON" in error_of(lambda: Recipe.from_json("{", where="x")).message


# --- docs/training.md's examples ------------------------------------------------------------------------

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_FACT = re.compile(r"^#>\s*(?P<name>\w+)\s*=\s*(?P<value>.+?)\s*$")


def _examples() -> list[tuple[str, str, int]]:
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    found = []
    for match in _FENCE.finditer(text):
        if match.group(1) in ("net", "net-error"):
            found.append((match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1))
    return found


EXAMPLES = _examples()


def _resolve_example(body: str, folder: Path) -> Recipe:
    path = folder / "main.net"
    path.write_text(body, encoding="utf-8")
    lines = [line for line in body.splitlines() if not line.startswith("# error:")]
    if lines and lines[0].startswith("# recipe file"):
        return resolve([], load_recipe(path), None)
    return resolve(netdsl.load_graph(path).graph["recipe"], [], None)


def test_the_docs_have_examples():
    assert sum(info == "net" for info, _, _ in EXAMPLES) >= 5
    assert sum(info == "net-error" for info, _, _ in EXAMPLES) >= 8


def test_docs_examples(tmp_path):
    for body, _ in [(body, line) for info, body, line in EXAMPLES if body.startswith("# file:")]:
        (tmp_path / body.splitlines()[0].removeprefix("# file:").strip()).write_text(body, encoding="utf-8")
    checked = 0
    for info, body, line in EXAMPLES:
        if body.startswith("# file:"):
            continue
        if info == "net-error":
            expected = body.splitlines()[0].removeprefix("# error:").strip()
            error = error_of(lambda body=body: _resolve_example(body, tmp_path))
            assert expected in str(error), f"docs/training.md line {line}: got\n{error}"
            continue
        recipe = _resolve_example(body, tmp_path)
        for fact in filter(None, map(_FACT.match, body.splitlines())):
            spec = SETTINGS[fact.group("name")]
            value = show(getattr(recipe, spec.attribute), spec)
            assert value == fact.group("value"), f"docs/training.md line {line}: {spec.name} is {value}"
            checked += 1
    assert checked >= 10


def test_the_papers_recipe_is_the_default(tmp_path):
    """The paper's recipe, written out in docs/training.md, differs from the defaults only where the
    defaults leave a choice open (the resize of image folders, the test views)."""
    body = next(body for _, body, _ in EXAMPLES if body.startswith("# recipe file: the AlexNet paper"))
    recipe = _resolve_example(body, tmp_path)
    written = {s.name for s in load_recipe(tmp_path / "main.net")}
    assert {"batch", "lr", "momentum", "weight_decay", "schedule", "max_drops", "pca_noise", "flip"} <= written
    default = Recipe()
    changed = {
        name for name, spec in SETTINGS.items() if getattr(recipe, spec.attribute) != getattr(default, spec.attribute)
    }
    assert changed == {"resize", "views"}


# --- any text: a recipe or a NetError, never a traceback --------------------------------------------------

_NAMES = [*SETTINGS, "lr_mult", "momentun", "x", "train", "input", "true"]
_VALUES = [
    "0",
    "-1",
    "0.5",
    "1e300",
    "(1, 2)",
    "(3, 2, 1)",
    '"a"',
    '""',
    "true",
    "auto",
    "none",
    "x",
    "2 ** 80",
    "1 / 0",
]


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(["", '"*.bias" ', '"" ', '"[" ']), st.sampled_from(_VALUES)),
        max_size=6,
    ),
    st.lists(st.sampled_from(["--lr", "--batch", "--crop", "--mean", "--lr-mult", "--steps"]), max_size=3),
    st.sampled_from(["0", "x", "1,2", "*=1", "none", "1e999", ""]),
)
def test_any_train_block_resolves_or_is_a_net_error(items, flag_names, flag_value):
    text = NET + "train {\n" + "".join(f"  {name} {pattern}= {value}\n" for name, pattern, value in items) + "}\n"
    argv = [part for flag in flag_names for part in (flag, flag_value)]
    try:
        recipe = resolve(netdsl.graph_from_text(text).graph["recipe"], [], flags(*argv))
    except NetError:
        return
    assert Recipe.from_json(recipe.to_json()) == recipe


if __name__ == "__main__":
    print(settings_table())
