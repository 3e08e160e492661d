"""The training recipe: every setting `netdsl train` reads, declared once, and how the places that give
them combine.

A setting is written in a `train { }` block of the net (or of a file it includes), in a recipe file
(`netdsl train --recipe F`), or as a flag (`--weight-decay 0.001`). Later places win:

    defaults  <  the net's train blocks, in order  <  the recipe file's  <  flags

A resumed run starts instead from the recipe it saved, and flags given at resume override that
(`Recipe.changes_from` lists each override for the log), except the optimizer and the schedule's kind,
whose saved state only they can use, and the weights the run started from; a recipe file cannot be given
at resume.

`Recipe`'s fields are the one table of settings: each is declared with `setting(kind, default, unit,
doc, ...)` (netdsl.train.spec, which also describes a setting in words), and validation, the `netdsl
train` flags (`add_flags`) and the table in docs/training.md (tests/test_train_recipe.py checks it) all
come from them. `lr_mult` and `decay_mult` take a glob pattern over netdsl weight names (`lr_mult "fc8.*"
= 10`); they become the lists `lr_mults` and `decay_mults` of (pattern, value), the last matching pattern
winning.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from netdsl.compiler.training import RECOMPUTE
from netdsl.errors import NetError, Span, did_you_mean
from netdsl.files import parse_json
from netdsl.ir.graph import Setting
from netdsl.train.schedule import KINDS as SCHEDULES
from netdsl.train.spec import (
    Spec,
    flag_name,
    got,
    metavar_of,
    range_text,
    setting,
    setting_hint,
    show,
    type_text,
)

KEPT_AT_RESUME = ("optimizer", "schedule", "weights")  # a flag at resume may not change them: the run's state is theirs
MAX_SEED = 2**32 - 1
MAX_TIMEOUT = 7 * 24 * 3600  # seconds: a collective waits at most a week for a rank


_AUTO = (("auto", "auto"),)
_OFF = (("none", None), ("false", None))


@dataclass(frozen=True)
class Recipe:
    """Every setting of a training run, resolved (`resolve`). `source(name)` tells where a value came from."""

    # The table of settings (kept as rows: the formatter would give each argument a line of its own).
    # fmt: off
    # --- how long, in what batches ---------------------------------------------------------------------
    batch: int = setting("int", 128, "images", "images per optimizer step, all processes together (under "
                         "torchrun each of N processes takes batch / N)", low=1)
    accumulate: int = setting("int", 1, "parts", "each process's batch runs through the net in this many "
                              "equal parts, one after another, their gradients summed before the step: the "
                              "step of the whole batch (batch norm apart: it normalizes each part) in the "
                              "memory of one part", low=1)
    recompute: str = setting("choice", "none", "", "memory for compute, the same gradients: `cheap`: the layers "
                             "after each conv or fc (activation, LRN, pooling, batch norm, dropout) keep only their "
                             "input for the backward pass, which runs them again; `all`: each conv or fc and the "
                             "layers after it do (about one forward pass more)", choices=RECOMPUTE)
    epochs: int = setting("int", 90, "epochs", "passes over the training set", low=1)
    steps: int | None = setting("int", None, "steps", "optimizer steps to train for, in place of `epochs`; "
                                "`none`: `epochs` decides", low=1, words=(("none", None),))
    early_stop: int | None = setting("int", None, "epochs", "training ends once the validation error has not "
                                     "improved (by more than `threshold`) for this many validated epochs in a row; "
                                     "`none`: it runs its epochs or steps", low=1, words=(("none", None),))
    seed: int = setting("int", 0, "", "seeds the initial weights, the validation split, the data order and the "
                        "augmentation", low=0, high=MAX_SEED)
    # --- the optimizer ---------------------------------------------------------------------------------
    optimizer: str = setting("choice", "sgd", "", "`sgd`: the paper's rule, v <- momentum*v - weight_decay*lr*w - "
                             "lr*grad, w <- w + v; `adamw`: AdamW (decay decoupled)", choices=("sgd", "adamw"))
    lr: float = setting("number", 0.01, "", "the base learning rate; the schedule scales it, and "
                        "`lr_mult` per weight", low=0, above=True)
    momentum: float = setting("number", 0.9, "", "sgd's momentum", low=0, high=1, below=True)
    nesterov: bool = setting("bool", False, "", "sgd with Nesterov's momentum")
    weight_decay: float = setting("number", 0.0005, "", "each step pulls a weight w towards 0 by "
                                  "weight_decay * lr * w (`decay_mult` per weight)", low=0)
    betas: tuple[float, float] = setting("numbers", (0.9, 0.999), "", "adamw's decay rates of the gradient's "
                                         "mean and square", low=0, high=1, below=True, lengths=(2,))
    eps: float = setting("number", 1e-8, "", "adamw's epsilon, added to the root mean square", low=0, above=True)
    lr_mults: tuple[tuple[str, float], ...] = setting(
        "mult", (), "factor", '`lr_mult "PATTERN" = X`: multiplies `lr` for the weights the pattern matches (the '
        "last matching pattern wins; others 1)", name="lr_mult", low=0)
    decay_mults: tuple[tuple[str, float], ...] = setting(
        "mult", (), "factor", '`decay_mult "PATTERN" = X`: multiplies `weight_decay` likewise; '
        '`decay_mult "*.bias" = 0`: no decay on biases', name="decay_mult", low=0)
    clip_grad: float = setting("number", 0.0, "L2 norm", "gradients whose norm (all weights together) is larger "
                               "are scaled down to it; 0: off", low=0)
    ema: float | None = setting("number", None, "decay", "keep an exponential moving average of the weights, "
                                "a <- ema*a + (1-ema)*w after each step (about 1/(1-ema) steps long), which "
                                "validation measures and the run saves as its weights; `none`: the weights "
                                "themselves", low=0, high=1, above=True, below=True, words=(("none", None),))
    # --- the learning rate's schedule ------------------------------------------------------------------
    schedule: str = setting("choice", "plateau", "", "`constant`; `step`: times gamma every step_epochs; "
                            "`multistep`: times gamma at each milestone; `cosine`: down to cosine_floor at the "
                            "end; `poly`: times (1 - t / T) ** power, t the epochs done of T, down to 0 at the end; "
                            "`exp`: times gamma ** s, s the steps done (Caffe's); `inv`: times (1 + gamma * s) ** "
                            "-power (Caffe's, as its LeNet: gamma 0.0001, power 0.75); "
                            "`plateau`: times gamma when the validation error stops improving (the paper)",
                            choices=SCHEDULES)
    gamma: float = setting("number", 0.1, "factor", "what each drop multiplies the rate by (step, multistep, "
                           "plateau); each step's (exp, inv)", low=0, high=1, above=True)
    step_epochs: int = setting("int", 30, "epochs", "step: epochs between drops", low=1)
    milestones: tuple[int, ...] = setting("ints", (30, 60), "epochs", "multistep: the epochs at whose start the "
                                          "rate drops", low=1, increasing=True)
    patience: int = setting("int", 3, "epochs", "plateau: epochs in a row without improvement that are waited "
                            "out; the next one without improvement drops the rate", low=0)
    max_drops: int | None = setting("int", 3, "drops", "plateau: the most drops (the paper made 3); `none`: no "
                                    "limit", low=0, words=(("none", None),))
    threshold: float = setting("number", 0.001, "error", "plateau and early_stop: an epoch improves when its "
                               "validation error (a fraction: 0.001 is 0.1 points) is below the best so far by more "
                               "than this", low=0, high=1, below=True)
    cosine_floor: float = setting("number", 0.0, "factor", "cosine: the rate's factor at the end of training",
                                  low=0, high=1)
    power: float = setting("number", 1.0, "", "poly: the exponent of (1 - t / T), 1: a straight line down to 0; "
                           "inv: the exponent of 1 / (1 + gamma * s)",
                           low=0, above=True)
    warmup_epochs: float = setting("number", 0.0, "epochs", "the rate rises linearly from about 0 over this many "
                                   "epochs (fractions too), then follows the schedule", low=0)
    # --- the loss --------------------------------------------------------------------------------------
    label_smoothing: float = setting("number", 0.0, "", "the cross-entropy's targets give this much weight, "
                                     "spread evenly, to all classes", low=0, high=1, below=True)
    # --- the data --------------------------------------------------------------------------------------
    data: str | None = setting("string", None, "", "the images: a folder (DIR/train/<class>/..., "
                               "DIR/val/<class>/..., or DIR/<class>/...), an image list (LIST.txt: a line "
                               "`images/cat1.jpg CLASS` per image, as Caffe's), an .npz file (x, y, optionally "
                               'x_val, y_val) or `"digits"` (scikit-learn\'s); no default',
                               metavar="DIR|LIST.txt|FILE.npz|digits", example="digits")
    val_data: str | None = setting("string", None, "", "validation images apart from `data` (all of which then "
                                   "trains): a folder (DIR/<class>/...), an image list (LIST.txt, as ImageNet's "
                                   "validation set is given) or an .npz file (x, y), their classes those of `data` "
                                   "of the same names (class numbers: the same numbers); `none`: from `data`",
                                   words=(("none", None),), metavar="DIR|LIST.txt|FILE.npz", example="val.txt")
    val_fraction: float = setting("number", 0.1, "fraction", "held out for validation (per class, seeded) from "
                                  "data without validation images of its own (none with `val_data`)", low=0, high=1,
                                  below=True)
    resize: int | tuple[int, int] | str = setting("span", "auto", "pixels", "the shorter side is scaled to this "
                                                  "before cropping; (low, high): to a size drawn from low to high "
                                                  "for each training image, each time (VGG's scale jittering), "
                                                  "and to their middle for validation; `auto`: round(crop * 256 "
                                                  "/ 224) for image folders and lists (the paper: 256 for 224), "
                                                  "the crop itself for arrays and digits", low=1, words=_AUTO)
    crop: tuple[int, int] | str = setting("size", "auto", "pixels", "the random training crop and the centre "
                                          "view, n or (h, w); `auto`: the net's input", low=1, words=_AUTO)
    crop_area: tuple[float, float] | None = setting("numbers", None, "fraction", "Inception's random-resized "
                                                    "crops: each training crop is a box of the image as stored, "
                                                    "its share of the area drawn from (low, high) and its aspect "
                                                    "from crop_aspect, scaled to the net's input (in place of "
                                                    "`resize` and a crop of it; validation as before); `none`: "
                                                    "off", low=0, high=1, above=True, lengths=(2,),
                                                    ordered=True, words=(("none", None),))
    crop_aspect: tuple[float, float] = setting("numbers", (3 / 4, 4 / 3), "w / h", "crop_area: the range of the "
                                               "boxes' aspect ratios, drawn log-uniformly", low=0.001, high=1000,
                                               lengths=(2,), ordered=True)
    flip: bool = setting("bool", True, "", "random horizontal flips while training")
    pca_noise: float = setting("number", 0.1, "std", "the paper's colour noise: the std of each alpha along the "
                               "principal components of the training set's RGB colours; 0: off", low=0)
    saturation: float = setting("number", 1.0, "factor", "Darknet's colour jitter: each training presentation "
                                "scales the colours' saturation by a factor from 1/s to s (drawn from [1, s], "
                                "inverted one time in two); 1: off", low=1)
    exposure: float = setting("number", 1.0, "factor", "the same for the brightness (HSV's value; a gray "
                              "image's pixels), at most 255; 1: off", low=1)
    hue: float = setting("number", 0.0, "turn", "Darknet's hue jitter: each training presentation turns the hue by "
                         "a share of the colour circle drawn from [-hue, hue]; 0: off", low=0, high=0.5)
    angle: float = setting("number", 0.0, "degrees", "Darknet's rotation: each training presentation turns the "
                           "scaled image about its centre by an angle drawn from [-angle, angle] before the crop "
                           "(bilinear; the mean colour where no pixel comes from); 0: off", low=0, high=180)
    mixup: float = setting("number", 0.0, "alpha", "blend each training image with another of its batch, and the "
                           "labels alike, by a share drawn from Beta(alpha, alpha) each batch; 0: off", low=0)
    cutmix: float = setting("number", 0.0, "alpha", "paste a box of another image of its batch into each training "
                            "image, the labels weighted by area (the share drawn from Beta(alpha, alpha) each "
                            "batch); 0: off; with mixup too, each batch takes one of the two", low=0)
    mean: tuple[float, ...] | str | None = setting(
        "numbers", "auto", "0..255", "subtracted per channel: `auto`: the training set's mean (the starting "
        "`weights`' own, where they carry one); `none`: nothing; or one value per channel", lengths=(1, 3),
        words=(("auto", "auto"), *_OFF))
    std: tuple[float, ...] | str | None = setting(
        "numbers", None, "0..255", "divides each channel after the mean: `auto`: the training set's std (the "
        "starting `weights`' own, where they carry their preprocessing: then also by default); `false`: "
        "nothing; or one value per channel", low=0, above=True, lengths=(1, 3),
        words=(("false", None), ("none", None), ("auto", "auto")))
    workers: int = setting("int", 2, "processes", "data loading processes (0: in the training process; at most "
                           "one per CPU, a CPU share under torchrun; the batches the same with any number)", low=0)
    skip_corrupt: bool = setting("bool", False, "", "skip (and count) images that cannot be decoded, instead of "
                                 "stopping")
    # --- validation, logs and checkpoints --------------------------------------------------------------
    val_every: int = setting("int", 1, "epochs", "validate every this many epochs", low=1)
    views: int = setting("int", 1, "views", "views per validation image: 1 (the centre) or 10 (the paper's four "
                         "corners and centre, each flipped, softmax averaged)", choices=(1, 10))
    keep_best: int = setting("int", 3, "checkpoints", "the best checkpoints kept (by validation top-1) beside "
                             "the last; `0`: none, and `weights.safetensors` holds the last weights", low=0)
    checkpoint_every: int | None = setting("int", None, "steps", "also write the last checkpoint every this many "
                                           "steps (a crash then loses fewer); `none`: after each epoch (and on "
                                           "Ctrl-C or SIGTERM) only", low=1, words=(("none", None),))
    log_every: int = setting("int", 50, "steps", "a line of training loss and accuracy every this many steps",
                             low=1)
    # --- how it runs -----------------------------------------------------------------------------------
    dtype: str = setting("choice", "fp32", "", "`bf16`: bf16 autocast, fp32 master weights; `fp16`: with loss "
                         "scaling", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = setting("bool", False, "", "channels-last memory layout on GPUs")
    compile: bool = setting("bool", False, "", "run the training step under torch.compile")
    backend: str = setting("choice", "torch", "", "`torch`: every layer with PyTorch; `triton`: netdsl's own "
                           "kernels forward and backward (conv, fc, LRN + max-pool, batch norm, dropout, the loss; "
                           "on the CPU under Triton's interpreter, slowly)", choices=("torch", "triton"))
    init: str = setting("choice", "paper", "", "initial weights: `paper`: N(0, 0.01), biases 0 (1 in AlexNet's "
                        "conv2, conv4, conv5, fc6, fc7); `he`: N(0, 2 / fan_in), biases 0", choices=("paper", "he"))
    weights: str | None = setting("string", None, "", "start from these weights (a .safetensors file, or a run "
                                  "folder: its weights.safetensors): each of the net's weights the file holds by "
                                  "name, the others (a layer renamed to start afresh, e.g. a last layer for other "
                                  "classes) from `init`; the mean and std they were trained with, unless `mean` or "
                                  "`std` is given; `none`: every weight from `init`", words=(("none", None),),
                                  metavar="FILE|RUN", example="runs/lenet5")
    timeout: float = setting("number", 300.0, "seconds", "under torchrun, how long a collective waits for a rank "
                             "that died, before every rank stops with an error (at most a week: centuries "
                             "overflow inside PyTorch)", low=0, high=MAX_TIMEOUT, above=True)
    # fmt: on

    _sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source(self, name: str, pattern: str | None = None) -> str:
        """Where a value came from: "default", a file position ("nets/x.net:12:5") or a flag ("--lr").
        For `lr_mult`/`decay_mult`, of the entry with `pattern`."""
        if name not in SETTINGS:
            raise KeyError(name)
        key = _key(name, pattern) if SETTINGS[name].kind == "mult" else name
        return self._sources.get(key, "default")

    def changes_from(self, saved: Recipe) -> list[str]:
        """One line per setting whose value differs from `saved`'s (at resume: each flag that overrides the
        saved run), saying the new value, its flag and the old value."""
        lines = []
        for spec in SETTINGS.values():
            new, old = getattr(self, spec.attribute), getattr(saved, spec.attribute)
            if spec.kind == "mult":
                for pattern, value in new:
                    before = dict(old).get(pattern, 1.0)
                    if before != value:
                        where = self.source(spec.name, pattern)
                        lines.append(f'{spec.name} "{pattern}" = {show(value)} ({where}; was {show(before)})')
            elif new != old:
                lines.append(f"{spec.name} = {show(new, spec)} ({self.source(spec.name)}; was {show(old, spec)})")
        return lines

    def to_dict(self) -> dict:
        """Every value and where it came from, as JSON-able data (what a run folder stores)."""
        settings: dict[str, object] = {}
        for spec in SETTINGS.values():
            value = getattr(self, spec.attribute)
            if spec.kind == "mult":
                settings[spec.name] = [{"pattern": p, "value": v, "from": self.source(spec.name, p)} for p, v in value]
            else:
                value = list(value) if isinstance(value, tuple) else value
                settings[spec.name] = {"value": value, "from": self.source(spec.name)}
        return {"netdsl_recipe": 1, "settings": settings}

    @classmethod
    def from_dict(cls, record: dict, where: str = "recipe.json") -> Recipe:
        """The recipe `to_dict` wrote; each value is checked again (`where` names the file in errors). A
        setting missing from `record` (written by an older netdsl) takes its default."""
        settings = record.get("settings") if isinstance(record, dict) else None
        if not isinstance(settings, dict):
            raise NetError(
                "not a netdsl recipe (no `settings`)",
                where=where,
                hint="the file was written by another program, or damaged: put it back, or start a new run (--out)",
            )
        state = _State()
        for name, entry in settings.items():
            spec = SETTINGS.get(name)
            if spec is None:
                hint = "it was written by another version of netdsl"
                raise NetError(f"the recipe has an unknown setting `{name}`", where=where, hint=hint)
            fail = _at(f"{where}: {name}")
            try:
                entries = entry if spec.kind == "mult" else [dict(entry, pattern=None)]
                for item in entries:
                    pattern, value = item["pattern"], _from_json(item["value"])
                    if spec.kind == "mult":
                        _check_pattern(spec, pattern, fail)
                    state.put(spec, pattern, _checked(spec, value, False, fail), str(item["from"]))
            except (KeyError, TypeError, ValueError):
                raise NetError(
                    f"the recipe's `{name}` is malformed",
                    where=where,
                    hint="the run's recipe.json was edited or damaged: put the file back, or start a new run (--out)",
                ) from None
        return state.recipe()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "recipe.json") -> Recipe:
        try:
            record = parse_json(text)
        except ValueError as error:
            raise NetError(
                f"the recipe is not valid JSON: {error}",
                where=where,
                hint="the file was written by another program, or damaged: put it back, or start a new run (--out)",
            ) from None
        return cls.from_dict(record, where)


def _specs() -> dict[str, Spec]:
    specs = {}
    for item in dataclasses.fields(Recipe):
        if "spec" in item.metadata:
            spec = item.metadata["spec"]
            spec = dataclasses.replace(spec, name=spec.name or item.name, attribute=item.name)
            specs[spec.name] = spec
    return specs


SETTINGS: dict[str, Spec] = _specs()  # by the name each is written with, in the table's order

# What other tools call some settings, for the hint of an unknown one.
# fmt: off
_ALIASES = {
    "base_lr": "lr", "learning_rate": "lr", "epsw": "lr_mult", "epsb": "lr_mult", "batch_size": "batch",
    "mini": "batch", "max_epochs": "epochs", "max_iter": "steps", "max_batches": "steps", "random_seed": "seed",
    "solver": "optimizer", "type": "optimizer", "momw": "momentum", "momb": "momentum", "decay": "weight_decay",
    "wd": "weight_decay", "wc": "decay_mult", "lr_policy": "schedule", "policy": "schedule",
    "stepsize": "step_epochs", "step_size": "step_epochs", "scales": "gamma", "burn_in": "warmup_epochs",
    "warmup": "warmup_epochs", "min_lr": "cosine_floor", "smoothing": "label_smoothing", "mirror": "flip",
    "crop_size": "crop", "inner_size": "crop", "mean_value": "mean", "color_noise": "pca_noise",
    "num_workers": "workers", "test_interval": "val_every", "test_freq": "val_every", "multiview_test": "views",
    "display": "log_every", "checkpoint_hist": "keep_best", "amp": "dtype", "torchcompile": "compile",
    "clip_grad_norm": "clip_grad", "subdivisions": "accumulate",
}
# fmt: on


def alias_of(name: str) -> str | None:
    """netdsl's name for a setting other tools call `name` (`learning_rate` -> `lr`), or None."""
    return _ALIASES.get(name.lower())


