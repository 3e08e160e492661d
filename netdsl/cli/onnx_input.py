"""An ONNX model given where a net goes (`check`, `info`, `graph`, `compile`, `run`, `eval`): imported into a
folder as a .net file and its weights, which the command then reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from netdsl.errors import NetError, os_hint


def onnx_importer(where: str):
    """netdsl.interop.onnx_import.import_to_files, or the error that says how to install onnx."""
    try:
        from netdsl.interop.onnx_import import import_to_files
    except ImportError:
        raise NetError("reading ONNX models needs onnx", where=where, hint="pip install 'netdsl[onnx]'") from None
    return import_to_files


def imported_model(model: Path, folder: Path, args: argparse.Namespace) -> Path:
    """An ONNX model given where a net goes: imported into `folder` (its weights, with the preprocessing and
    class names `netdsl export` kept in the model, are used by `run` and `eval` where --weights is not given)."""
    from netdsl.train.augment import Preprocess

    import_to_files = onnx_importer(str(model))
    net, weights = folder / f"{model.stem}.net", folder / f"{model.stem}.safetensors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NetError(f"cannot create {folder}: {error.strerror}", where=str(folder), hint=os_hint(error)) from None
    import_to_files(model, net, weights, read_preprocess=Preprocess.from_json)
    if hasattr(args, "weights") and args.weights is None:  # `run` or `eval` without --weights: the model's
        args.weights = weights
    return net
