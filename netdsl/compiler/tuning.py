"""Tiles tuned on a device: reading a tuning file of `netdsl tune` and building kernels with its tiles.

Each tunable kernel (the conv, channels-last conv, fc and LRN families: `emit.tunable`) takes its block sizes
from its launcher's `pick_config`, a rule measured on one GPU for AlexNet's layers. `netdsl tune` times the
family's candidate tiles on the device at hand, for each step of a net at a batch size, and writes what won:

    {
      "format": "netdsl-tuning/1",
      "device": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11.0", "netdsl": "0.4.0",
      "net": "alexnet", "dtype": "bf16",
      "steps": {
        "conv3_gpu0_conv_bias_relu": {
          "signature": "<SHA-256 of the step's kernel file as built without tuning>",
          "batches": {
            "128": {"config": {"BLOCK_M": 128, ...}, "ms": 0.071, "default_ms": 0.080, "timed": 10},
            "1": {"config": null, "ms": 0.012, "default_ms": 0.012, "timed": 10}
          }
        }
      }
    }

A `config` of null means the launcher's own choice was the fastest. `netdsl compile --tuning FILE` (and
`netdsl run`, `netdsl.load(..., tuning=FILE)`) writes each tuned step's tiles into its kernel file's `TUNED`
table, by batch size; a step whose kernel changed since it was tuned (another netdsl, other options, an
edited net: its signature differs) keeps the launcher's choice, and the report says which. The file's values
reach the kernels only as whole numbers under known names: nothing in it can become code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from netdsl.compiler.emit import emit_program, tuning_candidates
from netdsl.compiler.steps import Step
from netdsl.errors import NetError
from netdsl.files import parse_json

TUNING_FORMAT = "netdsl-tuning/1"
# The names a config may use, the most each may be (block sizes: MAX_BLOCK), all but num_stages powers of two.
# What a step takes is narrower: one of its family's candidates (`emit.tuning_candidates`), checked at compile.
LAUNCH_KEYS = ("num_warps", "num_stages")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_P", *LAUNCH_KEYS)
MAX_CONFIG_VALUE = {"num_warps": 32, "num_stages": 8}
MAX_BLOCK = 4096
_BATCH = re.compile(r"[1-9][0-9]{0,6}")
# The compile options a tuning is made with, as `netdsl compile` spells them (the kernels differ with each).
_OPTION_FLAGS = {"layout": "--layout", "precision": "--precision", "space_to_depth": "--space-to-depth",
                 "merge_towers": "--merge-towers", "split_k": "--split-k"}  # fmt: skip


@dataclass(frozen=True)
class Tuning:
    """A tuning file, checked: per step, its kernel's signature and per batch the tiles that won (None: the
    launcher's own choice), with the times measured."""

    path: str
    device: str
    triton: str
    steps: dict[str, dict] = field(default_factory=dict)
    dtype: str | None = None  # what it was tuned for: the dtype and the compile options
    options: dict[str, object] = field(default_factory=dict)

    def configs(self, step: str, signature: str) -> dict[int, dict[str, int]] | None:
        """The tiles tuned for `step` by batch size (only those that beat the launcher's choice), or None when the
        file has no entry for it or its kernel has changed since (`signature` differs)."""
        entry = self.steps.get(step)
        if entry is None or entry["signature"] != signature:
            return None
        return {int(batch): row["config"] for batch, row in entry["batches"].items() if row["config"]}


