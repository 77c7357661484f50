"""Where rewriting pays, by family, device and shape: the measured routing table, in one place.

A rewrite that makes a model slower is a bug, so a site the table does not mark as a measured
win is left to Inductor (the report lists it, with the reason).

MLP sites (:func:`mlp_rewrite_pays`).  H200, bf16, torch 2.11 (benchmarks/RESULTS.md, "MLP
block"; each against ``torch.compile``'s default in the same run):

* training graphs: our forward+backward measured 0.95-1.02x Inductor's GPU time from 4096
  tokens up and 0.7-0.85x at 16 tokens, and a training step of third-party models 0.98-0.99x
  (wall), so CUDA training graphs stay with Inductor.  With ``GLU_FUSION_RECOMPUTE=1`` the
  user asks for memory instead (0.78-0.84x peak, 0.90-0.94x speed), and they are rewritten.
* inference graphs: 1.02-1.07x from 16384 tokens, parity at 4096, slower below: rewritten from
  ``CUDA_INFERENCE_MIN_TOKENS`` tokens when the token count is known when compiling.

Gated RMSNorm sites (:func:`gated_norm_rewrite_pays`).  H200, bf16, 2026-12-02, a Qwen3-Next-style
``RMSNormGated`` over 24 heads of 128 (D = 128), static shapes, our kernel time against
Inductor's (ratio = Inductor / ours, > 1: ours faster):

==================  =========================  ==========================  ==================
graph               8192 tokens                decode (CUDA graphs)        decision
==================  =========================  ==========================  ==================
inference (fwd)     1.12x                      1.37x                       rewritten
training (fwd+bwd)  0.88x                      0.78x                       left to Inductor
==================  =========================  ==========================  ==================

Only D = 128 was measured; benchmarks/bench_norms.py measures the other widths, the token range
and the plain / residual norms, and is what should move a row here.

Plain RMSNorm and residual + RMSNorm sites are not rewritten on any device by default
(``patterns.rms_norm.REWRITE_DEVICE_TYPES`` is empty: no static-shape measurement showed them
faster than Inductor yet; benchmarks/bench_norms.py is that measurement).

CPU graphs are rewritten only when the user asks for them (``GLU_FUSION_DEVICES``), for testing:
the table does not apply there.
"""
from __future__ import annotations

from typing import Optional

from glu_fusion import config

#: Off: every matched site is rewritten (tests and the benchmarks' "ours" variants measure our
#: path on every shape this way).  Part of the pass's cache key.
ROUTE_BY_MEASUREMENT = True

#: CUDA inference graphs with at least this many tokens (known when compiling) are rewritten.
CUDA_INFERENCE_MIN_TOKENS = 8192


def mlp_rewrite_pays(device_type: str, tokens: Optional[int], training: bool) -> Optional[str]:
    """None when rewriting an MLP site of this kind pays; otherwise why it is left to Inductor."""
    if not ROUTE_BY_MEASUREMENT or device_type != "cuda":
        return None
    if training:
        if config.recompute:
            return None
        return "CUDA training graph: measured no faster than Inductor (GLU_FUSION_RECOMPUTE=1 trades speed for memory)"
    if tokens is None or tokens < CUDA_INFERENCE_MIN_TOKENS:
        return (f"CUDA inference with {tokens if tokens is not None else 'a dynamic number of'} tokens: "
                f"measured faster only from {CUDA_INFERENCE_MIN_TOKENS}")
    return None


#: The gated norm's rows of the table: graph kind -> (rewritten, what was measured).
GATED_NORM_TABLE: dict[str, tuple[bool, str]] = {
    "inference": (True, "forward measured 1.12x Inductor's kernel time at 8192 tokens, 1.37x at decode"),
    "training": (False, "forward+backward measured 0.88x Inductor's kernel time at 8192 tokens and "
                        "0.78x at decode (H200, D=128)"),
}


def gated_norm_rewrite_pays(device_type: str, training: bool, gate_upcast: bool = False) -> Optional[str]:
    """None when rewriting a gated RMSNorm site pays; otherwise why it is left to Inductor.

    ``gate_upcast``: the op would read the gate's fp32 upcast (an fp32 x with a bf16 gate, HF's
    Mamba-2 mixer), a pass of its own before the op where Inductor folds the cast into its
    kernel: more bytes than the table's sites, never measured, so left to Inductor on CUDA."""
    if not ROUTE_BY_MEASUREMENT or device_type != "cuda":
        return None
    if gate_upcast:
        return "CUDA: the op would read an fp32 copy of the gate (a pass Inductor folds into its kernel); not measured"
    kind = "training" if training else "inference"
    rewritten, measured = GATED_NORM_TABLE[kind]
    return None if rewritten else f"CUDA {kind} graph: {measured}"
