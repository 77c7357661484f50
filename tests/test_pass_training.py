"""The pass inside real training and inference code: no_grad, autocast, checkpointing, residuals,
several layers, dynamic shapes, exported programs, recompute, a user's own pre-grad pass."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import checkpoint

import glu_fusion
from glu_fusion import demo
from glu_fusion.compile.passes import ChainedPass, with_pass, without_pass
from glu_fusion.compile.pre_grad import GluPass

K, N = 16, 40


class MLP(nn.Module):
    def __init__(self, k=K, n=N):
        super().__init__()
        self.gate_proj = nn.Linear(k, n, bias=False)
        self.up_proj = nn.Linear(k, n, bias=False)
        self.down_proj = nn.Linear(n, k, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Residual(nn.Module):
    def __init__(self, checkpointed=False):
        super().__init__()
        self.mlp = MLP()
        self.checkpointed = checkpointed

    def forward(self, x):
        if self.checkpointed:
            return x + checkpoint(self.mlp, x, use_reentrant=False)
        return x + self.mlp(x)


def _train_step(module, x, atol=1e-5, rtol=1e-5, **compile_kw):
    compiled = copy.deepcopy(module)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = module(xe)
    got = torch.compile(compiled, backend=glu_fusion.backend, **compile_kw)(xc)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=atol, rtol=rtol)
    for (name, p), q in zip(module.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_inference_under_no_grad(cpu_rewrites):
    model = MLP()
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        got = torch.compile(model, backend=glu_fusion.backend)(x)
        expected = model(x)
    torch.testing.assert_close(got, expected)
    assert cpu_rewrites.counts() == {"mlp_block": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_eager_output_dtype(dtype, cpu_rewrites):
    model = MLP()
    x = torch.randn(3, 5, K)
    compiled = torch.compile(copy.deepcopy(model), backend=glu_fusion.backend)
    with torch.autocast("cpu", dtype=dtype):
        expected = model(x)
        got = compiled(x)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_autocast_region_inside_the_compiled_code(cpu_rewrites):
    class Autocasting(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.mlp(x)

    model = Autocasting()
    x = torch.randn(3, K)
    got = torch.compile(copy.deepcopy(model), backend=glu_fusion.backend)(x)
    expected = model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_checkpointed_mlp_trains_like_eager(cpu_rewrites):
    _train_step(Residual(checkpointed=True), torch.randn(2, 5, K))
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_residual_input_trains_like_eager(cpu_rewrites):
    _train_step(Residual(), torch.randn(2, 5, K))
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_every_layer_rewritten_once(cpu_rewrites):
    model, (tokens,) = demo.build(cfg=demo.DemoConfig(layers=3, seq=8))
    result = demo.check(model, (tokens,), glu_fusion.backend)
    assert result.ok, result
    assert cpu_rewrites.counts() == {"mlp_block": 3}
    assert len({r.source for r in cpu_rewrites.rewrites}) == 1  # all from MLP.forward


def test_dynamic_batch_and_sequence(cpu_rewrites):
    model = MLP()
    compiled = torch.compile(copy.deepcopy(model), backend=glu_fusion.backend, dynamic=True)
    for shape in [(2, 5, K), (3, 7, K), (4, 2, K)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), model(x))
    assert cpu_rewrites.total >= 1
    assert all(g.counts() in ({"mlp_block": 1}, {}) for g in cpu_rewrites.graphs)


@pytest.mark.parametrize("packed", [False, True], ids=["two_weights", "packed"])
def test_exported_program_module(packed, cpu_rewrites):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(K, 2 * N)

        def forward(self, x):
            g, u = self.fc(x).chunk(2, dim=-1)
            return F.silu(g) * u

    model = Packed() if packed else MLP()
    x = torch.randn(4, K)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        got = torch.compile(exported, backend=glu_fusion.backend)(x)
        expected = model(x)
    torch.testing.assert_close(got, expected)
    # The packed module has no down projection: the SwiGLU alone is rewritten.
    assert cpu_rewrites.counts() == {"swiglu" if packed else "mlp_block": 1}
    assert cpu_rewrites.rewrites[0].spelling.startswith("packed chunk" if packed else "linear x2")


def test_recompute_setting_trains_like_eager(cpu_rewrites, monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "recompute", True)
    _train_step(Residual(), torch.randn(2, 5, K))
    assert cpu_rewrites.counts() == {"mlp_block": 1}


class CountingPass(CustomGraphPass):
    def __init__(self, with_uuid=True):
        self.calls = 0
        self.with_uuid = with_uuid

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting" if self.with_uuid else None


def test_backend_chains_the_users_pre_grad_pass(cpu_rewrites):
    user = CountingPass()
    with torch._inductor.config.patch(pre_grad_custom_pass=user):
        torch.compile(MLP(), backend=glu_fusion.backend)(torch.randn(2, K))
        assert torch._inductor.config.pre_grad_custom_pass is user  # untouched globally
    assert user.calls == 1
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_chaining_rules():
    user, other = CountingPass(), CountingPass(with_uuid=False)
    assert isinstance(with_pass(None, GluPass), GluPass)
    chained = with_pass(user, GluPass)
    assert isinstance(chained, ChainedPass) and chained.passes[0] is user
    assert isinstance(chained.passes[1], GluPass)
    assert with_pass(chained, GluPass) is chained                       # never twice
    assert with_pass([user, other], GluPass).passes[:2] == (user, other)  # list form of torch >= 2.13
    assert chained.uuid() is not None
    assert with_pass(other, GluPass).uuid() is None                     # unknown pass: no caching
    assert without_pass(chained, GluPass) is user
    assert without_pass(GluPass(), GluPass) is None


def test_enable_and_disable_keep_the_users_pass(cpu_rewrites):
    user = CountingPass()
    with torch._inductor.config.patch(pre_grad_custom_pass=user):
        glu_fusion.enable()
        glu_fusion.enable()
        installed = torch._inductor.config.pre_grad_custom_pass
        assert isinstance(installed, ChainedPass) and installed.passes[0] is user
        torch.compile(MLP())(torch.randn(2, K))
        assert cpu_rewrites.counts() == {"mlp_block": 1} and user.calls == 1
        glu_fusion.disable()
        assert torch._inductor.config.pre_grad_custom_pass is user
