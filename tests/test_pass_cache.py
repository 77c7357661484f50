"""Inductor's on-disk cache must never serve a graph built under other rewrite settings.

Three fresh processes share one ``TORCHINDUCTOR_CACHE_DIR``: the first rewrites CPU graphs, the
second forbids CPU rewriting (its compiled code must not call our op, so it must not reuse the
first graph), the third repeats the first settings and does hit the cache (so the test really
exercises it), running our op although the pass never ran in that process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn as nn, torch.nn.functional as F
    import glu_fusion
    from glu_fusion import reference
    from torch._dynamo.utils import counters

    calls = []
    original = reference.swiglu_preact
    def counted(*args):
        calls.append(1)
        return original(*args)
    reference.swiglu_preact = counted

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gate = nn.Linear(16, 24, bias=False)
            self.up = nn.Linear(16, 24, bias=False)
        def forward(self, x):
            return F.silu(self.gate(x)) * self.up(x)

    model = MLP()
    x = torch.randn(4, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=glu_fusion.backend)(x)
        ok = torch.allclose(out, model(x), atol=1e-5)
    print(json.dumps({"ok": ok, "op_calls": len(calls), "rewrites": glu_fusion.report().total,
                      "hits": counters["inductor"]["fxgraph_cache_hit"]
                              + counters["aot_autograd"]["autograd_cache_hit"]}))
""")


def _run(cache_dir: str, devices: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, GLU_FUSION_DEVICES=devices,
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TRITON_INTERPRET="0")
    env.pop("GLU_FUSION", None)
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)  # set for the test session itself
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_changed_setting_never_serves_a_stale_graph(tmp_path):
    cache = str(tmp_path / "inductor-cache")
    first = _run(cache, "cpu")
    assert first["ok"] and first["rewrites"] == 1 and first["op_calls"] == 1

    second = _run(cache, "cuda")
    assert second["ok"] and second["rewrites"] == 0
    assert second["op_calls"] == 0, "a graph compiled with CPU rewriting was served from the cache"

    third = _run(cache, "cpu")
    assert third["ok"] and third["hits"] >= 1, "the cache was not used; the test proves nothing"
    assert third["op_calls"] == 1  # the cached graph calls the op: registered without the pass
