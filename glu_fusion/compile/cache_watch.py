"""What a compile served from Inductor's cache calls: our ops, counted in the code it loaded.

A cache hit skips every graph pass, so the rewrite report would stay empty although the loaded
code calls the fused ops.  :func:`watch` brackets one compile (the backend's call of
``compile_fx``, or a whole Dynamo frame compile when the pass is installed globally): when
Inductor's or AOTAutograd's cache counters say it hit and the pass did not run meanwhile, it
counts the ``torch.ops.glu_fusion.*`` calls in the Python modules Inductor loaded for it and adds
a ``CachedGraph`` to the report, which turns those op calls into fused sites per family.  Watches nest: only the outermost one records.  Nothing here
raises into a compile.
"""
from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter
from typing import Iterator

from .report import REPORT, log

__all__ = ["count_op_calls", "watch", "begin", "end", "install_dynamo_callbacks"]

#: a call ``torch.ops.glu_fusion.<op>[_nograd].<overload>(`` (comments and assertion strings
#: that name the op are not followed by a parenthesis)
_OP_CALL = re.compile(r"torch\.ops\.glu_fusion\.(\w+?)(?:_nograd)?\.\w+\(")
_state = threading.local()
_callbacks_installed = False


def count_op_calls(source: str) -> dict[str, int]:
    """Calls of our ops in generated code, per op name (a ``_nograd`` twin counts as its op)."""
    return dict(Counter(_OP_CALL.findall(source)))


def _cache_hits() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def _loaded_modules() -> list:
    from torch._inductor.codecache import PyCodeCache
    return PyCodeCache.modules


def _source_of(module) -> str:
    path = getattr(module, "__file__", None)
    if not path:
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def begin() -> None:
    """Open a watch on this thread (nested opens only count depth)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    if depth:
        return
    try:
        _state.start = (len(_loaded_modules()), _cache_hits(), len(REPORT.graphs))
    except Exception as err:  # noqa: BLE001  (a torch without these internals: no watch)
        log.debug("cache watch unavailable: %r", err)
        _state.start = None


def end() -> None:
    """Close the watch opened last; the outermost close records a cache hit, if any."""
    depth = getattr(_state, "depth", 0)
    if depth <= 0:
        return
    _state.depth = depth - 1
    start = getattr(_state, "start", None)
    if depth > 1 or start is None:
        return
    _state.start = None
    try:
        modules_before, hits_before, runs_before = start
        hits = _cache_hits()
        if hits == hits_before or len(REPORT.graphs) != runs_before:
            return  # compiled afresh (the pass recorded it), or nothing was looked up
        modules = _loaded_modules()
        fresh = modules[modules_before:] if len(modules) >= modules_before else modules
        calls: Counter = Counter()
        seen = set()
        for module in fresh:
            path = getattr(module, "__file__", None)
            if path in seen:
                continue
            seen.add(path)
            calls.update(count_op_calls(_source_of(module)))
        REPORT.add_cached(dict(calls))
    except Exception as err:  # noqa: BLE001
        log.debug("cache watch failed: %r", err)


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Bracket one compile; see the module docstring."""
    begin()
    try:
        yield
    finally:
        end()


def install_dynamo_callbacks() -> None:
    """Watch every Dynamo compile in this process (used when the pass is installed globally,
    where no backend of ours wraps ``compile_fx``); once per process, never raises."""
    global _callbacks_installed
    if _callbacks_installed:
        return
    try:
        from torch._dynamo.callback import on_compile_end, on_compile_start

        on_compile_start(lambda *args, **kwargs: begin())
        on_compile_end(lambda *args, **kwargs: end())
        _callbacks_installed = True
    except Exception as err:  # noqa: BLE001
        log.debug("no Dynamo compile callbacks on this torch: %r", err)
