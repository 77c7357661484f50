"""The RMSNorm family under ``torch.compile(..., dynamic=True)``, where every size is symbolic,
the norm's width included: the decoder slice (residual add + norm) in the HF Llama, Gemma and
``F.rms_norm`` spellings rewritten once, forward and every gradient as close to float64 as the
GPU test asks (tests/test_gpu_rms_norm.py), the one compiled graph serving other row counts and
widths; and the checks that keep look-alikes out still holding with symbolic sizes."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.patterns.rms_norm as family
from glu_fusion.compile.pre_grad import GluPass

from helpers.rms_norm_cases import LOOKALIKES, gemma, hf_llama, rel_error, rms_norm_fn
from helpers.norm_cases import TOLERANCE

OP = torch.ops.glu_fusion.rms_norm.default
EPS = 1e-6

#: name -> (fn(x, w, eps), whether the weight is zero-centred, Gemma's ``1 + w``)
SPELLINGS = {"hf_llama": (hf_llama, False), "gemma": (gemma, True), "rms_norm_fn": (rms_norm_fn, False)}


@pytest.fixture
def norm_rewrites(cpu_rewrites, monkeypatch):
    """CPU norms rewritten, through the kernels (Triton's interpreter on the CPU)."""
    monkeypatch.setattr(family, "REWRITE_DEVICE_TYPES", ("cuda", "cpu"))
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return cpu_rewrites


def _slice(norm):
    """A decoder-layer slice: the residual add, the norm, and the sum as the next residual."""
    def fn(x, r, w):
        h = r + x
        return norm(h, w, EPS), h
    return fn


def _leaves(rows: int, d: int, dtype: torch.dtype, offset: bool, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(rows, d).to(dtype).requires_grad_()
    r = torch.randn(rows, d).to(dtype).requires_grad_()
    w = (0.1 * torch.randn(d) + (0.0 if offset else 1.0)).to(dtype).requires_grad_()
    return x, r, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_compiled_decoder_slice_under_dynamic_true(name, dtype, norm_rewrites):
    """Rewritten once, into the op with the residual add; forward (y and h) and the gradients of
    x, the residual and the weight within the dtype's tolerance of float64, for the traced shape
    and for other row counts and widths served by the same graph."""
    norm, offset = SPELLINGS[name]
    fn = _slice(norm)
    compiled = torch.compile(fn, backend=glu_fusion.backend, dynamic=True)
    graphs = 0
    for rows, d in ((4, 64), (7, 64), (5, 48)):
        x, r, w = _leaves(rows, d, dtype, offset, seed=rows * d)
        got = compiled(x, r, w)
        graphs = graphs or len(norm_rewrites.graphs)
        assert len(norm_rewrites.graphs) == graphs, "recompiled for a new row count or width"
        gouts = [torch.randn_like(t) for t in got]
        got_grads = torch.autograd.grad(got, (x, r, w), gouts)
        leaves = [t.detach().double().requires_grad_() for t in (x, r, w)]
        exp = fn(*leaves)
        exp_grads = torch.autograd.grad(exp, leaves, [g.double() for g in gouts])
        for what, a, b in zip(("y", "h", "dx", "dr", "dw"), [*got, *got_grads], [*exp, *exp_grads]):
            assert a.dtype == dtype and a.shape == b.shape, what
            assert rel_error(a, b) < TOLERANCE[dtype], f"{what} at {rows}x{d}: {rel_error(a, b)}"
    # Dynamo traces the frame twice (the float eps is made a graph input, then specialised): each
    # trace, the one kept included, has the one fused op
    assert [g.counts() for g in norm_rewrites.graphs] == [{"rms_norm": 1}] * graphs
    assert all("residual" in rewrite.spelling for rewrite in norm_rewrites.rewrites)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_spelling_rewritten_with_symbolic_sizes(name, norm_rewrites, dynamo_graph):
    """The pass on the Dynamo graph itself: one op, the residual add inside it, the norm's nodes
    gone, though the width is a symbol."""
    norm, offset = SPELLINGS[name]
    gm = dynamo_graph(_slice(norm), *_leaves(4, 32, torch.bfloat16, offset, seed=0), dynamic=True)
    assert not isinstance(next(n for n in gm.graph.nodes if n.name == "l_w_").meta["example_value"].shape[0], int)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    eps = op.args[3]  # a module-level float reaches this graph as a SymFloat (``.item()`` of an input)
    assert op.args[2] is not None
    assert eps == EPS or isinstance(eps.meta["example_value"], torch.SymFloat)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.rsqrt, F.rms_norm)]


# --- what stays, with symbolic sizes ----------------------------------------------------------------

def _first_dim_mean(x, r, w):
    """Statistics over the rows, not the width: not a norm over the last dimension."""
    h = (x + r).float()
    return (w * (h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + EPS)).to(x.dtype))


@pytest.mark.parametrize("fn", [*LOOKALIKES, _first_dim_mean], ids=lambda f: f.__name__)
def test_look_alikes_left_alone(fn, norm_rewrites, dynamo_graph):
    gm = dynamo_graph(fn, *_leaves(4, 32, torch.bfloat16, False, seed=0), dynamic=True)
    before = len(gm.graph.nodes)
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert len(gm.graph.nodes) == before and not norm_rewrites.rewrites


def test_broadcast_add_is_not_taken_as_residual(norm_rewrites, dynamo_graph):
    """A row-broadcast add (``[1, D]``) is a bias, not a residual stream: the norm is rewritten,
    the add stays outside the op."""
    def fn(x, r, w):
        return hf_llama(x + r[:1], w, EPS)

    gm = dynamo_graph(fn, *_leaves(4, 32, torch.bfloat16, False, seed=0), dynamic=True)
    GluPass()(gm.graph)
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert op.args[2] is None and op.args[0].target in (torch.add, operator.add)


def test_a_traced_width_above_the_limit_stays(norm_rewrites, dynamo_graph, monkeypatch):
    """The width rule decides on the traced width when the width is a symbol."""
    monkeypatch.setattr(family, "MAX_D", 31)
    gm = dynamo_graph(_slice(hf_llama), *_leaves(4, 32, torch.bfloat16, False, seed=0), dynamic=True)
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert not norm_rewrites.rewrites