# --- resolving ---------------------------------------------------------------------------------------


def resolve(
    graph_settings: Iterable[Setting],
    recipe_file_settings: Iterable[Setting],
    args: argparse.Namespace | None,
    saved: Recipe | None = None,
) -> Recipe:
    """The recipe of a run: defaults < the net's `train` blocks (`graph.graph["recipe"]`) < the recipe
    file's (`load_recipe`) < the flags in `args` (`add_flags`). With `saved` (a resumed run's recipe), the
    saved values replace the first three; flags still override them. Raises `NetError` at the setting or
    flag that is wrong."""
    graph_settings, recipe_file_settings = list(graph_settings), list(recipe_file_settings)
    state = _State()
    for item in graph_settings + recipe_file_settings:  # checked even where `saved` replaces them
        state.apply(item)
    if saved is not None:
        if recipe_file_settings:
            raise NetError(
                "a recipe file cannot be given when a run is resumed",
                where="--recipe",
                hint="the run goes on with the recipe it saved; change a setting with its flag (--lr 0.001)",
            )
        state = _State.of(saved)
    for spec in SETTINGS.values():
        given = getattr(args, spec.name, None) if args is not None else None
        if given is not None:
            state.apply_flag(spec, given)
    recipe = state.recipe()
    if recipe.channels_last and recipe.backend == "triton":  # its update works in place on flat buffers
        raise NetError(
            "channels_last is for the torch backend: the triton backend lays out its maps itself, and its update "
            "writes the weights in place in flat buffers that a change of memory format would leave behind",
            where=recipe.source("channels_last"),
            hint="leave channels_last out with the triton backend",
        )
    if recipe.recompute != "none" and recipe.compile:
        raise NetError(
            f"recompute = {recipe.recompute} is for eager PyTorch: under torch.compile its partitioner chooses "
            "what the backward pass computes again (it already does so for cheap layers)",
            where=recipe.source("recompute"),
            hint="leave out compile or recompute",
        )
    for name in KEPT_AT_RESUME if saved is not None else ():
        if getattr(recipe, name) != getattr(saved, name):
            raise NetError(
                f"`{name}` cannot change when a run is resumed: the run's is {show(getattr(saved, name))}",
                where=recipe.source(name),
                hint=f"the saved state (velocities, schedule counts, weights) belongs to it; start a new run to change "
                f"{name}",
            )
    return recipe


