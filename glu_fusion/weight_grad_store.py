"""Deferred weight gradients: dX now, the weight-gradient GEMMs later.

Pipeline-parallel schedules (zero-bubble, DualPipe) split a layer's backward in two: the input
gradient is needed at once by the previous stage, the weight gradient only by the optimizer, so
its GEMMs can fill the bubbles of the schedule.  While a ``WeightGradStore`` is entered, the
backward of the grouped expert SwiGLU ops (``glu_fusion::grouped_swiglu``,
``glu_fusion::grouped_swiglu_packed``) computes the input gradient and the bias gradients (cheap)
at once, returns no weight gradient to autograd, and queues the weight-gradient computation::

    store = WeightGradStore()
    with store:
        loss.backward()          # dX and bias grads now; weight grads queued
    ...                          # send dX upstream, run other micro-batches
    store.flush()                # run every queued weight grad, in order, into ``.grad``

``pop()`` runs only the oldest queued computation.  Each computation accumulates into the
``.grad`` of the weight the op read: a leaf parameter, or the leaf parameter a view was taken of
(a transposed or packed-half view), exactly as autograd would have, so store on and off give the
same gradients (bit for bit: the weight-gradient kernel has a fixed reduction order).  Before the
flush the weights' ``.grad`` is untouched (None when it was None).  A weight that is neither a
leaf nor a view of one gets its gradient from autograd as usual.

What the store does not do:

* It only acts in eager backward passes.  A backward traced by ``torch.compile``/AOTAutograd is
  compiled without it (the queued work would outlive the traced graph).
* Hooks that autograd runs after accumulating a gradient (``register_post_accumulate_grad_hook``)
  do not run for the deferred gradients; the flush writes ``.grad`` directly.

Composing with FSDP: FSDP reduces (reduce-scatters) a parameter's gradient from a hook at the
end of the module's backward, which runs before a deferred weight gradient exists.  So turn
FSDP's gradient synchronisation off for the deferred backward passes (FSDP2:
``module.set_requires_gradient_sync(False)``; FSDP1: ``no_sync()``), flush the store, and then
let the reduction run (for FSDP2, a final backward with synchronisation on, or the schedule's
own reduce step).  The flush accumulates into the unsharded parameter's ``.grad`` in that
parameter's dtype; FSDP's mixed-precision policy then casts the accumulated gradient to its
reduce dtype after the accumulation and before the reduce, as it does for eager gradients.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["WeightGradStore", "active_store", "accumulate_into_grad", "deferrable"]

# A process-wide stack, not a thread-local: the autograd engine runs CUDA backward passes on its
# own device threads, not on the thread that entered the store.
_ACTIVE: list["WeightGradStore"] = []


class WeightGradStore:
    """A FIFO of deferred weight-gradient computations (see the module docstring)."""

    def __init__(self) -> None:
        self._queue: deque[Callable[[], None]] = deque()

    def __enter__(self) -> "WeightGradStore":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, compute: Callable[[], None]) -> None:
        """Queue one weight-gradient computation (it accumulates into ``.grad`` itself)."""
        self._queue.append(compute)

    def pop(self) -> None:
        """Run the oldest queued computation."""
        if not self._queue:
            raise IndexError("glu_fusion.WeightGradStore.pop: nothing is queued")
        self._queue.popleft()()

    def flush(self) -> None:
        """Run every queued computation, oldest first."""
        while self._queue:
            self._queue.popleft()()

    def clear(self) -> None:
        """Drop every queued computation without running it."""
        self._queue.clear()


def active_store(*tensors: Tensor) -> Optional[WeightGradStore]:
    """The innermost entered store, when this backward runs eagerly on plain tensors; else None
    (compiled or traced backward passes see fake or functional tensor subclasses)."""
    if not _ACTIVE or torch.compiler.is_compiling():
        return None
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None
    return _ACTIVE[-1]


def _leaf_of(t: Tensor) -> Optional[Tensor]:
    if t.is_leaf:
        return t if t.requires_grad else None
    base = t._base
    if base is not None and base.is_leaf and base.requires_grad:
        return base
    return None


def deferrable(*weights: Tensor) -> bool:
    """Whether each weight is a leaf, or a view of one, whose ``.grad`` a flush can fill."""
    return all(_leaf_of(w) is not None for w in weights)


@torch.no_grad()
def accumulate_into_grad(target: Tensor, grad: Tensor) -> None:
    """Add ``grad`` (shaped like ``target``) into the ``.grad`` of ``target``'s leaf: the leaf
    itself, or the parameter ``target`` is a view of (the view's elements of its gradient)."""
    leaf = _leaf_of(target)
    if leaf is None:
        raise ValueError("glu_fusion: a deferred weight gradient needs a leaf tensor or a view of one")
    if leaf is not target:
        full = torch.zeros_like(leaf)
        full.as_strided(target.shape, target.stride(),
                        target.storage_offset() - leaf.storage_offset()).copy_(grad)
        grad = full
    if leaf.grad is None:
        leaf.grad = grad.contiguous()
    else:
        leaf.grad += grad
