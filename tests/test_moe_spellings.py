"""Expert blocks as the code people run spells them: transformers 5.x ``@use_experts_implementation``
with ``grouped_mm`` (Qwen3-MoE / Qwen3-Next / DeepSeek-V3 experts; on the CPU under
``torch.compile`` the grouped GEMM is ``aten._grouped_mm`` for bf16 weights and
``transformers::grouped_mm_fallback`` for the others) and torchtitan 0.2.2's ``GroupedExperts``.

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

import glu_fusion
import glu_fusion.ops  # noqa: F401
from glu_fusion.compile.pre_grad import GluPass
from helpers.graphs import render
from helpers.moe_spellings import HFGroupedMMExperts, TitanGroupedExperts, ensure_fallback_op

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


def _run_graph_and_compare(module, args, tol):
    """Rewrite the Dynamo graph, run it as a GraphModule (no AOTAutograd: transformers' fallback
    op reads its offsets on the host in backward), and compare the output and the gradients of
    x, the routing weights and every parameter with eager."""
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
        assert named[name].grad is not None, name
        _close(named[name].grad, p.grad, name, tol)


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
    the backend: both layers' experts rewritten (and their down projections and combines, without
    row masks), equal losses and expert gradients; returns the expert rewrites' spellings."""
    torch.manual_seed(0)
    eager = model_class(cfg).to(torch.bfloat16)
    assert eager.config._experts_implementation == "grouped_mm"
    compiled = copy.deepcopy(eager)
    ids = torch.randint(0, 128, (2, 8))
    want = eager(ids, labels=ids).loss
    got = torch.compile(compiled, backend=glu_fusion.backend)(ids, labels=ids).loss
    assert report.counts().get("experts") == 2
    spellings = {r.spelling for r in report.rewrites if r.family == "experts"}
    # the down projection and combine too, where no row mask sits between them (transformers 5.18)
    masked = any("zeroed rows" in s for s in spellings)
    assert report.counts().get("expert_combine", 0) == (0 if masked else 2)
    _close(got, want, "loss", 2e-2)
    want.backward()
    got.backward()
    named = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if "experts" in name:
            _close(named[name].grad, p.grad, name, 5e-2)
    return spellings


def test_tiny_gpt_oss_compiled_training_step(cpu_rewrites):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"], _experts_implementation="grouped_mm")
    spellings = _tiny_training_step(transformers.GptOssForCausalLM, cfg, cpu_rewrites)
    assert all("per-row expert bias" in s and "gpt-oss" in s for s in spellings), spellings


def test_tiny_qwen3_moe_compiled_training_step(cpu_rewrites):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        _experts_implementation="grouped_mm")
    spellings = _tiny_training_step(transformers.Qwen3MoeForCausalLM, cfg, cpu_rewrites)
    # transformers 5.17 zeroes the rows routed to no local expert around each GEMM, 5.18 only
    # under expert parallelism
    assert spellings in ({"grouped_mm packed chunk, zeroed rows, silu(g)*u"}, {"grouped_mm packed chunk, silu(g)*u"})
