"""The preprocessing of trained weights, carried in an ONNX model's `metadata_props`.

`netdsl train` saves how it prepared images (size, crop, channels, mean, std, class names) as JSON in the
safetensors metadata of its weights, under "netdsl.preprocess" (netdsl/train/augment.py, `Preprocess`). Export
writes the same text under the same key of the model's metadata_props, and the class names once more under
"names" as `{0: 'cat', 1: 'dog'}`, the key and form Ultralytics' exporter writes and several ONNX tools read.
Import copies the record back into the safetensors metadata of the weights it writes.

The record is text at this stage: training comes after interop, so `Preprocess` (which reads and checks the
record) is not imported here. The command line passes its reader in (`read_preprocess`), and `netdsl run`
checks the record of any weights file it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from netdsl.errors import NetError
from netdsl.files import parse_json

PREPROCESS_KEY = "netdsl.preprocess"  # the key of the record in a safetensors file and in an ONNX model
NAMES_KEY = "names"


class Preprocessing(Protocol):
    """What `read_preprocess` returns (netdsl.train.augment.Preprocess)."""

    def check_fits(self, shape: tuple[int, ...], where: str) -> None: ...


ReadPreprocess = Callable[[str, str], Preprocessing]  # (record, where) -> the record read; NetError when damaged


def export_props(preprocess: str) -> dict[str, str]:
    """The metadata_props of a model exported from weights with the preprocessing record `preprocess`."""
    try:
        record = parse_json(preprocess)
    except (ValueError, TypeError):
        record = None
    if not isinstance(record, dict):
        raise NetError(
            "the preprocessing record is not a JSON object",
            where="preprocess",
            hint='pass the "netdsl.preprocess" text of weights that `netdsl train` wrote',
        )
    props = {PREPROCESS_KEY: preprocess}
    classes = record.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes):
        props[NAMES_KEY] = repr(dict(enumerate(classes)))
    return props


def imported_metadata(model) -> dict[str, str]:
    """The safetensors metadata for the weights imported from `model`: its preprocessing record, if any
    (onnx.checker has refused a model with a key twice)."""
    return {prop.key: prop.value for prop in model.metadata_props if prop.key == PREPROCESS_KEY}


def check_preprocess(
    metadata: Mapping[str, str], inputs: Mapping[str, tuple[int, ...]], read: ReadPreprocess, where: str
) -> None:
    """NetError (blaming `where`, the model) when the record in `metadata` is damaged or is not for a net
    with these `inputs`."""
    text = metadata.get(PREPROCESS_KEY)
    if text is None:
        return
    try:
        preprocess = read(text, where)
        if len(inputs) == 1:
            preprocess.check_fits(next(iter(inputs.values())), where)
    except NetError as error:
        error.where = where
        error.hint = (
            "the record comes from the weights the model was exported with: export it again from weights "
            "that `netdsl train` wrote"
        )
        raise


__all__ = ["NAMES_KEY", "PREPROCESS_KEY", "Preprocessing", "ReadPreprocess", "check_preprocess", "export_props"]
