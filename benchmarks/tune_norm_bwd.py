"""Sweep the gated-norm kernels' tile size (elements per program) and, for the backward, the
weight-gradient workspace cap, at 524288 rows in bf16.  Prints the median time of each variant.

    python benchmarks/tune_norm_bwd.py
"""
from __future__ import annotations

import torch
import triton

from _measure import bench
from glu_fusion.kernels.norms import rms_norm_gated as kernels

ROWS = 524288
TILES = (2048, 4096, 8192, 16384)
WORKSPACES = (16 << 20, 4 << 20, 1 << 20)


def main() -> None:
    defaults = (kernels.FWD_TILE_ELEMENTS, kernels.BWD_TILE_ELEMENTS, kernels._WORKSPACE_BYTES)
    by_width = kernels.BWD_TILE_ELEMENTS_BY_WIDTH
    kernels.BWD_TILE_ELEMENTS_BY_WIDTH = {}   # sweep one size for every width
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for d in (128, 256, 1024):
        x = torch.randn(ROWS, d, device="cuda", dtype=torch.bfloat16)
        z = torch.randn_like(x)
        w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        y = torch.empty_like(x)
        rstd = torch.empty(ROWS, 1, device="cuda", dtype=torch.float32)
        dx, dz = torch.empty_like(x), torch.empty_like(x)
        flags = (1e-6, d, True, 0, 0.0, False, False, False, False)
        floor_fwd = bench(lambda: y.copy_(x)) * 1.5
        print(f"\nD={d}: forward (floor ~{floor_fwd * 1e3:.0f} us, 1.5x a copy of x)")
        for tile in TILES:
            kernels.FWD_TILE_ELEMENTS = tile
            ms = bench(lambda: kernels.rms_norm_gated_forward(x, z, w, y, rstd, *flags))
            print(f"  tile {tile:6d}: {ms * 1e3:8.1f} us")
        kernels.FWD_TILE_ELEMENTS = defaults[0]
        kernels.rms_norm_gated_forward(x, z, w, y, rstd, *flags)
        print(f"D={d}: backward incl. weight-gradient sum (floor ~{floor_fwd / 1.5 * 2.5 * 1e3:.0f} us)")
        for tile in TILES:
            for ws in WORKSPACES:
                kernels.BWD_TILE_ELEMENTS, kernels._WORKSPACE_BYTES = tile, ws
                ms = bench(lambda: kernels.rms_norm_gated_backward(dy, x, z, w, rstd, dx, dz, True, d, True, 0,
                                                                   0.0))
                print(f"  tile {tile:6d}, workspace cap {ws >> 20:3d} MB: {ms * 1e3:8.1f} us")
        kernels.FWD_TILE_ELEMENTS, kernels.BWD_TILE_ELEMENTS, kernels._WORKSPACE_BYTES = defaults
    kernels.BWD_TILE_ELEMENTS_BY_WIDTH = by_width


if __name__ == "__main__":
    main()
