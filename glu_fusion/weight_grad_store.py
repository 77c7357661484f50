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

Accumulating in fp32: with ``WeightGradStore(accumulate_dtype=torch.float32)`` a flush does not
touch ``.grad``.  Each deferred weight gradient comes out of the GEMM in fp32 (its accumulator, not
rounded to the weight's bf16/fp16 first) and is added into an fp32 sum per parameter that the
store keeps across micro-batches; the sums are cast once, at the end, into what the gradient
reduction consumes.  Without it, every flush adds a bf16 gradient into a bf16 ``.grad``, one
rounding per micro-batch.  ``write_grads()`` casts the sums once to each parameter's dtype and
adds them into ``.grad`` (no data parallelism, DDP); ``reduce_fsdp(model)`` hands them to FSDP2.
The sums take an fp32 copy of each deferred weight (under FSDP2, of its unsharded form) until
then, as FSDP2's own fp32 gradient accumulator does.

Composing with FSDP2 (``fully_shard``): FSDP reduces (reduce-scatters) a parameter's gradient from
a hook at the end of the module's backward, which runs before a deferred weight gradient exists.
So turn gradient synchronisation off for every deferred backward pass and let the store run the
reduction once the last one is done::

    store = WeightGradStore(accumulate_dtype=torch.float32)
    model.set_requires_gradient_sync(False)
    for micro_batch in micro_batches:
        with store:
            loss_fn(model(micro_batch)).backward()
    store.reduce_fsdp(model)     # flush, hand the fp32 sums to FSDP, reduce-scatter
    optimizer.step()

``reduce_fsdp`` casts each sum once to the dtype FSDP reduces in (the policy's ``reduce_dtype``,
else the parameter's) and runs FSDP2's post-backward reduction for every FSDP module, as
``torch.distributed.pipelining`` does for its own deferred weight gradients (its ``REDUCE_GRAD``
step); FSDP2 has no public call for this, so ``reduce_fsdp`` uses the same internals
(``FSDPParamGroup.post_backward``, ``FSDPParam.unsharded_accumulated_grad``; present from torch
2.11 to 2.13 at least).  With the default store (no ``accumulate_dtype``) it flushes into the
bf16 ``.grad`` and reduces that.  FSDP1 (``FullyShardedDataParallel``) has no such step here.
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
    """A FIFO of deferred weight-gradient computations (see the module docstring).

    ``accumulate_dtype``: None (the default) adds each deferred gradient into the weight's
    ``.grad`` in the weight's dtype.  ``torch.float32`` (or ``torch.float64``) keeps a sum per
    parameter in that dtype (or the parameter's, if wider) inside the store instead, computed
    from the GEMM's accumulator without rounding to the weight's dtype; ``write_grads()`` or
    ``reduce_fsdp()`` casts it once and hands it on, ``accumulated_grads()`` shows it.
    """

    def __init__(self, accumulate_dtype: Optional[torch.dtype] = None) -> None:
        if accumulate_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"glu_fusion.WeightGradStore: accumulate_dtype must be None, torch.float32 or "
                             f"torch.float64, got {accumulate_dtype}")
        self.accumulate_dtype: Optional[torch.dtype] = accumulate_dtype
        self._queue: deque[Callable[[], None]] = deque()
        # id(leaf) -> (leaf, its gradient sum in the accumulate dtype, laid out with the leaf's strides)
        self._sums: dict[int, tuple[Tensor, Tensor]] = {}

    def __enter__(self) -> "WeightGradStore":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, compute: Callable[[], None]) -> None:
        """Queue one weight-gradient computation (it hands its result to ``accumulate``)."""
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
        """Drop every queued computation without running it, and every accumulated sum."""
        self._queue.clear()
        self._sums.clear()

    def sum_dtype(self, weight: Tensor) -> Optional[torch.dtype]:
        """The dtype a deferred gradient of ``weight`` is computed and summed in: None for the
        weight's own (no ``accumulate_dtype``), else the wider of the two."""
        if self.accumulate_dtype is None:
            return None
        return torch.promote_types(self.accumulate_dtype, weight.dtype)

    @torch.no_grad()
    def accumulate(self, target: Tensor, grad: Tensor) -> None:
        """Add ``grad`` (shaped like ``target``) for the leaf parameter ``target`` is or views:
        into its ``.grad`` (``accumulate_dtype`` None) or into the store's sum for it."""
        if self.accumulate_dtype is None:
            accumulate_into_grad(target, grad)
            return
        leaf = _leaf_of(target)
        if leaf is None:
            raise ValueError("glu_fusion: a deferred weight gradient needs a leaf tensor or a view of one")
        entry = self._sums.get(id(leaf))
        if entry is None:
            total = torch.empty_strided(leaf.shape, leaf.stride(), dtype=self.sum_dtype(leaf),
                                        device=leaf.device).zero_()
            entry = self._sums[id(leaf)] = (leaf, total)
        _same_elements(entry[1], leaf, target).add_(grad)

    def accumulated_grads(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, sum)`` for every parameter with an accumulated deferred gradient (empty
        without ``accumulate_dtype``); the sums are the store's own tensors, not copies."""
        return list(self._sums.values())

    @torch.no_grad()
    def write_grads(self) -> None:
        """Flush, then cast each accumulated sum once to its parameter's dtype and add it into the
        parameter's ``.grad``; the store's sums are dropped."""
        self.flush()
        sums, self._sums = self._sums, {}
        for leaf, total in sums.values():
            _add_to_grad(leaf, total.to(leaf.dtype))

    @torch.no_grad()
    def reduce_fsdp(self, module: torch.nn.Module) -> None:
        """FSDP2: flush, hand every accumulated sum to FSDP and run FSDP's gradient reduction.

        ``module`` is the root ``fully_shard`` module, after the backward passes of the step ran
        with ``module.set_requires_gradient_sync(False)``.  Each sum is cast once, to the dtype
        FSDP reduces that parameter in, and added to what FSDP accumulated for it itself (from
        gradients autograd produced during those passes); then every FSDP module's
        post-backward reduce-scatters, as after a backward with synchronisation on.  The
        sharded ``.grad`` of the parameters then holds the reduced gradients.  Gradient
        synchronisation is left on (``set_requires_gradient_sync(True)``) and the backward is
        marked the last one of the step (``set_is_last_backward(True)``).  A sum of a parameter
        FSDP does not manage goes to its ``.grad``, as ``write_grads`` does.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(module, FSDPModule):
            raise TypeError(f"glu_fusion.WeightGradStore.reduce_fsdp: expected a module that fully_shard "
                            f"was applied to, got {type(module).__name__}")
        self.flush()
        module.set_requires_gradient_sync(True)
        module.set_is_last_backward(True)
        root = fully_shard.state(module)
        sums, self._sums = self._sums, {}
        for state in root._state_ctx.all_states:
            for group in _fsdp_param_groups(state):
                for fsdp_param in group.fsdp_params:
                    param = getattr(fsdp_param, "_unsharded_param", None)
                    if param is None:  # never unsharded: no gradient to reduce
                        continue
                    # What FSDP does after each backward without synchronisation, for the
                    # gradients flushed into .grad since: add them into its reduce-dtype
                    # accumulator, or start one (one gradient dtype per reduce-scatter).
                    fsdp_param.accumulate_unsharded_grad_if_needed()
                    fsdp_param.to_accumulated_grad_if_needed()
                    entry = sums.pop(id(param), None)
                    if entry is not None:
                        _hand_to_fsdp(fsdp_param, entry[1])
                group.post_backward()
        root._root_post_backward_final_callback()
        for leaf, total in sums.values():
            _add_to_grad(leaf, total.to(leaf.dtype))


def _fsdp_param_groups(state) -> list:
    """An FSDP2 state's parameter groups: a list in torch 2.13, a single one (or None) in 2.11."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def _hand_to_fsdp(fsdp_param, total: Tensor) -> None:
    """Give FSDP one parameter's summed deferred gradient, cast once to the dtype its reduction
    uses, where its post-backward picks the gradient up: the reduce-dtype accumulator FSDP keeps
    across backward passes without synchronisation, or ``.grad`` when it reduces in the
    parameter's own dtype."""
    param = fsdp_param._unsharded_param
    dtype = fsdp_param.reduce_dtype or param.dtype
    grad = total.to(dtype)
    held = fsdp_param.unsharded_accumulated_grad
    if held is not None:
        held += grad
    elif dtype == param.dtype:
        _add_to_grad(param, grad)
    else:
        fsdp_param.unsharded_accumulated_grad = grad


def _same_elements(total: Tensor, leaf: Tensor, target: Tensor) -> Tensor:
    """The elements of ``total`` (laid out like ``leaf``) that ``target`` (``leaf`` or a view of
    it) covers, as a view."""
    if target is leaf:
        return total
    return total.as_strided(target.shape, target.stride(), target.storage_offset() - leaf.storage_offset())


def _add_to_grad(leaf: Tensor, grad: Tensor) -> None:
    if leaf.grad is None:
        leaf.grad = grad
    else:
        leaf.grad += grad


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
