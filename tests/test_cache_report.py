"""The report tells the truth when Inductor serves a graph from its cache: the pass does not run
then, so the report counts the fused ops in the code the cache served.

Two fresh processes share one ``TORCHINDUCTOR_CACHE_DIR``: the first compiles (and rewrites), the
second is served from the cache and must say so, with the op calls it found.  Both routes are
checked: ``backend=glu_fusion.backend`` and ``GLU_FUSION=1`` with a plain ``torch.compile``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn, torch.nn.functional as F
    import glu_fusion

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gate = nn.Linear(16, 24, bias=False)
            self.up = nn.Linear(16, 24, bias=False)
            self.down = nn.Linear(24, 16, bias=False)
        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    model = MLP()
    x = torch.randn(4, 16, requires_grad=True)
    backend = glu_fusion.backend if sys.argv[1] == "backend" else "inductor"
    out = torch.compile(model, backend=backend)(x)
    out.sum().backward()
    rep = glu_fusion.report()
    print(json.dumps({"ok": torch.allclose(out, model(x), atol=1e-5), "rewrites": rep.total,
                      "cached": len(rep.cached_graphs), "cached_sites": rep.cached_counts(),
                      "first_counts": rep.counts(),
                      "text": str(rep)}))
""")


def _run(cache_dir: str, route: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, GLU_FUSION_DEVICES="cpu",
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TRITON_INTERPRET="0")
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)  # set for the test session itself
    env.pop("GLU_FUSION", None)
    if route == "environment":
        env["GLU_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, route], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("route", ["backend", "environment"])
def test_second_process_reports_the_ops_the_cache_served(tmp_path, route):
    cache = str(tmp_path / "inductor-cache")
    first = _run(cache, route)
    assert first["ok"] and first["rewrites"] == 1 and first["cached"] == 0, first["text"]
    assert first["first_counts"] == {"mlp_block": 1}

    second = _run(cache, route)
    assert second["ok"] and second["rewrites"] == 0, second["text"]
    assert second["cached"] >= 1, f"the cache hit went unreported:\n{second['text']}"
    assert second["cached_sites"] == first["first_counts"], second["text"]  # one vocabulary: families
    assert "served from Inductor's cache: 1 fused site(s) (mlp_block=1)" in second["text"]
    assert "nothing rewritten" not in second["text"]
