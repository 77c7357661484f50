"""The expert combine family: transformers' down projection and combine rewritten into
``glu_fusion::grouped_down_combine`` (snapshot, results and gradients against eager through the
backend on the CPU), and the look-alikes it must leave alone."""
from __future__ import annotations

import copy

import expecttest
import pytest
import torch

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass
from helpers.combine_cases import DownCombine, routed
from helpers.graphs import render

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
E, D, N, TOKENS, TOP_K = 4, 48, 32, 16, 2


@pytest.fixture(autouse=True)
def experts_rewrite_on(monkeypatch):
    from glu_fusion.patterns import experts
    monkeypatch.setattr(experts, "REWRITE_DEVICE_TYPES", ("cpu",))


def _graph(module, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=keep, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


class TestSnapshot(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _rewrites(self, cpu_rewrites):
        self.report = cpu_rewrites

    def test_transformers_down_and_combine(self):
        """The GEMM, the multiply, the inverse permutation and the top-k sum become one op reading
        ``down_proj`` [E, D, N] in place, the sort's permutation as the rows' slots."""
        gm = _graph(DownCombine(E, D, N), *routed(TOKENS, E, TOP_K, N))
        GluPass()(gm.graph)
        text = render(gm.graph)
        self.assertExpectedInline(text[text.index("cumsum"):], """\
cumsum(histc, dim=#, dtype=int32)
glu_fusion.grouped_down_combine.default(in, cumsum, in, None, getitem, getitem, 2)
.to(glu_fusion.grouped_down_combine.default, bfloat16)
return (.to)""")
        [rewrite] = self.report.rewrites
        assert rewrite.spelling == "grouped_mm down projection, routing-weight scale, inverse permutation, top-2 sum"

    def test_gptoss_bias_added_in_place(self):
        """gpt-oss adds each row's expert bias in place after the GEMM: the op takes the bias, and
        the gather feeding the add is gone."""
        gm = _graph(DownCombine(E, D, N, bias=True), *routed(TOKENS, E, TOP_K, N))
        GluPass()(gm.graph)
        text = render(gm.graph)
        self.assertExpectedInline(text[text.index("cumsum"):], """\
cumsum(histc, dim=#, dtype=int32)
glu_fusion.grouped_down_combine.default(in, cumsum, in, in, getitem, getitem, 2)
.to(glu_fusion.grouped_down_combine.default, bfloat16)
return (.to)""")


def _leaves(args):
    return [a.clone().requires_grad_(a.is_floating_point()) for a in args]


def _close(got, want, name):
    scale = want.detach().double().abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), atol=3e-2 * max(scale, 1e-3), rtol=3e-2,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant,bias,rewritten", [
    ("model", False, True), ("model", True, True), ("argsort", False, True),
    ("gather_by_perm", False, False), ("weights_after_gather", False, False), ("fp32_weights", False, False),
    ("masked", False, False), ("proj_returned", False, False)])
def test_compiled_training_step_matches_eager(variant, bias, rewritten, cpu_rewrites):
    """Through ``glu_fusion.backend`` in bf16: the output and the gradients of the rows, the
    routing weights and the down weight (and bias) equal eager's; look-alikes are left alone."""
    eager = DownCombine(E, D, N, variant=variant, bias=bias, seed=1)
    compiled = copy.deepcopy(eager)
    args = routed(TOKENS, E, TOP_K, N, seed=2)
    mine, theirs = _leaves(args), _leaves(args)
    want = eager(*theirs)
    got = torch.compile(compiled, backend=glu_fusion.backend)(*mine)
    assert cpu_rewrites.counts().get("expert_combine", 0) == (1 if rewritten else 0)
    if variant == "proj_returned":
        (got, _), (want, _) = got, want
    _close(got, want, "out")
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for name, a, b in (("h", mine[0], theirs[0]), ("routing weights", mine[2], theirs[2])):
        _close(a.grad, b.grad, name)
    named = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        _close(named[name].grad, p.grad, name)
