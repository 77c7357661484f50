"""The README's "What happens in your situation" table says what the routing code does.

Each row of the table is checked against the function or constant that decides it, so a change
to the routing table that the README does not follow (or the reverse) fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from glu_fusion import config
from glu_fusion.patterns import experts, rms_norm, routing

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- situations:"


def situation_rows() -> dict[str, str]:
    """situation -> what happens, from the table after the marker."""
    text = README.read_text()
    table = text[text.index(MARKER):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("situation", "---"):
            rows[cells[0]] = cells[1]
    return rows


def rewritten(what: str) -> bool:
    return what.startswith("rewritten")


MIN_TOKENS = routing.CUDA_INFERENCE_MIN_TOKENS

# situation -> whether the code rewrites it (computed when the test runs)
CHECKS = {
    f"CUDA, inference graph, MLP with at least {MIN_TOKENS} tokens known when compiling":
        lambda: routing.mlp_rewrite_pays("cuda", MIN_TOKENS, training=False) is None,
    "CUDA, inference graph, MLP with fewer tokens, or a dynamic token count":
        lambda: (routing.mlp_rewrite_pays("cuda", MIN_TOKENS - 1, training=False) is None
                 or routing.mlp_rewrite_pays("cuda", None, training=False) is None),
    "CUDA, training graph, MLP": lambda: routing.mlp_rewrite_pays("cuda", 16384, training=True) is None,
    "CUDA, training graph, MLP, `GLU_FUSION_RECOMPUTE=1`":
        lambda: routing.mlp_rewrite_pays("cuda", 16384, training=True) is None,
    "CUDA, gated RMSNorm `rmsnorm(x)·w·silu(z)`, inference graph":
        lambda: routing.gated_norm_rewrite_pays("cuda", training=False) is None,
    "CUDA, gated RMSNorm, training graph": lambda: routing.gated_norm_rewrite_pays("cuda", training=True) is None,
    "CUDA, RMSNorm with its residual add (no gate)": lambda: rms_norm.worth_rewriting("cuda", 4096, 16384),
    "CUDA, mixture-of-experts block": lambda: "cuda" in experts.REWRITE_DEVICE_TYPES,
    "CPU (default `GLU_FUSION_DEVICES=cuda`)": lambda: "cpu" in config.rewrite_devices,
}
SETTINGS = {"CUDA, training graph, MLP, `GLU_FUSION_RECOMPUTE=1`": {"recompute": True}}


def test_every_situation_is_checked():
    rows = situation_rows()
    assert set(CHECKS) <= set(rows), f"rows missing from the README table: {set(CHECKS) - set(rows)}"
    unchecked = set(rows) - set(CHECKS) - {r for r in rows if r.startswith("CPU with")}
    assert not unchecked, f"README rows no test checks: {unchecked}"


@pytest.mark.parametrize("situation", sorted(CHECKS))
def test_situation_matches_the_code(situation, monkeypatch):
    monkeypatch.setattr(config, "rewrite_devices", ("cuda",))
    monkeypatch.setattr(config, "recompute", False)
    for name, value in SETTINGS.get(situation, {}).items():
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(routing, "ROUTE_BY_MEASUREMENT", True)
    what = situation_rows()[situation]
    assert rewritten(what) == CHECKS[situation](), f"README says {what!r} for {situation!r}"


def test_cpu_with_the_setting_is_rewritten(monkeypatch):
    monkeypatch.setattr(config, "rewrite_devices", ("cpu",))
    row = next(v for k, v in situation_rows().items() if k.startswith("CPU with"))
    assert rewritten(row)
    assert routing.mlp_rewrite_pays("cpu", 16, training=True) is None
    assert re.search(r"TRITON_INTERPRET=1", row)
