"""`netdsl run`: inputs in, top classes out — a thin layer over `netdsl.runtime.net.Net`."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from tokenize import TokenError

import numpy as np

from netdsl.cli.flags import ensemble_classes, plan_options
from netdsl.errors import NetError, os_hint
from netdsl.files import refuse_folder, refuse_overwriting, write_array, write_arrays
from netdsl.ir.dtypes import torch_dtype
from netdsl.tables import format_bytes, format_table

# The mean RGB value of ImageNet's training images (0-255): the paper subtracts the mean activity.
IMAGENET_MEAN = (123.68, 116.78, 103.94)
RESIZE = 256  # the paper's shorter side


def default_preprocess(shape: tuple[int, ...]):
    """How `netdsl run` prepares an image for weights that carry no preprocessing of their own: as the paper
    did, the shorter side scaled to 256, the centre cropped to the net's input, ImageNet's mean subtracted."""
    from netdsl.train.augment import Preprocess, image_mode

    channels, height, width = shape
    image_mode(channels, "--input")  # a net images cannot feed: said before any file is read
    mean = IMAGENET_MEAN if channels == 3 else (float(np.mean(IMAGENET_MEAN)),)
    return Preprocess(size=RESIZE, crop=(height, width), channels=channels, mean=mean)


def saved_preprocess(weights: Path | None):
    """The preprocessing trained weights were saved with (`netdsl train`), or None (no file: default weights)."""
    if weights is None or not weights.is_file():
        return None
    from netdsl.train.start import saved_preprocess as recorded

    return recorded(weights)


def _prepared_image(path: Path, preprocesses: list, views: int, scales) -> list[np.ndarray]:
    """An image as the net reads it by each of `preprocesses` (of one number of channels), the file decoded once
    for all: its shorter side scaled to each of `scales` in turn (default: the preprocessing's own size), and
    `views` of it at each (`Preprocess.views`): scales*views x C x H x W."""
    from netdsl.train.augment import open_image

    try:
        image = open_image(path, preprocesses[0].channels)
        made = []
        for preprocess in preprocesses:
            sizes = scales or (preprocess.size,)
            made.append(np.concatenate([replace(preprocess, size=size).views(image, views) for size in sizes]))
        return made
    except NetError as error:
        if error.span is None and error.where is None:  # what is wrong with an image names it
            error.where = str(path)
        raise


def read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise NetError(
            f"cannot read the labels in {path} ({error})",
            where=str(path),
            hint="one class name per line, in class order",
        ) from None


def _read_npy(path: Path, image_suffixes) -> np.ndarray:
    """A .npy file's array, read once; never a pickle (an object array is refused, not loaded), and never an
    allocation its header promises but its bytes do not hold."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below, whichever way reading ends
    except FileNotFoundError as error:
        raise NetError(f"no such file: {path}", where=str(path), hint=os_hint(error)) from None
    except OSError as error:
        raise NetError(f"cannot read {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)) from None
    with handle:
        if handle.read(6) != b"\x93NUMPY":
            raise NetError(
                f"{path} is neither an image nor a .npy array",
                where=str(path),
                hint=f"give images ({', '.join(sorted(image_suffixes))}), folders or lists (.txt) of them, or "
                "arrays saved with numpy.save",
            )
        try:
            handle.seek(0)
            header = np.lib.format
            version = header.read_magic(handle)
            read = header.read_array_header_1_0 if version == (1, 0) else header.read_array_header_2_0
            shape, _, dtype = read(handle)
            need, have = math.prod(shape) * dtype.itemsize, os.fstat(handle.fileno()).st_size - handle.tell()
            if not dtype.hasobject and need > have:
                raise NetError(
                    f"{path} is cut short: its header says {' x '.join(map(str, shape))} {dtype} values "
                    f"({need:,} bytes), and {have:,} bytes follow it",
                    where=str(path),
                    hint="save it again with numpy.save",
                )
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        except (ValueError, TokenError) as error:  # numpy tokenizes a header it cannot parse as it is
            if "allow_pickle" in str(error):
                raise NetError(
                    f"{path} holds Python objects, not numbers; netdsl does not load pickled data",
                    where=str(path),
                    hint="save a float or integer array with numpy.save",
                ) from None
            raise NetError(
                f"{path} is not a readable .npy array ({error})", where=str(path), hint="save it again with numpy.save"
            ) from None
        except (OSError, EOFError) as error:
            raise NetError(
                f"{path} is not a readable .npy array ({error})", where=str(path), hint="save it again with numpy.save"
            ) from None


def input_files(paths: list[Path] | None) -> list[Path] | None:
    """--input's files: each file as named, for a folder the images in it and its subfolders (sorted; names
    starting with a dot left out), and for an image list (LIST.txt) the images it names, in its order (their
    classes, where it gives them, passed over). A folder without images is an error naming it."""
    from netdsl.train.augment import IMAGE_SUFFIXES, images_in
    from netdsl.train.listing import is_image_list, list_images

    if not paths:
        return paths
    files = []
    for path in paths:
        if is_image_list(path):
            files += map(Path, list_images(path))
            continue
        found = images_in(path) if path.is_dir() else [path]
        if not found:
            raise NetError(
                f"the folder {path} holds no images",
                where=str(path),
                hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}; or name the files themselves",
            )
        files += found
    return files


def input_passes(paths: list[Path], shape: tuple[int, ...], preprocesses: list, views: int = 1, scales=None,
                 rows: int | None = None, names: list | None = None):  # fmt: skip
    """The inputs of `paths`, images and .npy arrays (one image or a batch each), as float32 batches of `shape`
    images a pass of `rows` rows at a time (None: all in one; the last pass may hold fewer): for each pass, a
    list of its batch as each of `preprocesses` prepares it (how each model of an ensemble prepares images;
    None: the paper's), each image decoded once for all, an array taken as it is by every model. With `views`
    > 1 each image gives that many rows (the paper's ten views), and with `scales` that many at each size
    (`_prepared_image`): then only images are taken (`require_images`). Each file is read when its rows are
    next (the memory held: a pass's and one file's, once for each preprocessing, whatever the models sharing
    it), and the names of its inputs are added to `names`: its path, or for a batch in an array, the path and
    the row (`x.npy[3]`)."""
    if views > 1 or scales is not None:
        require_images(paths, "--views" if views > 1 else "--scales")
    resolved = [each or default_preprocess(shape) for each in preprocesses]
    keys = [each.to_json() for each in resolved]
    first = {}  # each preprocessing (by its JSON): the first model that prepares images so
    for number, key in enumerate(keys):
        first.setdefault(key, number)
    ways, pick = [resolved[number] for number in first.values()], [list(first).index(key) for key in keys]
    pending, count = [], 0  # pending: the rows read and not yet passed on, a list (a batch per way) per file
    for path in paths:
        made, named = _read_input(path, shape, ways, views, scales)
        if names is not None:
            names += named
        pending.append(made)
        count += len(made[0])
        if rows is not None and count >= rows:
            joined = [np.concatenate(each) for each in zip(*pending, strict=True)]
            whole = count - count % rows
            for start in range(0, whole, rows):
                yield [joined[way][start : start + rows] for way in pick]
            pending, count = [[each[whole:] for each in joined]], count - whole
    if count:
        joined = [np.concatenate(each) for each in zip(*pending, strict=True)]
        yield [joined[way] for way in pick]


def _read_input(path: Path, shape: tuple[int, ...], preprocesses: list, views: int, scales):
    """One --input file's rows, a batch for each of `preprocesses`, and their names."""
    from netdsl.train.augment import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _prepared_image(path, preprocesses, views, scales), [str(path)]
    array = _read_npy(path, IMAGE_SUFFIXES)
    if array.dtype.kind not in "fiu":
        raise NetError(
            f"{path} holds {array.dtype} values, not numbers",
            where=str(path),
            hint="save the image's pixels as numbers: numpy.save(path, pixels.astype(numpy.float32))",
        )
    one = tuple(array.shape) == shape
    if one:
        array = array[None]
    if tuple(array.shape[1:]) != shape:
        want = " x ".join(map(str, shape))
        raise NetError(
            f"{path} {'has shape ' + ' x '.join(map(str, array.shape)) if array.ndim else 'holds a single number'}"
            f", but the net takes {want} images",
            where=str(path),
            hint=f"one image of {want}, or a batch N x {want}",
        )
    named = [str(path)] if one else [f"{path}[{row}]" for row in range(len(array))]
    return [array.astype(np.float32)] * len(preprocesses), named


def _whole(passes) -> list[np.ndarray]:
    """The passes of `input_passes` joined: each preprocessing's batch of all the inputs."""
    passes = list(passes)
    if not passes:
        raise _no_inputs()
    return [np.concatenate(each) for each in zip(*passes, strict=True)]


def _no_inputs() -> NetError:
    return NetError("the inputs hold no images", where="--input", hint="give images, or arrays of N >= 1 images")


def require_images(paths: list[Path] | None, flag: str) -> None:
    """NetError (on `flag`: --dense, --views or --scales, which prepare image files) unless `paths` are images."""
    from netdsl.train.augment import IMAGE_SUFFIXES

    if not paths:
        raise NetError(f"{flag} takes images", where=flag, hint="give them with --input")
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise NetError(
                f"{flag} takes images, and {path} is not one",
                where=flag,
                hint=f"{flag} prepares image files; give images (.jpg, .png, ...) or leave {flag} out",
            )


def run_command(path: Path, args: argparse.Namespace) -> int:
    import torch

    from netdsl.train.runs import weights_file

    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the same kernels, interpreted on the CPU
    path, dtype = resolve_build_dir(path, args)
    shape = _input_shape(path)
    args.input = input_files(args.input)
    models = [weights_file(each) for each in (args.weights if isinstance(args.weights, list) else [args.weights])]
    args.weights = models[0]  # one weights file, or the first of an ensemble
    if len(models) > 1:
        _refuse_in_ensemble(args, len(models))
    if args.save:  # before the run: outputs written over an input would destroy it
        refuse_folder(args.save, "--save")
        given = getattr(args, "given", None)  # the ONNX model or build folder named, if that is what it was
        read = [path, given, *models, args.tuning, args.labels, *(args.input or [])]
        if given is not None and Path(given).is_dir():
            read += [Path(given) / "plan.json", *Path(given).glob("kernels/*")]
        refuse_overwriting(args.save, read, "--save")
    saved = [saved_preprocess(model) for model in models]  # each model's (None: the paper's, `default_preprocess`)
    for model, own in zip(models, saved, strict=True):
        if own is not None:
            own.check_fits(shape, str(model))
    labels = read_labels(args.labels) or ensemble_classes(list(zip(models, saved, strict=True)))
    heading = f"ensemble of {len(models)}, the softmax averaged: {', '.join(map(str, models))}" if models[1:] else None
    if args.dense:
        require_images(args.input, "--dense")
        outputs = _dense_outputs(path, dtype, [own or default_preprocess(shape) for own in saved], args, models)
        report(outputs, labels, args, [str(file) for file in args.input], heading)
        return 0
    views = args.views * len(args.scales or (None,))  # the rows each image gives: its views at each scale
    if args.input or args.views > 1 or args.scales:  # each model's inputs, as it prepares images, a pass at a time
        names = []
        rows = None if args.time or args.distributed else args.batch  # these two read every input first
        passes = input_passes(args.input or [], shape, saved, args.views, args.scales, rows, names)
    else:
        flag = "--random" if args.random else "--batch"
        drawn = random_inputs(args.random or args.batch or 1, shape, args.seed, flag)
        step = args.batch or len(drawn)
        passes, names = ([drawn[start : start + step]] * len(models) for start in range(0, len(drawn), step)), None
    net = step_times = x = None
    start = time.perf_counter()
    if args.distributed:
        x = _whole(passes)[0]
        if args.cuda_graph:
            raise NetError(
                "CUDA-graph capture runs in one process", where="--cuda-graph", hint="leave out --distributed"
            )
        if args.merge_towers:
            raise NetError(
                "--merge-towers runs the towers on one device; --distributed runs one process per device",
                where="--merge-towers",
                hint="leave out one of the two",
            )
        if args.batch and args.batch < len(x):
            raise NetError(
                f"--distributed runs all {len(x)} inputs in one pass; it does not split them into passes of "
                f"{args.batch}",
                where="--batch",
                hint="leave out --batch, or give at most that many inputs",
            )
        y = _run_distributed(path, torch.from_numpy(x).to(torch_dtype(dtype)), dtype, args)
        if y is None:
            return 0  # the rank that owns the output prints it
    else:
        try:
            if args.time:  # every pass, after a warm-up of them all: the inputs read first
                x = _whole(passes)[0]
                net, y, step_times, start = _timed_run(path, x, dtype, args)
            else:
                y = _run_passes(path, passes, dtype, args, models)
        except NetError as error:  # Net's errors name its keyword arguments; here they are flags
            error.where = _FLAGS.get(error.where, error.where)
            raise
    seconds = time.perf_counter() - start
    outputs = {name: value.float().cpu() for name, value in (y.items() if isinstance(y, dict) else [(None, y)])}
    if views > 1:  # the paper's test: each image's views (at each scale), softmax averaged (class scores only)
        from netdsl.train.evaluate import probabilities

        softmax = len(models) > 1 or _ends_in_softmax(path)  # an ensemble's: probabilities already
        outputs = {
            name: probabilities(value, softmax, views) if is_scores(value) else value[::views]
            for name, value in outputs.items()
        }
    report(outputs, labels, args, names, heading)
    if args.time:
        count = len(next(iter(outputs.values())))
        print(
            f"{count} input(s) in {seconds * 1e3:.1f} ms ({args.backend} backend"
            f"{', ' + dtype}{', steps timed one at a time' if net else ', distributed'})"
        )
        if net is not None:
            ran = len(x)  # the rows that ran: with --views, each input's views
            largest = min(args.batch or ran, ran)  # the largest pass's batch
            print("\n".join(_time_tables(net, step_times, largest)))
    return 0


def report(
    outputs: dict, labels: list[str] | None, args: argparse.Namespace, inputs: list[str] | None, heading=None
) -> None:
    """Prints `heading` (where there is one) and each output (`describe_output`; `inputs`: the names of the
    inputs), and saves them all where --save says."""
    if heading:
        print(heading)
    for name, value in outputs.items():
        print("\n".join(describe_output(name, value, labels, args.top, inputs)))
    if args.save:
        save_outputs(args.save, outputs, inputs)


def _run_passes(path: Path, passes, dtype: str, args: argparse.Namespace, models: list):
    """The inputs of `passes` (`input_passes`) through the net with each weights file of `models`, a pass at a
    time: one model's outputs; an ensemble's, the softmax of each model's class scores averaged over them, as
    the paper averaged the predictions of several nets (rows as the inputs': views are averaged after)."""
    import torch

    from netdsl.train.evaluate import probabilities

    nets = [_local_net(path, dtype, args, model) for model in models]
    outputs = [[] for _ in nets]
    for xs in passes:
        for net, x, into in zip(nets, xs, outputs, strict=True):
            into.append(net(torch.from_numpy(x).to(torch_dtype(dtype))))
    if not outputs[0]:
        raise _no_inputs()
    if any(out.is_cuda for each in outputs for out in each if isinstance(out, torch.Tensor)):
        torch.cuda.synchronize()
    ys = [_join(each) for each in outputs]
    if len(ys) == 1:
        return ys[0]
    softmax, total = _ends_in_softmax(path), 0
    for y in ys:
        if isinstance(y, dict) or not is_scores(y):
            raise NetError(
                "an ensemble averages class scores, and the net's output is not one (N x K)",
                where="--weights",
                hint="give one weights file to see a net's maps",
            )
        total = total + probabilities(y.float().cpu(), softmax)
    return total / len(ys)


def _refuse_in_ensemble(args: argparse.Namespace, count: int) -> None:
    """The flags an ensemble of several weights files cannot honour: it runs the nets one after another, in
    this process."""
    for flag, chosen in {"--distributed": args.distributed, "--time": args.time}.items():
        if chosen:
            raise NetError(
                f"{flag} runs one net, and --weights gives {count}",
                where=flag,
                hint=f"leave out {flag}, or give one weights file",
            )


def _dense_outputs(path: Path, dtype: str, preprocesses: list, args: argparse.Namespace, models: list) -> dict:
    """--dense: each image whole, its shorter side scaled to each of --scales (default: each model's own size),
    through the net with its fc layers as convolutions (VGG's dense evaluation, netdsl.train.evaluate.DenseScores),
    with each weights file of `models` (None: the default weights), prepared as `preprocesses` says (each
    model's): {None: N x K probabilities, averaged over the models}. Images of one size share a pass, as many as
    hold the pixels of --batch net inputs (default: all of them); each image is decoded once for all the
    scales and models."""
    import torch

    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.devices import parse_devices
    from netdsl.runtime.weights import init_weights, load_weights
    from netdsl.train.data import ImageFiles
    from netdsl.train.evaluate import DenseScores, dense_probabilities_by

    _refuse_with_dense(path, dtype, args)
    graph, devices = load_graph(path), parse_devices(args.devices)
    ways: dict[str, tuple] = {}  # the models that prepare images alike: (preprocessing, scales, their scorers)
    for model, preprocess in zip(models, preprocesses, strict=True):
        weights = init_weights(graph, seed=args.seed, scheme=args.init) if model is None else load_weights(model, graph)
        try:
            scorer = DenseScores(graph, weights, devices, preprocess.flip, args.backend, dtype)
        except NetError as error:
            error.where = _FLAGS.get(error.where, error.where)
            raise
        way = ways.setdefault(preprocess.to_json(), (preprocess, tuple(args.scales or (preprocess.size,)), []))
        way[2].append(scorer)
    images = ImageFiles(args.input, np.zeros(len(args.input)), preprocesses[0])
    images.unreadable_hint = None  # the decoder's own: run has no --skip-corrupt
    probs = dense_probabilities_by(images, list(ways.values()), batch=args.batch or len(args.input))
    return {None: torch.stack([each for way in probs for each in way]).mean(dim=0)}


def _refuse_with_dense(path: Path, dtype: str, args: argparse.Namespace) -> None:
    """The flags --dense cannot honour: it builds a net for each size of image, in fp32 (or bf16 or fp16 under
    autocast), in this process, from the .net file (a build folder's plan is for the net's own input size)."""
    from netdsl.compiler.plan import PLAN_OPTIONS

    given = getattr(args, "given", None)
    if given is not None and Path(given).is_dir():
        raise NetError(
            f"--dense builds a net for each size of image, and {given} is compiled for one",
            where="--dense",
            hint=f"give the net it was compiled from: netdsl run {path} --dense",
        )
    conflicts = {
        "--views": args.views > 1, "--random": args.random is not None, "--distributed": args.distributed,
        "--cuda-graph": args.cuda_graph, "--time": args.time, "--dtype": dtype == "tf32",
        **{"--" + name.replace("_", "-"): _meaning(name, getattr(args, name)) != _meaning(name, None)
           for name in PLAN_OPTIONS},
    }  # fmt: skip
    for flag, chosen in conflicts.items():
        if chosen:
            raise NetError(
                f"{flag} does not apply to --dense",
                where=flag,
                hint="--dense runs each whole image through a net built for its size, in fp32, bf16 or fp16, in "
                f"one process; leave out {flag} (or --dense)",
            )


def random_inputs(count: int, shape: tuple[int, ...], seed: int, flag: str) -> np.ndarray:
    """`count` random images of `shape` (standard normal, seeded); a batch the machine cannot hold is an
    error naming its size, before anything is allocated."""
    need = count * math.prod(shape) * 4
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    if memory and need > memory // 2:
        raise NetError(
            f"{count:,} random images of {' x '.join(map(str, shape))} take {format_bytes(need)}, more than half "
            f"of this machine's {format_bytes(memory)}",
            where=flag,
            hint="ask for fewer images; to time large batches, use --batch with a few passes",
        )
    try:
        return np.random.default_rng(seed).standard_normal((count, *shape), dtype=np.float32)
    except MemoryError:
        raise NetError(
            f"{count:,} random images ({format_bytes(need)}) cannot be allocated",
            where=flag,
            hint="ask for fewer (--random N) or a smaller --batch",
        ) from None


def is_scores(value) -> bool:
    """Whether an output (N x ...) holds one score per class: N x K, or N x K x 1 x 1."""
    return value.dim() == 2 or (value.dim() == 4 and tuple(value.shape[2:]) == (1, 1))


def describe_output(
    name: str | None, value, labels: list[str] | None, top: int, inputs: list[str] | None = None
) -> list[str]:
    """The top classes of each input (named by `inputs`, where given: a file) for class scores; for a map, its
    shape and a short summary."""
    title = f"output {name}: " if name is not None else ""
    if not is_scores(value):
        shape = " x ".join(map(str, value.shape))
        return [
            f"{title}N x C x H x W = {shape}: mean {float(value.mean()):.4g}, std {float(value.std()):.4g}, "
            f"min {float(value.min()):.4g}, max {float(value.max()):.4g}"
        ]
    scores = value.reshape(value.shape[0], -1)
    k = min(top, scores.shape[1])
    values, indices = scores.topk(k, dim=1)
    lines = [f"{title}{value.shape[0]} x {scores.shape[1]} scores"] if name is not None else []
    for i in range(scores.shape[0]):
        ranked = ", ".join(f"{_label(labels, int(c))}: {float(v):.4g}" for v, c in zip(values[i], indices[i]))
        source = f" ({inputs[i]})" if inputs is not None else ""
        lines.append(f"input {i}{source}: top {k}: {ranked}")
    return lines


def save_outputs(path: Path, outputs: dict, inputs: list[str] | None = None) -> None:
    """Each output with its full shape (class scores as N x K): one output as .npy, or every output by name
    in an .npz (the only way for several), with `inputs`, the inputs' names (each row's file), as `files`
    where no output takes that name."""
    arrays = {name: (value.flatten(1) if is_scores(value) else value).numpy() for name, value in outputs.items()}
    if path.suffix.lower() == ".npz":
        named = {name or "output": value for name, value in arrays.items()}
        if inputs is not None and "files" not in named:
            named["files"] = np.array(inputs)
        write_arrays(path, named)
        return
    if len(arrays) > 1:
        raise NetError(
            f"the net has {len(arrays)} outputs ({', '.join(arrays)}), and a .npy file holds one",
            where="--save",
            hint=f"save them all by name: --save {path.with_suffix('.npz')}",
        )
    write_array(path, next(iter(arrays.values())))


# Net's errors name its keyword arguments; on the command line they are flags.
_FLAGS = {"devices": "--devices", "backend": "--backend", "cuda_graph": "--cuda-graph", "batch": "--batch",
          "dtype": "--dtype", "weights": "--weights", "layout": "--layout", "precision": "--precision",
          "merge_towers": "--merge-towers", "space_to_depth": "--space-to-depth", "tuning": "--tuning"}  # fmt: skip


def _local_net(path: Path, dtype: str, args: argparse.Namespace, weights: Path | None):
    """The net built in this process as the flags say, with `weights` (None: the default ones); a tuning file
    from another device a note, and a build folder's kernels edited since it was compiled a warning."""
    from netdsl.runtime.devices import parse_devices
    from netdsl.runtime.net import Net, TuningWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TuningWarning)
        net = Net(
            path,
            backend=args.backend,
            devices=parse_devices(args.devices),
            dtype=dtype,
            weights=weights,
            seed=args.seed,
            init=args.init,
            progress=sys.stderr if sys.stderr.isatty() else None,  # a progress bar through the first run
            cuda_graph=args.cuda_graph,
            **plan_options(args),
        )
    for warning in caught:  # a tuning from another device is a note here; anything else as Python shows it
        if issubclass(warning.category, TuningWarning):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    given = getattr(args, "given", None)
    if given is not None and Path(given).is_dir():
        for line in stale_kernels(Path(given), net.compiled.kernels, path, dtype):
            print(line, file=sys.stderr)
    return net


