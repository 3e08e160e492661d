"""netdsl: describe convolutional networks as text and compile them into GPU code."""

from netdsl.errors import NetError
from netdsl.frontend import graph_from_text, load_graph

__version__ = "0.1.0"
__all__ = ["NetError", "__version__", "graph_from_text", "load_graph"]
