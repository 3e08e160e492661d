"""What the benchmark scripts' command lines share: argparse types for counts (runs, steps, batches, epochs),
which refuse what cannot be measured (a median of no runs, a time per no steps) before anything is built, and
the rule that `--smoke` refuses the flags it sets itself, so the command a script echoes is the one that ran.
No torch here: bench/frontend.py times netdsl's import and must not have torch loaded before it."""

from __future__ import annotations

import argparse


def _count(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1: runs, repetitions, timed steps, epochs, a batch."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """A count that may be 0: untimed warm-up steps, worker processes."""
    return _count(text, 0)


def _counts(text: str, least: int) -> tuple[int, ...]:
    try:
        return tuple(_count(word, least) for word in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated whole numbers of at least {least}, not {text!r}"
        ) from None


def positive_ints(text: str) -> tuple[int, ...]:
    """`128,32`: comma-separated counts of at least 1 (batches)."""
    return _counts(text, 1)


def non_negative_ints(text: str) -> tuple[int, ...]:
    """`0,1,2`: comma-separated counts that may be 0 (worker processes)."""
    return _counts(text, 0)


def recompute_modes(text: str) -> tuple[str, ...]:
    """`none,cheap,all`: the `recompute` settings to measure, a row each."""
    modes = tuple(part.strip() for part in text.split(","))
    unknown = [mode for mode in modes if mode not in ("none", "cheap", "all")]
    if unknown:
        raise argparse.ArgumentTypeError(f"recompute settings are none, cheap and all, not {unknown[0]!r}")
    return modes


def joined(values: tuple[int, ...]) -> str:
    """The flag's text back from positive_ints or non_negative_ints: (128, 32) -> `128,32`."""
    return ",".join(map(str, values))


def settle_smoke(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict, smoke_sets: str) -> None:
    """Fills in the `defaults` of the flags that `--smoke` sets itself (their parser default is None). Under
    --smoke a value given for one of them would not be what ran, nor what the echoed command says: refused,
    naming what --smoke sets (`smoke_sets`, e.g. "batch 1 and fp32")."""
    given = [f"--{name.replace('_', '-')}" for name in defaults if getattr(args, name) is not None]
    if args.smoke and given:
        parser.error(f"--smoke sets {smoke_sets} itself: leave out {', '.join(given)}")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