class _State:
    """The values so far and where each came from, while the places that give them are applied in order."""

    def __init__(self) -> None:
        self.values = {spec.name: spec.default for spec in SETTINGS.values() if spec.kind != "mult"}
        self.mults: dict[str, list[tuple[str, float]]] = {n: [] for n, s in SETTINGS.items() if s.kind == "mult"}
        self.sources = {name: "default" for name in self.values}

    @classmethod
    def of(cls, recipe: Recipe) -> _State:
        state = cls()
        for spec in SETTINGS.values():
            value = getattr(recipe, spec.attribute)
            if spec.kind == "mult":
                state.mults[spec.name] = list(value)
            else:
                state.values[spec.name] = value
        state.sources = dict(recipe._sources)
        return state

    def put(self, spec: Spec, pattern: str | None, value, source: str) -> None:
        """Makes a checked value the current one (a multiplier's: the current one for its pattern)."""
        if spec.kind == "mult":
            entries = [(p, v) for p, v in self.mults[spec.name] if p != pattern]  # a later one replaces it
            self.mults[spec.name] = [*entries, (pattern, value)]
            self.sources[_key(spec.name, pattern)] = source
        else:
            self.values[spec.name] = value
            self.sources[spec.name] = source

    def apply(self, item: Setting) -> None:
        """A setting of a `train` block, checked at its place in the file."""
        spec = SETTINGS.get(item.name)
        name_span = Span(item.span.file, item.span.line, item.span.col, item.span.line, item.span.col + len(item.name))
        if spec is None:
            alias = _ALIASES.get(item.name.lower())
            hint = f"netdsl calls it `{alias}`" if alias else did_you_mean(item.name, SETTINGS)
            raise NetError(
                f"unknown training setting `{item.name}`",
                name_span,
                hint=hint or "the settings are listed in docs/training.md",
            )
        if spec.kind == "mult" and item.pattern is None:
            raise NetError(
                f"`{spec.name}` needs a pattern of weight names",
                name_span,
                hint=f'e.g. {spec.name} "*.bias" = 2 (weights are named <layer>.<tensor>, as conv1@gpu0.bias)',
            )
        if spec.kind != "mult" and item.pattern is not None:
            raise NetError(
                f"`{spec.name}` takes no pattern",
                item.pattern_span,
                hint="only lr_mult and decay_mult are given per weight",
            )
        fail = _at_span(item.value_span, item.pattern_span)
        if spec.kind == "mult":
            _check_pattern(spec, item.pattern, fail)
        self.put(spec, item.pattern, _checked(spec, item.value, item.word, fail), str(item.span))

    def apply_flag(self, spec: Spec, given) -> None:
        """A flag's value (a string; a bool for true/false settings; a list of PATTERN=X for multipliers)."""
        flag = flag_name(spec)
        fail = _at(flag)
        if spec.kind == "bool":
            self.put(spec, None, bool(given), flag if given else "--no-" + flag[2:])
        elif spec.kind == "mult":
            for text in given:
                pattern, equals, number = text.rpartition("=")
                if not equals:
                    raise NetError(f"{flag} takes PATTERN=X, got `{text}`", where=flag, hint=f"e.g. {flag} '*.bias=2'")
                _check_pattern(spec, pattern, fail)
                self.put(spec, pattern, _checked(spec, _number(number.strip()), False, fail), flag)
        else:
            value, word = _flag_value(spec, given)
            self.put(spec, None, _checked(spec, value, word, fail), flag)

    def recipe(self) -> Recipe:
        values = {SETTINGS[name].attribute: value for name, value in self.values.items()}
        mults = {SETTINGS[name].attribute: tuple(entries) for name, entries in self.mults.items()}
        return Recipe(**values, **mults, _sources=dict(self.sources))


