"""Checkpoints: everything a training run needs to continue exactly where it stopped, in one file.

A checkpoint is one safetensors file, written atomically (a temporary file renamed into place, so a run
killed while writing leaves the previous checkpoint whole):

- the weights under netdsl's own names (`conv1@gpu0.weight`, `s1.batchnorm.running_mean`): the file
  is also a weights file, `netdsl run --weights RUN/checkpoints/last.ckpt` reads it;
- the optimizer's state under `optim:<weight name>:<key>` (momentum buffers: `velocity`);
- every random number generator's state under `rng:<name>` (torch's CPU generator, each CUDA device's);
- with `ema`, the optimizer's own weights under `live:<name>`, the average of them under the weights' names
  (netdsl.train.average);
- in the file's metadata, as JSON: `netdsl.checkpoint` (format, epoch, step, position in the epoch, the
  loss and accuracy sums of the epoch and of the log interval so far, schedule state, the best
  checkpoints so far, the resolved recipe, the net's fingerprint) and
  `netdsl.preprocess` (what `netdsl run` and `netdsl eval` apply to an image).

Names holding a `:` cannot be weight names (the language's names never hold one), which is how a
weights reader tells the two apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from netdsl.errors import NetError, os_hint
from netdsl.files import parse_json, sorted_safetensors_header, write_atomic_bytes
from netdsl.tables import format_shape

FORMAT = 1
STATE_KEY = "netdsl.checkpoint"
PREPROCESS_KEY = "netdsl.preprocess"
OPTIM_PREFIX = "optim:"
RNG_PREFIX = "rng:"
LIVE_PREFIX = "live:"
EARLIER_CHECKPOINT = "an earlier checkpoint of the run may still be whole (checkpoints/)"  # the damaged one's hint


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # netdsl name -> tensor (float32, CPU)
    optimizer: dict[str, dict[str, torch.Tensor]]  # weight name -> its optimizer state
    rng: dict[str, torch.Tensor]  # generator name -> state
    state: dict = field(default_factory=dict)  # JSON: epoch, step, schedule, best, recipe, ...
    preprocess: str | None = None  # JSON of netdsl.train.data.Preprocess
    live: dict[str, torch.Tensor] = field(default_factory=dict)  # with `ema`: the optimizer's weights (`weights`:
    # their average)


def save_checkpoint(paths: list[Path], checkpoint: Checkpoint) -> None:
    """Writes `checkpoint` to each of `paths` atomically; NetError (naming the file) when the disk refuses."""
    from safetensors.torch import save

    tensors = {name: _plain(value) for name, value in checkpoint.weights.items()}
    for name, state in checkpoint.optimizer.items():
        for key, value in state.items():
            tensors[f"{OPTIM_PREFIX}{name}:{key}"] = _plain(torch.as_tensor(value))
    for name, value in checkpoint.rng.items():
        tensors[f"{RNG_PREFIX}{name}"] = _plain(value)
    for name, value in checkpoint.live.items():
        tensors[f"{LIVE_PREFIX}{name}"] = _plain(value)
    metadata = {STATE_KEY: json.dumps({"format": FORMAT, **checkpoint.state}, sort_keys=True)}
    if checkpoint.preprocess is not None:
        metadata[PREPROCESS_KEY] = checkpoint.preprocess
    data = save(tensors, metadata=metadata)
    size = 8 + int.from_bytes(data[:8], "little")
    data = sorted_safetensors_header(data[:size]) + data[size:]  # the same bytes for the same checkpoint
    for path in paths:
        write_atomic_bytes(Path(path), data)


def load_checkpoint(path: Path) -> Checkpoint:
    """Reads a checkpoint written by `save_checkpoint`; a missing, truncated or foreign file is a NetError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NetError("no checkpoint here", where=str(path), hint="a run folder holds checkpoints/last.ckpt")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if STATE_KEY not in metadata:
                raise NetError(
                    "this safetensors file is not a netdsl checkpoint (it may be a weights file)",
                    where=str(path),
                    hint="resume from a run folder written by netdsl train",
                )
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 -- not iterable
    except SafetensorError as error:
        raise NetError(
            f"the checkpoint is damaged ({error})",
            where=str(path),
            hint=f"it may be truncated; {EARLIER_CHECKPOINT}",
        ) from None
    except OSError as error:
        raise NetError(
            f"cannot read the checkpoint: {error.strerror or error}", where=str(path), hint=os_hint(error)
        ) from None
    try:
        state = parse_json(metadata[STATE_KEY])
        if not isinstance(state, dict):
            raise ValueError("not a record")
    except ValueError as error:
        raise NetError(
            f"the checkpoint's record of the run is damaged ({error})",
            where=str(path),
            hint=EARLIER_CHECKPOINT,
        ) from None
    if state.get("format") != FORMAT:
        raise NetError(
            f"checkpoint format {state.get('format')} is not {FORMAT}",
            where=str(path),
            hint="resume it with the netdsl that wrote it, or start a new run",
        )
    checkpoint = Checkpoint({}, {}, {}, state, metadata.get(PREPROCESS_KEY))
    for name, value in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            weight, _, key = name[len(OPTIM_PREFIX) :].rpartition(":")
            checkpoint.optimizer.setdefault(weight, {})[key] = value
        elif name.startswith(RNG_PREFIX):
            if value.dtype != torch.uint8 or value.dim() != 1:  # what torch.set_rng_state takes
                raise NetError(
                    f"the checkpoint's random state `{name[len(RNG_PREFIX) :]}` is {value.dtype} of "
                    f"{format_shape(tuple(value.shape))}, not a row of bytes",
                    where=str(path),
                    hint=EARLIER_CHECKPOINT,
                )
            checkpoint.rng[name[len(RNG_PREFIX) :]] = value
        elif name.startswith(LIVE_PREFIX):
            checkpoint.live[name[len(LIVE_PREFIX) :]] = value
        else:
            checkpoint.weights[name] = value
    return checkpoint


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by weight name (`names`: id of a parameter -> its name)."""
    result = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                result[names[id(param)]] = {key: value.detach().clone() for key, value in state.items()}
    return result


def check_tensors(checkpoint: Checkpoint, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """That the checkpoint at `path` holds each tensor of the module's `state` (weights, batch-norm statistics) in
    its shape, and nothing else (and so do its live weights, where it has them): a NetError naming the first that
    differs (a damaged or edited file)."""
    for prefix, tensors in (("", checkpoint.weights), (LIVE_PREFIX, checkpoint.live)):
        if prefix and not tensors:
            continue
        for name in sorted(set(state) | set(tensors)):
            if name not in tensors or name not in state:
                missing = name not in tensors
                raise NetError(
                    f"the checkpoint {'lacks' if missing else 'holds'} `{prefix}{name}`, which the net "
                    f"{'has' if missing else 'does not have'}",
                    where=str(path),
                    hint=EARLIER_CHECKPOINT,
                )
            saved, wanted = tuple(tensors[name].shape), tuple(state[name].shape)
            if saved != wanted:
                raise NetError(
                    f"the checkpoint's `{prefix}{name}` is {format_shape(saved)}, the net's {format_shape(wanted)}",
                    where=str(path),
                    hint=EARLIER_CHECKPOINT,
                )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: dict[int, str], saved: dict[str, dict], path: Path
) -> None:
    """Puts state saved by `optimizer_state_by_name` back onto the optimizer's parameters, on their devices; a
    tensor of another shape than its weight's (a damaged or edited checkpoint at `path`) is a NetError."""
    where = str(path)
    known = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            known.add(name)
            if name not in saved:
                continue
            for key, value in saved[name].items():
                if not value.is_floating_point():
                    raise NetError(
                        f"the checkpoint's optimizer state `{key}` of `{name}` holds {value.dtype} values",
                        where=where,
                        hint=EARLIER_CHECKPOINT,
                    )
                if value.dim() and value.shape != param.shape:
                    raise NetError(
                        f"the checkpoint's optimizer state `{key}` of `{name}` is {format_shape(tuple(value.shape))}, "
                        f"the weight {format_shape(tuple(param.shape))}",
                        where=where,
                        hint=EARLIER_CHECKPOINT,
                    )
            optimizer.state[param] = {
                key: value.to(param.device) if value.dim() else value.clone() for key, value in saved[name].items()
            }
    unknown = sorted(set(saved) - known)
    if unknown:
        raise NetError(
            f"the checkpoint holds optimizer state for `{unknown[0]}`, which the net does not have",
            where=where,
            hint=EARLIER_CHECKPOINT,
        )


