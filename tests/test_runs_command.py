"""`netdsl runs`: run folders side by side. The reference is each run's own metrics.jsonl and recipe.json, read
here by hand: every figure in the table is the one the run recorded, and the last column names exactly the
settings the runs were given differently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_support import PLAIN, TINY

from netdsl.cli.main import main
from netdsl.train.history import differing, read_history, setting_text
from netdsl.train.recipe import Recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Under runs/: three runs of TINY on 300 of scikit-learn's digits (an lr and a seed apart, one of them of 3
    epochs), and one told to stop after 40 steps (inside its second epoch: its last weights measured apart)."""
    datasets = pytest.importorskip("sklearn.datasets")
    root = tmp_path_factory.mktemp("runs")
    digits = datasets.load_digits()
    data = root / "data.npz"
    np.savez(data, x=(digits.images[:300, None] * 16).clip(0, 255).astype(np.uint8), y=digits.target[:300])
    net = root / "tiny.net"
    net.write_text(TINY)
    common = ["train", str(net), "--data", str(data), "--batch", "8", "--val-fraction", "0.2", *PLAIN, "--mean", "auto",
              "--std", "auto"]  # fmt: skip
    for name, flags in (
        ("slow", ["--lr", "0.01", "--epochs", "2"]),
        ("fast", ["--lr", "0.05", "--epochs", "2"]),
        ("other seed", ["--lr", "0.05", "--epochs", "3", "--seed", "1"]),
        ("cut/short", ["--lr", "0.05", "--steps", "40"]),
    ):
        assert main([*common, *flags, "--out", str(root / "runs" / name)]) == 0
    return root / "runs"


def recorded(run: Path) -> tuple[list[dict], dict | None]:
    """A run's epoch records and its final one (if any), from metrics.jsonl."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finals = [line for line in lines if line["kind"] == "final"]
    return [line for line in lines if line["kind"] == "epoch"], finals[-1] if finals else None


def table(out: str) -> dict[str, list[str]]:
    """The printed table's rows by run, each cell as printed (columns are two or more spaces apart)."""
    import re

    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "net"] and set(lines[1]) <= {"-", " "}
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[2:])}


def test_each_runs_figures_are_the_ones_it_recorded(runs, capsys, monkeypatch):
    monkeypatch.chdir(runs.parent)
    assert main(["runs"]) == 0  # the default: runs/
    out = capsys.readouterr().out
    rows = table(out)
    assert sorted(rows) == ["runs/cut/short", "runs/fast", "runs/other seed", "runs/slow"]
    for name, cells in rows.items():
        epochs, final = recorded(Path(name))
        validated = [line for line in epochs if line["val_top1"] is not None]
        best = max(validated, key=lambda line: line["val_top1"])
        last = final or validated[-1]
        net, progress, best_top1, at, last_top1, val_loss, train_loss, speed, _ = cells
        assert net == "tiny"
        assert progress == ("40/40 steps" if name == "runs/cut/short" else f"{len(epochs)}/{len(epochs)} epochs")
        assert best_top1 == f"{100 * best['val_top1']:.2f}%" and at == str(best["epoch"])
        assert last_top1 == f"{100 * last['val_top1']:.2f}%" and val_loss == f"{last['val_loss']:.4f}"
        assert train_loss == f"{epochs[-1]['train_loss']:.4f}"
        logged = [json.loads(line) for line in (Path(name) / "metrics.jsonl").read_text().splitlines()]
        speeds = sorted(line["images_per_s"] for line in logged if line["kind"] == "step")
        assert speed == f"{speeds[len(speeds) // 2]:,.0f}"  # the median of the logged steps'
    _, final = recorded(runs / "cut" / "short")
    assert final is not None and final["step"] == 40  # the cut run's last figures are its last weights'
    order = list(rows)  # by best validation top-1, highest first
    bests = [float(rows[name][2].rstrip("%")) for name in order]
    assert bests == sorted(bests, reverse=True)


def test_the_last_column_names_the_settings_given_differently(runs, capsys):
    assert main(["runs", str(runs), "--sort", "name"]) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == [f"{runs}/{name}" for name in ("cut/short", "fast", "other seed", "slow")]
    differs = {Path(name).name: cells[-1] for name, cells in rows.items()}
    wanted = {
        "short": {"steps 40", "seed 0", "lr 0.05"},  # (its epochs setting has no say: `steps` ends it)
        "fast": {"steps none", "epochs 2", "seed 0", "lr 0.05"},
        "other seed": {"steps none", "epochs 3", "seed 1", "lr 0.05"},
        "slow": {"steps none", "epochs 2", "seed 0", "lr 0.01"},
    }
    assert {name: set(text.split(", ")) for name, text in differs.items()} == wanted
    # two runs alone: only what differs between them
    again = [str(runs / "fast"), str(runs / "slow" / ".." / "fast")]  # (each run once, as first named)
    assert main(["runs", str(runs / "fast"), str(runs / "slow"), *again]) == 0
    rows = table(capsys.readouterr().out)
    assert {Path(name).name: cells[-1] for name, cells in rows.items()} == {"fast": "lr 0.05", "slow": "lr 0.01"}
    assert main(["runs", str(runs / "fast")]) == 0  # one run: nothing differs
    assert table(capsys.readouterr().out)[str(runs / "fast")][-1] == "-"


