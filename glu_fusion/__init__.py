"""glu_fusion: fused Triton kernels for SwiGLU MLPs and gated RMSNorm, applied by torch.compile.

Public API (see README.md):

* ``swiglu``, ``swiglu_packed``, ``mlp_block``, ``mlp_block_packed``, ``grouped_swiglu``,
  ``grouped_swiglu_packed``, ``grouped_down_combine``, ``rms_norm``, ``rms_norm_gated``:
  differentiable functional ops
  (``glu_fusion.functional``); ``WeightGradStore``: deferred weight gradients.
* ``backend``, ``enable()``, ``disable()``, ``report()``: the pass and what it rewrote
  (``glu_fusion.compile``).
* ``config``: the three user settings, validated on assignment.
"""
from __future__ import annotations

from . import config
from ._version import __version__
from .compile.backend import backend, disable, enable
from .compile.report import Report, report
from .functional import (grouped_down_combine, grouped_swiglu, grouped_swiglu_packed, mlp_block, mlp_block_packed,
                         rms_norm, rms_norm_gated, swiglu, swiglu_packed)
from .weight_grad_store import WeightGradStore

__all__ = ["__version__", "config", "swiglu", "swiglu_packed", "mlp_block", "mlp_block_packed", "grouped_swiglu",
           "grouped_swiglu_packed", "grouped_down_combine", "rms_norm", "rms_norm_gated", "WeightGradStore", "backend", "enable", "disable",
           "report", "Report"]
