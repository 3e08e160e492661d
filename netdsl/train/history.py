"""What earlier training runs reached, read from their run folders without loading a checkpoint: each run's
recipe (recipe.json) and its epochs (metrics.jsonl). `netdsl runs` lays several side by side, as one compares
the runs of a search over learning rates or the five nets the AlexNet paper averaged: how far each got, its best
and last validation figures, and the settings in which the runs differ."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from netdsl.errors import NetError, os_hint
from netdsl.train.figures import pyplot, save_png
from netdsl.train.recipe import SETTINGS, Recipe
from netdsl.train.runs import CHECKPOINTS, METRICS, RECIPE, RunFolder, metric_records
from netdsl.train.spec import Spec, show


@dataclass
class RunHistory:
    """One run folder's record: its recipe, the net it names and the records of its epochs, in order (and the
    `final` record of a run that ended inside an epoch)."""

    path: Path
    net: str
    recipe: Recipe
    epochs: list[dict]
    final: dict | None
    step: int  # the last step a record names
    speed: float | None = None  # images a second, the median of the logged steps'

    @property
    def planned(self) -> str:
        """How far the run was to go: `3/30 epochs` or `400/1000 steps`."""
        if self.recipe.steps is not None:
            return f"{self.step}/{self.recipe.steps} steps"
        done = self.epochs[-1]["epoch"] if self.epochs else 0
        return f"{done}/{self.recipe.epochs} epochs"

    @property
    def validated(self) -> list[dict]:
        """The epochs that measured validation images, in order."""
        return [line for line in self.epochs if _number(line.get("val_top1"))]

    @property
    def best(self) -> dict | None:
        """The validated epoch of the highest top-1 (the first of equals), as the run chose its best weights."""
        return max(self.validated, key=lambda line: line["val_top1"], default=None)

    @property
    def last(self) -> dict | None:
        """The last validation: the final record's (the last weights) where the run ended inside an epoch."""
        if self.final is not None and _number(self.final.get("val_top1")):
            return self.final
        validated = self.validated
        return validated[-1] if validated else None


def find_runs(paths: list[Path]) -> list[Path]:
    """The run folders `paths` name: each a run folder (it holds recipe.json) or a folder holding run folders
    at any depth (sorted; names starting with a dot passed over). A path that holds none is an error."""
    found: list[Path] = []
    for path in paths:
        if (path / RECIPE).is_file():
            found.append(path)
            continue
        if not path.is_dir():
            hint = "give a run folder (the --out of netdsl train), or a folder of them"
            raise NetError(f"no such folder: {path}" if not path.exists() else f"{path} is not a run folder",
                           where=str(path), hint=hint)  # fmt: skip
        inside = []
        for folder, names, files in os.walk(path, onerror=_raise):
            names[:] = sorted(name for name in names if not name.startswith(".") and name != CHECKPOINTS)
            if RECIPE in files:
                inside.append(Path(folder))
                names[:] = []  # a run folder's own folders hold no runs
        if not inside:
            hint = f"a run folder (netdsl train's --out) holds {RECIPE} from the run's start on"
            raise NetError(f"{path} holds no training runs", where=str(path), hint=hint)
        found += inside
    once: dict[Path, Path] = {}  # each run once, as it was first named
    for path in found:
        once.setdefault(path.resolve(), path)
    return list(once.values())


def _raise(error: OSError) -> None:
    raise NetError(f"cannot read {error.filename}: {error.strerror or error}", where=str(error.filename),
                   hint=os_hint(error))  # fmt: skip


