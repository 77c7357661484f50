"""Launch helpers shared by the kernels: interpreter detection, tile tables, dot precision, and
launch plans that call a compiled binary directly."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch


try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton without knobs has no launch hooks to honour
    _knobs = None


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (small fixed tiles, no tuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_quiet():
    """A context for one launch: under the interpreter, numpy computes the kernel and warns on
    every overflow or NaN a float kernel legitimately produces (``exp`` of a large input, NaN
    inputs); those warnings are silenced there, as the GPU raises none.  Elsewhere: nothing."""
    if not interpreting():
        return contextlib.nullcontext()
    import numpy
    return numpy.errstate(all="ignore")


def precision(allow_tf32: bool) -> str:
    """``tl.dot`` input precision for fp32 operands (ignored for fp16/bf16)."""
    return "tf32" if allow_tf32 else "ieee"


def tile_config(table: dict, dtype: torch.dtype, m: int) -> dict:
    """Pick a kernel's launch meta-parameters from its table, keyed by operand width and the
    token count: ``table[(wide, small_m)]`` with ``wide`` for 4-byte operands and ``small_m``
    for M <= 64 (decode-like calls, which want narrow row tiles and many column tiles).

    A fixed table keeps the first call and compile time short (no autotuning sweep), and the
    fp32 entries stay inside Hopper's 227 KB of shared memory per program.
    """
    return dict(table[(dtype == torch.float32, m <= 64)])


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class LaunchPlan:
    """One kernel launch with everything but its tensors fixed: grid, scalars, constexprs.

    ``kernel[grid](...)`` re-binds the arguments, re-derives Triton's specialisation and hashes a
    cache key on every call, about 30 us of host time on the H100 machine, more than the GPU
    work of a small layer (benchmarks/results/host_overhead.txt).  A plan is built once per
    shape/stride/dtype signature (the ops cache them) and, once it has launched through Triton
    with every tensor 16-byte aligned, keeps the compiled binary and calls its launcher directly
    as Triton itself does after its lookup.  With the scalars fixed, the binary's specialisation
    can only change with tensor alignment, which is checked on every call; misaligned tensors,
    another current device, launch hooks (profilers), the interpreter and ``direct = False`` (set
    by the ops, which own that switch) take Triton's ordinary path.

    Tensors are the kernel's leading parameters, scalars follow, constexprs come by keyword.
    """

    #: Whether plans may call their binary directly; the ops set it (the kernels read no setting).
    direct: bool = True

    __slots__ = ("kernel", "grid", "scalars", "keywords", "device", "_binary", "_tail")

    def __init__(self, kernel, grid: tuple, scalars: tuple, keywords: dict, device: int):
        self.kernel = kernel
        self.grid = (tuple(grid) + (1, 1))[:3]
        self.scalars = tuple(scalars)
        self.keywords = keywords
        self.device = device
        self._binary = None
        self._tail = ()

    def __call__(self, *tensors) -> None:
        binary = self._binary
        if binary is not None and LaunchPlan.direct:
            addresses = 0
            for t in tensors:
                addresses |= t.data_ptr()
            if not addresses & 15 and torch.cuda.current_device() == self.device and not _launch_hooks_set():
                grid = self.grid
                binary.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device),
                           binary.function, binary.packed_metadata, None, None, None,
                           *tensors, *self.scalars, *self._tail)
                return
        with interpreter_quiet():
            launched = self.kernel[self.grid](*tensors, *self.scalars, **self.keywords)
        if binary is None and launched is not None and self._cacheable(tensors):
            self._tail = constexpr_tail(self.kernel, len(tensors) + len(self.scalars), self.keywords)
            self._binary = launched

    def _cacheable(self, tensors) -> bool:
        if interpreting() or not LaunchPlan.direct or _launch_hooks_set():
            return False
        if torch.cuda.current_device() != self.device:
            return False
        return all(t.data_ptr() % 16 == 0 for t in tensors) and hasattr(self.kernel, "fn")


def constexpr_tail(kernel, n_positional: int, keywords: dict) -> tuple:
    """Values of a kernel's parameters after the positional ones, in signature order: what
    Triton's launcher receives after the runtime arguments."""
    params = list(inspect.signature(kernel.fn).parameters.values())[n_positional:]
    missing = [p.name for p in params if p.name not in keywords and p.default is p.empty]
    if missing:
        raise TypeError(f"glu_fusion: kernel {kernel.fn.__name__} is missing {missing}")
    return tuple(keywords[p.name] if p.name in keywords else p.default for p in params)


def _launch_hooks_set() -> bool:
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def _hook_active(hook) -> bool:
    """A launch hook is a callable, or (newer Triton) a chain that may hold none."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)