def _key(name: str, pattern: str | None) -> str:
    return f'{name} "{pattern}"'


# --- checking one value ------------------------------------------------------------------------------

_Fail = Callable[..., NetError]  # (message, hint=None, at_pattern=False) -> the error to raise


def _at_span(value_span: Span, pattern_span: Span | None) -> _Fail:
    def fail(message: str, hint: str | None = None, at_pattern: bool = False) -> NetError:
        return NetError(message, pattern_span if at_pattern and pattern_span else value_span, hint=hint)

    return fail


def _at(where: str) -> _Fail:
    """Errors blamed on a flag, or on a setting of a saved recipe."""

    def fail(message: str, hint: str | None = None, at_pattern: bool = False) -> NetError:
        return NetError(message, where=where, hint=hint)

    return fail


def _explained(spec: Spec, fail: _Fail) -> _Fail:
    """`fail`, with the setting's own description as the hint of an error that has none of its own."""

    def explained(message: str, hint: str | None = None, at_pattern: bool = False) -> NetError:
        return fail(message, hint or setting_hint(spec), at_pattern)

    return explained


def _checked(spec: Spec, value, word: bool, fail: _Fail):
    """`value` as the setting keeps it (tuples normalized, whole numbers as int, the others float), or the
    error `fail` makes, naming what the setting takes (with the setting's description where no better hint)."""
    fail = _explained(spec, fail)
    words = dict(spec.words)
    written = show(value) if isinstance(value, bool) else value  # `std = false` evaluates to False
    if isinstance(written, str) and written in words:
        return words[written]
    if value is None and (spec.default is None or None in words.values()):  # a saved `none`
        return None
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"`{spec.name}` must be true or false, got {got(value)}", _word_hint(value, word, ()))
        return value
    if kind in ("choice", "string"):
        if kind == "choice" and value not in spec.choices:
            hint = did_you_mean(value, spec.choices) if isinstance(value, str) else None
            raise fail(f"`{spec.name}` must be {type_text(spec)}, got {got(value)}", hint)
        if kind == "string" and (not isinstance(value, str) or not value):
            example = f'e.g. {spec.name} = "{spec.example}"'
            raise fail(f"`{spec.name}` must be a non-empty string, got {got(value)}", example)
        return value
    if kind in ("ints", "numbers", "size", "span"):
        return _checked_tuple(spec, value, word, fail)
    return _checked_number(spec, value, word, fail, spec.name)


