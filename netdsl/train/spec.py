"""One training setting's declaration (`Spec`, made by `setting` for each `Recipe` field) and how it is
described: its value as a `train` block writes it (`show`), what it takes in words (`type_text`), its flag
(`flag_of`) and the hint naming it. netdsl.train.recipe checks values against it; its errors, the `netdsl
train` flags and the table in docs/training.md all read from here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = ("int", "number", "bool", "choice", "string", "ints", "numbers", "size", "span", "mult")


@dataclass(frozen=True)
class Spec:
    """One setting: its kind, default, unit, meaning, and the values it takes."""

    kind: str  # one of KINDS
    default: object
    unit: str
    doc: str
    low: float | None = None  # the least value (of each item, for tuples)
    high: float | None = None
    above: bool = False  # `low` itself is not allowed
    below: bool = False  # `high` itself is not allowed
    choices: tuple = ()  # "choice": its words; "int": the only values allowed
    words: tuple[tuple[str, object], ...] = ()  # words taken in place of a value, and what each stands for
    lengths: tuple[int, ...] = ()  # tuples: the numbers of items allowed (none given: any, at least one)
    increasing: bool = False  # tuples: each item above the one before
    ordered: bool = False  # tuples: each item at least the one before
    metavar: str = ""  # "string": what its flag's help shows it takes (DIR|FILE.npz|digits)
    example: str = ""  # "string": a value, for the hint of a wrong one
    name: str = ""  # the name it is written with (filled in from the field: `lr_mult` for `lr_mults`)
    attribute: str = ""  # the `Recipe` attribute


def setting(kind: str, default, unit: str, doc: str, *, name: str = "", **limits):
    """A `Recipe` field that is a setting (the arguments are `Spec`'s)."""
    if kind not in KINDS:
        raise ValueError(f"a setting's kind is one of {KINDS}, not {kind!r}")
    spec = Spec(kind, default, unit, doc, name=name, **limits)
    return field(default=default, metadata={"spec": spec})


def flag_name(spec: Spec) -> str:
    return "--" + spec.name.replace("_", "-")


def setting_hint(spec: Spec) -> str:
    """What the setting is and its default, as `--help` says (docs/training.md has them all)."""
    default = "1" if spec.kind == "mult" else show(spec.default, spec)
    unit = f"{spec.unit}; " if spec.unit else ""
    return f"`{spec.name}`: {spec.doc} ({unit}default {default}); docs/training.md lists every setting"


def show(value, spec: Spec | None = None) -> str:
    """A value as it is written in a `train` block."""
    if spec is not None:
        for word, meaning in spec.words:
            if value == meaning:
                return word
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:.12g}"
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", text)
    if isinstance(value, tuple):
        return "(" + ", ".join(show(item) for item in value) + ")"
    return str(value)


def got(value) -> str:
    """A value in an error message."""
    return f"`{value}`" if isinstance(value, str) else show(value)


def range_text(spec: Spec) -> str:
    low, high = spec.low, spec.high
    if low is not None and high is not None and not spec.above and not spec.below:
        return f"from {show(low)} to {show(high)}"
    parts = []
    if low is not None:
        parts.append(f"above {show(float(low))}" if spec.above else f"at least {show(float(low))}")
    if high is not None:
        parts.append(f"below {show(float(high))}" if spec.below else f"at most {show(float(high))}")
    return " and ".join(parts)


def type_text(spec: Spec) -> str:
    """What the setting takes, in words: `a number above 0`, `sgd or adamw`, ..."""
    kind = spec.kind
    limits = range_text(spec)
    if kind == "bool":
        text = "true or false"
    elif kind == "choice":
        text = ", ".join(spec.choices[:-1]) + " or " + spec.choices[-1]
    elif kind == "string":
        text = "a string"
    elif kind == "int" and spec.choices:
        text = " or ".join(str(c) for c in spec.choices)
    elif kind in ("int", "number"):
        text = ("a whole number" if kind == "int" else "a number") + (f" {limits}" if limits else "")
    elif kind == "mult":
        text = f"a number {limits}, per pattern of weight names"
    elif kind == "size":
        text = f"a whole number or (h, w), {limits}"
    elif kind == "span":
        text = f"a whole number or (low, high), {limits}"
    else:
        what = "whole numbers" if kind == "ints" else "numbers"
        if spec.lengths == (2,):
            text = f"two {what} (a, b)"
        elif spec.lengths == (1, 3):
            text = f"one {what[:-1] if what == 'numbers' else what} per channel (1 or 3)"
        else:
            text = f"{what} (a, b, ...)"
        text += ", each " + limits if limits else ""
        text += ", increasing" if spec.increasing else ""
        text += ", not decreasing" if spec.ordered else ""
    if spec.words:
        text += ", or " + " or ".join(words_of(spec))
    return text


def words_of(spec: Spec) -> list[str]:
    """The words a setting takes, one per meaning (`std`'s `none` is a synonym of `false`)."""
    first: dict[object, str] = {}
    for word, meaning in spec.words:
        first.setdefault(meaning, word)
    return list(first.values())


def flag_of(spec: Spec) -> str:
    """The `netdsl train` flag of a setting: `--weight-decay X`, `--flip/--no-flip`, `--lr-mult PATTERN=X`."""
    flag = flag_name(spec)
    if spec.kind == "bool":
        return f"{flag}/--no-{flag[2:]}"
    return f"{flag} {metavar_of(spec)}"


def metavar_of(spec: Spec) -> str:
    if spec.kind == "mult":
        return "PATTERN=X"
    if spec.kind == "choice":
        return "|".join(spec.choices)
    base = {"int": "N", "number": "X", "string": spec.metavar, "ints": "A,B,...", "size": "N|H,W", "span": "N|LOW,HIGH"}
    if spec.kind == "numbers":
        base["numbers"] = {(2,): "A,B", (1, 3): "X|R,G,B"}.get(spec.lengths, "A,B,...")
    return "|".join([base[spec.kind], *words_of(spec)])
