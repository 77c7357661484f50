"""Odd inputs of the public functions: empty dimensions (M = 0, K = 0, N = 1), NaN/Inf, strided
views, deterministic mode, and error messages that name the caller's arguments.

Every result is compared with the same computation spelled in plain torch on float64 copies of
the inputs, forward and every gradient.  CPU runs go through the Triton interpreter (the
conftest switches it on) and, where marked, through the plain-torch reference path.
"""
from __future__ import annotations

import gc

import warnings

import pytest
import torch
import torch.nn.functional as F

import glu_fusion

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


# --- eager spellings (the oracle) ------------------------------------------------------------------

def eager_swiglu(x, wg, wu, bg=None, bu=None):
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def eager_swiglu_packed(x, w, b=None):
    g, u = F.linear(x, w, b).chunk(2, dim=-1)
    return F.silu(g) * u


def eager_mlp_block(x, wg, wu, wd, bg=None, bu=None, bd=None):
    return F.linear(eager_swiglu(x, wg, wu, bg, bu), wd, bd)


def eager_mlp_block_packed(x, w, wd, b=None, bd=None):
    return F.linear(eager_swiglu_packed(x, w, b), wd, bd)


def eager_rms_norm(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def eager_rms_norm_gated(x, z, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps) * F.silu(z)


# --- comparison ------------------------------------------------------------------------------------

def _first(y):
    return y[0] if isinstance(y, tuple) else y


def compare_with_eager(fn, eager, inputs, dtype=torch.float32):
    """Run ``fn`` on ``inputs`` (any strides; each becomes a differentiable leaf of its own) and
    ``eager`` on float64 copies; compare the output and the gradient of every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = _first(fn(*leaves))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    want = eager(*leaves64)
    want_grads = torch.autograd.grad(want, leaves64, dout.double(), allow_unused=True)
    assert out.shape == want.shape and out.dtype == dtype
    _close("output", out, want, dtype)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        w = torch.zeros_like(leaves64[i]) if w is None else w
        g = torch.zeros_like(leaves[i]) if g is None else g
        assert g.shape == w.shape, f"grad {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        _close(f"grad {i}", g, w, dtype)


def _close(name, got, want, dtype):
    if want.numel() == 0:
        return
    err = (got.double() - want).abs().max().item()
    scale = 1.0 + want.abs().max().item()
    assert err <= TOL[dtype] * scale * 10, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(params=["interpreter", "reference"])
def path(request, monkeypatch):
    """Run the ops through the Triton interpreter's kernels, then through the plain-torch path."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif torch.cuda.is_available():
        pytest.skip("the interpreter path is exercised on CPU-only machines")
    torch.manual_seed(0)
    return request.param


def _gemm_inputs(m, k, n, d=5, dtype=torch.float32):
    def r(*s):
        return torch.randn(*s, dtype=dtype)
    return dict(x=r(m, k), wg=r(n, k) / max(k, 1) ** 0.5, wu=r(n, k) / max(k, 1) ** 0.5, wd=r(d, n),
                bg=r(n), bu=r(n), bd=r(d))


# --- 1. empty dimensions and N = 1 -----------------------------------------------------------------

GEMM_SHAPES = [(0, 8, 4), (3, 0, 4), (0, 0, 4), (3, 8, 1)]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("kind", ["swiglu", "swiglu_packed", "mlp_block", "mlp_block_packed"])
def test_gemm_ops_empty_and_unit_dims(path, kind, m, k, n):
    t = _gemm_inputs(m, k, n)
    packed = torch.cat([t["wg"], t["wu"]])
    packed_b = torch.cat([t["bg"], t["bu"]])
    if kind == "swiglu":
        compare_with_eager(glu_fusion.swiglu, eager_swiglu, [t["x"], t["wg"], t["wu"], t["bg"], t["bu"]])
    elif kind == "swiglu_packed":
        compare_with_eager(glu_fusion.swiglu_packed, eager_swiglu_packed, [t["x"], packed, packed_b])
    elif kind == "mlp_block":
        compare_with_eager(glu_fusion.mlp_block, eager_mlp_block,
                           [t["x"], t["wg"], t["wu"], t["wd"], t["bg"], t["bu"], t["bd"]])
    else:
        compare_with_eager(glu_fusion.mlp_block_packed, eager_mlp_block_packed,
                           [t["x"], packed, t["wd"], packed_b, t["bd"]])


def test_k_zero_gives_the_bias_path_only(path):
    """With no input features the projections are their biases: silu(bg)·bu on every row."""
    t = _gemm_inputs(3, 0, 4)
    out = glu_fusion.swiglu(t["x"], t["wg"], t["wu"], t["bg"], t["bu"])
    torch.testing.assert_close(out, (F.silu(t["bg"]) * t["bu"]).expand(3, 4))


@pytest.mark.parametrize("m,d", [(0, 8), (3, 0), (3, 1), (0, 0)])
@pytest.mark.parametrize("kind", ["rms_norm", "rms_norm_gated"])
def test_norms_empty_and_unit_dims(path, kind, m, d):
    x, z, w = torch.randn(m, d), torch.randn(m, d), torch.randn(d)
    if kind == "rms_norm":
        compare_with_eager(glu_fusion.rms_norm, eager_rms_norm, [x, w])
    else:
        compare_with_eager(glu_fusion.rms_norm_gated, eager_rms_norm_gated, [x, z, w])


# --- 2. error messages name the caller's arguments -------------------------------------------------

def test_packed_bias_error_names_bias_with_full_shape():
    x, w, wd = torch.randn(3, 8), torch.randn(24, 8), torch.randn(5, 12)
    for call in (lambda: glu_fusion.swiglu_packed(x, w, torch.randn(48)),
                 lambda: glu_fusion.mlp_block_packed(x, w, wd, torch.randn(48))):
        with pytest.raises(ValueError, match=r"bias must have shape \(2N,\) = \(24,\).*got \(48,\)") as info:
            call()
        assert "b_gate" not in str(info.value) and "b_up" not in str(info.value)


def test_packed_weight_error_names_weight():
    with pytest.raises(ValueError, match=r"packed weight must be 2-D \[2N, K\].*\(23, 8\)"):
        glu_fusion.swiglu_packed(torch.randn(3, 8), torch.randn(23, 8))
    with pytest.raises(ValueError, match=r"x has K=7 features but the weight expects K=8"):
        glu_fusion.swiglu_packed(torch.randn(3, 7), torch.randn(24, 8))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float16"):
        glu_fusion.swiglu_packed(torch.randn(3, 8), torch.randn(24, 8), torch.randn(24).half())


def test_grouped_packed_bias_error_names_bias():
    offsets = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias must have shape \(E, 2N\) = \(1, 24\).*got \(1, 12\)"):
        glu_fusion.grouped_swiglu_packed(torch.randn(3, 8), offsets, torch.randn(1, 24, 8), torch.randn(1, 12))


@pytest.mark.parametrize("fn", ["swiglu", "mlp_block"])
def test_separate_bias_errors_use_public_names(fn):
    x, wg, wu, wd = torch.randn(3, 8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(5, 12)
    extra = (wd,) if fn == "mlp_block" else ()
    call = getattr(glu_fusion, fn)
    with pytest.raises(ValueError, match=r"bias_gate must have shape \(12,\), got \(5,\)") as info:
        call(x, wg, wu, *extra, torch.randn(5), torch.randn(12))
    assert "b_gate" not in str(info.value)
    with pytest.raises(TypeError, match=r"bias_up has dtype torch.float16"):
        call(x, wg, wu, *extra, torch.randn(12), torch.randn(12).half())
    with pytest.raises(ValueError, match="bias_gate and bias_up"):
        call(x, wg, wu, *extra, torch.randn(12))
    if fn == "mlp_block":
        with pytest.raises(ValueError, match=r"bias_down must have shape \(5,\), got \(3,\)"):
            call(x, wg, wu, wd, bias_down=torch.randn(3))


def _public_calls():
    """Each public function with valid tensor arguments, by name, in its signature's order."""
    x, w, wd = torch.randn(3, 8), torch.randn(12, 8), torch.randn(5, 12)
    packed, offsets, experts = torch.randn(24, 8), torch.tensor([1, 3], dtype=torch.int32), torch.randn(2, 12, 8)
    return {
        "swiglu": dict(x=x, w_gate=w, w_up=w, bias_gate=None, bias_up=None),
        "swiglu_packed": dict(x=x, weight=packed, bias=None),
        "mlp_block": dict(x=x, w_gate=w, w_up=w, w_down=wd, bias_gate=None, bias_up=None, bias_down=None),
        "mlp_block_packed": dict(x=x, weight=packed, w_down=wd, bias=None, bias_down=None),
        "grouped_swiglu": dict(x=x, offsets=offsets, w_gate=experts, w_up=experts, bias_gate=None, bias_up=None),
        "grouped_swiglu_packed": dict(x=x, offsets=offsets, weight=torch.randn(2, 24, 8), bias=None),
        "rms_norm": dict(x=x, weight=None, residual=None),
        "rms_norm_gated": dict(x=x, z=x, weight=None),
    }


_LIST = [[1.0] * 8] * 3


@pytest.mark.parametrize("fn, name, bad", [
    (fn, name, bad) for fn, args in _public_calls().items() for name, value in args.items()
    for bad in ([_LIST] if value is None else [None, _LIST])])  # an optional argument may be None
def test_a_non_tensor_argument_is_a_type_error_naming_it(fn, name, bad):
    args = _public_calls()[fn]
    args[name] = bad
    with pytest.raises(TypeError, match=rf"glu_fusion.{fn}: {name} must be a torch.Tensor, got "
                                        rf"{type(bad).__name__}"):
        getattr(glu_fusion, fn)(**args)


@pytest.mark.parametrize("offsets", [[7, 3, 10], [-1, 3, 10], [2, 5, 11]], ids=["decreasing", "negative", "past-T"])
@pytest.mark.parametrize("fn", ["grouped_swiglu", "grouped_swiglu_packed"])
def test_grouped_offsets_that_are_no_cumulative_counts_are_refused(fn, offsets):
    x, w = torch.randn(10, 8), torch.randn(3, 12, 8)
    weights = (w, w) if fn == "grouped_swiglu" else (torch.randn(3, 24, 8),)
    with pytest.raises(ValueError, match=r"offsets must be cumulative token counts .*at most T=10.*got \["):
        getattr(glu_fusion, fn)(x, torch.tensor(offsets, dtype=torch.int32), *weights)


@pytest.mark.parametrize("group_size", [4.0, "4", True])
def test_rms_norm_gated_group_size_of_the_wrong_type_is_named(group_size):
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="group_size must be an int or None"):
        glu_fusion.rms_norm_gated(x, x, group_size=group_size)


@pytest.mark.parametrize("group_size", [None, 4])
def test_rms_norm_gated_with_no_features_is_empty_with_or_without_groups(group_size):
    x, z, w = torch.randn(3, 0, requires_grad=True), torch.randn(3, 0), torch.randn(0)
    out = glu_fusion.rms_norm_gated(x, z, w, group_size=group_size)
    assert out.shape == (3, 0)
    out.sum().backward()
    assert x.grad.shape == (3, 0)


# --- 3. NaN and Inf propagate as in eager, without interpreter warnings ----------------------------

def _special_rows(m, k):
    x = torch.randn(m, k)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 0] = float("-inf")
    x[3] *= 1e30   # finite input whose products overflow fp32
    return x


