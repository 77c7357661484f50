"""The post-grad passes, in the order Inductor runs them on the compiled forward and backward.

``POST_GRAD_PASSES`` fixes that order: first ``SavedPreactPass`` (it looks for our ops by their
own names), then ``GraphOpsPass`` (which renames them to their autograd-free twins).

``SavedPreactPass``: the compiled SwiGLU backward writes ``dH`` over the saved pre-activations.
The op's backward needs a ``[M, 2N]`` gradient ``dH`` next to the ``[M, 2N]`` pre-activations it
saved, and reads those for nothing else.  Eager autograd must keep the saved tensor intact
(``retain_graph`` may run the backward again), so ``swiglu_dh`` is functional.  A compiled
backward knows more: AOTAutograd marks saved tensors that only the backward sees as *donated*
(``bw_donated_idxs``) and refuses ``retain_graph`` for such a graph.  This pass turns
``swiglu_dh(dout, preact, 0)`` on a donated ``preact`` that nothing else reads into
``swiglu_dh_inplace(dout, preact)`` and lets every user of ``dH`` read ``preact``: one
``[M, 2N]`` buffer less at the backward's peak.  The MLP block's ``mlp_dgated(dout, preact, w_down,
0)`` becomes ``mlp_dgated_inplace`` the same way.  Graphs without donated buffers (the setting
``torch._functorch.config.donated_buffer`` off, compiled autograd) stay as they are.

``GraphOpsPass``: compiled graphs call our ops' autograd-free twins.  A ``torch.library`` custom
op called from Inductor's generated code still passes the op's Python autograd layer, which only
finds that no autograd graph is wanted (AOTAutograd's runtime runs compiled graphs with grad mode
off) and redispatches below autograd.  Nothing differentiates a graph once Inductor compiles it,
so this pass points each call of a ``glu_fusion`` op at its twin ``<name>_nograd``
(``ops.graph_twins``): same schema, implementation and fake implementation, autograd and
autocast falling through.  Calls inside ``auto_functionalized`` are kept: Inductor rewrites those
itself later.
"""
from __future__ import annotations

import operator
import os
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .cache_key import pass_uuid

__all__ = ["POST_GRAD_PASSES", "SavedPreactPass", "GraphOpsPass", "reuse_saved_preact", "use_graph_ops"]

#: ``GLU_FUSION_GRAPH_OPS=0`` (a benchmark A/B switch, not a user setting): compiled code calls
#: the ops themselves instead of their twins.  Anything but ``0`` keeps the default (on).
_GRAPH_OPS: bool = os.environ.get("GLU_FUSION_GRAPH_OPS", "1").strip() != "0"


def _donated_placeholder_idxs() -> Optional[frozenset]:
    """The backward placeholders AOTAutograd donates in the compile under way; None: none.

    Torch versions differ in whether they fill ``bw_donated_idxs`` with the setting off, and
    only with it on does torch refuse ``retain_graph`` for such a backward: both must hold."""
    import torch._functorch.config
    if not torch._functorch.config.donated_buffer:
        return None
    tracing_context = torch._guards.TracingContext.try_get()
    metadata = getattr(tracing_context, "fw_metadata", None) if tracing_context is not None else None
    idxs = getattr(metadata, "bw_donated_idxs", None) if metadata is not None else None
    return frozenset(idxs) if idxs else None


def _is_backward_graph(placeholders: list) -> bool:
    """AOTAutograd names the incoming gradients of a backward graph ``tangents_*``; forward and
    inference graphs have none (their inputs are ``primals_*`` / ``arg*``)."""
    return any(str(p.target).startswith("tangents") for p in placeholders)


def reuse_saved_preact(graph: torch.fx.Graph) -> int:
    """Rewrite each eligible ``swiglu_dh`` / ``mlp_dgated`` in a compiled backward graph into
    its in-place form over the donated pre-activations; returns how many."""
    ops = torch.ops.glu_fusion
    if not hasattr(ops, "swiglu_dh_inplace"):
        return 0
    candidates = [*graph.find_nodes(op="call_function", target=ops.swiglu_dh.default)]
    if hasattr(ops, "mlp_dgated_inplace"):
        candidates += graph.find_nodes(op="call_function", target=ops.mlp_dgated.default)
    if not candidates:
        return 0
    placeholders = list(graph.find_nodes(op="placeholder"))
    donated = _donated_placeholder_idxs()
    if donated is None or not _is_backward_graph(placeholders):
        return 0
    index = {node: i for i, node in enumerate(placeholders)}
    rewritten = 0
    for node in candidates:
        dout, preact, *rest = node.args
        layout = rest[-1]
        if (layout != 0 or not isinstance(preact, torch.fx.Node) or index.get(preact) not in donated
                or len(preact.users) != 1):
            continue
        block = node.target is ops.mlp_dgated.default
        if block and not all(u.target is operator.getitem for u in node.users):
            continue
        with graph.inserting_before(node):
            if block:  # (dH, h) -> h, with dH written over preact
                inplace = graph.call_function(ops.mlp_dgated_inplace.default, (dout, preact, rest[0]))
            else:
                inplace = graph.call_function(ops.swiglu_dh_inplace.default, (dout, preact))
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten"):
            if key in node.meta:
                inplace.meta[key] = node.meta[key]
        if block:
            value = node.meta.get("val")
            inplace.meta["val"] = value[1] if isinstance(value, (tuple, list)) else None
            for user in list(node.users):
                user.replace_all_uses_with(preact if user.args[1] == 0 else inplace)
                graph.erase_node(user)
        else:
            inplace.meta["val"] = None
            node.replace_all_uses_with(preact)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


class SavedPreactPass(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass`` running :func:`reuse_saved_preact`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        from . import post_grad  # looked up per call, so tests can observe it
        post_grad.reuse_saved_preact(graph)

    def uuid(self) -> str:
        """Source hash plus this compile's donated placeholders: Inductor's graph cache does not
        key on donation, and a backward compiled with it must never serve one without (a
        backward first run with ``retain_graph`` is compiled without donated buffers)."""
        donated = _donated_placeholder_idxs()
        return pass_uuid("saved-preact", [__file__], sorted(donated) if donated else None)

    def __repr__(self) -> str:
        return "SavedPreactPass()"


def use_graph_ops(graph: torch.fx.Graph) -> int:
    """Point every direct call of a ``glu_fusion`` op in ``graph`` at its twin; returns how many."""
    from ..ops.graph_twins import GRAPH_TWINS
    if not _GRAPH_OPS:
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
        return pass_uuid("graph-ops", [__file__], int(_GRAPH_OPS))

    def __repr__(self) -> str:
        return "GraphOpsPass()"


#: The post-grad passes in the order they run in ``post_grad_custom_post_pass``.
POST_GRAD_PASSES = (SavedPreactPass, GraphOpsPass)