def _checked_number(spec: Spec, value, word: bool, fail: _Fail, what: str):
    whole = spec.kind in ("int", "ints", "size", "span")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise fail(f"`{what}` must be {type_text(spec)}, got {got(value)}", _word_hint(value, word, spec.words))
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise fail(f"`{what}` must be a whole number, got {got(value)}")
        value = int(value)
    elif abs(value) > sys.float_info.max:  # a whole number (a flag's digits) beyond any float
        raise fail(
            f"`{what}` must be {type_text(spec)}, got a number beyond floating point's range",
            "the largest floating-point number is about 1.8e308",
        )
    else:
        value = float(value)
    if spec.choices and value not in spec.choices:
        raise fail(f"`{what}` must be {type_text(spec)}, got {got(value)}")
    low, high = spec.low, spec.high
    if (low is not None and (value <= low if spec.above else value < low)) or (
        high is not None and (value >= high if spec.below else value > high)
    ):
        raise fail(f"`{what}` must be {range_text(spec)}, got {got(value)}")
    return value


def _finite(value: int | float) -> bool:
    """Whether a number is finite (a whole number always is, however many digits it has: math.isfinite would
    convert it to a float first, and overflow)."""
    return isinstance(value, int) or math.isfinite(value)


def _checked_tuple(spec: Spec, value, word: bool, fail: _Fail) -> tuple:
    items = value if isinstance(value, tuple) else (value,)
    if spec.kind in ("size", "span") and len(items) not in (1, 2):
        raise fail(f"`{spec.name}` must be {type_text(spec)}, got {len(items)} numbers")
    if spec.lengths and len(items) not in spec.lengths:
        raise fail(f"`{spec.name}` must be {type_text(spec)}, got {got(value)}")
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
        raise fail(f"`{spec.name}` must be {type_text(spec)}, got {got(value)}", _word_hint(value, word, spec.words))
    checked = tuple(_checked_number(spec, item, False, fail, spec.name) for item in items)
    if spec.increasing and any(b <= a for a, b in itertools.pairwise(checked)):
        raise fail(f"`{spec.name}` must increase, got {got(value)}")
    if spec.ordered and any(b < a for a, b in itertools.pairwise(checked)):
        raise fail(f"`{spec.name}` must not decrease, got {got(value)}")
    if spec.kind == "size" and len(checked) == 1:
        checked = (checked[0], checked[0])
    if spec.kind == "span":  # one number, or a range of at least two
        if len(checked) == 1:
            return checked[0]
        if checked[1] <= checked[0]:
            raise fail(
                f"`{spec.name}`: a range's low must be below its high, got {got(value)}",
                f"one number for a fixed size, e.g. {spec.name} = {checked[0]}",
            )
    return checked


