"""The host fast path: per-signature plans and cached kernel binaries.

CPU: the pieces (plan cache, constexpr order, hook detection, the ordinary path under the
interpreter).  GPU: results through the plans equal those of the general path bit for bit,
forward and backward, across calls whose signatures differ in shape or tensor alignment, and the
plans do keep compiled binaries.
"""
from __future__ import annotations

import types

import pytest
import torch

import glu_fusion
from glu_fusion.kernels._launch import LaunchPlan, _hook_active, constexpr_tail
from glu_fusion.ops import dispatch, plan_cache
from glu_fusion.ops import rms_norm_gated as norm_ops
from glu_fusion.ops import swiglu as swiglu_ops


def test_plan_cache_builds_once_per_key_and_never_caches_errors():
    built = []

    def build(value):
        built.append(value)
        if value < 0:
            raise ValueError("bad input")
        return None if value == 0 else value * 10

    cache = plan_cache.PlanCache(build, limit=3)
    assert cache.get("a", 1) == 10 and cache.get("a", 1) == 10
    assert cache.get("zero", 0) is None and cache.get("zero", 0) is None
    assert built == [1, 0]
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get("bad", -1)
    assert built == [1, 0, -1, -1]
    cache.get("b", 2)
    cache.get("c", 3)  # the fourth key empties the full cache first
    assert list(cache._plans) == ["c"]


def test_constexpr_tail_in_signature_order():
    def kernel(a, b, FIRST, SECOND=7, THIRD=None):
        pass

    fake = types.SimpleNamespace(fn=kernel)
    assert constexpr_tail(fake, 2, {"THIRD": 3, "FIRST": 1, "num_warps": 4}) == (1, 7, 3)
    with pytest.raises(TypeError, match="FIRST"):
        constexpr_tail(fake, 2, {"SECOND": 2})


def test_launch_hooks_detected_in_both_forms():
    assert not _hook_active(None)
    assert _hook_active(lambda metadata: None)
    assert not _hook_active(types.SimpleNamespace(calls=[]))
    assert _hook_active(types.SimpleNamespace(calls=[print]))


def test_plan_takes_the_ordinary_path_without_a_binary():
    calls = []

    class FakeKernel:
        fn = staticmethod(lambda a, n, BLOCK: None)

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    plan = LaunchPlan(FakeKernel(), (4,), (5,), {"BLOCK": 8}, 0)
    t = torch.zeros(4)
    plan(t)
    plan(t)
    assert [c[0] for c in calls] == [(4, 1, 1), (4, 1, 1)]
    assert calls[0][1] == (t, 5) and calls[0][2] == {"BLOCK": 8}
    assert plan._binary is None   # the fake returned no binary: nothing to cache


def _launch_plans(cache):
    """The Triton launch plans an op's cached plans call (cuBLAS-only plans have none)."""
    found = []
    for plan in cache._plans.values():
        for cell in getattr(plan, "__closure__", None) or ():
            if isinstance(cell.cell_contents, LaunchPlan):
                found.append(cell.cell_contents)
    return found


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
_INTERPRETER = pytest.mark.skipif(not dispatch.interpreter_active(), reason="CPU kernels need the interpreter")
PLAN_CASES = [pytest.param(op, device, dtype, marks=_GPU if device == "cuda" else _INTERPRETER,
                           id=f"{op}-{device}-{str(dtype)[6:]}")
              for op in ("swiglu", "swiglu_packed", "norm")
              for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16))]


@pytest.mark.parametrize("op,device,dtype", PLAN_CASES)
def test_plans_match_the_general_path(op, device, dtype):
    """On the CPU (interpreter) this exercises the plans' bookkeeping; on the GPU also the
    cached binaries."""
    torch.manual_seed(0)
    k, n = 48, 80

    def problem(m: int, offset: int):
        """Inputs for ``op`` whose x starts ``offset`` elements into its buffer (misaligned)."""
        buf = torch.randn(m * k + offset, device=device, dtype=dtype)
        x = buf[offset:].view(m, k).requires_grad_()
        if op == "swiglu":
            wg = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
            wu = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
            return (x, wg, wu), lambda x, wg, wu: glu_fusion.swiglu(x, wg, wu), (m, n)
        if op == "swiglu_packed":
            w = torch.randn(2 * n, k, device=device, dtype=dtype, requires_grad=True)
            return (x, w), lambda x, w: glu_fusion.swiglu_packed(x, w, layout="interleaved"), (m, n)
        z = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(k, device=device, dtype=dtype, requires_grad=True)
        return (x, z, w), lambda x, z, w: glu_fusion.rms_norm_gated(x, z, w), (m, k)

    # Signatures alternate (M = 1 / 16 / 17, aligned / misaligned x), each twice, so the
    # second round runs from the plans and their cached binaries.
    for m, offset in [(m, off) for m in (1, 16, 17) for off in (0, 1)] * 2:
        leaves, fn, out_shape = problem(m, offset)
        dout = torch.randn(out_shape, device=device, dtype=dtype)
        results = []
        for cached in (False, True):
            plan_cache.set_cached_launch(cached)
            try:
                out = fn(*leaves)
                results.append([out, *torch.autograd.grad(out, leaves, dout)])
            finally:
                plan_cache.set_cached_launch(True)
        for general, planned in zip(*results):
            torch.testing.assert_close(planned, general, rtol=0, atol=0)
    caches = ([swiglu_ops._FORWARD_PLANS, swiglu_ops._DH_PLANS] if op != "norm"
              else [norm_ops._FORWARD_PLANS, norm_ops._BACKWARD_PLANS])
    for cache in caches:
        assert _launch_plans(cache), "no plan was built"
        if device == "cuda":
            assert any(launch._binary is not None for launch in _launch_plans(cache)), "no binary was cached"