def read_history(path: Path) -> RunHistory:
    """The run folder at `path` as RunHistory. Its recipe is checked as a resume checks it (a damaged one is an
    error naming it); the lines of its metrics that are not netdsl's records are passed over, as a resume does."""
    run = RunFolder(path)
    record, recipe = run.saved_recipe()
    lines = metric_records(run.path / METRICS)
    epochs: dict[int, dict] = {}
    final = None
    for line in lines:
        if line.get("kind") == "epoch" and isinstance(line.get("epoch"), int):
            epochs[line["epoch"]] = line  # (a run resumed after an epoch was recorded records it again)
        elif line.get("kind") == "final":
            final = line
    step = max((line.get("step", 0) for line in lines), default=0)
    logged = [line for line in lines if line.get("kind") == "step"]
    speeds = sorted(line["images_per_s"] for line in logged if _number(line.get("images_per_s")))
    if final is not None and final.get("step") != step:
        final = None  # a later resume went on past it
    net = record.get("net") if isinstance(record.get("net"), str) else "?"
    speed = speeds[len(speeds) // 2] if speeds else None
    return RunHistory(run.path, Path(net).stem or "?", recipe, [epochs[n] for n in sorted(epochs)], final, step, speed)


def differing(histories: list[RunHistory]) -> list[tuple[str, str | None]]:
    """The settings (name, and pattern for `lr_mult` and `decay_mult`) whose values are not the same in every
    run that uses them, in the settings' order."""
    found = []
    for spec in SETTINGS.values():
        values = [getattr(history.recipe, spec.attribute) for history in histories if _counts(history.recipe, spec)]
        if spec.kind == "mult":
            patterns = dict.fromkeys(pattern for value in values for pattern, _ in value)
            found += [(spec.name, p) for p in patterns if len({dict(v).get(p, 1.0) for v in values}) > 1]
        elif any(value != values[0] for value in values[1:]):
            found.append((spec.name, None))
    return found


def setting_text(recipe: Recipe, name: str, pattern: str | None) -> str:
    """`lr 0.01`, `lr_mult "conv*" 0.1`: a setting's value in a run, as a train block writes it ("" where the run
    does not use it)."""
    spec = SETTINGS[name]
    if not _counts(recipe, spec):
        return ""
    value = getattr(recipe, spec.attribute)
    if pattern is not None:
        return f'{name} "{pattern}" {show(dict(value).get(pattern, 1.0))}'
    return f"{name} {show(value, spec)}"


def summary_rows(histories: list[RunHistory], names: list[str]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The header and a row per run (named as `names` say) of `netdsl runs`' table."""
    header = ("run", "net", "progress", "best top-1", "at epoch", "last top-1", "val loss", "train loss", "img/s",
              "settings that differ")  # fmt: skip
    changed = differing(histories)
    rows = []
    for name, history in zip(names, histories, strict=True):
        best, last = history.best, history.last
        trained = history.epochs[-1].get("train_loss") if history.epochs else None
        rows.append((
            name,
            history.net,
            history.planned,
            _percent(best["val_top1"]) if best else "-",
            str(best["epoch"]) if best else "-",
            _percent(last["val_top1"]) if last else "-",
            _figure(last.get("val_loss")) if last else "-",
            _figure(trained),
            f"{history.speed:,.0f}" if history.speed is not None else "-",
            ", ".join(filter(None, (setting_text(history.recipe, *setting) for setting in changed))) or "-",
        ))  # fmt: skip
    return header, rows


def plot_histories(path: Path, histories: list[RunHistory], names: list[str]) -> bool:
    """Each run's validation top-1 and training loss per epoch, a line per run, as a PNG; False when matplotlib
    is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    figure, (top1, loss) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, history in zip(names, histories, strict=True):
        validated = history.validated
        (drawn,) = top1.plot([line["epoch"] for line in validated], [line["val_top1"] for line in validated],
                             marker="." if len(validated) < 30 else None, label=name)  # fmt: skip
        trained = [line for line in history.epochs if _number(line.get("train_loss"))]
        epochs, losses = [line["epoch"] for line in trained], [line["train_loss"] for line in trained]
        loss.plot(epochs, losses, color=drawn.get_color())
    for axes, title in ((top1, "validation top-1"), (loss, "training loss")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    top1.legend(fontsize="small")
    save_png(figure, path)
    return True


def _counts(recipe: Recipe, spec: Spec) -> bool:
    """Whether a run's `spec` setting has a say in it: `epochs` has none where `steps` ends the run."""
    return not (spec.name == "epochs" and recipe.steps is not None)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value) -> str:
    return f"{100 * value:.2f}%" if _number(value) else "-"


def _figure(value) -> str:
    return f"{value:.4f}" if _number(value) else "-"
