"""Worker of tests/test_fsdp_deferred_grads.py: FSDP2 gradient accumulation with the expert
weight gradients deferred by a ``WeightGradStore``, on two processes (``torchrun``).

A small model with two grouped expert SwiGLUs (a gpt-oss-style packed ``[E, K, 2N]`` weight read
through a transposed view, with bias; separate ``[E, N, K]`` gate and up weights) between plain
linears, every module ``fully_shard``-ed with bf16 parameters and fp32 gradient reduction, runs
the same micro-batches (different on each rank) in four variants from the same initial weights:

* ``autograd``: no store; synchronisation off for all but the last micro-batch, so FSDP
  accumulates the bf16 gradients in fp32 itself and reduce-scatters once.
* ``store_fp32``: ``WeightGradStore(accumulate_dtype=torch.float32)``, synchronisation off for
  every micro-batch, ``store.reduce_fsdp(model)`` at the end.
* ``store_bf16``: the default store (each flush adds a bf16 gradient into the bf16 ``.grad``),
  synchronisation off, ``store.reduce_fsdp(model)``.
* ``float64``: a store accumulating in float64, flushed after each micro-batch; its sums, added
  over the ranks and divided by the world size (FSDP's mean), are the exact weight gradients of
  the micro-batches' own bf16 inputs dH and x, and the growth of the sums at each flush gives
  ``S = sum over micro-batches and ranks of |dW|`` / world size, the scale of the rounding bounds.

Every variant computes the same forward and the same dH and x (deferring changes neither), so
the variants differ only in how the expert weight gradients are computed and summed.  Rank 0
writes the gathered (full) gradients' differences as JSON; the test checks them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import glu_fusion
from glu_fusion.weight_grad_store import WeightGradStore

EXPERT_WEIGHTS = ("experts1.weight", "experts2.w_gate", "experts2.w_up")


class PackedExperts(nn.Module):
    """gpt-oss's storage: gate and up interleaved in one ``[E, K, 2N]`` weight, bias ``[E, 2N]``."""

    def __init__(self, e: int, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(e, k, 2 * n) / k ** 0.5)
        self.bias = nn.Parameter(torch.randn(e, 2 * n) * 0.1)

    def forward(self, x, offsets):
        return glu_fusion.grouped_swiglu_packed(x, offsets, self.weight.transpose(1, 2), self.bias,
                                                layout="interleaved")


class SeparateExperts(nn.Module):
    def __init__(self, e: int, k: int, n: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(e, n, k) / k ** 0.5)
        self.w_up = nn.Parameter(torch.randn(e, n, k) / k ** 0.5)

    def forward(self, x, offsets):
        return glu_fusion.grouped_swiglu(x, offsets, self.w_gate, self.w_up)


class Model(nn.Module):
    def __init__(self, e: int, k: int, n: int) -> None:
        super().__init__()
        self.inp = nn.Linear(k, k)
        self.experts1 = PackedExperts(e, k, n)
        self.mid = nn.Linear(n, k)
        self.experts2 = SeparateExperts(e, k, n)
        self.out = nn.Linear(n, k)

    def forward(self, x, offsets):
        h = self.mid(self.experts1(self.inp(x), offsets))
        return self.out(self.experts2(h, offsets))


