"""Expert blocks as the code people run spells them: transformers 5.x ``@use_experts_implementation``
with ``grouped_mm`` (Qwen3-MoE / Qwen3-Next / DeepSeek-V3 experts; on the CPU under
``torch.compile`` the grouped GEMM is ``aten._grouped_mm`` for bf16 weights and
``transformers::grouped_mm_fallback`` for the others) and with ``batched_mm`` (each row's expert
weight gathered, ``torch.bmm``; rewritten over the rows sorted by expert), and torchtitan
0.2.2's ``GroupedExperts``.

The CPU graph of a transformers model holds exactly what ``grouped_mm_experts_forward`` spells,
so the hand-written modules of ``helpers/moe_spellings.py`` (transcribed from transformers
5.17.0's ``integrations/moe.py`` and torchtitan 0.2.2's ``models/moe/moe.py``; torchtitan does not
import without its training stack) are what CI checks; the tiny Qwen3MoeForCausalLM runs where
transformers is installed.  Float64 is not a rewrite dtype, so the precise checks are float32.
"""
from __future__ import annotations

import copy

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401
from glu_fusion.compile.pre_grad import GluPass
from helpers.graphs import render
from helpers.moe_spellings import HFBatchedMMExperts, HFGroupedMMExperts, TitanGroupedExperts, ensure_fallback_op

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
ensure_fallback_op()

OPS = {torch.ops.glu_fusion.grouped_swiglu.default: "grouped_swiglu",
       torch.ops.glu_fusion.grouped_swiglu_packed.default: "grouped_swiglu_packed"}
E, H, I, TOKENS, TOP_K = 4, 64, 32, 16, 2


@pytest.fixture(autouse=True)
def experts_rewrite_on(monkeypatch):
    from glu_fusion.patterns import experts
    monkeypatch.setattr(experts, "REWRITE_DEVICE_TYPES", ("cpu",))


def _routing(dtype, seed=0, sentinel=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, H, generator=g).to(dtype)
    idx = torch.randn(TOKENS, E, generator=g).topk(TOP_K, dim=-1).indices
    idx[3, 0] = 1   # an expert nobody else picks stays possible; expert 1 twice is not
    idx[3, 1] = 2
    if sentinel:   # a pair routed to no local expert (expert parallelism's sentinel E)
        idx[5, 1] = E
    w = torch.rand(TOKENS, TOP_K, generator=g).to(dtype)
    return h, idx, w


