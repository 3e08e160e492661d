"""netdsl names for ONNX names. A layer keeps its ONNX name (its first output's name) when that is a valid
netdsl name; other names are rewritten (`/features/features.0/Conv_output_0` -> `features_0`, `input.1` ->
`input_1`). The writer keeps them unique.
"""

from __future__ import annotations

import re

from netdsl.lang.scope import BUILTINS as SCOPE_BUILTINS
from netdsl.lang.scope import RESERVED_WORDS

# The words of the grammar that cannot name a layer, and the built-in words that cannot be redefined.
RESERVED = RESERVED_WORDS
BUILTINS = frozenset(SCOPE_BUILTINS)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]+")
_TORCH_NAME = re.compile(r"/(?:(.+)/)?([A-Za-z]+)(?:_\d+)?_output_\d+\Z")
_LONGEST_NAME = 120


def is_name(text: str) -> bool:
    """Whether `text` can name a layer in a `.net` file."""
    return bool(_NAME.match(text)) and text not in RESERVED and text not in BUILTINS


def tower_base(names: list[str]) -> tuple[str, list[str] | None]:
    """`conv1.relu_gpu0`, `conv1.relu_gpu1` -> `conv1.relu` and the towers `gpu0`, `gpu1` (None: no common
    stem ending in `_` or `@`)."""
    prefix = names[0][: next((i for i, chars in enumerate(zip(*names)) if len(set(chars)) > 1), min(map(len, names)))]
    cut = max(prefix.rfind("_"), prefix.rfind("@"))
    if cut <= 0:
        return names[0], None
    return names[0][:cut], [name[cut + 1 :] for name in names]


def torch_name(name: str) -> str:
    """torch.onnx.export's `/features/features.0/Conv_output_0` -> `features.0` (the module's
    qualified name); `/layer1/layer1.0/conv1/Conv_output_0` -> `layer1.0/conv1`; `/Flatten_output_0`
    -> `Flatten`. Other names are returned as they are."""
    match = _TORCH_NAME.match(name)
    if not match:
        return name
    if not match.group(1):
        return match.group(2)
    kept: list[str] = []
    for part in match.group(1).split("/"):
        if kept and part.startswith(kept[-1] + "."):
            kept[-1] = part
        else:
            kept.append(part)
    return "/".join(kept)


def sanitize(name: str, fallback: str) -> str:
    """A valid netdsl name for an ONNX name: kept when valid, else runs of other characters become `_`."""
    if is_name(name) and len(name) <= _LONGEST_NAME:
        return name
    clean = _NOT_NAME.sub("_", torch_name(name)).strip("_")[:_LONGEST_NAME].rstrip("_")
    if not clean:
        return fallback
    if clean[0].isdigit():
        clean = f"{fallback}_{clean}"
    if clean in RESERVED or clean in BUILTINS:
        clean = f"{clean}_"
    return clean


def sanitize_file(name: str) -> str:
    """A file name safe to write into a comment of the `.net` text."""
    return re.sub(r"[^A-Za-z0-9._\-]", "_", name)[:100]
