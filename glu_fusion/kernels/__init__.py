"""Triton kernels: plain functions of tensors (no torch.library, no autograd here)."""
from .swiglu_bwd import swiglu_gate_grad, swiglu_input_grad, swiglu_weight_grad
from .swiglu_fwd import swiglu_forward

__all__ = ["swiglu_forward", "swiglu_gate_grad", "swiglu_input_grad", "swiglu_weight_grad"]
from .rms_norm_gated import rms_norm_gated_backward, rms_norm_gated_forward  # noqa: F401,E402
