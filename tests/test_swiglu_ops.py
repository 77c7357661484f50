"""The SwiGLU custom ops on the reference path: schema checks, gradcheck, compile, errors."""
from __future__ import annotations

import pytest
import torch

import glu_fusion
from glu_fusion import reference
from glu_fusion.ops.swiglu import CONCAT_UP_FIRST, INTERLEAVED_GATE_EVEN

from helpers.swiglu_cases import ALL_LAYOUTS, make_problem, rel_error


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(99)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_gradcheck_float64(layout):
    problem = make_problem(layout, (3, 2), 12, 5, torch.float64, bias=True)
    assert torch.autograd.gradcheck(lambda *leaves: problem.run(list(leaves)), problem.leaves)


def test_opcheck_forward_ops():
    x = torch.randn(5, 16)
    wg, wu = torch.randn(8, 16), torch.randn(8, 16)
    bg, bu = torch.randn(8), torch.randn(8)
    packed, pbias = torch.randn(16, 16), torch.randn(16)
    torch.library.opcheck(torch.ops.glu_fusion.swiglu_preact.default, (x, wg, wu, bg, bu))
    torch.library.opcheck(torch.ops.glu_fusion.swiglu_preact.default, (x.reshape(5, 1, 16), wg, wu, None, None))
    for save in (True, False):
        torch.library.opcheck(torch.ops.glu_fusion.swiglu.default, (x, wg, wu, bg, bu, save))
        torch.library.opcheck(torch.ops.glu_fusion.swiglu.default, (x, wg, wu, None, None, save))
        for layout in (CONCAT_UP_FIRST, INTERLEAVED_GATE_EVEN):
            torch.library.opcheck(torch.ops.glu_fusion.swiglu_packed.default, (x, packed, pbias, layout, save))


def test_opcheck_backward_ops():
    dout, preact = torch.randn(5, 8), torch.randn(5, 16)
    for layout in (CONCAT_UP_FIRST, INTERLEAVED_GATE_EVEN):
        torch.library.opcheck(torch.ops.glu_fusion.swiglu_dh.default, (dout, preact, layout))
    torch.library.opcheck(torch.ops.glu_fusion.swiglu_dh_inplace.default, (dout, preact.clone()))


def test_preact_op_equals_saved_preactivations():
    x, wg, wu, bg, bu = torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8, 16), torch.randn(8), torch.randn(8)
    for biases in ((bg, bu), (None, None)):
        saved = torch.ops.glu_fusion.swiglu.default(x, wg, wu, *biases, True)[1]
        torch.testing.assert_close(torch.ops.glu_fusion.swiglu_preact.default(x, wg, wu, *biases), saved)
    with pytest.raises(ValueError, match="K=16"):
        torch.ops.glu_fusion.swiglu_preact.default(x[..., :15], wg, wu, None, None)


def test_dh_inplace_equals_functional_dh():
    dout, preact = torch.randn(3, 5, 8), torch.randn(15, 16)
    want = torch.ops.glu_fusion.swiglu_dh.default(dout, preact, 0)
    overwritten = preact.clone()
    assert torch.ops.glu_fusion.swiglu_dh_inplace.default(dout, overwritten) is None
    assert torch.equal(overwritten, want)
    with pytest.raises(ValueError, match="swiglu_dh_inplace needs"):
        torch.ops.glu_fusion.swiglu_dh_inplace.default(dout, preact[:, :15])
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.glu_fusion.swiglu_dh_inplace.default(dout.double(), preact)


def test_compile_dynamic_shapes_hand_written_call():
    torch._dynamo.reset()
    wg = torch.randn(24, 32, requires_grad=True)
    wu = torch.randn(24, 32, requires_grad=True)

    @torch.compile(dynamic=True, fullgraph=True)
    def f(x):
        return glu_fusion.swiglu(x, wg, wu) * 2

    for batch in (3, 5, 9):
        x = torch.randn(batch, 4, 32, requires_grad=True)
        out = f(x)
        want = reference.swiglu(x, wg, wu) * 2
        assert rel_error(out, want) < 1e-5
        gx, gw = torch.autograd.grad(out.sum(), [x, wg])
        wx, ww = torch.autograd.grad(want.sum(), [x, wg])
        assert rel_error(gx, wx) < 1e-5 and rel_error(gw, ww) < 1e-5


