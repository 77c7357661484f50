"""On a GPU: the demo model in bf16 trains through the pass like ``torch.compile``'s default, and
the compiled code really runs our kernels (counted with the profiler)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
from glu_fusion import demo
from glu_fusion.__main__ import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LAYERS = 4


@pytest.fixture
def cuda_rewrites(monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cuda",))
    torch._dynamo.reset()
    glu_fusion.report().reset()
    yield glu_fusion.report()
    torch._dynamo.reset()


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _kernel_counts(step) -> dict[str, int]:
    """CUDA kernels launched by one call of ``step``, by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_bf16_training_matches_inductor_default_and_runs_our_kernels(cuda_rewrites):
    cfg = demo.DemoConfig(layers=LAYERS, dim=256, hidden=688, heads=4, seq=129, batch=4, vocab=512)
    model, (tokens,) = demo.build("cuda", torch.bfloat16, cfg)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    ours_c = torch.compile(ours, backend=glu_fusion.backend)
    ref_c = torch.compile(ref)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-2)
    for step in range(4):
        opt_ours.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=True)
        loss_ours, loss_ref = _loss(ours_c, tokens), _loss(ref_c, tokens)
        loss_ours.backward()
        loss_ref.backward()
        assert abs(loss_ours.item() - loss_ref.item()) <= 2e-2 * abs(loss_ref.item()), step
        if step == 0:
            for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
                assert _rel(q.grad, p.grad) <= 6e-2, name
        opt_ours.step()
        opt_ref.step()
    assert cuda_rewrites.counts() == {"swiglu": LAYERS}

    def train_step(compiled):
        return lambda: _loss(compiled, tokens).backward()

    ours_kernels = _kernel_counts(train_step(ours_c))
    ref_kernels = _kernel_counts(train_step(ref_c))
    # Our kernels by name (Inductor's own kernels may carry "swiglu" in theirs): the forward is
    # the fused kernel, or for training calls from _CUBLAS_MIN_TOKENS up cuBLAS and the gate.
    swiglu = {k: v for k, v in ours_kernels.items() if k.startswith("swiglu_")}
    forward = sum(v for k, v in swiglu.items() if k.startswith(("swiglu_fwd", "swiglu_gate_kernel")))
    print("our kernels per step:", swiglu)
    assert forward >= LAYERS, swiglu
    assert sum(swiglu.values()) - forward >= LAYERS, swiglu  # backward kernels too
    assert not any(k.startswith("swiglu_") for k in ref_kernels)


def test_demo_main_job_on_gpu(cuda_rewrites, capsys):
    assert main(["--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "swiglu=2" in out and "train step: glu_fusion" in out
