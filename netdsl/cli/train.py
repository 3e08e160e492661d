"""`netdsl train` and `netdsl eval`: thin layers over `netdsl.train`."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from netdsl.cli.flags import ensemble_classes, image_sizes, output_file, require_weights, seconds, seed_number
from netdsl.codegen.interpret import use_interpreter
from netdsl.errors import NetError, environment_error
from netdsl.files import parse_json, refuse_folder, write_arrays

if TYPE_CHECKING:  # the annotations of Member; imported where they are used, as the commands load lazily

    import networkx as nx
    import numpy as np
    import torch

    from netdsl.train.augment import Preprocess
    from netdsl.train.evaluate import Tally

TRAIN_HELP = "train a net: the recipe from its `train` blocks, a --recipe file and flags (docs/training.md)"
EVAL_HELP = "measure trained weights on a data set: top-1, top-5, per-class accuracy, confusion matrix"


def add_commands(commands, positive) -> None:
    """The `train` and `eval` subcommands (`positive`: the CLI's whole-number type)."""
    from netdsl.train.recipe import add_flags

    train = commands.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP)
    train.add_argument("net", nargs="?", type=Path, help="the .net file (with --resume: the run's, by default)")
    train.add_argument("--recipe", type=Path, metavar="FILE", help="a file of `train` blocks, applied after the net's")
    train.add_argument("--out", type=Path, metavar="RUN", help="the run folder to write (default: runs/<net name>)")
    train.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue the run in this folder from its last checkpoint"
    )
    train.add_argument("--devices", metavar="MAP", help="logical devices to torch devices: gpu0=cuda:0,gpu1=cuda:1")
    train.add_argument(
        "--check-grads",
        action="store_true",
        help="compare autograd with finite differences (float64) on a few weights of every layer, then stop",
    )
    train.add_argument(
        "--find-lr",
        type=positive,
        nargs="?",
        const=100,
        metavar="STEPS",
        help="sweep the rate from 1e-7 to 10 over STEPS steps (default 100) of the recipe's training, print the "
        "loss against it and suggest an lr, then stop (nothing is written)",
    )
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_flags(train)

    evaluate = commands.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
    evaluate.add_argument(
        "net", type=Path, nargs="+",
        help="the .net file, or an .onnx model (with its weights); several, one for each --weights: an ensemble of "
        "different nets",
    )  # fmt: skip
    evaluate.add_argument(
        "--weights", type=Path, nargs="+", metavar="W",
        help="trained weights (or a run folder); several: an ensemble, the softmax averaged over the models (as "
        "the paper averaged five nets); for an .onnx model, default: its own",
    )  # fmt: skip
    evaluate.add_argument(
        "--data", required=True, metavar="DIR|LIST.txt|FILE.npz|digits", help="the images to measure on"
    )
    evaluate.add_argument(
        "--split",
        choices=("val", "train", "all"),
        default="val",
        help="which images: the validation ones (the default), the training ones, or all",
    )
    evaluate.add_argument("--views", type=int, choices=(1, 10), default=1, help="1: the centre; 10: the paper's views")
    evaluate.add_argument(
        "--scales",
        type=image_sizes,
        metavar="S1,S2,...",
        help="measure each image with its shorter side scaled to each size (the views of each), the softmax "
        "averaged over all: VGG's multi-scale test (e.g. 256,384,512 for a net trained at resize = (256, 512)); "
        "default: the size the weights were trained with",
    )
    evaluate.add_argument(
        "--dense",
        action="store_true",
        help="VGG's dense evaluation: each whole image (at each of --scales) through the net with its fc layers "
        "as convolutions, the class scores averaged over the positions, and over the mirror image where training "
        "flipped",
    )
    evaluate.add_argument(
        "--batch", type=positive, default=64, metavar="N",
        help="images per forward pass (with --dense, whole images of one size, as many as hold N inputs' pixels)",
    )  # fmt: skip
    evaluate.add_argument(
        "--val-fraction", type=float, default=None, metavar="X", help="as in training (default: the run's)"
    )
    evaluate.add_argument("--seed", type=seed_number, default=None, help="the split's seed (default: the run's)")
    evaluate.add_argument("--workers", type=int, default=0, metavar="N", help="data loading processes")
    evaluate.add_argument(
        "--skip-corrupt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip (and count) images that cannot be decoded, instead of stopping (default: the run's)",
    )
    evaluate.add_argument("--backend", choices=("torch", "triton"), default="torch", help="PyTorch ops or the kernels")
    evaluate.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="what the net computes in (default fp32); bf16 and fp16 as training does, under autocast with --dense",
    )  # fmt: skip
    evaluate.add_argument("--devices", metavar="MAP", help="logical devices to torch devices")
    evaluate.add_argument("--confusion", type=Path, metavar="OUT.png", help="draw the confusion matrix (matplotlib)")
    evaluate.add_argument(
        "--save", type=Path, metavar="OUT.npz",
        help="save every image's class probabilities, label, prediction and file (or array row), and the classes",
    )  # fmt: skip
    evaluate.add_argument(
        "--mistakes", type=positive, metavar="N", help="list the N images the net got wrong most confidently"
    )
    evaluate.add_argument(
        "--timeout", type=seconds, default=300.0, metavar="X",
        help="under torchrun (each process measuring its share), how long a process waits for the others (seconds)",
    )  # fmt: skip
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def train_command(args: argparse.Namespace) -> int:
    """`netdsl train`."""
    return _under_torchrun(_train, args)