def test_autocast_follows_active_dtype():
    x = torch.randn(4, 16)
    wg, wu = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = glu_fusion.swiglu(x, wg, wu)
        eager = torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert rel_error(out, eager) < 2e-2


def test_fp32_highest_precision_is_honoured(monkeypatch):
    """With 'highest' the kernels must not use tf32: the op reports ieee to them."""
    from glu_fusion.ops import dispatch
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert dispatch.allow_tf32() is False
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert dispatch.allow_tf32() is True


# --- bad input -----------------------------------------------------------------------------------

def _ok():
    return torch.randn(4, 16), torch.randn(8, 16), torch.randn(8, 16)


def test_error_k_mismatch():
    x, wg, wu = _ok()
    with pytest.raises(ValueError, match="K=15"):
        glu_fusion.swiglu(x[:, :15], wg, wu)


def test_error_weight_shapes_differ():
    x, wg, wu = _ok()
    with pytest.raises(ValueError, match="w_gate .* and w_up .* differ"):
        glu_fusion.swiglu(x, wg, wu[:7])


def test_error_dtype_mismatch():
    x, wg, wu = _ok()
    with pytest.raises(TypeError, match="w_up has dtype torch.float16"):
        glu_fusion.swiglu(x, wg, wu.half())


def test_error_device_mismatch():
    x, wg, wu = _ok()
    with pytest.raises(ValueError, match="w_gate is on meta"):
        glu_fusion.swiglu(x, wg.to("meta"), wu)


def test_error_bias_shape():
    x, wg, wu = _ok()
    with pytest.raises(ValueError, match="bias_gate must have shape"):
        glu_fusion.swiglu(x, wg, wu, torch.randn(9), torch.randn(8))
    with pytest.raises(ValueError, match="both bias_gate and bias_up"):
        glu_fusion.swiglu(x, wg, wu, torch.randn(8))
    with pytest.raises(ValueError, match="both bias_gate and bias_up"):  # the op itself, too
        torch.ops.glu_fusion.swiglu(x, wg, wu, None, torch.randn(8), True)


def test_error_integer_dtype():
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        glu_fusion.swiglu(torch.ones(2, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long),
                          torch.ones(3, 4, dtype=torch.long))


def test_error_packed_odd_rows_and_bad_layout():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="even first dimension"):
        glu_fusion.swiglu_packed(x, torch.randn(15, 16))
    with pytest.raises(ValueError, match="layout must be one of"):
        glu_fusion.swiglu_packed(x, torch.randn(16, 16), layout="stacked")


def test_preact_saved_only_when_a_backward_can_need_it(monkeypatch):
    from glu_fusion import config
    from glu_fusion.ops import swiglu as swiglu_ops

    seen = []
    real = swiglu_ops.swiglu
    monkeypatch.setattr(swiglu_ops, "swiglu", lambda *a: seen.append(a[-1]) or real(*a))
    x, wg, wu = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8, 16, requires_grad=True)
    glu_fusion.swiglu(x, wg, wu)
    with torch.no_grad():
        glu_fusion.swiglu(x, wg, wu)
    glu_fusion.swiglu(x, wg, wu.detach())
    monkeypatch.setattr(config, "recompute", True)
    out = glu_fusion.swiglu(x, wg, wu)
    assert seen == [True, False, False, False]
    (gw,) = torch.autograd.grad(out.sum(), [wu])  # recompute path still differentiates
    want = torch.autograd.grad(reference.swiglu(x, wg, wu).sum(), [wu])[0]
    assert rel_error(gw, want) < 1e-5


def test_cuda_fast_path_registered_for_every_op():
    """Every op has a direct CUDA kernel (skipping custom_op's per-call wrapper)."""
    import glu_fusion.ops  # noqa: F401
    names = ["swiglu", "swiglu_packed", "swiglu_preact", "swiglu_dh", "swiglu_dh_inplace",
             "rms_norm_gated", "rms_norm_gated_backward"]
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"glu_fusion::{n}", "CUDA")]
    assert not missing
