"""netdsl: describe convolutional networks as text and compile them into GPU code."""

from netdsl._version import __version__
from netdsl.errors import NetError
from netdsl.lang.frontend import graph_from_text, load_graph

__all__ = ["NetError", "__version__", "graph_from_text", "load", "load_graph"]


def load(path, **kwargs):
    """A compiled net, ready to run on a batch: see `netdsl.runtime.net.Net` (imported here lazily: it needs torch)."""
    from netdsl.runtime.net import load as _load

    return _load(path, **kwargs)
