"""One launch each of the engine's dgated kernel (every configuration in ``--configs``) and of
cuBLAS's ``dOut·Wd`` for the same shape, inside an NVTX range named ``profile``, so that Nsight
Compute profiles exactly those launches and shows whether L2 traffic or the epilogue bounds the
engine (``device_run.sh epilogues`` runs it):

    ncu --clock-control none --nvtx --nvtx-include "profile/" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis \
        python3 benchmarks/ncu_dgated.py --shape 16384x4096x14336
"""
from __future__ import annotations

import argparse

import torch

from glu_fusion.kernels.engine import host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16384x4096x14336", help="M x D x N: dOut [M, D], Wd [D, N]")
    parser.add_argument("--configs", default="DGATED,DGATED_WIDE", help="host.Config names")
    args = parser.parse_args()
    m, d, n = (int(v) for v in args.shape.split("x"))
    bf = torch.bfloat16
    dout = torch.randn(m, d, device="cuda", dtype=bf)
    wd = torch.randn(d, n, device="cuda", dtype=bf) / n ** 0.5
    pre = torch.randn(m, 2 * n, device="cuda", dtype=bf)
    dgu = torch.empty_like(pre)
    h = torch.empty(m, n, device="cuda", dtype=bf)
    configs = [getattr(host, name) for name in args.configs.split(",")]

    def launches() -> None:
        for cfg in configs:
            host.dgated(dout, wd, pre[:, :n], pre[:, n:], dgu[:, :n], dgu[:, n:], h, cfg=cfg)
        torch.mm(dout, wd)

    launches()  # compile and warm up outside the range
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    launches()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("profiled:", ", ".join(c.name for c in configs), "and cuBLAS dOut·Wd at", args.shape)


if __name__ == "__main__":
    main()