def _check_pattern(spec: Spec, pattern, fail: _Fail) -> None:
    """A pattern of weight names: glob characters (* ? [...]) and what names are made of."""
    hint = f'e.g. {spec.name} "fc8.*" = 10; weight names are <layer>.<tensor>, as conv1@gpu0.bias'
    if not isinstance(pattern, str) or not pattern:
        raise fail(f"`{spec.name}`: the pattern is empty", hint, at_pattern=True)
    bad = re.search(r"[^A-Za-z0-9_.@/*?!\[\]-]", pattern)
    if bad:
        raise fail(f"`{spec.name}`: a weight name cannot contain {bad.group()!r}", hint, at_pattern=True)
    if _unclosed_set(pattern):
        raise fail(
            f"`{spec.name}`: the pattern's `[` has no closing `]`",
            "`[...]` matches one of the characters inside; `[[]` matches a `[` itself: x[[]1].weight",
            at_pattern=True,
        )


def _unclosed_set(pattern: str) -> bool:
    """Whether a `[` of the glob opens a set that never closes (fnmatch's reading: `[]...]` and `[!]...]`
    hold a `]`)."""
    index = 0
    while index < len(pattern):
        if pattern[index] == "[":
            start = index + 1
            start += pattern.startswith("!", start)
            start += pattern.startswith("]", start)
            close = pattern.find("]", start)
            if close < 0:
                return True
            index = close
        index += 1
    return False


