"""``GluPass``: the pre-grad graph pass that rewrites every pattern family into fused ops.

Inductor calls it through ``config.pre_grad_custom_pass`` on each Dynamo graph (and each
subgraph, e.g. a checkpointed region).  This module loads ``torch._inductor`` (its base class
lives there), so the package imports it only when a pass is needed; the pattern matcher and the
patterns load on the first call and are registered once per process.
"""
from __future__ import annotations

import os
import threading

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .. import config
from .cache_key import pass_uuid
from .report import REPORT

__all__ = ["GluPass", "graph_has_rewritable_device", "graph_device_types"]

_lock = threading.Lock()
_matcher = None          # the process-wide PatternMatcherPass, built on first use


def _pattern_pass():
    """The PatternMatcherPass with every family registered (built once per process)."""
    global _matcher
    with _lock:
        if _matcher is None:
            from torch._inductor.pattern_matcher import PatternMatcherPass

            from .. import patterns
            matcher = PatternMatcherPass(pass_name="glu_fusion")
            patterns.register_all(matcher)
            _matcher = matcher
        return _matcher


def _sources() -> list[str]:
    """The files whose text decides what this pass writes: itself, the settings, the op
    registrations and the patterns."""
    from .. import ops, patterns
    ops_dir = os.path.dirname(os.path.abspath(ops.__file__))
    return [__file__, config.__file__,
            *(os.path.join(ops_dir, f) for f in os.listdir(ops_dir) if f.endswith(".py")),
            *patterns.source_files()]


def graph_has_rewritable_device(graph: torch.fx.Graph) -> bool:
    """Whether any placeholder of ``graph`` holds a tensor on a device type the settings allow.

    Cheap early exit: graphs that live elsewhere are returned untouched without matching.
    Subgraphs (whose placeholders may carry no traced value) are always searched.
    """
    seen_any = False
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            seen_any = True
            if value.device.type in config.rewrite_devices:
                return True
    return not seen_any


def graph_device_types(graph: torch.fx.Graph) -> tuple[str, ...]:
    """The device types of the tensors ``graph``'s placeholders hold, sorted."""
    types = set()
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            types.add(value.device.type)
    return tuple(sorted(types))


class GluPass(CustomGraphPass):
    """Rewrites the SwiGLU (and further registered) families in a pre-grad graph.

    ``uuid()`` changes whenever the sources of the pass, the patterns or the op registrations,
    the package version or a rewriting setting change, so Inductor's cache never serves a graph
    built under other rules.  Constructing one registers the custom ops: a process that finds
    the graph in the cache never runs the pass but still needs the ops.
    """

    def __init__(self) -> None:
        from .. import ops  # noqa: F401  (registers glu_fusion::* ops)

    def __call__(self, graph: torch.fx.Graph) -> None:
        with REPORT.graph() as record:
            if not graph_has_rewritable_device(graph):
                record.skipped_devices = graph_device_types(graph)
                return
            try:
                _pattern_pass().apply(graph)  # Inductor recompiles the module afterwards
            finally:
                REPORT.settle_left(record)

    def uuid(self) -> str:
        return pass_uuid("pre-grad", _sources())

    def __repr__(self) -> str:
        return "GluPass()"