def _graph(module, *args):
    """The single Dynamo graph of ``module`` and its inputs (the parameters themselves)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=keep, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _fused(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS]


def _grouped_gemms(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and ("grouped_mm" in str(n.target) or "grouped_mm_fallback" in str(n.target))]


def _close(got, want, name, tol):
    scale = want.detach().double().abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), atol=tol * max(scale, 1e-3), rtol=tol,
                               msg=lambda m: f"{name}: {m}")


def _float64_reference(module, args, dout):
    """The output and the gradients (inputs, then parameters by name) of ``module`` in float64."""
    ref = copy.deepcopy(module).double()
    leaves = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    out = ref(*leaves)
    out.backward(dout.double())
    return out, [a.grad if a.is_floating_point() else None for a in leaves], \
        {name: p.grad for name, p in ref.named_parameters()}


def _run_graph_and_compare(module, args, tol, reference_tol=None):
    """Rewrite the Dynamo graph, run it as a GraphModule (no AOTAutograd: transformers' fallback
    op reads its offsets on the host in backward), and compare the output and the gradients of
    x, the routing weights and every parameter with eager (and, given ``reference_tol``, with
    the module in float64)."""
    reference = copy.deepcopy(module)
    eager = copy.deepcopy(module)
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    want = eager(*leaves)
    gm, inputs = _graph(module, *[a.detach().clone() for a in args])
    GluPass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert len(_fused(gm)) == 1
    params = {id(p) for p in module.parameters()}
    real = []
    for t in inputs:
        if id(t) in params:
            real.append(t)
            continue
        match = [i for i, a in enumerate(args) if a.shape == t.shape and a.dtype == t.dtype and torch.equal(a, t)]
        real.append(None if not match else match[0])
    mine = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    got = gm(*[mine[r] if isinstance(r, int) else r for r in real])[0]
    _close(got, want, "out", tol)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for i, (a, b) in enumerate(zip(mine, leaves)):
        if b.requires_grad:
            _close(a.grad, b.grad, f"input {i}", tol)
    named = dict(module.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is None:   # a parameter the spelling does not read
            assert named[name].grad is None, name
            continue
        assert named[name].grad is not None, name
        _close(named[name].grad, p.grad, name, tol)
    if reference_tol is None:
        return
    ref_out, ref_inputs, ref_params = _float64_reference(reference, args, dout)
    _close(got, ref_out, "out against float64", reference_tol)
    for i, (a, ref) in enumerate(zip(mine, ref_inputs)):
        if ref is not None:
            _close(a.grad, ref, f"input {i} against float64", reference_tol)
    for name, ref in ref_params.items():
        if ref is not None:
            _close(named[name].grad, ref, f"{name} against float64", reference_tol)


# --- transformers' grouped_mm experts ----------------------------------------------------------

class TestHFSnapshot(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _rewrites(self, cpu_rewrites):
        self.report = cpu_rewrites

    def test_hf_grouped_mm_snapshot(self):
        """The gate/up GEMM, its row zeroing and ``silu(gate) * up`` become one packed op reading
        ``gate_up_proj`` [E, 2I, H] in place; the rows are zeroed after it as before; the down
        projection stays the model's grouped GEMM."""
        m = HFGroupedMMExperts(E, H, I, dtype=torch.bfloat16)
        gm, _ = _graph(m, *_routing(torch.bfloat16))
        GluPass()(gm.graph)
        text = render(gm.graph)
        self.assertExpectedInline(text[text.index(".masked_fill_"):], """\
.masked_fill_(getitem, .unsqueeze, 0.0)
.to(getitem, bfloat16)
glu_fusion.grouped_swiglu_packed.default(.to, cumsum, in, None, 0, 'silu', 1.702, 7.0, True)
getitem(glu_fusion.grouped_swiglu_packed.default, 0)
.masked_fill(getitem, .unsqueeze, 0.0)
.transpose(in, -2, -1)
.to(.masked_fill, bfloat16)
_grouped_mm(.to, .transpose, offs=cumsum, bias=None, out_dtype=None)
.masked_fill(_grouped_mm, .unsqueeze, 0.0)
.unsqueeze(getitem, -1)
mul(.masked_fill, .unsqueeze)
empty_like(getitem)
arange(#, device=device(type='cpu'))
setitem(empty_like, getitem, arange)
getitem(mul, empty_like)
.view(getitem, 16, 2, 64)
.sum(.view, dim=1)
.to(.sum, bfloat16)
return (.to)""")
        [op] = _fused(gm)
        assert op.args[2].op in ("placeholder", "get_attr")   # gate_up_proj itself: no copy, no transpose
        [rewrite] = self.report.rewrites
        assert rewrite.spelling == "grouped_mm packed chunk, zeroed rows, silu(g)*u", rewrite.spelling


def test_hf_fallback_op_float32_results_and_gradients(cpu_rewrites):
    """float32 weights: the graph holds ``transformers::grouped_mm_fallback``; the rewritten graph
    equals eager in its output and the gradients of x, gate_up_proj, down_proj and the routing
    weights (a sentinel pair included)."""
    m = HFGroupedMMExperts(E, H, I, dtype=torch.float32, seed=3)
    _run_graph_and_compare(m, _routing(torch.float32, seed=4, sentinel=True), tol=1e-5)
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.spelling.startswith("transformers fallback packed chunk, zeroed rows"), rewrite.spelling


