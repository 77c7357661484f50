"""Plots from the benchmark JSON files: our time relative to Inductor's and to the floor.

    python benchmarks/plot.py --swiglu swiglu.json --norm norm.json --block mlp_block.json --out DIR

Writes ``swiglu.png``, ``rms_norm_gated.png`` and ``mlp_block.png``: one bar group per shape,
bars for forward and forward+backward, y = time / Inductor time (below 1: we are faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _bars(ax, labels, series, title):
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("time / Inductor time")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_family(path: str, out: str, png: str, title: str, label, ours: str) -> None:
    """One bar group per shape: ``ours`` forward and forward+backward, and the forward floor,
    each over Inductor's time."""
    data = json.load(open(path))
    rows, env = data["rows"], data["env"]
    series = {f"ours {ph}": [r[f"{ours}_{ph}_ms"] / r[f"inductor_{ph}_ms"] for r in rows]
              for ph in ("fwd", "fwdbwd")}
    series["floor fwd"] = [r["floor_fwd_ms"] / r["inductor_fwd_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    _bars(ax, [label(r) for r in rows], series,
          f"{title} bf16, {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, png), dpi=110)


def plot_norms(path: str, out: str) -> None:
    """bench_norms.py's rows: our GPU time with CUDA graphs over Inductor's, forward and
    forward+backward, and the copy floor's, one bar group per (family, shape)."""
    data = json.load(open(path))
    rows, env = data["rows"], data["env"]
    series = {f"ours {ph}": [r[f"ours_{ph}"]["graph_ms"] / r[f"inductor_{ph}"]["graph_ms"] for r in rows]
              for ph in ("fwd", "fwdbwd")}
    series["copy fwd"] = [r["copy_fwd"]["graph_ms"] / r["inductor_fwd"]["graph_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    _bars(ax, [f"{r['family']} {'x'.join(map(str, r['shape']))}" for r in rows], series,
          f"Norms bf16 (GPU time, CUDA graphs), {env['device']}, torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rms_norm_gated.png"), dpi=110)


def plot_block(path: str, out: str) -> None:
    """MLP block: the default path and the SwiGLU-only rewrite, GPU time over Inductor's,
    forward and forward+backward."""
    data = json.load(open(path))
    rows, env = data["rows"], data["env"]
    # Rows of older runs named the default route "ours_unfused_bwd" (and "ours" a fused backward GEMM).
    default = "ours_unfused_bwd" if "ours_unfused_bwd_fwd_gpu_ms" in rows[0] else "ours"
    series = {}
    for ph in ("fwd", "fwdbwd"):
        for name, key in (("block (default)", default), ("SwiGLU only", "ours_swiglu")):
            series[f"{name} {ph}"] = [r[f"{key}_{ph}_gpu_ms"] / r[f"inductor_{ph}_gpu_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(13, 4.8))
    _bars(ax, [f"{r['K']}→{r['N']} M={r['M']}" for r in rows], series,
          f"MLP block bf16 (GPU time over Inductor's), {env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mlp_block.png"), dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--swiglu")
    parser.add_argument("--norm")
    parser.add_argument("--block")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.swiglu:
        plot_family(args.swiglu, args.out, "swiglu.png", "SwiGLU (ours = pass + ops)",
                    lambda r: f"{r['K']}→{r['N']} M={r['M']}", "ours_backend")
    if args.norm:
        plot_norms(args.norm, args.out)
    if args.block:
        plot_block(args.block, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