def _same_specials(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ from eager"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), "+inf positions differ from eager"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf positions differ from eager"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_nan_inf_propagate_like_eager_without_warnings(path):
    m, k, n = 6, 8, 4
    x = _special_rows(m, k)
    wg, wu, wd = torch.randn(n, k), torch.randn(n, k), torch.randn(3, n)
    z, w = _special_rows(m, k), torch.randn(k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases = [(glu_fusion.swiglu(x, wg, wu), eager_swiglu(x, wg, wu)),
                 (glu_fusion.swiglu_packed(x, torch.cat([wg, wu])), eager_swiglu_packed(x, torch.cat([wg, wu]))),
                 (glu_fusion.mlp_block(x, wg, wu, wd), eager_mlp_block(x, wg, wu, wd)),
                 (glu_fusion.rms_norm(x, w)[0], eager_rms_norm(x, w)),
                 (glu_fusion.rms_norm_gated(x, z, w), eager_rms_norm_gated(x, z, w))]
    for got, want in cases:
        _same_specials(got, want)


def test_nan_inputs_backward_prints_no_warning(path):
    x = _special_rows(6, 8).requires_grad_()
    wg, wu = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z, w = torch.randn(6, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glu_fusion.swiglu(x, wg, wu).sum().backward()
        glu_fusion.rms_norm_gated(x, z, w).sum().backward()
    assert torch.isnan(wg.grad).any() and torch.isnan(x.grad[0]).all()


# --- 4. strided views ------------------------------------------------------------------------------

def _views(m, k, n):
    """Inputs as views a model may hand over: transposed, sliced, channels-last-like 4-D."""
    x_t = torch.randn(k, m).t()                       # [M, K] with unit stride along M
    x_sliced = torch.randn(m, 2 * k)[:, ::2]          # every other column
    x_4d = torch.randn(2, k, 3, m).permute(0, 2, 3, 1)  # [B, H, W, C] over NCHW storage
    wg_t = torch.randn(k, n).t()                      # weight stored transposed
    wu_sliced = torch.randn(n, k + 3)[:, 1:k + 1]     # weight cut from a wider tensor
    return x_t, x_sliced, x_4d, wg_t, wu_sliced


@pytest.mark.parametrize("which_x", [0, 1, 2])
def test_swiglu_and_block_on_strided_views(path, which_x):
    m, k, n = 5, 8, 6
    views = _views(m, k, n)
    x, wg, wu = views[which_x], views[3], views[4]
    wd = torch.randn(n, 7).t()
    bg, bu = torch.randn(2 * n)[::2], torch.randn(n)
    compare_with_eager(glu_fusion.swiglu, eager_swiglu, [x, wg, wu, bg, bu])
    compare_with_eager(glu_fusion.mlp_block, eager_mlp_block, [x, wg, wu, wd])
    packed = torch.randn(k, 2 * n).t()
    compare_with_eager(glu_fusion.swiglu_packed, eager_swiglu_packed, [x, packed])
    compare_with_eager(glu_fusion.mlp_block_packed, eager_mlp_block_packed, [x, packed, wd])


@pytest.mark.parametrize("which_x", [0, 1, 2])
def test_norms_on_strided_views(path, which_x):
    m, k = 5, 8
    x = _views(m, k, 1)[which_x]
    dims = tuple(range(x.dim()))[::-1]
    z = torch.randn(tuple(x.shape)[::-1]).permute(dims)   # every dimension reversed in storage
    w = torch.randn(2 * k)[::2]
    compare_with_eager(glu_fusion.rms_norm, eager_rms_norm, [x, w])
    compare_with_eager(glu_fusion.rms_norm_gated, eager_rms_norm_gated, [x, z, w])


# --- 5. deterministic mode -------------------------------------------------------------------------

def _grads_twice(device, m, k, n, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    x, wg, wu, wd, z, w = r(m, k), r(n, k) / k ** 0.5, r(n, k) / k ** 0.5, r(k, n), r(m, k), r(k)
    dout, dnorm = r(m, n), r(m, k)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd, z, w)]
        lx, lwg, lwu, lwd, lz, lw = leaves
        grads = list(torch.autograd.grad(glu_fusion.swiglu(lx, lwg, lwu), (lx, lwg, lwu), dout))
        grads += torch.autograd.grad(glu_fusion.mlp_block(lx, lwg, lwu, lwd), (lx, lwg, lwu, lwd),
                                     torch.ones(m, k, device=device, dtype=dtype))
        grads += torch.autograd.grad(glu_fusion.rms_norm_gated(lx, lz, lw), (lx, lz, lw), dnorm)
        runs.append(grads)
    return runs


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_backward_is_bit_identical_cpu(path, deterministic):
    first, second = _grads_twice("cpu", 40, 16, 24, torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_backward_is_bit_identical_gpu(deterministic, dtype):
    first, second = _grads_twice("cuda", 8192, 1024, 2816, dtype)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


# --- 6. more than 2^31 elements (int64 offsets) ----------------------------------------------------

def _free_bytes():
    gc.collect()  # what earlier tests in this process left in the caching allocator counts as free
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    return free


def _need(gib):
    if _free_bytes() < gib * 2 ** 30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


def _check_rows(got, want, dtype):
    """Max error within a dtype-scaled fraction of the largest reference value (long bf16
    reductions make elementwise relative bounds meaningless near zero)."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * (1.0 + want.abs().max().item()), f"max error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.bigmem
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["swiglu", "mlp_block"])
def test_gemm_family_beyond_2_pow_31_elements(kind):
    """[M, N] pre-activations and output with M·N > 2^31: the last rows (addressed past 2^31) must be
    right in the forward and in dx."""
    _need(40)
    dtype, k, n, d = torch.bfloat16, 32, 32768, 16
    m = 2 ** 31 // n + 64
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    wg = (torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5).requires_grad_()
    wu = (torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5).requires_grad_()
    wd = (torch.randn(d, n, device="cuda", dtype=dtype) / n ** 0.5).requires_grad_()
    if kind == "swiglu":
        out = glu_fusion.swiglu(x, wg, wu)
        eager = eager_swiglu
        args = (wg, wu)
    else:
        out = glu_fusion.mlp_block(x, wg, wu, wd)
        eager = eager_mlp_block
        args = (wg, wu, wd)
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, (x,), dout)
    with torch.no_grad():   # inference takes the fused forward kernel (no saved pre-activations)
        out_inference = (glu_fusion.swiglu(x, wg, wu) if kind == "swiglu" else glu_fusion.mlp_block(x, wg, wu, wd))
    for rows in (slice(0, 64), slice(m - 64, m)):
        xs = x[rows].detach().float().requires_grad_()
        want = eager(xs, *(a.detach().float() for a in args))
        (want_dx,) = torch.autograd.grad(want, (xs,), dout[rows].float())
        _check_rows(out[rows], want, dtype)
        _check_rows(out_inference[rows], want, dtype)
        _check_rows(dx[rows], want_dx, dtype)


@pytest.mark.gpu
@pytest.mark.bigmem
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["rms_norm", "rms_norm_gated"])
def test_norm_family_beyond_2_pow_31_elements(kind):
    """x [M, D] with M·D > 2^31: the last rows must be right in the forward and in dx."""
    _need(48)
    dtype, d = torch.bfloat16, 4096
    m = 2 ** 31 // d + 64
    x = torch.randn(m, d, device="cuda", dtype=dtype, requires_grad=True)
    z = torch.randn(m, d, device="cuda", dtype=dtype) if kind == "rms_norm_gated" else None
    w = torch.randn(d, device="cuda", dtype=dtype)
    if kind == "rms_norm":
        y = glu_fusion.rms_norm(x, w)[0]
    else:
        y = glu_fusion.rms_norm_gated(x, z, w)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    for rows in (slice(0, 64), slice(m - 64, m)):
        xs = x[rows].detach().float().requires_grad_()
        want = (eager_rms_norm(xs, w.float()) if kind == "rms_norm"
                else eager_rms_norm_gated(xs, z[rows].float(), w.float()))
        (want_dx,) = torch.autograd.grad(want, (xs,), dy[rows].float())
        _check_rows(y[rows], want, dtype)
        _check_rows(dx[rows], want_dx, dtype)
