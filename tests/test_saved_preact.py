"""The post-grad pass that lets a compiled SwiGLU backward write ``dH`` over the saved
pre-activations (``glu_fusion.saved_preact``): which graphs it rewrites, the graph it leaves,
and that gradients stay exact."""
from __future__ import annotations

import re

import expecttest
import pytest
import torch

import glu_fusion
from glu_fusion.compile import post_grad as saved_preact
from glu_fusion.compile.post_grad import reuse_saved_preact
from helpers.graphs import render as render_snapshot
from helpers.models import Packed, TwoWeights

# Post-grad graphs spell views and transposes differently across torch versions.
_SPELLINGS = {"aten.reshape.default": "view", "aten.view.default": "view", "aten._unsafe_view.default": "view",
              "aten.permute.default": "t", "aten.t.default": "t"}


def render(graph: torch.fx.Graph) -> str:
    text = render_snapshot(graph)
    for spelling, common in _SPELLINGS.items():
        text = text.replace(spelling, common)
    return re.sub(r"\bt\(([^,()]+), \[#, #\]\)", r"t(\1)", text)  # permute's dims


@pytest.fixture
def post_grad(cpu_rewrites, monkeypatch):
    """``run(module, x) -> (backward graphs after the pass, grads of compiled, grads of eager)``."""
    monkeypatch.setattr(glu_fusion.config, "recompute", False)
    seen = []

    def recording(graph):
        count = reuse_saved_preact(graph)
        if any(n.op == "placeholder" and str(n.target).startswith("tangents") for n in graph.nodes):
            seen.append((count, render(graph)))
        return count

    monkeypatch.setattr(saved_preact, "reuse_saved_preact", recording)

    def run(module, x):
        params = list(module.parameters())
        x64 = x.double().requires_grad_()
        ref = torch.autograd.grad(module.double()(x64).sum(), [x64, *module.parameters()])
        module.float()
        x = x.requires_grad_()
        got = torch.autograd.grad(torch.compile(module, backend=glu_fusion.backend)(x).sum(), [x, *params])
        return seen, got, ref

    return run


def _close(got, ref):
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


class TestSavedPreact(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _run(self, post_grad):
        self.run_module = post_grad

    def test_two_weights_backward_overwrites_saved_preact(self):
        seen, got, ref = self.run_module(TwoWeights(), torch.randn(2, 5, 16))
        _close(got, ref)
        (count, text), = seen
        assert count == 1
        self.assertExpectedInline(text, """\
glu_fusion.swiglu_dh_inplace.default(in, in)
aten.slice.Tensor(in, #, #, #)
aten.mm.default(aten.slice.Tensor, in)
aten.slice.Tensor(in, #, #, #)
aten.addmm.default(aten.mm.default, aten.slice.Tensor, in)
view(aten.addmm.default, [#, #, #])
t(aten.slice.Tensor)
aten.mm.default(t, in)
t(aten.slice.Tensor)
aten.mm.default(t, in)
return (aten.mm.default, view, aten.mm.default)""")

    def test_packed_concat_rewritten_interleaved_kept(self):
        seen, got, ref = self.run_module(Packed(), torch.randn(7, 16))
        _close(got, ref)
        assert [count for count, _ in seen] == [1]
        seen.clear()
        seen, got, ref = self.run_module(Packed(interleaved=True), torch.randn(7, 16))
        _close(got, ref)
        # dH's columns sit as the interleaved weight's rows, not as the saved [g | u]
        assert [count for count, _ in seen] == [0]
        assert "glu_fusion.swiglu_dh.default(in, in, 2)" in seen[0][1]

    def test_no_donated_buffers_no_rewrite(self):
        import torch._functorch.config
        with torch._functorch.config.patch(donated_buffer=False):
            seen, got, ref = self.run_module(TwoWeights(), torch.randn(9, 16))
        _close(got, ref)
        assert [count for count, _ in seen] == [0]


@pytest.mark.parametrize("plain_backward_first", [False, True])
def test_retain_graph_refused_or_exact(cpu_rewrites, monkeypatch, plain_backward_first):
    """A second backward must not read gradients where the pre-activations were.  Torch either
    compiles that backward without donated buffers (then nothing is rewritten) or refuses
    ``retain_graph`` for a backward compiled with them; never a silently wrong gradient."""
    monkeypatch.setattr(glu_fusion.config, "recompute", False)
    module = TwoWeights()
    x = torch.randn(4, 16, requires_grad=True)
    want = torch.autograd.grad(module(x).sum(), x)[0]
    compiled = torch.compile(module, backend=glu_fusion.backend)
    if plain_backward_first:
        torch.autograd.grad(compiled(x).sum(), x)
    out = compiled(x).sum()
    try:
        first = torch.autograd.grad(out, x, retain_graph=True)[0]
    except RuntimeError as err:
        assert "donated buffer" in str(err)
        return
    second = torch.autograd.grad(out, x)[0]
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)


