"""``GraphOpsPass``: compiled graphs call our ops' autograd-free twins.

A ``torch.library`` custom op called from Inductor's generated code still passes the op's
Python autograd layer, which only finds that no autograd graph is wanted (AOTAutograd's
runtime runs compiled graphs with grad mode off) and redispatches below autograd.  Nothing
differentiates a graph once Inductor compiles it, so this post-grad pass points each call of a
``glu_fusion`` op at its twin ``<name>_nograd`` (``ops._common.register_graph_twins``): same
schema, implementation and fake implementation, autograd and autocast falling through.  Calls
inside ``auto_functionalized`` are kept: Inductor rewrites those itself later.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import __version__, config
from .graph_pass import file_digest

__all__ = ["GraphOpsPass", "use_graph_ops"]


def use_graph_ops(graph: torch.fx.Graph) -> int:
    """Point every direct call of a ``glu_fusion`` op in ``graph`` at its twin; returns how many."""
    from .ops._common import GRAPH_TWINS
    if not config.graph_ops:
        return 0
    swapped = 0
    for node in graph.nodes:
        if node.op == "call_function":
            twin = GRAPH_TWINS.get(node.target)
            if twin is not None:
                node.target = twin
                swapped += 1
    return swapped


class GraphOpsPass(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass`` running :func:`use_graph_ops` (after
    ``SavedPreactPass``, which looks for the ops by their own names)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        use_graph_ops(graph)

    def uuid(self) -> str:
        return f"glu_fusion-graph-ops-{__version__}-{file_digest(__file__)}-{int(config.graph_ops)}"

    def __repr__(self) -> str:
        return "GraphOpsPass()"
