"""The front end in one call: read a `.net` file and return its checked, shaped layer graph (or, for a
recipe file, its training settings)."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import networkx as nx

from netdsl.ir.graph import Setting
from netdsl.ir.limits import check_memory, check_options
from netdsl.ir.shapes import infer_shapes
from netdsl.lang.build import build, build_recipe
from netdsl.lang.parse import parse_file, parse_text


def load_graph(path: str | Path, *, batch: int = 1, dtype: str = "fp32", memory_limit: int | None = None) -> nx.DiGraph:
    """Parse, build and shape-check a `.net` file. Raises `NetError` for any mistake in it (or in the options:
    `batch` images, `dtype` one of netdsl.ir.dtypes.DTYPES, `memory_limit` bytes per device or None)."""
    check_options(batch, dtype, memory_limit)
    with _gc_paused():
        return _checked(build(parse_file(path)), batch, dtype, memory_limit)


def graph_from_text(
    text: str, file: str = "<string>", *, batch: int = 1, dtype: str = "fp32", memory_limit: int | None = None
) -> nx.DiGraph:
    """Like `load_graph`, for source text held in memory (includes resolve relative to `file`)."""
    check_options(batch, dtype, memory_limit)
    with _gc_paused():
        return _checked(build(parse_text(text, file)), batch, dtype, memory_limit)


def load_recipe(path: str | Path) -> list[Setting]:
    """The settings of a recipe file (`netdsl train --recipe F`): its `train` blocks, in order, after its
    constants and includes ran. A layer, input or other net statement in it is a `NetError`."""
    return build_recipe(parse_file(path))


@contextlib.contextmanager
def _gc_paused():
    """Parsing and building allocate many small objects that all stay alive, and Python's cyclic
    collector would scan the growing heap again and again: time grew ~18x for 10x the layers
    (bench/frontend.py). Nothing made here needs the collector meanwhile; it resumes afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _checked(graph: nx.DiGraph, batch: int, dtype: str, memory_limit: int | None) -> nx.DiGraph:
    graph = infer_shapes(graph)
    check_memory(graph, batch, dtype, memory_limit)
    return graph
