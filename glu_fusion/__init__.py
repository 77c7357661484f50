"""glu_fusion: fused Triton kernels for SwiGLU MLPs and gated RMSNorm, applied by torch.compile.

Public API (see README.md):

* ``swiglu``, ``swiglu_packed``, ``rms_norm_gated``: differentiable functional ops
  (``glu_fusion.functional``).
* ``backend``, ``enable()``, ``disable()``, ``report()``: the pass and what it rewrote
  (``glu_fusion.compile``).
* ``config``: the three user settings, validated on assignment.
"""
from __future__ import annotations

from . import config
from ._version import __version__
from .compile.backend import backend, disable, enable
from .compile.report import Report, report
from .functional import rms_norm_gated, swiglu, swiglu_packed

__all__ = ["__version__", "config", "swiglu", "swiglu_packed", "rms_norm_gated", "backend", "enable",
           "disable", "report", "Report"]