@pytest.mark.parametrize("gptoss", [False, True])
@pytest.mark.parametrize("sentinel_masks", [True, False])
def test_hf_grouped_mm_bf16_compiled_training_step(gptoss, sentinel_masks, cpu_rewrites):
    """transformers 5.17 (rows zeroed around each GEMM) and 5.18 (no masks without expert
    parallelism), Qwen3-MoE's silu experts and gpt-oss's (per-row bias, clamped gate)."""
    m = HFGroupedMMExperts(E, H, I, dtype=torch.bfloat16, seed=5, gptoss=gptoss, sentinel_masks=sentinel_masks)
    eager, compiled = m, copy.deepcopy(m)
    h, idx, w = _routing(torch.bfloat16, seed=6, sentinel=sentinel_masks)
    he, hc = h.clone().requires_grad_(), h.clone().requires_grad_()
    we, wc = w.clone().requires_grad_(), w.clone().requires_grad_()
    want = eager(he, idx, we)
    got = torch.compile(compiled, backend=glu_fusion.backend)(hc, idx, wc)
    # without the row masks the down projection and combine are rewritten too
    assert cpu_rewrites.counts() == ({"experts": 1} if sentinel_masks else {"experts": 1, "expert_combine": 1})
    _close(got, want, "out", 3e-2)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    _close(hc.grad, he.grad, "x", 3e-2)
    _close(wc.grad, we.grad, "routing weights", 3e-2)
    named = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        _close(named[name].grad, p.grad, name, 3e-2)


# --- transformers' gpt-oss experts (is_transposed, per-row bias, clamped gate) ----------------------

def test_hf_gptoss_fallback_op_float32_results_and_gradients(cpu_rewrites):
    """gpt-oss through ``grouped_mm_experts_forward``: ``gate_up_proj [E, H, 2I]`` read as is, the
    per-row bias ``gate_up_proj_bias[expert_ids]`` added in place, interleaved halves, the clamped
    gate.  One packed op with the expert bias; the output and the gradients of x, the routing
    weights and every parameter (the bias included) equal eager's."""
    m = HFGroupedMMExperts(E, H, I, dtype=torch.float32, gptoss=True, seed=7)
    _run_graph_and_compare(m, _routing(torch.float32, seed=8, sentinel=True), tol=1e-5)
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.spelling == ("transformers fallback packed interleaved, per-row expert bias, zeroed rows, "
                                "gpt-oss (u+1)*glu"), rewrite.spelling


