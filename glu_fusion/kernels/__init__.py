"""Triton kernels: plain functions of tensors (no torch.library, no autograd here)."""
from .rms_norm_gated import rms_norm_gated_backward, rms_norm_gated_forward
from .swiglu_bwd import swiglu_gate_grad
from .swiglu_fwd import swiglu_forward
from .swiglu_gate import swiglu_gate
from .swiglu_fwd_tma import swiglu_forward_tma, tma_eligible

__all__ = ["swiglu_forward", "swiglu_forward_tma", "swiglu_gate", "tma_eligible", "swiglu_gate_grad",
           "rms_norm_gated_forward",
           "rms_norm_gated_backward"]
