"""glu_fusion: fused Triton kernels for SwiGLU MLPs and gated RMSNorm, applied by torch.compile.

Public API (see README.md):

* ``swiglu(x, w_gate, w_up, bias_gate=None, bias_up=None)`` and
  ``swiglu_packed(x, weight, bias=None, layout="concat")``: differentiable functional ops.
* ``rms_norm_gated(x, z, weight=None, eps=1e-6, group_size=None, norm_before_gate=True,
  activation="silu", ...)``: the fused gated RMSNorm.
* ``backend``, ``enable()``, ``disable()``, ``report()``: the pass and what it rewrote.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import config

__version__ = "0.1.0"

__all__ = ["swiglu", "swiglu_packed", "config", "__version__"]


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, bias_gate: Optional[Tensor] = None,
           bias_up: Optional[Tensor] = None) -> Tensor:
    """``silu(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)`` for ``x`` of shape ``[..., K]``
    and weights ``[N, K]``; differentiable in every argument.  Saves the ``[M, 2N]``
    pre-activations for backward unless ``config.recompute`` (``GLU_FUSION_RECOMPUTE=1``) is set."""
    from .ops import swiglu as swiglu_ops

    if (bias_gate is None) != (bias_up is None):
        raise ValueError("glu_fusion.swiglu: give both bias_gate and bias_up, or neither")
    save = _save_preact(x, w_gate, w_up, bias_gate, bias_up)
    return swiglu_ops.swiglu(x, w_gate, w_up, bias_gate, bias_up, save)[0]


def swiglu_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  layout: str = "concat") -> Tensor:
    """SwiGLU with one packed ``[2N, K]`` weight (and optional ``[2N]`` bias), read in place.

    ``layout="concat"``: gate rows first, then up rows (``y.chunk(2, -1)`` order);
    ``"interleaved"``: gate rows at even indices (``y[..., ::2]``), up rows at odd ones.
    ``"concat_up_first"`` and ``"interleaved_up_first"`` put the up half first.
    """
    from .ops import swiglu as swiglu_ops

    if layout not in swiglu_ops.LAYOUTS:
        raise ValueError(f"glu_fusion.swiglu_packed: layout must be one of {sorted(swiglu_ops.LAYOUTS)}, "
                         f"got {layout!r}")
    save = _save_preact(x, weight, bias)
    return swiglu_ops.swiglu_packed(x, weight, bias, swiglu_ops.LAYOUTS[layout], save)[0]


def _save_preact(*tensors: Optional[Tensor]) -> bool:
    """Write the pre-activations only when a backward can need them (and recompute is off):
    in inference the forward then writes only its output."""
    if config.recompute or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def __getattr__(name: str):
    """Import the ops (custom-op registration, ~20 ms) on first use, not with the package: the
    ``GLU_FUSION`` entry point imports this package at every ``import torch``."""
    if name == "ops":
        import importlib
        return importlib.import_module(".ops", __name__)
    if name == "rms_norm_gated":
        from .ops.rms_norm_gated import rms_norm_gated_api
        return rms_norm_gated_api
    raise AttributeError(f"module 'glu_fusion' has no attribute {name!r}")


__all__ += ["rms_norm_gated"]


# --- turning the pass on, and what it did ---------------------------------------------------------

from .backend import backend  # noqa: E402
from .report import REPORT as _REPORT, Report  # noqa: E402

__all__ += ["backend", "enable", "disable", "report", "Report"]


def enable() -> None:
    """Make every ``torch.compile`` with Inductor in this process use the fusion pass (as
    ``GLU_FUSION=1`` does); a ``pre_grad_custom_pass`` already set keeps running before it."""
    from .backend import install
    install()


def disable() -> None:
    """Remove the fusion pass from Inductor's global config (graphs compiled before stay fused)."""
    from .backend import uninstall
    uninstall()


def report() -> Report:
    """The process-wide rewrite report: ``.graphs`` (one record per graph the pass ran on, with
    ``.rewrites`` and ``.counts()``), ``.counts()`` per family, ``.total``, ``.reset()``;
    ``str(report())`` is a readable summary."""
    return _REPORT