def _word_hint(value, word: bool, words) -> str | None:
    if not (word and isinstance(value, str)):
        return None
    if words:
        return did_you_mean(value, dict(words)) or f"`{value}` is not a constant defined before this train block"
    return f"`{value}` is not a constant defined before this train block"


def _flag_value(spec: Spec, text: str) -> tuple[object, bool]:
    """A flag's text as a value: numbers and tuples (comma-separated) parsed, anything else a word."""
    text = text.strip()
    if spec.kind in ("choice", "string"):
        return text, spec.kind == "choice"
    if text in dict(spec.words):
        return text, True
    if spec.kind in ("ints", "numbers", "size", "span"):
        parts = text.strip("()").split(",")
        numbers = tuple(_number(part.strip()) for part in parts)
        return (numbers[0] if len(numbers) == 1 else numbers), False
    return _number(text), False


def _number(text: str):
    """An int or float from a flag, else the text itself (reported as what it is)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def _from_json(value):
    return tuple(value) if isinstance(value, list) else value


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`flag_of`), in a group of their own. A flag not given is None, so that
    `resolve` knows which were given; values stay text until `resolve` checks them."""
    group = parser.add_argument_group("training settings (docs/training.md)")
    for spec in SETTINGS.values():
        default = "1" if spec.kind == "mult" else show(spec.default, spec)
        unit = f"{spec.unit}; " if spec.unit else ""
        help_text = f"{spec.doc} ({unit}default {default})".replace("%", "%%")
        if spec.kind == "bool":
            group.add_argument(flag_name(spec), dest=spec.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif spec.kind == "mult":
            group.add_argument(flag_name(spec), dest=spec.name, action="append", metavar="PATTERN=X", help=help_text)
        else:
            group.add_argument(flag_name(spec), dest=spec.name, metavar=metavar_of(spec), help=help_text)
