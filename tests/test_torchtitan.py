"""torchtitan: its Llama 3 blocks go through the pass (when torchtitan is installed), and the log
summary of ``benchmarks/torchtitan_run.sh`` reads the figures and flags what went wrong."""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

import glu_fusion

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("torchtitan_summary", ROOT / "benchmarks" / "torchtitan_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _log(losses, tps, rewrites_per_rank):
    lines = []
    for rank, n in enumerate(rewrites_per_rank):
        lines += [f"[default{rank}]:[titan] 2026-01-01 - glu_fusion - INFO - rewrote swiglu: linear x2, "
                  f"silu(g)*u x[8,2048,256] w[768,256] w[768,256] torch.bfloat16 in feed_forward"] * n
    for rank in range(2):
        for step, (loss, t) in enumerate(zip(losses, tps), start=1):
            lines.append(f"[default{rank}]:[titan] 2026-01-01 - root - INFO - step: {step:2}  loss: {loss + rank:8.5f}  "
                         f"grad_norm:  1.2345  memory:  {1.5 + step / 100:5.2f}GiB(1.05%)  tps: {t:,}  "
                         f"tflops: 1.00  mfu: 0.10%")
    return "\n".join(lines)


def test_summary_reads_rank0_figures_and_rewrites():
    s = _summary_module()
    losses = [8.0, 7.5, 7.0, 6.5, 6.0, 5.5]
    plain = s.parse_log(_log(losses, [100, 200, 1000, 1100, 1200, 1300], [0, 0]))
    fused = s.parse_log(_log([x + 0.01 for x in losses], [100, 200, 1000, 1200, 1300, 1400], [1, 1]))
    assert plain["steps"][1]["loss"] == 8.0  # rank 0's line, not rank 1's
    assert fused["rewrites"] == {"0": {"swiglu": 1}, "1": {"swiglu": 1}}
    out = s.summarize({"plain": plain, "glu_fusion": fused}, ranks=2)
    assert out["ok"], out["failures"]
    assert out["runs"]["plain"]["median_tps_per_rank"] == 1200  # steps 4..6
    assert out["runs"]["glu_fusion"]["peak_reserved_gib"] == pytest.approx(1.56)
    assert out["max_loss_diff"] == pytest.approx(0.01)
    assert out["speed_ratio"] == pytest.approx(1300 / 1200)
    assert "PASS" in s.markdown(out, "t")


@pytest.mark.parametrize("case", ["loss gap", "rank 1 unfused", "plain fused", "no steps"])
def test_summary_flags_failures(case):
    s = _summary_module()
    losses = [8.0, 7.5, 7.0, 6.5]
    tps = [1000] * 4
    plain = _log(losses, tps, [0, 0])
    fused = _log(losses, tps, [1, 1])
    if case == "loss gap":
        fused = _log([x + 0.2 for x in losses], tps, [1, 1])
    elif case == "rank 1 unfused":
        fused = _log(losses, tps, [1, 0])
    elif case == "plain fused":
        plain = _log(losses, tps, [1, 1])
    else:
        fused = "Traceback (most recent call last):\nRuntimeError: boom"
    out = s.summarize({"plain": s.parse_log(plain), "glu_fusion": s.parse_log(fused)}, ranks=2)
    assert not out["ok"] and out["failures"]


def test_corpus_is_json_lines_of_text(tmp_path):
    import json
    s = _summary_module()
    path = tmp_path / "data.json"
    s.make_corpus(str(path), docs=20)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 20 and all(isinstance(r["text"], str) and len(r["text"]) > 100 for r in rows)


def test_torchtitan_llama3_blocks_are_fused_with_parity(cpu_rewrites):
    """torchtitan's own block code (``w2(silu(w1(x)) * w3(x))``, ``nn.RMSNorm``, RoPE), compiled
    per block as torchtitan does, on the reference path: forward and every gradient match eager."""
    pytest.importorskip("tyro", reason="torchtitan's dependencies are not installed")
    llama3 = pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not installed")
    from torchtitan.models.llama3.model.model import Transformer

    args = copy.deepcopy(llama3.llama3_args["debugmodel"])
    args.n_layers, args.max_seq_len = 2, 32
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    ref = copy.deepcopy(model)
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, backend=glu_fusion.backend, fullgraph=True))
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    got, expected = model(tokens), ref(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(expected)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert cpu_rewrites.counts().get("mlp_block", 0) >= 1, str(cpu_rewrites)
