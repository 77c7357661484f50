"""Triton kernels: plain functions of tensors (no torch.library, no autograd, no settings read).

::

    kernels/
      _launch.py    launch helpers every kernel shares: interpreter detection, tile tables,
                    dot precision, LaunchPlan (a prepared launch of a compiled binary)
      engine/       the Hopper GEMM engine (Gluon, sm_90): one persistent warp-specialised
                    main loop and its schedules (mainloop), the epilogues (plain/bias, SwiGLU
                    forward, dgated), one entry point per epilogue (kernels), descriptors and
                    launches (host), the split weight gradient's reduction (reduce)
      portable/     the tl.dot kernels for the CPU (Triton's interpreter) and GPUs other than
                    Hopper: the SwiGLU forward (pointer and persistent TMA), the gate and the
                    gate-grad elementwise kernels, the grouped expert kernels, and the
                    elementwise helpers they share
      norms/        RMSNorm with a residual add, and the gated RMSNorm

The ops import a module where they launch it; importing this package imports no Triton.
"""
