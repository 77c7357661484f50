"""One Inductor hook, several passes: ours chained after any pass the user set there.

torch 2.11 takes one pass object per hook, newer versions also a list; we always chain into a
``ChainedPass`` and never overwrite what the user put in the hook.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = ["ChainedPass", "with_pass", "without_pass"]


class ChainedPass(CustomGraphPass):
    """Runs several graph passes in order (one Inductor hook's value); its uuid is theirs
    combined (None when any pass has none, so Inductor then bypasses its cache as it would for
    that pass alone)."""

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
