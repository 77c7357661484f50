"""``GluPass``: the pre-grad graph pass that rewrites every pattern family into fused ops.

Inductor calls it through ``config.pre_grad_custom_pass`` on each Dynamo graph (and each
subgraph, e.g. a checkpointed region).  This module loads ``torch._inductor`` (its base class
lives there), so the package imports it only when a pass is needed; the pattern matcher and the
patterns load on the first call and are registered once per process.
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Any, Callable, Optional, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import __version__, config
from .report import REPORT

__all__ = ["GluPass", "ChainedPass", "with_pass", "without_pass", "with_glu_pass", "without_glu_pass",
           "graph_has_rewritable_device", "file_digest"]

_lock = threading.Lock()
_matcher = None          # the process-wide PatternMatcherPass, built on first use
_source_digest: Optional[str] = None


def _pattern_pass():
    """The PatternMatcherPass with every family registered (built once per process)."""
    global _matcher
    with _lock:
        if _matcher is None:
            from torch._inductor.pattern_matcher import PatternMatcherPass

            from . import patterns
            matcher = PatternMatcherPass(pass_name="glu_fusion")
            patterns.register_all(matcher)
            _matcher = matcher
        return _matcher


def _sources_digest() -> str:
    """Hash of the pass, pattern and op-registration sources (read once per process)."""
    global _source_digest
    if _source_digest is None:
        from . import ops, patterns
        here = os.path.dirname(os.path.abspath(__file__))
        ops_dir = os.path.dirname(os.path.abspath(ops.__file__))
        files = [os.path.join(here, "graph_pass.py"), os.path.join(here, "config.py"),
                 *sorted(os.path.join(ops_dir, f) for f in os.listdir(ops_dir) if f.endswith(".py")),
                 *patterns.source_files()]
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
        _source_digest = digest.hexdigest()
    return _source_digest


@functools.lru_cache(maxsize=None)
def file_digest(path: str) -> str:
    """SHA-256 of one source file, read once per process: part of a pass's cache key."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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


class GluPass(CustomGraphPass):
    """Rewrites the SwiGLU (and further registered) families in a pre-grad graph.

    ``uuid()`` changes whenever the sources of the pass, the patterns or the op registrations,
    the package version or a rewriting setting change, so Inductor's cache never serves a graph
    built under other rules.  Constructing one registers the custom ops: a process that finds
    the graph in the cache never runs the pass but still needs the ops.
    """

    def __init__(self) -> None:
        from . import ops  # noqa: F401  (registers glu_fusion::* ops)

    def __call__(self, graph: torch.fx.Graph) -> None:
        with REPORT.graph():
            if not graph_has_rewritable_device(graph):
                return
            _pattern_pass().apply(graph)  # Inductor recompiles the module afterwards

    def uuid(self) -> str:
        return f"glu_fusion-{__version__}-{_sources_digest()}-{config.settings_key()}"

    def __repr__(self) -> str:
        return "GluPass()"


class ChainedPass(CustomGraphPass):
    """Runs several graph passes in order (one Inductor hook's value); its uuid is theirs combined (None when any pass
    has none, so Inductor then bypasses its cache as it would for that pass alone)."""

    def __init__(self, passes: Sequence[Callable[[torch.fx.Graph], Any]]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[Any]:
        ids = []
        for p in self.passes:
            uuid = p.uuid() if isinstance(p, CustomGraphPass) else None
            if uuid is None:
                return None
            ids.append(uuid)
        return tuple(ids)

    def __repr__(self) -> str:
        return f"ChainedPass({list(self.passes)!r})"


def _flatten(existing: Any) -> list:
    if existing is None:
        return []
    if isinstance(existing, ChainedPass):
        return [q for p in existing.passes for q in _flatten(p)]
    if isinstance(existing, (list, tuple)):
        return [q for p in existing for q in _flatten(p)]
    return [existing]


def with_pass(existing: Any, kind: type) -> Any:
    """``existing`` (None, one pass, a list or a chain) followed by one ``kind()`` pass."""
    passes = _flatten(existing)
    if any(isinstance(p, kind) for p in passes):
        return existing
    if not passes:
        return kind()
    return ChainedPass([*passes, kind()])


def without_pass(existing: Any, kind: type) -> Any:
    """``existing`` with every ``kind`` pass taken out (the user's passes stay)."""
    passes = [p for p in _flatten(existing) if not isinstance(p, kind)]
    if not passes:
        return None
    if len(passes) == 1:
        return passes[0]
    return ChainedPass(passes)


def with_glu_pass(existing: Any) -> Any:
    """``existing`` followed by one ``GluPass`` (the pre-grad hook's value)."""
    return with_pass(existing, GluPass)


def without_glu_pass(existing: Any) -> Any:
    """``existing`` with every ``GluPass`` taken out."""
    return without_pass(existing, GluPass)