def _under_torchrun(command, args: argparse.Namespace) -> int:
    """`command(args)`. Under torchrun a process ends with `os._exit` once its output is flushed: every
    file is written and every collective done by then, and the process group's threads, torn down while
    another rank exits or has died, abort the interpreter's exit ("terminate called without an active
    exception") and would turn a clean status into a crash."""
    from netdsl.train.world import World

    if not World.from_environment().distributed:
        return command(args)
    try:
        code = command(args)
    except (NetError, OSError) as error:
        said = error if isinstance(error, NetError) else environment_error(error)  # as main() says them
        if said is None:
            raise
        print(said.format(), file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(args: argparse.Namespace) -> int:
    from netdsl.lang.frontend import load_graph, load_recipe
    from netdsl.runtime.devices import parse_devices
    from netdsl.train.loop import StoppedError, Trainer
    from netdsl.train.recipe import resolve
    from netdsl.train.runs import RECIPE, ROOT, RunFolder

    if args.resume is not None:
        run = RunFolder(args.resume)
        run.create(resume=True)
        record, saved = run.saved_recipe()
        where = str(run.path / RECIPE)
        if args.net is None and not isinstance(record.get("net"), str):
            hint = "give the net: netdsl train NET.net --resume RUN"
            raise NetError(f"{RECIPE} does not name the run's net", where=where, hint=hint)
        net = args.net or _recorded_net(run.path, record["net"])
        if args.out is not None and args.out.resolve() != run.path.resolve():
            raise NetError("--out and --resume name different run folders", where="--out", hint="give one of them")
    else:
        if args.net is None:
            raise NetError("which net?", where="train", hint="netdsl train NET.net --data ... (or --resume RUN)")
        net, saved = args.net, None
    graph = load_graph(net)
    recipe_file = load_recipe(args.recipe) if args.recipe is not None else []
    recipe = resolve(graph.graph.get("recipe", []), recipe_file, args, saved=saved)
    if recipe.backend == "triton":
        import torch

        if not torch.cuda.is_available():
            use_interpreter()  # the same kernels, interpreted on the CPU
    if args.check_grads:
        return _check_grads(graph, recipe)
    if args.find_lr is not None:
        return _find_lr(net, recipe, args)
    if args.resume is None:
        run = RunFolder(args.out or ROOT / graph.graph["name"])
        run.check_new()
    trainer = Trainer(net, recipe, run, devices=parse_devices(args.devices), resume=args.resume is not None)
    leader = trainer.world.leader
    if leader:
        if args.resume is None:
            run.create(resume=False)
        run.remove_stale_temporaries()
        if saved is not None:
            for line in recipe.changes_from(saved):
                print(f"resume: {line}: the flag wins over the saved run", file=sys.stderr)
        run.write_recipe({"recipe": recipe.to_dict(), "net": _net_from(run.path, net), "netdsl_run": 1})
    trainer.world.barrier()
    try:
        summary = trainer.fit()
    except StoppedError as stop:
        if leader:
            print(
                f"stopped at step {stop.step:,}: checkpoint {stop.checkpoint}; continue with "
                f"netdsl train --resume {run.path}",
                file=sys.stderr,
            )
        return 128 + stop.signum
    if leader:
        best = (
            f"; best validation top-1 {100 * summary.best_top1:.2f}% (epoch {summary.best_epoch + 1})"
            if summary.best_top1 is not None
            else ""
        )
        if summary.final_top1 is not None:
            best += f"; the last weights {100 * summary.final_top1:.2f}% (step {summary.steps:,})"
        took = f"in {summary.seconds:,.1f} s"
        if summary.steps_run == summary.steps:
            trained = f"trained {summary.steps:,} steps {took}"
        elif summary.steps_run:
            trained = f"trained {summary.steps_run:,} more steps (to step {summary.steps:,}) {took}"
        else:
            trained = f"the run had already trained its {summary.steps:,} steps"
        quoted = {"net": shlex.quote(str(net)), "run": shlex.quote(str(run.path))}
        print(
            f"{trained}{best}\n"
            f"weights: {summary.weights}   run: {run.path}\n"
            f"try: netdsl run {quoted['net']} --weights {quoted['run']} --input IMAGE\n"
            f"     netdsl eval {quoted['net']} --weights {quoted['run']} {_measured_on(recipe)} --mistakes 10",
            file=sys.stderr,
        )
    return 0


def _measured_on(recipe) -> str:
    """The data `netdsl eval` measures a run's validation images on, as flags: the run's split of its data, or
    its val_data whole."""
    if recipe.val_data is not None:
        return f"--data {shlex.quote(str(recipe.val_data))} --split all"
    return f"--data {shlex.quote(str(recipe.data))}"


def _find_lr(net: Path, recipe, args: argparse.Namespace) -> int:
    from netdsl.runtime.devices import parse_devices
    from netdsl.train.lr_find import HIGH, LOW, RateFinder, report
    from netdsl.train.runs import RunFolder

    if args.resume is not None:
        raise NetError(
            "--find-lr starts a sweep of its own, not a run's continuation",
            where="--find-lr",
            hint="give the net (and --weights RUN to sweep from a run's weights)",
        )
    if args.find_lr < 5:
        raise NetError(f"--find-lr takes at least 5 steps, not {args.find_lr}", where="--find-lr", hint="--find-lr 100")
    finder = RateFinder(net, recipe, RunFolder(Path(os.devnull)), devices=parse_devices(args.devices))
    print(
        f"sweeping {recipe.optimizer}'s rate from {LOW:g} to {HIGH:g} over {args.find_lr} steps of batch "
        f"{recipe.batch} ({recipe.dtype}) on {len(finder.data.train):,} images; nothing is written",
        file=sys.stderr,
    )
    print(report(finder.sweep(args.find_lr)))
    return 0


def _check_grads(graph, recipe) -> int:
    import torch

    from netdsl.runtime.weights import init_weights
    from netdsl.tables import format_table
    from netdsl.train.diagnose import check_gradients
    from netdsl.train.loop import class_count

    classes = class_count(graph)
    shape = graph.nodes[graph.graph["inputs"][0]]["layer"].shape
    generator = torch.Generator().manual_seed(recipe.seed)
    batch = 4
    x = torch.randn((batch, *shape), generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=generator)
    start = init_weights(graph, recipe.seed, recipe.init)
    if recipe.weights is not None:  # where a fine-tuning run would start
        from netdsl.train.start import Start

        start.update(Start.read(recipe.weights, graph).values)
    checks = check_gradients(graph, start, x, y, seed=recipe.seed, recompute=recipe.recompute)
    rows = [
        (c.weight, str(list(c.index)), f"{c.autograd:.6e}", f"{c.numeric:.6e}", f"{c.error:.1e}") for c in checks
    ]
    print("\n".join(format_table(("weight", "index", "autograd", "finite difference", "error"), rows, left={0, 1})))
    worst = max(checks, key=lambda c: c.error)
    bad = [c for c in checks if c.error > GRADIENT_TOLERANCE]
    weights = len({c.weight for c in checks})
    print(f"{len(checks)} entries of {weights} weights; worst error {worst.error:.1e} ({worst.weight})")
    if bad:
        raise NetError(
            f"{len(bad)} gradients differ from finite differences by more than {GRADIENT_TOLERANCE:g}, first "
            f"`{bad[0].weight}` {list(bad[0].index)}",
            where="--check-grads",
            hint="a kink of relu or a tie in max-pooling can fool finite differences: try another --seed",
        )
    return 0


GRADIENT_TOLERANCE = 1e-5


def eval_command(args: argparse.Namespace) -> int:
    """`netdsl eval`: under torchrun each process measures its share of the images (every world.size-th), and
    the tallies are summed; rank 0 prints them."""
    return _under_torchrun(_eval_model, args)


def _eval_model(args: argparse.Namespace) -> int:
    """The models to measure, (net, weights) each: one net with every --weights file, or a net for each. An
    ONNX model is imported into a temporary folder (gone before a torchrun process exits) and measured with its
    own weights where --weights is not given; a .net file needs --weights."""
    import tempfile

    from netdsl.cli.onnx_input import imported_model

    nets, given = list(args.net), args.weights
    named = [str(net) for net in nets]  # as the user wrote them, for the figures of each model
    if given is not None and len(nets) not in (1, len(given)):
        raise NetError(
            f"{len(nets)} nets and {len(given)} weights files: which weights are whose is not said",
            where="--weights",
            hint="give one net for all the weights, or one weights file (or run folder) per net, in the same order",
        )
    with tempfile.TemporaryDirectory(prefix="netdsl-onnx-") as folder:
        own = []  # each net's own weights: an ONNX model's, else None
        for index, net in enumerate(nets):
            if net.suffix.lower() == ".onnx":
                imported = argparse.Namespace(weights=None)
                nets[index] = imported_model(net, Path(folder) / str(index), imported)
                own.append(imported.weights)
            else:
                own.append(None)
        if None in own:
            require_weights(given, "eval measures trained weights")
        if given is None:  # ONNX models, each with its own weights
            models = list(zip(nets, own, named, strict=True))
        elif len(nets) == 1:
            models = [(nets[0], path, str(path)) for path in given]
        else:
            models = [(net, path, f"{path} ({name})") for net, path, name in zip(nets, given, named, strict=True)]
        return _eval(args, models)


def _eval(args: argparse.Namespace, models: list[tuple[Path, Path, str]]) -> int:
    """Measures the models, (net, weights, what to call it) each: one alone, or several as an ensemble."""
    import numpy as np
    import torch

    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.devices import parse_devices
    from netdsl.train.data import check_workers, labels_by_name, loading_workers, open_data
    from netdsl.train.evaluate import Measured, Tally
    from netdsl.train.progress import Meter
    from netdsl.train.runs import RunFolder, weights_file
    from netdsl.train.world import World

    if args.dense and args.views != 1:
        raise NetError("--dense measures each whole image (and its mirror), not views of it", where="--views",
                       hint="leave out --views, or --dense")  # fmt: skip
    if args.backend == "triton" and not torch.cuda.is_available():
        use_interpreter()  # the same kernels, interpreted on the CPU
    world = World.from_environment()
    world.join(args.timeout)
    if args.confusion is not None:  # before the measuring, not by the write at its end
        refuse_folder(args.confusion, "--confusion")
    if args.save is not None:
        read = [path for net, weights, _ in models for path in (net, weights_file(weights))]
        output_file(args.save, "--save", [*read, Path(args.data)], ".npz", "an .npz file",
                    hint="eval saves several arrays by name: give a name ending in .npz")  # fmt: skip
    graphs = {net: load_graph(net) for net, _, _ in models}
    members = [Member.load(net, graphs[net], weights_file(path), name) for net, path, name in models]
    first = members[0]  # its run's split of the data is measured, and its classes name the data's
    classes, shape = first.classes, first.shape
    for member in members[1:]:
        if member.classes != classes:
            raise NetError(f"{member.net} scores {member.classes} classes, and {first.net} {classes}",
                           where=str(member.net), hint="an ensemble averages models of the same classes")  # fmt: skip
        if member.shape != shape and member.own is None:
            raise NetError(
                f"{member.net} takes {' x '.join(map(str, member.shape))} inputs, unlike {first.net}, and "
                f"{member.path} does not say how to prepare images for it",
                where=str(member.path),
                hint="give weights that netdsl train wrote (they carry their preprocessing)",
            )
    fraction, seed, skip = split_settings(args, first)
    check_workers(args.workers)
    workers, note = loading_workers(args.workers, sharing=world.local_size)  # under torchrun, the CPUs shared
    if note and world.leader:
        print(note, file=sys.stderr)
    # only the parts measured are looked at for unreadable files, and not at all where the weights' run scanned
    # the same files; the weights' own preprocessing stands for the data's statistics
    split = open_data(
        args.data, shape, num_outputs=classes, val_fraction=fraction if args.split == "val" else 0.0,
        seed=seed, skip_corrupt=skip, workers=workers, size=None if first.own is None else first.own.size,
        scan_record=RunFolder(run_folder(first.path)).read_scan(), world=world,
        statistics=any(member.own is None for member in members),
        check={"all": ("train", "val")}.get(args.split, (args.split,)),
        meter=lambda _, images: Meter(sys.stderr, images, "reading the images", world),  # for unreadable ones
    )  # fmt: skip
    if split.skipped and world.leader:
        print(f"skipped {len(split.skipped)} unreadable images (first: {split.skipped[0]})", file=sys.stderr)
    named = ensemble_classes([(member.path, member.own) for member in members])  # the weights' class names
    for member in members:
        member.preprocess = member.own or split.preprocess
        if member.own is None and world.leader:
            print(f"note: {member.path} carries no preprocessing; using the data's own mean", file=sys.stderr)
    parts = {"val": [split.val], "train": [split.train], "all": [split.train, split.val]}[args.split]
    parts = [part for part in parts if part is not None]
    if not parts:
        validated = _run_settings(first.path, first.metadata).get("val_data")
        hint = "use --split all, or --val-fraction"
        if validated is not None:
            hint = f"the run trained on all of it and validated on {validated}: --data {validated} --split all"
        raise NetError("the data has no validation images", where="--data", hint=hint)
    trained = named or list(first.preprocess.classes)  # the weights' class names
    relabel = labels_by_name(split.classes, trained, str(args.data))
    if relabel is not None and world.leader:
        print(
            f"note: the data's {len(split.classes)} classes are matched by name to the "
            f"{len(trained)} the weights were trained on",
            file=sys.stderr,
        )
    relabel = None if relabel is None else torch.tensor(relabel)
    if world.distributed:  # this process's share: every world.size-th image
        parts = [part.subset(np.arange(world.rank, len(part), world.size)) for part in parts]
    mapping = parse_devices(args.devices)
    groups: dict[tuple[str, tuple], list[int]] = {}  # models that prepare images alike (at the same sizes)
    for number, member in enumerate(members):
        sizes = tuple(args.scales or (member.preprocess.size,))
        groups.setdefault((member.preprocess.to_json(), sizes), []).append(number)
    title = "measuring" + (" (this process's share)" if world.distributed else "")
    shown = Meter(sys.stderr, sum(map(len, parts)) * sum(len(sizes) for _, sizes in groups), title, world)
    devices = {member: world.device_map(member.graph, mapping) if world.distributed else mapping for member in members}
    alike = [([members[number] for number in numbers], sizes) for (_, sizes), numbers in groups.items()]
    measure = _measure(args, alike, devices, workers, shown.advance)
    order = [number for numbers in groups.values() for number in numbers]  # the models as `measure` gives them
    tally = Tally(classes)  # the ensemble's (the one model's, with one)
    measured = Measured() if args.save or args.mistakes else None  # each image's figures, where they are shown
    for part in parts:
        labels = torch.from_numpy(part.labels)
        labels = labels if relabel is None else relabel[labels]
        probs = [None] * len(members)  # each model's, N x K
        for number, each in zip(order, measure(part), strict=True):
            probs[number] = each
            members[number].tally.add(each, labels)
        ensemble = torch.stack(probs).mean(dim=0)  # the softmax averaged over the models
        tally.add(ensemble, labels)
        if measured is not None:
            measured.add(part, ensemble, labels)
    shown.close()
    if world.distributed:
        tally = Tally.from_vector(classes, world.sum(tally.vector()))
        for member in members:
            member.tally = Tally.from_vector(classes, world.sum(member.tally.vector()))
        if measured is not None:
            measured = measured.gathered(world)
        if not world.leader:
            return 0
    names = trained or split.classes
    if len(members) > 1:  # each model alone, then the ensemble
        for member in members:
            alone = member.tally.report(names).splitlines()[0].split("   ", 1)[1]
            print(f"{member.name}: {alone}")
        print(f"ensemble of {len(members)}, the softmax averaged:")
    print(tally.report(names), end="")
    if args.mistakes:
        print("\n" + "\n".join(measured.mistakes(names, args.mistakes)))
    if args.save is not None:
        write_arrays(args.save, measured.arrays(names))
    if args.confusion is not None and not tally.plot_confusion(args.confusion, names):
        hint = "pip install 'netdsl[train]'"
        raise NetError("drawing the confusion matrix needs matplotlib", where="--confusion", hint=hint)
    return 0


@dataclass(eq=False)  # a model is itself: two records of the same weights are still two models
class Member:
    """One trained model `netdsl eval` measures (of an ensemble, or alone; `netdsl neighbours` probes one): its
    net (file and graph), the classes it scores and the input it takes, its weights file, the weights, their
    saved preprocessing (`own`; None: the data's, once read), and its own tally."""

    net: Path
    graph: nx.DiGraph
    classes: int
    shape: tuple[int, ...]
    path: Path
    name: str  # what the user called it: the weights (and the net, of several) or the ONNX model
    metadata: dict[str, str]
    weights: dict[str, np.ndarray]
    own: Preprocess | None
    tally: Tally
    preprocess: Preprocess | None = None  # own, or the data's

    @classmethod
    def load(cls, net: Path, graph, path: Path, name: str) -> Member:
        from netdsl.runtime.weights import load_weights, weights_metadata
        from netdsl.train.evaluate import Tally
        from netdsl.train.loop import class_count
        from netdsl.train.start import saved_preprocess

        classes, shape = class_count(graph), tuple(graph.nodes[graph.graph["inputs"][0]]["layer"].shape)
        metadata = weights_metadata(path)  # for the settings of the run that wrote them
        weights = load_weights(path, graph)
        own = saved_preprocess(path)
        if own is not None:
            own.check_fits(shape, str(path))
        return cls(net, graph, classes, shape, path, name, metadata, weights, own, Tally(classes))


def _measure(args, groups: list[tuple[list[Member], tuple[int, ...]]], devices: dict, workers: int, advance):
    """eval's measuring by the models of `groups` (each: models that prepare images alike, and the sizes it
    scales them to; `devices`: each model's): a function from a set of images (a Samples) to each model's N x K
    probabilities, the groups' models in order. Each image is decoded once for all the groups, sizes and
    models. Views (the centre, or the paper's ten): a pass holds --batch images' views at one size or fewer
    images' at several (the same views to a pass); --dense: whole images, those of one size together."""
    import torch

    from netdsl.ir.dtypes import torch_dtype
    from netdsl.runtime.net import Net
    from netdsl.train.evaluate import DenseScores, dense_probabilities_by, prepared_images, probabilities

    ways = [(group[0].preprocess, sizes) for group, sizes in groups]
    if args.dense:
        scorers = [[DenseScores(member.graph, member.weights, devices[member], member.preprocess.flip, args.backend,
                                args.dtype) for member in group] for group, _ in groups]  # fmt: skip

        def measure_dense(part) -> list[torch.Tensor]:
            dense = [(preprocess, sizes, each) for (preprocess, sizes), each in zip(ways, scorers, strict=True)]
            measured = dense_probabilities_by(part, dense, args.batch, workers, advance)
            return [probs for each in measured for probs in each]

        return measure_dense
    nets = [[Net(member.net, backend=args.backend, weights=member.weights, devices=devices[member],
                 dtype=args.dtype) for member in group] for group, _ in groups]  # fmt: skip
    softmax = [[member.graph.nodes[member.graph.graph["outputs"][0]]["layer"].op == "softmax" for member in group]
               for group, _ in groups]  # fmt: skip
    chunk = max(1, args.batch // max(len(sizes) for _, sizes in groups))

    def measure(part) -> list[torch.Tensor]:
        # each model's, in its group's list: a share of the images under torchrun may be empty
        probs = [[[torch.zeros((0, member.classes))] for member in group] for group, _ in groups]
        for made in prepared_images(part, ways, args.views, chunk, workers):
            for x, (_, sizes), *each in zip(made, groups, nets, softmax, probs, strict=True):
                views = x.flatten(0, 2).to(torch_dtype(args.dtype))  # N x sizes x views x C x H x W
                for net, is_softmax, into in zip(*each, strict=True):  # the softmax averaged over all the views
                    output = torch.as_tensor(net(views)).cpu()
                    into.append(probabilities(output, is_softmax, len(sizes) * args.views))
                advance(len(x) * len(sizes))
        return [torch.cat(each) for group in probs for each in group]

    return measure


def _net_from(run: Path, net: Path) -> str:
    """The net's path as recipe.json records it: relative to the run folder, so that `--resume` finds it from
    any working folder (and after the run folder and the net moved together)."""
    try:
        return os.path.relpath(Path(net).resolve(), run.resolve())
    except ValueError:  # another drive
        return str(Path(net).resolve())


def _recorded_net(run: Path, recorded: str) -> Path:
    """The net recipe.json names: relative to the run folder, or (as runs before that recorded it) to the
    working folder the run was started from."""
    beside = Path(os.path.normpath(run / recorded))
    return beside if beside.is_file() or not Path(recorded).is_file() else Path(recorded)


def split_settings(args: argparse.Namespace, model: Member) -> tuple[float, int, bool]:
    """How to split the data as the run that trained `model` did: its val_fraction (none where it validated on
    val_data: it trained on all of its data), seed and skip_corrupt, each unless the flag of that name says
    otherwise."""
    run = _run_settings(model.path, model.metadata)
    held = 0.0 if run.get("val_data") is not None else run.get("val_fraction", 0.1)
    fraction = args.val_fraction if args.val_fraction is not None else held
    seed = args.seed if args.seed is not None else run.get("seed", 0)
    skip = args.skip_corrupt if args.skip_corrupt is not None else bool(run.get("skip_corrupt", False))
    return fraction, seed, skip


def _run_settings(weights: Path, metadata: dict[str, str]) -> dict:
    """The settings of the run that wrote `weights` (empty when unknown): a checkpoint's own, in its header;
    else the recipe.json of the run folder that holds the file (weights.safetensors) or its checkpoints/."""
    from netdsl.train.checkpoint import STATE_KEY
    from netdsl.train.runs import RunFolder

    if STATE_KEY in metadata:
        with contextlib.suppress(ValueError):  # a damaged header: the run folder's copy
            state = parse_json(metadata[STATE_KEY])
            settings = _settings_of(state.get("recipe"), str(weights)) if isinstance(state, dict) else {}
            if settings:
                return settings
    folder = run_folder(weights)
    try:
        record = RunFolder(folder).read_recipe()
    except NetError:
        return {}
    return _settings_of(record.get("recipe") if isinstance(record, dict) else None, str(folder / "recipe.json"))


def run_folder(weights: Path) -> Path:
    """The run folder that would hold `weights`: its own (weights.safetensors), or its checkpoints/'s."""
    from netdsl.train.runs import CHECKPOINTS

    return weights.parent.parent if weights.parent.name == CHECKPOINTS else weights.parent


def _settings_of(recipe, where: str) -> dict:
    """Each setting's value in a recipe `Recipe.to_dict` wrote (empty when it is not one), checked as a resume
    checks them: a value the file cannot have been written with is an error naming it (`where`), not a split of
    the data that the run never made."""
    from netdsl.train.recipe import SETTINGS, Recipe

    settings = recipe.get("settings") if isinstance(recipe, dict) else None
    if not isinstance(settings, dict):
        return {}
    checked = Recipe.from_dict(recipe, where)
    return {name: getattr(checked, SETTINGS[name].attribute) for name in settings}