def signature(source: str) -> str:
    """What a tuning is valid for: the kernel file as built without tuned tiles."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def read_tuning(path: str | Path) -> Tuning:
    """A tuning file of `netdsl tune`, checked; a NetError naming the file and what is wrong otherwise."""
    where = str(path)
    try:
        data = parse_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NetError("no such tuning file", where=where, hint="write one with netdsl tune NET -o FILE") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise NetError(
            f"cannot read the tuning file ({type(error).__name__}: {error})",
            where=where,
            hint="write it again with netdsl tune NET -o FILE",
        ) from None
    if not isinstance(data, dict) or data.get("format") != TUNING_FORMAT:
        raise NetError(
            f"not a tuning file of netdsl tune (its `format` is not {TUNING_FORMAT!r})",
            where=where,
            hint="write one with netdsl tune NET -o FILE",
        )
    steps = data.get("steps")
    if not isinstance(steps, dict):
        raise _bad(where, "steps", "is not a table of steps")
    for step, entry in steps.items():
        check_entry(where, step, entry)
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise _bad(where, "options", "is not a table of compile options")
    dtype = data.get("dtype")
    return Tuning(
        where, str(data.get("device", "?")), str(data.get("triton", "?")), steps, None if dtype is None else str(dtype),
        {key: options[key] for key in _OPTION_FLAGS if key in options},
    )  # fmt: skip


def check_entry(where: str, step: str, entry: object) -> None:
    at = f"steps.{step}"
    if not isinstance(entry, dict) or not isinstance(entry.get("signature"), str):
        raise _bad(where, at, "needs a `signature` (the kernel's SHA-256)")
    batches = entry.get("batches")
    if not isinstance(batches, dict):
        raise _bad(where, f"{at}.batches", "is not a table of batch sizes")
    for batch, row in batches.items():
        if not (isinstance(batch, str) and _BATCH.fullmatch(batch)):
            raise _bad(where, f"{at}.batches", f"has {batch!r}, which is not a batch size")
        if not isinstance(row, dict) or "config" not in row:
            raise _bad(where, f"{at}.batches.{batch}", "needs a `config` (null for the launcher's choice)")
        check_config(where, f"{at}.batches.{batch}.config", row["config"])


def check_config(where: str, at: str, config: object) -> None:
    """Null, or whole numbers from 1 to their MAX_CONFIG_VALUE (MAX_BLOCK for block sizes) under the names of
    CONFIG_KEYS, powers of two but for num_stages."""
    if config is None:
        return
    if not isinstance(config, dict) or not config:
        raise _bad(where, at, "is neither null nor a table of block sizes")
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise _bad(where, at, f"has {key!r}, which no kernel takes (known: {', '.join(CONFIG_KEYS)})")
        most = MAX_CONFIG_VALUE.get(key, MAX_BLOCK)
        if type(value) is not int or not 1 <= value <= most:
            raise _bad(where, f"{at}.{key}", f"is {value!r}, not a whole number from 1 to {most}")
        if key != "num_stages" and value & (value - 1):
            raise _bad(where, f"{at}.{key}", f"is {value}, not a power of two")


def _bad(where: str, at: str, what: str) -> NetError:
    return NetError(f"{at} {what}", where=where, hint="write the file again with netdsl tune NET -o FILE")


def emit_tuned(
    program: nx.DiGraph, input_precision: str, dtype: str, tuning: Tuning, options: dict[str, object] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Every step's kernel file (`emit.emit_program`), tuned steps with their tiles in `TUNED`; and the report's
    lines on what the tuning changed (and, when the build's dtype or compile `options` differ from those it was
    tuned with, which)."""
    tuned, kept, stale, untuned = [], [], [], []

    def tiles(step: Step, source: str) -> dict[int, dict[str, int]] | None:
        configs = tuning.configs(step.name, signature(source))
        if configs:
            _check_tiles(tuning.path, step, dtype, configs)
            tuned.append((step.name, configs))
        elif configs is not None:
            kept.append(step.name)
        elif step.name in tuning.steps:
            stale.append(step.name)
        else:
            untuned.append(step.name)
        return configs

    files = emit_program(program, input_precision, dtype, tiles)
    lines = _report(tuning, tuned, kept, stale, untuned)
    built, tuned_with = option_flags(dtype, options or {}), option_flags(tuning.dtype, tuning.options)
    if stale and tuning.dtype is not None and built != tuned_with:
        lines.append(f"  the file was tuned with `{tuned_with}`, this build is `{built}`: tune with the same flags")
    return files, lines


def option_flags(dtype: str | None, options: dict[str, object]) -> str:
    """`--dtype bf16 --split-k ...`: the dtype and the compile options that are not the defaults, as flags."""
    flags = [f"--dtype {dtype}"] if dtype else []
    for name, flag in _OPTION_FLAGS.items():
        value = options.get(name)
        if value is True:
            flags.append(flag)
        elif isinstance(value, str) and not (name == "layout" and value == "auto"):
            flags.append(f"{flag} {value}")
    return " ".join(flags)


def _check_tiles(where: str, step: Step, dtype: str, configs: dict[int, dict[str, int]]) -> None:
    """Each tuned config is one of the tiles `netdsl tune` tries for the step (`emit.tuning_candidates`): nothing
    else reaches a kernel, however the file was written."""
    candidates = tuning_candidates(step, dtype)
    for batch, config in configs.items():
        if config not in candidates:
            raise _bad(
                where,
                f"steps.{step.name}.batches.{batch}.config",
                f"({describe_config(config)}) is not one of the tiles netdsl tune tries for this step",
            )


def _report(tuning: Tuning, tuned: list, kept: list[str], stale: list[str], untuned: list[str]) -> list[str]:
    lines = [f"tiles tuned by netdsl tune ({tuning.path}; {tuning.device}, Triton {tuning.triton}):"]
    for name, configs in tuned:
        for batch, config in sorted(configs.items()):
            row = tuning.steps[name]["batches"][str(batch)]
            times = f"{row['ms']:.3f} ms, default {row['default_ms']:.3f}" if _timed(row) else "no times"
            lines.append(f"  {name} at batch {batch}: {describe_config(config)} ({times})")
    if kept:
        lines.append(f"  the launcher's own tiles won for: {', '.join(kept)}")
    if stale:
        lines.append(f"  not used, the kernel changed since it was tuned (run netdsl tune again): {', '.join(stale)}")
    if untuned:
        lines.append(f"  not in the file: {', '.join(untuned)}")
    return lines


def _timed(row: dict) -> bool:
    return all(isinstance(row.get(key), (int, float)) for key in ("ms", "default_ms"))


def describe_config(config: dict[str, int]) -> str:
    """`128x64x32 w4 s3` (pixels x channels x K block, warps, stages), `16c x 64p w8` for an LRN tile (channels x
    pooled pixels), `64c x 32p x 32k w8 s2` for a conv + LRN + max-pool stage's."""
    if "BLOCK_M" in config:
        tile = f"{config['BLOCK_M']}x{config.get('BLOCK_N')}x{config.get('BLOCK_K')}"
    elif "BLOCK_C" in config:
        tile = f"{config['BLOCK_C']}c x {config.get('BLOCK_P')}p"
    else:
        tile = f"{config.get('BLOCK_N')}c x {config.get('BLOCK_P')}p x {config.get('BLOCK_K')}k"
    extras = [f"w{config['num_warps']}"] if "num_warps" in config else []
    if "num_stages" in config:
        extras.append(f"s{config['num_stages']}")
    return " ".join([tile, *extras])
