"""Every setting of glu_fusion and the environment variable behind it, in one place.

Settings are read from the environment when this module is imported and may be changed
afterwards by assigning to the attributes (tests do).  Settings that change what the pass
rewrites are part of the pass's cache key (see ``graph_pass.GluPass.uuid``).
"""
from __future__ import annotations

import os

__all__ = ["enabled_by_env", "rewrite_devices", "recompute", "forward_tma", "forward", "backward", "cached_launch", "graph_ops", "rms_norm", "settings_key"]


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _env_list(name: str, default: str) -> tuple[str, ...]:
    raw = os.environ.get(name, default)
    return tuple(sorted({part.strip().lower() for part in raw.split(",") if part.strip()}))


#: ``GLU_FUSION=1``: a plain ``torch.compile`` uses the pass (read by ``_autoload``).
enabled_by_env: bool = _env_flag("GLU_FUSION")

#: ``GLU_FUSION_DEVICES`` (default ``cuda``): device types whose graphs the pass rewrites.
#: ``cpu`` is useful for tests: the CPU op then runs the Triton interpreter or the reference.
rewrite_devices: tuple[str, ...] = _env_list("GLU_FUSION_DEVICES", "cuda")

#: ``GLU_FUSION_RECOMPUTE=1``: the SwiGLU op saves only its input for backward and recomputes
#: the ``[M, 2N]`` pre-activations there (less memory, one more GEMM).  Default: save them.
recompute: bool = _env_flag("GLU_FUSION_RECOMPUTE")


#: ``GLU_FUSION_TMA`` (default 1): on Hopper, the SwiGLU forward uses the persistent TMA kernel
#: where every operand is TMA-addressable and M >= 1024 (below that the pointer kernel measured
#: faster); ``0`` keeps the pointer kernel everywhere.
forward_tma: bool = _env_flag("GLU_FUSION_TMA", default=True)

#: ``GLU_FUSION_FORWARD`` selects the SwiGLU forward of training calls (those that save the
#: pre-activations for backward) from ``_CUBLAS_MIN_TOKENS`` tokens up: ``auto`` (default):
#: two cuBLAS GEMMs write the pre-activations, then one elementwise kernel applies the gate,
#: which measured faster than our fused GEMM on the H100 at M=16384 (benchmarks/NOTES.md,
#: run 14; the threshold is 8192 tokens because at M=1024 it measured slower);
#: ``fused``: the fused GEMM-with-gate kernel always.  Inference calls always use the fused
#: kernel, which writes only the output.
forward: str = os.environ.get("GLU_FUSION_FORWARD", "auto").strip().lower() or "auto"
if forward not in ("auto", "fused"):
    raise ValueError(f"GLU_FUSION_FORWARD must be 'auto' or 'fused', got {forward!r}")

#: ``GLU_FUSION_BACKWARD`` selects how the SwiGLU backward runs on the GPU:
#: ``gemm`` (default): one elementwise Triton kernel writes ``dH = [dG | dU]`` in the weight's
#: layout, then cuBLAS GEMMs compute ``dX = dH·W`` and ``dW = dHᵀ·x``;
#: ``fused``: the input-grad and 3D-tiled weight-grad Triton kernels, which compute the gate's
#: backward inside their operand loads (no ``[M, 2N]`` gradient buffer) but, measured on the H100
#: (benchmarks/NOTES.md), run 5-6x slower than the GEMM path at large shapes.
backward: str = os.environ.get("GLU_FUSION_BACKWARD", "gemm").strip().lower() or "gemm"
if backward not in ("fused", "gemm"):
    raise ValueError(f"GLU_FUSION_BACKWARD must be 'fused' or 'gemm', got {backward!r}")


#: ``GLU_FUSION_CACHED_LAUNCH`` (default 1): launch our Triton kernels through the binary cached
#: per argument signature, skipping Triton's per-call binding (``ops._common.PlanCache``,
#: ``kernels._launch.LaunchPlan``);
#: ``0`` takes Triton's ordinary launch path on every call.
cached_launch: bool = _env_flag("GLU_FUSION_CACHED_LAUNCH", default=True)


#: ``GLU_FUSION_GRAPH_OPS`` (default 1): graphs Inductor compiles call our ops' autograd-free
#: twins (``graph_ops.py``), skipping torch.library's Python autograd layer on every call;
#: ``0`` keeps the ops themselves.
graph_ops: bool = _env_flag("GLU_FUSION_GRAPH_OPS", default=True)


#: ``GLU_FUSION_RMS_NORM`` (default 1): rewrite RMSNorms (with their residual add) into
#: ``glu_fusion::rms_norm`` where ``patterns/rms_norm.worth_rewriting`` allows; ``0`` leaves
#: them to Inductor.
rms_norm: bool = _env_flag("GLU_FUSION_RMS_NORM", default=True)


def settings_key() -> str:
    """The settings that change what the pass writes into a graph, as a stable string."""
    return f"devices={','.join(rewrite_devices)};recompute={int(recompute)};backward={backward};rms_norm={int(rms_norm)}"