def _timed_run(path: Path, x: np.ndarray, dtype: str, args: argparse.Namespace):
    """--time: the inputs through the net in passes of --batch, on a GPU after a warm-up run of them all (Triton
    compiles each kernel on its first launch), each step timed: (net, outputs, step times, start time)."""
    import torch

    net = _local_net(path, dtype, args, args.weights)
    chunks = torch.from_numpy(x).to(torch_dtype(dtype)).split(args.batch or len(x))
    if any(device.type == "cuda" for device in net.devices.values()):
        for chunk in chunks:
            net(chunk)
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs, step_times = [], {}
    for chunk in chunks:
        out, times = net.profile(chunk)
        step_times = {name: step_times.get(name, 0.0) + ms for name, ms in times.items()}
        outputs.append(out)
    if any(out.is_cuda for out in outputs if isinstance(out, torch.Tensor)):
        torch.cuda.synchronize()
    return net, _join(outputs), step_times, start


def resolve_build_dir(path: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """`netdsl run` takes a .net file or a build folder of `netdsl compile`: the folder's plan.json names
    the net it was compiled from (relative to the folder), the dtype and the compile-time options, which the
    run takes (into `args`) and its flags may not contradict. Returns the net and the dtype."""
    if not path.is_dir():
        return path, args.dtype or "fp32"
    from netdsl.compiler.plan import read_plan_source

    source, built, options = read_plan_source(path)
    if args.dtype is not None and args.dtype != built:
        raise NetError(
            f"{path} was compiled for {built}, not {args.dtype}",
            where="--dtype",
            hint=f"leave --dtype out, or compile again: netdsl compile {source} -o {path} --dtype {args.dtype}",
        )
    for name, value in options.items():
        given = getattr(args, name)
        if given is None or given is False:  # not given (an on/off flag cannot be given as off): the build's
            setattr(args, name, value)
            continue
        if name == "tuning":  # recorded by its absolute path (flags.plan_options)
            given = str(Path(given).resolve())
        if _meaning(name, given) != _meaning(name, value):
            flag = "--" + name.replace("_", "-")
            raise NetError(
                f"{path} was compiled with {flag} {_shown(value)}, not {_shown(given)}",
                where=flag,
                hint=f"leave {flag} out, or compile again with the flags you want: netdsl compile {source} -o {path}",
            )
    return source, built


def stale_kernels(folder: Path, kernels: dict[str, str], source: Path, dtype: str) -> list[str]:
    """A note when a build folder's `kernels/` is not what its plan.json compiles to (`kernels`: file name ->
    source): a kernel edited by hand, or a compile stopped between swapping in its kernels and renaming its
    plan.json into place. The run goes on with the kernels compiled from the plan's net; the note says so."""
    on_disk = {file.name: file for file in sorted((folder / "kernels").glob("*.py"))}
    differ = sorted(name for name, text in kernels.items() if name in on_disk and _text(on_disk[name]) != text)
    missing = sorted(set(kernels) - set(on_disk))
    extra = sorted(set(on_disk) - set(kernels))
    if not (differ or missing or extra):
        return []
    parts = [
        f"{len(names)} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for names, what in [(differ, "differ"), (missing, "missing"), (extra, "not the plan's")]
        if names
    ]
    return [
        f"note: {folder / 'kernels'} is not what {folder / 'plan.json'} compiles to ({'; '.join(parts)}): "
        "edited by hand, or a compile stopped part-way",
        f"  this run uses the kernels compiled from {source}; to bring the folder up to date: "
        f"netdsl compile {source} -o {folder} --dtype {dtype} (and the other flags plan.json records)",
    ]


def _text(file: Path) -> str | None:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _meaning(name: str, value: object) -> object:
    """An option's value with its default spelt out (a build records None for the default): so --precision
    ieee matches a build without a precision, --layout auto one without a layout."""
    from netdsl.compiler.passes import Options
    from netdsl.ir.dtypes import FP32_DEFAULT_PRECISION

    if value is not None:
        return value
    return FP32_DEFAULT_PRECISION if name == "precision" else getattr(Options(), name)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "the default" if value is None else str(value)


def _join(outputs: list):
    import torch

    if isinstance(outputs[0], dict):
        return {name: torch.cat([out[name] for out in outputs]) for name in outputs[0]}
    return torch.cat(outputs)


def _ends_in_softmax(path: Path) -> bool:
    from netdsl.lang.frontend import load_graph

    graph = load_graph(path)
    return graph.nodes[graph.graph["outputs"][0]]["layer"].op == "softmax"


def _input_shape(path: Path) -> tuple[int, ...]:
    from netdsl.ir import layer
    from netdsl.lang.frontend import load_graph

    graph = load_graph(path)
    if len(graph.graph["inputs"]) != 1:
        raise NetError("`netdsl run` feeds nets with one input", where=str(path), hint="use netdsl.load from Python")
    return layer(graph, graph.graph["inputs"][0]).shape


def _run_distributed(path: Path, x, dtype: str, args: argparse.Namespace):
    """This process's partition, under torchrun: the output on the rank that owns it, else None."""
    import torch.distributed as dist

    from netdsl.runtime.distributed import run_distributed

    try:
        options = {name: value for name, value in plan_options(args).items() if name != "merge_towers"}  # refused
        y = run_distributed(
            path, x, backend=args.backend, weights=args.weights, seed=args.seed, init=args.init, dtype=dtype, **options
        )
        if dist.is_initialized():
            dist.barrier()  # every rank's sends are received before the group goes away
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return y


def _label(labels: list[str] | None, index: int) -> str:
    return labels[index] if labels and index < len(labels) and labels[index] else str(index)


def _time_tables(net, step_times: dict[str, float], batch: int) -> list[str]:
    steps = net.program.graph["partitions"]
    rows = [
        (device, f"{sum(step_times[n] for n in names):,.2f}", format_bytes(arena), format_bytes(weights))
        for device, names in steps.items()
        for arena, weights in [net.memory(batch)[device]]
    ]
    lines = ["", *format_table(("device", "ms", "activations (arena)", "weights"), rows, left={0}), ""]
    kinds = {name: net.program.nodes[name]["step"].kind for name in step_times}
    rows = [(name, kinds[name], f"{ms:,.3f}") for name, ms in step_times.items() if kinds[name] != "view"]
    return lines + format_table(("step", "kind", "ms"), rows, left={0, 1})