def rank_sums(state: dict, rank: int, size: int) -> tuple[list[float], list[float]]:
    """Process `rank`'s share (of `size` processes) of the epoch's and the step window's loss sums, top-1 counts
    and images in a checkpoint's record `state`, as saved per rank: its own when the run goes on with as many
    processes; otherwise rank 0 takes every rank's total and the others none, so the sums over the world stay
    those of the run. (Checkpoints before `rank_sums` hold rank 0's own sums; before `window_sums`, no window:
    a fresh one.) A record of another shape is a ValueError."""
    saved = state.get("rank_sums")
    if saved is None:
        saved = [[*state["epoch_sums"], *state.get("window_sums", [0.0, 0.0, 0.0])]]
    saved = [[float(value) for value in sums] for sums in saved]
    if any(len(sums) != 6 for sums in saved):
        raise ValueError("rank_sums must hold six numbers per process")
    if len(saved) == size:
        mine = saved[rank]
    elif rank == 0:
        mine = [sum(column) for column in zip(*saved)]
    else:
        mine = [0.0] * 6
    return mine[:3], mine[3:]


def rng_states() -> dict[str, torch.Tensor]:
    """The state of every torch generator a training step draws from (dropout's masks)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{index}"] = state
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda{index}" in states:
                torch.cuda.set_rng_state(states[f"cuda{index}"], index)


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that shares memory with nothing (safetensors refuses shared storage)."""
    return value.detach().to("cpu").contiguous().clone()
