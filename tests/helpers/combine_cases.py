"""Routings and the eager reference of the experts' down projection and combine
(``glu_fusion.grouped_down_combine``): transformers 5.18's ``grouped_mm`` experts after the gate."""
from __future__ import annotations

import torch

import glu_fusion
from glu_fusion import grouped_reference
from glu_fusion.ops.grouped_swiglu import expert_of_rows, routed_rows


def make_routing(tokens: int, experts: int, topk: int, tail_tokens: int = 0, seed: int = 0):
    """``(offsets, perm, row_weights_of_slots)``: each token picks ``topk`` distinct experts (the
    last ``tail_tokens`` tokens' first choice is the sentinel expert ``experts``, which sorts to
    the tail and no offset counts, as under expert parallelism); ``perm`` sorts the flattened
    choices by expert."""
    gen = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    if tail_tokens:
        choice[-tail_tokens:, 0] = experts
    expert_ids = choice.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    counts = torch.bincount(sorted_ids[sorted_ids < experts], minlength=experts)
    weights = torch.rand(tokens * topk, generator=gen) + 0.1
    return counts.cumsum(0).to(torch.int32), perm, weights


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def eager_combine(h, offsets, w_down, b_down, row_weights, perm, topk):
    """transformers 5.18's steps, in h's dtype; the tail's rows masked to zero as its expert
    parallelism does."""
    s, d = h.shape[0], w_down.shape[1]
    proj = grouped_reference.grouped_linear(h, offsets, w_down)
    if b_down is not None:
        proj = proj + b_down[expert_of_rows(offsets, s).clamp(max=w_down.shape[0] - 1)]
    weighted = (proj * row_weights.unsqueeze(-1)).masked_fill(~routed_rows(offsets, s).unsqueeze(1), 0)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(s, device=perm.device)
    return weighted[inv_perm].view(s // topk, topk, d).sum(dim=1)


def problem(dtype, tokens=37, experts=5, topk=2, n=24, d=16, bias=True, tail_tokens=0, seed=0, device="cpu"):
    """``(leaves, offsets, perm)``: leaves h [S, N], w_down [E, D, N], bias_down [E, D] (or None)
    and row_weights [S], requiring grad."""
    offsets, perm, slot_weights = make_routing(tokens, experts, topk, tail_tokens, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    s = tokens * topk
    leaves = [torch.randn(s, n, generator=gen), torch.randn(experts, d, n, generator=gen) / n ** 0.5,
              torch.randn(experts, d, generator=gen) if bias else None, slot_weights[perm]]
    leaves = [t.to(device, dtype).requires_grad_() if t is not None else None for t in leaves]
    return leaves, offsets.to(device), perm.to(device)


def run_ours(leaves, offsets, perm, topk):
    h, w, b, rw = leaves
    return glu_fusion.grouped_down_combine(h, offsets, w, rw, perm, topk, bias_down=b)


def run_eager(leaves, offsets, perm, topk):
    h, w, b, rw = leaves
    return eager_combine(h, offsets, w, b, rw, perm, topk)


def outputs_and_grads(fn, leaves, offsets, perm, topk, dout):
    out = fn(leaves, offsets, perm, topk)
    present = [t for t in leaves if t is not None]
    return [out, *torch.autograd.grad(out, present, dout.to(out.dtype))]


class DownCombine(torch.nn.Module):
    """transformers 5.18's down projection and combine over rows sorted by expert
    (``grouped_mm_experts_forward`` after the gate), and look-alikes of it (``variant``):

    * ``model``: as transformers writes it; ``argsort``: the inverse permutation as ``argsort``;
    * ``gather_by_perm``: ``weighted[perm]`` (not the inverse: another result);
    * ``weights_after_gather``: the routing weights multiplied after the gather;
    * ``fp32_weights``: routing weights upcast (the multiply promotes);
    * ``masked``: rows zeroed by a mask after the GEMM;
    * ``proj_returned``: the GEMM's output also returned.
    """

    def __init__(self, experts: int, hidden: int, inter: int, dtype=torch.bfloat16, variant: str = "model",
                 bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_experts, self.variant = experts, variant
        self.down_proj = torch.nn.Parameter((torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5)
                                            .to(dtype))
        self.down_proj_bias = torch.nn.Parameter(torch.randn(experts, hidden, generator=gen).to(dtype)) if bias else None

    def forward(self, h, top_k_index, top_k_weights):
        num_tokens, num_top_k = top_k_index.shape
        expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
        sample_weights = top_k_weights.reshape(-1)
        sample_weights_g = sample_weights[perm]
        tokens_per_expert = torch.histc(expert_ids_g.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        proj = torch._grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offsets)
        if self.down_proj_bias is not None:
            proj.add_(self.down_proj_bias[expert_ids_g])
        if self.variant == "masked":
            proj = proj.masked_fill((expert_ids_g >= self.num_experts - 1).unsqueeze(-1), 0.0)
        if self.variant == "fp32_weights":
            sample_weights_g = sample_weights_g.float()
        weighted = proj if self.variant == "weights_after_gather" else proj * sample_weights_g.unsqueeze(-1)
        if self.variant == "argsort":
            inv_perm = torch.argsort(perm)
        elif self.variant == "gather_by_perm":
            inv_perm = perm
        else:
            inv_perm = torch.empty_like(perm)
            inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
        weighted = weighted[inv_perm]
        if self.variant == "weights_after_gather":
            weighted = weighted * sample_weights.unsqueeze(-1)
        out = weighted.view(num_tokens, num_top_k, -1).sum(dim=1).to(h.dtype)
        return (out, proj) if self.variant == "proj_returned" else out


def routed(tokens: int, experts: int, topk: int, inter: int, dtype=torch.bfloat16, seed: int = 0):
    """(h sorted rows [tokens·topk, inter], top_k_index [tokens, topk], top_k_weights)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    return (torch.randn(tokens * topk, inter, generator=gen).to(dtype), index,
            torch.rand(tokens, topk, generator=gen).to(dtype))
