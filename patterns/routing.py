"""Where rewriting an MLP pays, by device and shape: the measured routing table, in one place.

A rewrite that makes a model slower is a bug, so a site the table does not mark as a measured
win is left to Inductor (the report lists it, with the reason).  H200, bf16, torch 2.11
(benchmarks/RESULTS.md, "MLP block"; each against ``torch.compile``'s default in the same run):

* training graphs: our forward+backward measured 0.95-1.02x Inductor's GPU time from 4096
  tokens up and 0.7-0.85x at 16 tokens, and a training step of third-party models 0.98-0.99x
  (wall), so CUDA training graphs stay with Inductor.  With ``GLU_FUSION_RECOMPUTE=1`` the
  user asks for memory instead (0.78-0.84x peak, 0.90-0.94x speed), and they are rewritten.
* inference graphs: 1.02-1.07x from 16384 tokens, parity at 4096, slower below: rewritten from
  ``CUDA_INFERENCE_MIN_TOKENS`` tokens when the token count is known when compiling.
* CPU graphs are rewritten only when the user asks for them (``GLU_FUSION_DEVICES``), for
  testing: the table does not apply there.
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
