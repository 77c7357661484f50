"""Figures from torchtitan training logs: plain ``torch.compile`` against ``GLU_FUSION=1``.

``benchmarks/torchtitan_run.sh`` writes one console log per run (torchrun ``--tee 3``: each line
starts with ``[default<rank>]:``); this reads, per run, rank 0's loss, tokens/s and peak reserved
memory per logged step, and on every rank how many sites the ``glu_fusion`` logger says it
rewrote.  It also writes the synthetic text corpus the runs train on (``--make-corpus``).

    python benchmarks/torchtitan_summary.py --log plain=a.log --log glu_fusion=b.log \\
        --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys

# torchtitan's metrics line, colour printing off:
# "step:  3  loss:  7.12345  grad_norm:  1.2  memory:  1.23GiB(0.87%)  tps: 12,345  tflops: ..."
STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naNinf]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)")
RANK = re.compile(r"^\[(?:default|rank)(\d+)\]:")
REWRITE = re.compile(r"\brewrote (\w+): ")  # one INFO line of the glu_fusion logger per site
LOSS_TOLERANCE = 5e-2  # bf16 parameters over 20 AdamW steps


def parse_log(text: str) -> dict:
    """Per-step metrics of rank 0 (or of unprefixed lines) and rewrite counts per rank."""
    steps: dict[int, dict] = {}
    rewrites: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = RANK.match(line)
        rank = m.group(1) if m else "0"
        r = REWRITE.search(line)
        if r:
            per = rewrites.setdefault(rank, {})
            per[r.group(1)] = per.get(r.group(1), 0) + 1
        s = STEP.search(line)
        if s and rank == "0":
            steps[int(s.group(1))] = {"loss": float(s.group(2)), "mem_gib": float(s.group(3)),
                                      "tps": int(s.group(4).replace(",", ""))}
    return {"steps": steps, "rewrites": rewrites}


def summarize(runs: dict[str, dict], ranks: int, skip: int = 3) -> dict:
    """Median tokens/s past the first ``skip`` steps (compilation), peak memory, loss parity."""
    out = {"runs": {}, "failures": []}
    for name, parsed in runs.items():
        steps = parsed["steps"]
        if not steps:
            out["failures"].append(f"{name}: no training steps in the log")
            out["runs"][name] = {"steps": 0, "rewrites": parsed["rewrites"]}
            continue
        order = sorted(steps)
        timed = [steps[i]["tps"] for i in order if i > skip] or [steps[i]["tps"] for i in order]
        out["runs"][name] = {
            "steps": len(order), "losses": [steps[i]["loss"] for i in order],
            "median_tps_per_rank": statistics.median(timed),
            "peak_reserved_gib": max(steps[i]["mem_gib"] for i in order),
            "rewrites": parsed["rewrites"],
        }
    names = list(runs)
    if len(names) == 2 and all("losses" in out["runs"][n] for n in names):
        a, b = (out["runs"][n]["losses"] for n in names)
        if len(a) != len(b):
            out["failures"].append(f"step counts differ: {len(a)} vs {len(b)}")
        out["max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
        if not out["max_loss_diff"] <= LOSS_TOLERANCE:
            out["failures"].append(f"loss differs by {out['max_loss_diff']:.3g} > {LOSS_TOLERANCE}")
        ta, tb = (out["runs"][n]["median_tps_per_rank"] for n in names)
        out["speed_ratio"] = tb / ta
    fused = out["runs"].get("glu_fusion", {}).get("rewrites", {})
    for rank in map(str, range(ranks)):
        if fused.get(rank, {}).get("mlp_block", 0) + fused.get(rank, {}).get("swiglu", 0) < 1:
            out["failures"].append(f"glu_fusion run: no SwiGLU rewrite logged on rank {rank}")
    if out["runs"].get("plain", {}).get("rewrites"):
        out["failures"].append("plain run: the pass rewrote something")
    out["ok"] = not out["failures"]
    return out


def markdown(summary: dict, title: str) -> str:
    lines = [f"### {title}", "",
             "| run | steps | loss first -> last | median tokens/s per rank (steps > 3) | peak reserved GiB "
             "| rewrites per rank (glu_fusion log) |", "|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        if not r.get("steps"):
            lines.append(f"| {name} | 0 | - | - | - | {r['rewrites']} |")
            continue
        rw = "; ".join(f"rank {k}: {v}" for k, v in sorted(r["rewrites"].items())) or "none"
        lines.append(f"| {name} | {r['steps']} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} "
                     f"| {r['median_tps_per_rank']:.0f} | {r['peak_reserved_gib']:.2f} | {rw} |")
    lines.append("")
    if "max_loss_diff" in summary:
        lines.append(f"- max loss difference over the steps: {summary['max_loss_diff']:.3g} "
                     f"(tolerance {LOSS_TOLERANCE})")
        lines.append(f"- glu_fusion tokens/s / plain tokens/s: {summary['speed_ratio']:.3f}")
    lines.append(f"- checks: {'PASS' if summary['ok'] else 'FAIL'}")
    lines += [f"  - {f}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def make_corpus(path: str, docs: int = 4000, seed: int = 0) -> None:
    """A JSON-lines ``{"text": ...}`` corpus of word salad with some repeated phrases, so the
    loss can fall; stands in for torchtitan's ``c4_test`` sample, which its wheel does not ship."""
    rng = random.Random(seed)
    words = ("the model trains on tokens and every layer holds an attention block and a gated "
             "feed forward block whose weights are sharded across two devices while the optimizer "
             "updates them after each step of data parallel training with mixed precision").split()
    phrases = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(64)]
    with open(path, "w") as f:
        for _ in range(docs):
            parts = [rng.choice(phrases) if rng.random() < 0.7 else rng.choice(words)
                     for _ in range(rng.randint(40, 160))]
            f.write(json.dumps({"text": " ".join(parts) + "."}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", action="append", default=[], help="NAME=PATH, once per run")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--title", default="torchtitan Llama 3 debug model")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--make-corpus", metavar="PATH", help="write the training corpus and exit")
    args = p.parse_args(argv)
    if args.make_corpus:
        make_corpus(args.make_corpus)
        return 0
    runs = {}
    for item in args.log:
        name, _, path = item.partition("=")
        try:
            with open(path, errors="replace") as f:
                runs[name] = parse_log(f.read())
        except OSError as err:
            runs[name] = {"steps": {}, "rewrites": {}, "error": str(err)}
    summary = summarize(runs, args.ranks)
    md = markdown(summary, args.title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    print(md)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
