"""Pictures drawn with matplotlib, an optional dependency (`pip install 'netdsl[train]'`): pyplot on a backend
that needs no display, and a figure written as a PNG whole or not at all."""

from __future__ import annotations

import io
from pathlib import Path

from netdsl.files import write_atomic_bytes


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return None
    return pyplot


def save_png(figure, path: Path) -> None:
    """`figure`, laid out tight, as a PNG at `path` (atomically), and closed."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    write_atomic_bytes(Path(path), buffer.getvalue())
