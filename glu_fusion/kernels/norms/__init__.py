"""The norm kernels: ``rms_norm`` (RMSNorm with the residual add fused) and ``rms_norm_gated``
(the gated RMSNorm), forward and backward, with deterministic weight gradients."""
