"""Which backward runs a conv's or an fc's gradients: netdsl's kernels or PyTorch's (cuDNN, cuBLAS).

Every public Triton convolution backward known to us measures slower than cuDNN on some layers, so the
choice is made per layer, by measurement on a GPU, never by hope. The measurements live in a table that
ships with the package (`backward_choices.json`, beside this file) and is regenerated on a GPU by

    python bench/train_gpu.py --write-choices

A layer is looked up by its geometry (`layer_key`), the build's dtype and the nearest measured batch.
A layer the table does not hold keeps netdsl's kernel, and the plan says it was not measured; a measured
layer takes whichever backward was faster, and the plan records both figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from netdsl.errors import NetError
from netdsl.files import parse_json, write_atomic

TABLE = Path(__file__).with_name("backward_choices.json")
IMPLEMENTATIONS = ("netdsl", "torch")
FORMAT = 1


@dataclass(frozen=True)
class Measured:
    """One layer's backward (input and weight gradients together), timed both ways at one batch and dtype."""

    kind: str  # "conv2d" or "linear"
    key: str  # layer_key(...)
    dtype: str  # fp32, tf32, bf16, fp16
    batch: int
    netdsl_ms: float
    torch_ms: float

    @property
    def faster(self) -> str:
        return "torch" if self.torch_ms < self.netdsl_ms else "netdsl"


@dataclass(frozen=True)
class Choice:
    implementation: str  # "netdsl" or "torch"
    reason: str  # what decided it, with the figures
    measured: Measured | None = None


def layer_key(
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...] = (),
    padding: tuple[int, ...] = (),
    dilation: tuple[int, ...] = (),
    groups: int = 1,
) -> str:
    """A layer's geometry as text: its per-image input shape, its weight's shape, and for a conv its
    stride, padding (four sides), dilation and groups. Two layers with one key do the same work."""
    parts = ["x".join(map(str, input_shape)), "w" + "x".join(map(str, weight_shape))]
    if stride:
        parts += [
            "s" + "x".join(map(str, stride)),
            "p" + "x".join(map(str, padding)),
            "d" + "x".join(map(str, dilation)),
            f"g{groups}",
        ]
    return " ".join(parts)


def load_table(path: Path = TABLE) -> list[Measured]:
    """The measurements in a choices table; a damaged or foreign file is a NetError naming it."""
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        rows = [Measured(**row) for row in data["measurements"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise NetError(
            f"cannot read the backward choices table: {error}",
            where=str(path),
            hint="regenerate it on a GPU with `python bench/train_gpu.py --write-choices`",
        ) from None
    for row in rows:
        numbers = (row.netdsl_ms, row.torch_ms, row.batch)
        measured = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)
        if row.kind not in ("conv2d", "linear") or not (measured and row.netdsl_ms > 0 and row.torch_ms > 0
                                                        and row.batch >= 1):  # fmt: skip
            raise NetError(
                f"a row of the backward choices table is not a measurement: {row}",
                where=str(path),
                hint="regenerate the table on a GPU: python bench/train_gpu.py --write-choices",
            )
    return rows


def write_table(measurements: list[Measured], about: dict[str, str], path: Path = TABLE) -> None:
    """Writes the table atomically, rows sorted so that equal measurements give equal files. `about`
    says where they were taken (GPU, torch, triton, date)."""
    rows = sorted(measurements, key=lambda m: (m.kind, m.key, m.dtype, m.batch))
    data = {"format": FORMAT, "about": dict(sorted(about.items())), "measurements": [asdict(m) for m in rows]}
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def choose(kind: str, key: str, dtype: str, batch: int, table: list[Measured]) -> Choice:
    """netdsl's backward unless the table measured PyTorch's as faster for this layer and dtype (at the
    measured batch nearest to `batch`, on a log scale)."""
    rows = [m for m in table if m.kind == kind and m.key == key and m.dtype == dtype]
    if not rows:
        return Choice("netdsl", "not measured")
    nearest = min(rows, key=lambda m: (abs(math.log(m.batch / batch)), m.batch))
    figures = f"netdsl {nearest.netdsl_ms:.3f} ms, torch {nearest.torch_ms:.3f} ms at batch {nearest.batch}"
    return Choice(nearest.faster, figures, nearest)