def test_patterns_of_multipliers_differ_one_by_one():
    import dataclasses

    from netdsl.train.history import RunHistory

    base = Recipe()
    one = dataclasses.replace(base, lr_mults=(("conv*", 0.1), ("*.bias", 2.0)))
    two = dataclasses.replace(base, lr_mults=(("*.bias", 2.0),), weight_decay=0.001)
    histories = [RunHistory(Path(name), "n", recipe, [], None, 0) for name, recipe in (("a", one), ("b", two))]
    assert differing(histories) == [("weight_decay", None), ("lr_mult", "conv*")]  # in the settings' order
    assert setting_text(one, "lr_mult", "conv*") == 'lr_mult "conv*" 0.1'
    assert setting_text(two, "lr_mult", "conv*") == 'lr_mult "conv*" 1'  # unset: the default factor
    assert setting_text(two, "weight_decay", None) == "weight_decay 0.001"


def test_epochs_differ_only_among_the_runs_they_end():
    import dataclasses

    from netdsl.train.history import RunHistory

    def histories(*recipes):
        return [RunHistory(Path(str(i)), "n", recipe, [], None, 0) for i, recipe in enumerate(recipes)]

    by_steps = [dataclasses.replace(Recipe(), steps=100, epochs=epochs) for epochs in (2, 30)]
    assert differing(histories(*by_steps)) == []  # steps end both: their epochs settings have no say
    by_epochs = [dataclasses.replace(Recipe(), epochs=epochs) for epochs in (2, 30)]
    assert differing(histories(*by_epochs, by_steps[0])) == [("epochs", None), ("steps", None)]
    assert setting_text(by_steps[0], "epochs", None) == "" and setting_text(by_epochs[1], "epochs", None) == "epochs 30"
    assert differing(histories(by_epochs[0], by_steps[1])) == [("steps", None)]  # one run's epochs alone: no change


def test_lines_not_netdsls_are_passed_over_and_a_run_not_yet_validated_shows_dashes(runs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs / "fast", copy)
    metrics = copy / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["kind"] == "step"]
    metrics.write_text("\n".join(['{"kind": "epoch", "epoch": "two"}', "not json", *kept, '{"kind": "ep']) + "\n")
    history = read_history(copy)
    assert history.epochs == [] and history.best is None and history.last is None
    assert history.step == max(json.loads(line)["step"] for line in kept)
    assert main(["runs", str(copy)]) == 0
    cells = table(capsys.readouterr().out)[str(copy)]
    assert cells[1:7] == ["0/2 epochs", "-", "-", "-", "-", "-"] and cells[7] != "-"  # (its steps' speed)


def test_a_damaged_run_is_an_error_after_the_others_are_listed(runs, tmp_path, capsys):
    import shutil

    for name in ("fast", "slow"):
        shutil.copytree(runs / name, tmp_path / name)
    for name in ("bad", "worse"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.json").write_text('{"recipe": {"settings": {"lr": {"value": -1, "from": "x"}}}}')
    assert main(["runs", str(tmp_path), "--sort", "name"]) == 1
    out, err = capsys.readouterr()
    assert list(table(out)) == [str(tmp_path / "fast"), str(tmp_path / "slow")]
    for name in ("bad", "worse"):  # each named, neither with a traceback
        assert f"{tmp_path / name / 'recipe.json'}: lr: error: `lr` must be above 0, got -1" in err
    assert "Traceback" not in err


def test_the_curves_are_drawn(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    picture = tmp_path / "runs.png"
    assert main(["runs", str(runs), "-o", str(picture)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {picture}\n")
    with Image.open(picture) as image:
        assert image.size == (1100, 380)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines in several colours, not a blank picture


@pytest.mark.parametrize(
    "argv, message",
    [
        (["runs", "{t}/missing"], "{t}/missing: error: no such folder: {t}/missing"),
        (["runs", "{t}/empty"], "{t}/empty: error: {t}/empty holds no training runs"),
        (["runs", "{t}/file.txt"], "{t}/file.txt: error: {t}/file.txt is not a run folder"),
        (["runs", "{t}/damaged"], "{t}/damaged/recipe.json: lr: error: `lr` must be above 0, got -1"),
        (["runs", "{r}/fast", "-o", "{t}/out.jpg"], "--output: error: {t}/out.jpg is not a .png file"),
        (["runs", "{r}/fast", "-o", "{r}/fast/recipe.json"], "--output: error: "),
    ],
    ids=["missing", "no-runs", "a-file", "damaged-recipe", "not-png", "not-png-recipe"],
)
def test_mistakes_are_errors_naming_the_folder(runs, tmp_path, capsys, argv, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "recipe.json").write_text('{"recipe": {"settings": {"lr": {"value": -1, "from": "x"}}}}')
    fill = {"t": str(tmp_path), "r": str(runs)}
    assert main([part.format(**fill) for part in argv]) == 1
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err, err