def _graph_with_dh(layout=0, extra_use=False, backward=True):
    graph = torch.fx.Graph()
    preact = graph.placeholder("getitem_1")
    dout = graph.placeholder("tangents_1" if backward else "primals_1")
    dh = graph.call_function(torch.ops.glu_fusion.swiglu_dh.default, (dout, preact, layout))
    outputs = [dh]
    if extra_use:
        outputs.append(graph.call_function(torch.ops.aten.neg.default, (preact,)))
    graph.output(tuple(outputs))
    return graph


@pytest.mark.parametrize("case, rewritten", [
    ({}, 1),
    ({"layout": 2}, 0),                # columns not where the pre-activations have them
    ({"extra_use": True}, 0),         # something else still reads the pre-activations
    ({"backward": False}, 0),         # not a backward graph
])
def test_rewrite_conditions(monkeypatch, case, rewritten):
    import glu_fusion.ops  # noqa: F401
    monkeypatch.setattr(saved_preact, "_donated_placeholder_idxs", lambda: frozenset({0}))
    graph = _graph_with_dh(**case)
    assert reuse_saved_preact(graph) == rewritten
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert (torch.ops.glu_fusion.swiglu_dh_inplace.default in targets) == bool(rewritten)
    graph.lint()


def test_not_donated_placeholder_kept(monkeypatch):
    import glu_fusion.ops  # noqa: F401
    monkeypatch.setattr(saved_preact, "_donated_placeholder_idxs", lambda: frozenset({1}))
    assert reuse_saved_preact(_graph_with_dh()) == 0


def test_retain_graph_without_donated_buffers_is_exact(cpu_rewrites, monkeypatch):
    import torch._functorch.config
    monkeypatch.setattr(glu_fusion.config, "recompute", False)
    module = TwoWeights()
    x = torch.randn(6, 16, requires_grad=True)
    want = torch.autograd.grad(module(x).square().sum(), x)[0]
    with torch._functorch.config.patch(donated_buffer=False):
        out = torch.compile(module, backend=glu_fusion.backend)(x).square().sum()
        first = torch.autograd.grad(out, x, retain_graph=True)[0]
        second = torch.autograd.grad(out, x)[0]
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)


def test_uuid_keys_on_donation(monkeypatch):
    from glu_fusion.compile.post_grad import SavedPreactPass
    monkeypatch.setattr(saved_preact, "_donated_placeholder_idxs", lambda: frozenset({3, 1}))
    donated = SavedPreactPass().uuid()
    monkeypatch.setattr(saved_preact, "_donated_placeholder_idxs", lambda: None)
    assert SavedPreactPass().uuid() != donated and donated.endswith("[1, 3]")


def test_setting_off_means_no_donation():
    import torch._functorch.config
    with torch._functorch.config.patch(donated_buffer=False):
        assert saved_preact._donated_placeholder_idxs() is None
