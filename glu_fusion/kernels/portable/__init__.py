"""The portable Triton kernels (``tl.dot`` and elementwise): the CPU through Triton's
interpreter, and GPUs other than Hopper.

* ``swiglu_fwd``: the SwiGLU forward, a dual GEMM with the gate in its epilogue (pointer loads).
* ``swiglu_fwd_tma``: the same as a persistent TMA kernel, and ``tma_eligible``.
* ``swiglu_gate``: the gate alone, ``silu(g)·u``, after GEMMs computed elsewhere.
* ``swiglu_gate_grad``: the gate's backward, ``dH = [dG | dU]`` (and ``h``).
* ``grouped_gemm``, ``grouped_gate``: the expert (grouped) forward, input and weight gradients,
  and the expert gate's backward.
* ``_elementwise``: the 2-D tile and launch the elementwise kernels share.
"""