def micro_batch(args, rank: int, step: int, device):
    """Tokens sorted by expert: uneven counts with an empty expert, and a padded tail."""
    g = torch.Generator().manual_seed(1000 * rank + step + 1)
    counts = torch.randint(0, 2 * args.tokens // args.experts, (args.experts,), generator=g)
    counts[step % args.experts] = 0
    offsets = counts.cumsum(0).clamp_max(args.tokens - 3).to(torch.int32)
    x = torch.randn(args.tokens, args.dim, generator=g)
    target = torch.randn(args.tokens, args.dim, generator=g)
    return x.to(device), offsets.to(device), target.to(device)


def build(args, device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    torch.manual_seed(args.seed)
    model = Model(args.experts, args.dim, args.hidden).to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for sub in (model.experts1, model.experts2):
        fully_shard(sub, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def loss_of(model, args, rank, step, device):
    x, offsets, target = micro_batch(args, rank, step, device)
    out = model(x, offsets)
    # Mean over micro-batches, as a trainer scales a gradient-accumulation loss.
    return ((out.float() - target) ** 2).mean() / args.micro_batches


def full_grads(model) -> dict[str, torch.Tensor]:
    """The reduced gradients, gathered from the shards, in float64 on the host."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None, name
        out[name] = g.full_tensor().to("cpu", torch.float64)
    return out


def run(args, variant: str, rank: int, device):
    model = build(args, device)
    if variant == "autograd":
        for step in range(args.micro_batches):
            model.set_requires_gradient_sync(step == args.micro_batches - 1)
            loss_of(model, args, rank, step, device).backward()
        return full_grads(model), {}
    if variant == "float64":
        store = WeightGradStore(accumulate_dtype=torch.float64)
        model.set_requires_gradient_sync(False)
        abs_sums: dict[int, torch.Tensor] = {}
        last: dict[int, torch.Tensor] = {}
        for step in range(args.micro_batches):
            with store:
                loss_of(model, args, rank, step, device).backward()
            store.flush()
            for leaf, total in store.accumulated_grads():
                before = last.get(id(leaf), torch.zeros_like(total))
                abs_sums[id(leaf)] = abs_sums.get(id(leaf), torch.zeros_like(total)) + (total - before).abs()
                last[id(leaf)] = total.clone()
        # Unsharded, the modules' parameters are the leaves the ops saw: name the sums.
        from torch.distributed.fsdp import FSDPModule
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.unshard()
        names = {id(p): name for name, p in model.named_parameters()}
        exact, scale = {}, {}
        for leaf, total in store.accumulated_grads():
            name = names[id(leaf)]
            for src, dst in ((total, exact), (abs_sums[id(leaf)], scale)):
                t = src.clone()
                dist.all_reduce(t)
                dst[name] = (t / dist.get_world_size()).to("cpu", torch.float64)
        for m in fsdp_modules:
            m.reshard()
        store.clear()
        return exact, scale
    store = WeightGradStore(accumulate_dtype=torch.float32 if variant == "store_fp32" else None)
    model.set_requires_gradient_sync(False)
    for step in range(args.micro_batches):
        with store:
            loss_of(model, args, rank, step, device).backward()
        if step == 0 and variant == "store_fp32":
            # Deferred: nothing in the store's sums nor in any expert weight's gradient yet.
            assert len(store) == 2 and not store.accumulated_grads()
    store.reduce_fsdp(model)
    assert len(store) == 0 and not store.accumulated_grads()
    return full_grads(model), {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    grads = {}
    for variant in ("autograd", "store_fp32", "store_bf16"):
        grads[variant] = run(args, variant, rank, device)[0]
    exact, scale = run(args, "float64", rank, device)
    if rank == 0:
        doc = {"torch": torch.__version__, "world_size": dist.get_world_size(), "device": args.device,
               "args": vars(args), "params": {}}
        for name in grads["autograd"]:
            entry = {"deferred": name in exact}
            a = grads["autograd"][name]
            for variant in ("store_fp32", "store_bf16"):
                entry[f"{variant}_equal_autograd"] = bool(torch.equal(grads[variant][name], a))
            if name in exact:
                ref, s = exact[name], scale[name]
                u_bf16 = 2.0 ** -8  # bf16 unit roundoff: 8 significant bits, round to nearest
                entry["max_scale"] = float(s.max())
                for variant in ("autograd", "store_fp32", "store_bf16"):
                    entry[f"{variant}_err"] = float((grads[variant][name] - ref).abs().max())
                # The bound of `autograd` around the exact sums: one bf16 rounding of each
                # micro-batch's dW (<= 2^-8 |dW| per element, summed: 2^-8 S), plus fp32 sums.
                bound = u_bf16 * s * (1 + 2.0 ** -4) + 2.0 ** -16 * s.max()
                diff = (grads["store_fp32"][name] - a).abs()
                entry["fp32_vs_autograd_max_over_bound"] = float((diff / bound).max())
                entry["autograd_vs_exact_max_over_bound"] = float(((a - ref).abs() / bound).max())
            doc["params"][name] = entry
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