class TestHFGptOssSnapshot(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _rewrites(self, cpu_rewrites):
        self.report = cpu_rewrites

    def test_hf_gptoss_snapshot(self):
        """The GEMM, its in-place bias add, the row zeroing and the clamped gate become one packed
        op with ``gate_up_proj_bias`` as its bias; the gather feeding the add is gone, the down
        projection's stays."""
        m = HFGroupedMMExperts(E, H, I, dtype=torch.bfloat16, gptoss=True)
        gm, _ = _graph(m, *_routing(torch.bfloat16))
        GluPass()(gm.graph)
        text = render(gm.graph)
        self.assertExpectedInline(text[text.index(".clamp_"):text.index("_grouped_mm")], """\
.clamp_(getitem, max=3)
.masked_fill_(getitem, .unsqueeze, 0.0)
.to(getitem, bfloat16)
.transpose(in, -2, -1)
glu_fusion.grouped_swiglu_packed.default(.to, cumsum, .transpose, in, 2, 'gptoss', 1.702, 7.0, True)
getitem(glu_fusion.grouped_swiglu_packed.default, 0)
.masked_fill(getitem, .unsqueeze, 0.0)
getitem(in, getitem)
.to(.masked_fill, bfloat16)
""")


# --- transformers' batched_mm experts (each row's expert weight gathered, torch.bmm) --------------

class TestHFBatchedSnapshot(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _rewrites(self, cpu_rewrites):
        self.report = cpu_rewrites

    def _rewritten(self, gptoss):
        m = HFBatchedMMExperts(E, H, I, dtype=torch.bfloat16, gptoss=gptoss)
        gm, _ = _graph(m, *_routing(torch.bfloat16))
        GluPass()(gm.graph)
        gm.graph.lint()
        return gm, render(gm.graph)

    def test_hf_batched_mm_snapshot(self):
        """The gathered ``gate_up_proj[expert_ids]``, its ``bmm`` and ``silu(gate) * up`` become the
        rows sorted by expert, one packed op reading ``gate_up_proj`` [E, 2I, H] in place, and the
        op's rows put back in routing order; the down projection stays the model's ``bmm``."""
        gm, text = self._rewritten(gptoss=False)
        self.assertExpectedInline(text, """\
.repeat_interleave(in, 2, dim=0)
.reshape(in, -1)
.reshape(in, -1)
.remainder(.reshape, 4)
sort(.remainder)
getitem(sort, 0)
getitem(sort, 1)
arange(#, #, dtype=int64, device=device(type='cpu'))
searchsorted(getitem, arange, out_int32=True)
getitem(.repeat_interleave, getitem)
glu_fusion.grouped_swiglu_packed.default(getitem, searchsorted, in, None, 0, 'silu', 1.702, 7.0, True)
getitem(glu_fusion.grouped_swiglu_packed.default, 0)
argsort(getitem)
getitem(getitem, argsort)
getitem(in, .reshape)
.unsqueeze(getitem, -1)
bmm(getitem, .unsqueeze)
.squeeze(bmm, -1)
.unsqueeze(.reshape, -1)
mul(.squeeze, .unsqueeze)
.view(mul, 16, 2, 64)
.sum(.view, dim=1)
.to(.sum, bfloat16)
return (.to)""")
        [op] = _fused(gm)
        assert op.args[2].op in ("placeholder", "get_attr")   # gate_up_proj itself: no copy, no transpose
        assert sum(n.target in (torch.bmm, "bmm") for n in gm.graph.nodes) == 1   # the down projection
        [rewrite] = self.report.rewrites
        assert rewrite.spelling == "batched_mm packed chunk, silu(g)*u", rewrite.spelling

    def test_hf_batched_mm_gptoss_snapshot(self):
        """gpt-oss: the transposed ``gate_up_proj`` [E, H, 2I] read through a transposed view, the
        bias gathered and added in place folded into the op's per-expert bias."""
        gm, text = self._rewritten(gptoss=True)
        self.assertExpectedInline(text, """\
.repeat_interleave(in, 2, dim=0)
.reshape(in, -1)
.reshape(in, -1)
.remainder(.reshape, 4)
sort(.remainder)
getitem(sort, 0)
getitem(sort, 1)
arange(#, #, dtype=int64, device=device(type='cpu'))
searchsorted(getitem, arange, out_int32=True)
getitem(.repeat_interleave, getitem)
.transpose(in, -2, -1)
glu_fusion.grouped_swiglu_packed.default(getitem, searchsorted, .transpose, in, 2, 'gptoss', 1.702, 7.0, True)
getitem(glu_fusion.grouped_swiglu_packed.default, 0)
argsort(getitem)
getitem(getitem, argsort)
getitem(in, .reshape)
getitem(in, .reshape)
.unsqueeze(getitem, 1)
bmm(.unsqueeze, getitem)
.squeeze(bmm, 1)
.add_(.squeeze, getitem)
.unsqueeze(.reshape, -1)
mul(.squeeze, .unsqueeze)
.view(mul, 16, 2, 64)
.sum(.view, dim=1)
.to(.sum, bfloat16)
return (.to)""")
        [rewrite] = self.report.rewrites
        assert rewrite.spelling == "batched_mm packed interleaved, per-row expert bias, gpt-oss (u+1)*glu", \
            rewrite.spelling


@pytest.mark.parametrize("gptoss", [False, True], ids=["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["", "expert_parallel"])
def test_hf_batched_mm_float32_results_and_gradients(gptoss, expert_parallel, cpu_rewrites):
    """The rewritten graph's output and the gradients of x, the routing weights and every
    parameter (gate_up_proj_bias included) equal eager's and the float64 module's; under expert
    parallelism a sentinel id is clamped to the last expert (out of place) before the gathers."""
    m = HFBatchedMMExperts(E, H, I, dtype=torch.float32, gptoss=gptoss, seed=9, expert_parallel=expert_parallel)
    _run_graph_and_compare(m, _routing(torch.float32, seed=10, sentinel=expert_parallel), tol=1e-5,
                           reference_tol=1e-4)
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.spelling.startswith("batched_mm packed"), rewrite.spelling


def test_hf_batched_mm_negative_ids_read_experts_from_the_end(cpu_rewrites):
    """``W[ids]`` reads ``W[id + E]`` for a negative id; the sorted rows go to that expert too."""
    m = HFBatchedMMExperts(E, H, I, dtype=torch.float32, seed=11)
    h, idx, w = _routing(torch.float32, seed=12)
    idx[::3, 0] -= E
    _run_graph_and_compare(m, (h, idx, w), tol=1e-5, reference_tol=1e-4)


@pytest.mark.parametrize("gptoss", [False, True], ids=["qwen3_moe", "gpt_oss"])
def test_hf_batched_mm_bf16_compiled_training_step(gptoss, cpu_rewrites):
    """Through the backend (Inductor sorts, gathers and counts the rows): output and gradients
    within bf16 tolerance of eager and of the float64 module."""
    m = HFBatchedMMExperts(E, H, I, dtype=torch.bfloat16, seed=13, gptoss=gptoss)
    eager, compiled, reference = m, copy.deepcopy(m), copy.deepcopy(m)
    h, idx, w = _routing(torch.bfloat16, seed=14)
    he, hc = h.clone().requires_grad_(), h.clone().requires_grad_()
    we, wc = w.clone().requires_grad_(), w.clone().requires_grad_()
    want = eager(he, idx, we)
    got = torch.compile(compiled, backend=glu_fusion.backend)(hc, idx, wc)
    assert cpu_rewrites.counts() == {"experts": 1}
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    ref_out, (ref_h, _, ref_w), ref_params = _float64_reference(reference, (h, idx, w), dout)
    named = dict(compiled.named_parameters())
    for what, mine, eager_value, ref in [("out", got, want, ref_out), ("x", hc.grad, he.grad, ref_h),
                                         ("routing weights", wc.grad, we.grad, ref_w),
                                         *[(name, named[name].grad, p.grad, ref_params[name])
                                           for name, p in eager.named_parameters()]]:
        _close(mine, eager_value, what, 3e-2)
        _close(mine, ref, f"{what} against float64", 3e-2)


class _BatchedSpelling(HFBatchedMMExperts):
    """An up projection and gate over the rows in routing order, written by ``fn(self, rows,
    ids)``; ``w1``/``w3`` are separate gate and up weights [E, I, H]."""

    def __init__(self, fn, dtype=torch.bfloat16, **kwargs) -> None:
        super().__init__(E, H, I, dtype=dtype, **kwargs)
        g = torch.Generator().manual_seed(1)
        self.w1, self.w3 = (nn.Parameter((torch.randn(E, I, H, generator=g) * H ** -0.5 * 2).to(dtype))
                            for _ in range(2))
        self.fn = fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        rows = hidden_states.repeat_interleave(top_k_index.size(-1), dim=0)
        return self.fn(self, rows, top_k_index.reshape(-1)) * top_k_weights.reshape(-1, 1)


def _column(w, rows, ids):
    return torch.bmm(w[ids], rows.unsqueeze(-1)).squeeze(-1)


def _silu_chunk(y):
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


BATCHED_SPELLINGS = {
    "two_weights": (lambda m, r, ids: F.silu(_column(m.w1, r, ids)) * _column(m.w3, r, ids),
                    "batched_mm x2, silu(g)*u"),
    "matmul_operator": (lambda m, r, ids: _silu_chunk((m.gate_up_proj[ids] @ r.unsqueeze(2)).squeeze(2)),
                        "batched_mm packed chunk, silu(g)*u"),
    "matmul_of_transposed_weights": (
        lambda m, r, ids: _silu_chunk(
            torch.matmul(r.unsqueeze(1), m.gate_up_proj.transpose(1, 2)[ids]).squeeze(1)),
        "batched_mm packed chunk, silu(g)*u"),
}


@pytest.mark.parametrize("name", sorted(BATCHED_SPELLINGS))
def test_batched_spellings_become_one_op(name, cpu_rewrites):
    """Two gathered weights, ``@``/``torch.matmul`` for ``bmm``, and a gather of the transposed
    ``[E, H, 2I]`` view (read back as ``gate_up_proj`` itself): one op, equal to eager and to
    float64 in its output and every gradient."""
    fn, spelling = BATCHED_SPELLINGS[name]
    m = _BatchedSpelling(fn, dtype=torch.float32, seed=15)
    _run_graph_and_compare(m, _routing(torch.float32, seed=16), tol=1e-5, reference_tol=1e-4)
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.spelling == spelling, rewrite.spelling


# --- torchtitan GroupedExperts ------------------------------------------------------------------

def _titan_args(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, H, generator=g).to(dtype), torch.tensor([5, 0, 7, 4])


def test_titan_grouped_mm_becomes_one_op(cpu_rewrites):
    """``x.bfloat16()`` cast once per GEMM and ``w.bfloat16().transpose(-2, -1)``: one grouped op
    over the two casts' common input, reading the weights as cast (no copy beyond the model's)."""
    m = TitanGroupedExperts(H, I, E, use_grouped_mm=True, dtype=torch.bfloat16)
    gm, _ = _graph(m, *_titan_args(torch.bfloat16))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _fused(gm)
    assert OPS[op.target] == "grouped_swiglu"
    assert [n.target for n in op.args[2:4]] == ["bfloat16", "bfloat16"]
    assert len(_grouped_gemms(gm)) == 1   # the down projection
    assert not [n for n in gm.graph.nodes if n.target in ("contiguous", "clone")]
    assert sum(n.target == "bfloat16" for n in gm.graph.nodes) == 4   # x once, w1, w3, w2
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.spelling == "grouped_mm x2, silu(g)*u", rewrite.spelling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_titan_grouped_mm_results_and_gradients(dtype, cpu_rewrites):
    m = TitanGroupedExperts(H, I, E, use_grouped_mm=True, dtype=dtype, seed=7)
    _run_graph_and_compare(m, _titan_args(dtype, seed=8), tol=3e-2)


def test_titan_for_loop_is_left_and_reported(cpu_rewrites):
    m = TitanGroupedExperts(H, I, E, use_grouped_mm=False)
    args = _titan_args(torch.float32)
    want = m(*args)
    got = torch.compile(m, backend=glu_fusion.backend)(*args)
    torch.testing.assert_close(got, want)
    assert cpu_rewrites.total == 0
    left = cpu_rewrites.left
    assert len(left) == E   # one per expert, the empty one included
    assert all(lo.family == "experts" and lo.reason.startswith("a per-expert loop") for lo in left), left


# --- look-alikes --------------------------------------------------------------------------------

class _ZeroFillOne(HFGroupedMMExperts):
    """The rows are set to one, not zero: the gate of a row of ones is not one."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        offsets = torch.tensor([4, 8, 12, 16], dtype=torch.int32)
        mask = (top_k_index[:, :1] > 2)
        y = torch._grouped_mm(hidden_states, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        y = y.masked_fill(mask, 1.0)
        gate, up = y.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class _UnequalSplit(HFGroupedMMExperts):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        offsets = torch.tensor([4, 8, 12, 16], dtype=torch.int32)
        y = torch._grouped_mm(hidden_states, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = y.split([I // 2, I // 2 + I], dim=-1)
        return self.act_fn(gate)[:, :1] * up


class _MaskedGemmUsedElsewhere(HFGroupedMMExperts):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        offsets = torch.tensor([4, 8, 12, 16], dtype=torch.int32)
        y = torch._grouped_mm(hidden_states, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        z = y.masked_fill(top_k_index[:, :1] > 2, 0.0)
        gate, up = z.chunk(2, dim=-1)
        return self.act_fn(gate) * up + y.sum()


class _GptOssLookAlike(HFGroupedMMExperts):
    """gpt-oss's up projection with its per-row bias, gathered by ``bias_ids`` and grouped by the
    histogram of ``histogram_ids`` (each a function of the sorted and the unsorted ids): only the
    sorted ids for both make the gathered bias each row's expert bias."""

    def __init__(self, *a, bias_ids, histogram_ids, **k):
        super().__init__(*a, gptoss=True, **k)
        self.bias_ids, self.histogram_ids = bias_ids, histogram_ids

    def forward(self, hidden_states, top_k_index, top_k_weights):
        expert_ids = top_k_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        x = hidden_states[perm // top_k_index.size(-1)]
        counted = self.histogram_ids(expert_ids_g, top_k_index)
        offsets = torch.cumsum(torch.histc(counted.float(), bins=self.num_experts, min=0,
                                           max=self.num_experts - 1), dim=0, dtype=torch.int32)
        out = torch._grouped_mm(x, self.gate_up_proj, offs=offsets)
        out.add_(self.gate_up_proj_bias[self.bias_ids(expert_ids_g, expert_ids)])
        out = out.masked_fill((expert_ids_g >= self.num_experts).unsqueeze(-1), 0.0)
        return self._apply_gate(out)


def _sorted(ids_g, _):
    return ids_g


def _gptoss_bias_by(ids_of):
    """gpt-oss's batched up projection and gate with its bias gathered by ``ids_of(ids)``."""
    def fn(m, rows, ids):
        out = torch.bmm(rows.unsqueeze(1), m.gate_up_proj[ids]).squeeze(1)
        out.add_(m.gate_up_proj_bias[ids_of(ids)])
        return m._apply_gate(out)
    return fn


BATCHED_LOOK_ALIKES = {
    # one expert's weights broadcast to every row: a view, not each row's expert
    "batched_weights_not_gathered": lambda m, r, ids: _silu_chunk(
        torch.bmm(m.gate_up_proj[:1].expand(r.shape[0], -1, -1), r.unsqueeze(-1)).squeeze(-1)),
    "gate_and_up_gathered_by_other_ids": lambda m, r, ids: F.silu(_column(m.w1, r, ids))
    * _column(m.w3, r, ids.flip(0)),
    "squeeze_without_dim": lambda m, r, ids: _silu_chunk(
        torch.bmm(m.gate_up_proj[ids], r.unsqueeze(-1)).squeeze()),
    "silu_of_a_scaled_gate": lambda m, r, ids: (lambda g, u: F.silu(g * 2) * u)(
        *_column(m.gate_up_proj, r, ids).chunk(2, dim=-1)),
    "bmm_output_used_elsewhere": lambda m, r, ids: (lambda y: _silu_chunk(y) + y.sum())(
        _column(m.gate_up_proj, r, ids)),
}


LOOK_ALIKES = {
    "gptoss_bias_by_unsorted_ids": lambda: _GptOssLookAlike(E, H, I, dtype=torch.bfloat16, histogram_ids=_sorted,
                                                            bias_ids=lambda ids_g, ids: ids),
    "gptoss_histogram_of_other_ids": lambda: _GptOssLookAlike(
        E, H, I, dtype=torch.bfloat16, bias_ids=_sorted,
        histogram_ids=lambda ids_g, index: torch.sort(index.flip(0).reshape(-1))[0]),
    "gelu_experts": lambda: HFGroupedMMExperts(E, H, I, dtype=torch.bfloat16, act=nn.GELU()),
    "rows_filled_with_one": lambda: _ZeroFillOne(E, H, I, dtype=torch.bfloat16),
    "unequal_split": lambda: _UnequalSplit(E, H, I, dtype=torch.bfloat16),
    "gemm_output_used_elsewhere": lambda: _MaskedGemmUsedElsewhere(E, H, I, dtype=torch.bfloat16),
    "batched_gelu_experts": lambda: HFBatchedMMExperts(E, H, I, dtype=torch.bfloat16, act=nn.GELU()),
    "batched_gptoss_bias_by_other_ids": lambda: _BatchedSpelling(_gptoss_bias_by(lambda ids: ids.flip(0)),
                                                                 gptoss=True),
    **{f"batched_{name}": (lambda fn=fn: _BatchedSpelling(fn)) for name, fn in BATCHED_LOOK_ALIKES.items()},
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_are_left_alone(name, cpu_rewrites):
    gm, _ = _graph(LOOK_ALIKES[name](), *_routing(torch.bfloat16))
    before = str(gm.graph)
    GluPass()(gm.graph)
    assert str(gm.graph) == before
    assert cpu_rewrites.total == 0


def test_hf_experts_stay_with_inductor_by_default(cpu_rewrites, monkeypatch):
    from glu_fusion.patterns import experts
    monkeypatch.setattr(experts, "REWRITE_DEVICE_TYPES", ())
    gm, _ = _graph(HFGroupedMMExperts(E, H, I, dtype=torch.bfloat16), *_routing(torch.bfloat16))
    GluPass()(gm.graph)
    assert not _fused(gm) and not cpu_rewrites.rewrites


# --- transformers itself (skipped where it is not installed) --------------------------------------

def _tiny_training_step(model_class, cfg, report) -> set:
    """One loss and backward of a tiny transformers model in bf16, eager against compiled through
    the backend: both layers' experts rewritten (and, for ``grouped_mm``, their down projections
    and combines without row masks), equal losses and expert gradients; returns the expert
    rewrites' spellings."""
    torch.manual_seed(0)
    eager = model_class(cfg).to(torch.bfloat16)
    implementation = eager.config._experts_implementation
    assert implementation in ("grouped_mm", "batched_mm"), implementation
    compiled = copy.deepcopy(eager)
    ids = torch.randint(0, 128, (2, 8))
    want = eager(ids, labels=ids).loss
    got = torch.compile(compiled, backend=glu_fusion.backend)(ids, labels=ids).loss
    assert report.counts().get("experts") == 2
    spellings = {r.spelling for r in report.rewrites if r.family == "experts"}
    # the down projection and combine too, where no row mask sits between them (transformers 5.18);
    # batched_mm's down projection is a bmm over rows in routing order, not a grouped GEMM
    masked = any("zeroed rows" in s for s in spellings)
    assert report.counts().get("expert_combine", 0) == (0 if masked or implementation == "batched_mm" else 2)
    _close(got, want, "loss", 2e-2)
    want.backward()
    got.backward()
    named = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if "experts" in name:
            _close(named[name].grad, p.grad, name, 5e-2)
    return spellings


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_tiny_gpt_oss_compiled_training_step(implementation, cpu_rewrites):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"], experts_implementation=implementation)
    spellings = _tiny_training_step(transformers.GptOssForCausalLM, cfg, cpu_rewrites)
    assert all(s.startswith(implementation) and "per-row expert bias" in s and "gpt-oss" in s
               for s in spellings), spellings


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_tiny_qwen3_moe_compiled_training_step(implementation, cpu_rewrites):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        experts_implementation=implementation)
    spellings = _tiny_training_step(transformers.Qwen3MoeForCausalLM, cfg, cpu_rewrites)
    # transformers 5.17 zeroes the rows routed to no local expert around each GEMM, 5.18 only
    # under expert parallelism; batched_mm never does
    assert spellings in ({f"{implementation} packed chunk, zeroed rows, silu(g)*u"},
                         {f"{implementation} packed chunk, silu(g)*u"})
