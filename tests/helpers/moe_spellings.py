"""Expert blocks spelled exactly as the code people run spells them, for graphs that CI can
build without the libraries installed.

* :class:`HFGroupedMMExperts`: transformers 5.17.0 (``sentinel_masks=False``: 5.18.0, which zeroes
  the rows routed to no local expert only under expert parallelism), ``src/transformers/integrations/moe.py``,
  ``grouped_mm_experts_forward`` with its helpers ``_grouped_linear`` / ``_grouped_mm`` and the
  default ``_apply_gate`` (``chunk(2, dim=-1)``, ``act_fn(gate) * up``), as
  ``@use_experts_implementation`` runs it for Qwen3-MoE / Qwen3-Next / DeepSeek-V3 experts
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), and for gpt-oss
  (``is_transposed=True, has_bias=True``: ``gate_up_proj [E, H, 2I]`` with ``gate_up_proj_bias
  [E, 2I]``, ``GptOssExperts._apply_gate``: interleaved halves, clamped gate, alpha 1.702,
  limit 7, ``up + 1``).  Transcribed line by line from that file (the grouped GEMM taken as
  ``F.grouped_mm`` when torch has it, else ``torch._grouped_mm``, as ``_grouped_mm`` does when
  ``_can_use_grouped_mm`` says yes; under ``torch.compile`` that is bf16 weights only, other
  dtypes go through ``transformers::grouped_mm_fallback``).  ``act`` swaps the activation for
  look-alikes.
* :class:`HFBatchedMMExperts`: transformers 5.18.0, the same file, ``batched_mm_experts_forward``
  with its helper ``_batched_linear`` (every token repeated top-k times, each row's expert weight
  gathered by ``gate_up_proj[expert_ids]``, ``torch.bmm``; gpt-oss's transposed weights with the
  per-row bias added in place), for the same experts; ``expert_parallel`` takes its sentinel
  branch (ids clamped out of place, their routing weights zeroed).
* :func:`titan_run_experts_grouped_mm` / :func:`titan_run_experts_for_loop`: torchtitan 0.2.2,
  ``torchtitan/models/moe/moe.py``, ``_run_experts_grouped_mm`` and ``_run_experts_for_loop``
  (what ``GroupedExperts.forward`` calls with ``use_grouped_mm`` on and off), copied from the
  0.2.2 wheel's source; torchtitan itself does not import without its training dependencies.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def ensure_fallback_op() -> None:
    """``transformers::grouped_mm_fallback``: transformers' own registration when it is installed,
    else a copy of it (schema, loop over experts, fake, autograd) from ``integrations/moe.py``."""
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the op)
        return
    except ImportError:
        pass
    if hasattr(torch.ops, "transformers") and hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        return

    def fallback(input, weight, offs):
        output = torch.zeros(input.size(0), weight.size(2), device=input.device, dtype=input.dtype)
        start = 0
        for i, end in enumerate(offs.tolist()):
            if start == end:
                continue
            torch.mm(input[start:end], weight[i], out=output[start:end])
            start = end
        return output

    def fake(input, weight, offs):
        return torch.empty(input.size(0), weight.size(2), device=input.device, dtype=input.dtype)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.offs = inputs[2]

    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight = torch.zeros_like(input), torch.zeros_like(weight)
        start = 0
        for i, end in enumerate(ctx.offs.tolist()):
            if start == end:
                continue
            torch.mm(grad_output[start:end], weight[i].T, out=grad_input[start:end])
            torch.mm(input[start:end].T, grad_output[start:end], out=grad_weight[i])
            start = end
        return grad_input, grad_weight, None

    torch.library.custom_op("transformers::grouped_mm_fallback", fallback, mutates_args=(),
                            schema="(Tensor input, Tensor weight, Tensor offs) -> Tensor")
    torch.library.register_fake("transformers::grouped_mm_fallback", fake)
    torch.library.register_autograd("transformers::grouped_mm_fallback", backward, setup_context=setup_context)


def _hf_grouped_mm(input, weight, offs):
    """transformers' ``_grouped_mm`` as ``_can_use_grouped_mm`` dispatches it under
    ``torch.compile`` on the CPU (torch 2.13): the grouped GEMM for bf16 weights, else
    ``transformers::grouped_mm_fallback`` (:func:`ensure_fallback_op`)."""
    if weight.dtype != torch.bfloat16:
        return torch.ops.transformers.grouped_mm_fallback(input.to(weight.dtype), weight, offs=offs)
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(input.to(weight.dtype), weight, offs=offs)
    return torch._grouped_mm(input.to(weight.dtype), weight, offs=offs)


def _hf_grouped_linear(input, weight, offs, bias=None, is_transposed=False):
    if is_transposed:
        out = _hf_grouped_mm(input, weight, offs=offs)
    else:
        out = _hf_grouped_mm(input, weight.transpose(-2, -1), offs=offs)
    if bias is not None:
        out.add_(bias)
    return out


class HFGroupedMMExperts(nn.Module):
    """``gate_up_proj``/``down_proj`` as transformers stores them; ``forward(hidden_states,
    top_k_index, top_k_weights)`` is ``grouped_mm_experts_forward``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype=torch.float32, gptoss: bool = False,
                 seed: int = 0, act: nn.Module = None, sentinel_masks: bool = True) -> None:
        super().__init__()
        # 5.17 zeroes the sentinel rows around each GEMM; 5.18 only under expert parallelism
        self.sentinel_masks = sentinel_masks
        g = torch.Generator().manual_seed(seed)

        def p(*shape, s):
            return nn.Parameter((torch.randn(*shape, generator=g) * s).to(dtype))
        self.num_experts = num_experts
        self.has_gate, self.has_bias, self.is_transposed = True, gptoss, gptoss
        self.gptoss = gptoss
        if gptoss:
            self.gate_up_proj = p(num_experts, hidden, 2 * inter, s=hidden ** -0.5 * 2)
            self.gate_up_proj_bias = p(num_experts, 2 * inter, s=0.5)
            self.down_proj = p(num_experts, inter, hidden, s=inter ** -0.5)
            self.down_proj_bias = p(num_experts, hidden, s=0.5)
            self.alpha, self.limit = 1.702, 7.0
        else:
            self.gate_up_proj = p(num_experts, 2 * inter, hidden, s=hidden ** -0.5 * 2)
            self.down_proj = p(num_experts, hidden, inter, s=inter ** -0.5)
        self.act_fn = nn.SiLU() if act is None else act

    def _apply_gate(self, gate_up_out):
        if self.gptoss:   # GptOssExperts._apply_gate
            gate, up = gate_up_out[..., ::2], gate_up_out[..., 1::2]
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            return (up + 1) * glu
        gate, up = gate_up_out.chunk(2, dim=-1)   # _default_apply_gate
        return self.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        device = hidden_states.device
        num_top_k = top_k_index.size(-1)
        num_tokens = hidden_states.size(0)
        hidden_dim = hidden_states.size(-1)
        sample_weights = top_k_weights.reshape(-1)
        expert_ids = top_k_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        selected_hidden_states_g = hidden_states[perm // num_top_k]
        sample_weights_g = sample_weights[perm]
        histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
        tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        sentinel_mask = None
        if self.sentinel_masks:
            sentinel_mask = (expert_ids_g >= self.num_experts).unsqueeze(-1)
            expert_ids_g.clamp_(max=self.num_experts - 1)
        selected_weights = self.gate_up_proj
        selected_biases = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
        if sentinel_mask is not None:
            selected_hidden_states_g.masked_fill_(sentinel_mask, 0.0)
        proj_out = _hf_grouped_linear(selected_hidden_states_g, selected_weights, offsets, bias=selected_biases,
                                      is_transposed=self.is_transposed)
        if sentinel_mask is not None:
            proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
        proj_out = self._apply_gate(proj_out)
        selected_weights = self.down_proj
        selected_biases = self.down_proj_bias[expert_ids_g] if self.has_bias else None
        proj_out = _hf_grouped_linear(proj_out, selected_weights, offsets, bias=selected_biases,
                                      is_transposed=self.is_transposed)
        if sentinel_mask is not None:
            proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
        weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=device)
        weighted_out = weighted_out[inv_perm]
        final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
        return final_hidden_states.to(hidden_states.dtype)


def _hf_batched_linear(input, weight, bias=None, is_transposed=False):
    if is_transposed:
        out = torch.bmm(input.unsqueeze(1), weight).squeeze(1)
    else:
        out = torch.bmm(weight, input.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        out.add_(bias)
    return out


class HFBatchedMMExperts(HFGroupedMMExperts):
    """The same experts; ``forward`` is ``batched_mm_experts_forward``."""

    def __init__(self, *args, expert_parallel: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._is_expert_parallel = expert_parallel

    def forward(self, hidden_states, top_k_index, top_k_weights):
        num_top_k = top_k_index.size(-1)
        num_tokens = hidden_states.size(0)
        hidden_dim = hidden_states.size(-1)
        selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
        sample_weights = top_k_weights.reshape(-1)
        expert_ids = top_k_index.reshape(-1)
        sentinel_mask = None
        if self._is_expert_parallel:
            sentinel_mask = expert_ids >= self.num_experts
            expert_ids = expert_ids.clamp(0, self.num_experts - 1)
        selected_weights = self.gate_up_proj[expert_ids]
        selected_biases = self.gate_up_proj_bias[expert_ids] if self.has_bias else None
        proj_out = _hf_batched_linear(selected_hidden_states, selected_weights, bias=selected_biases,
                                      is_transposed=self.is_transposed)
        proj_out = self._apply_gate(proj_out)
        selected_weights = self.down_proj[expert_ids]
        selected_biases = self.down_proj_bias[expert_ids] if self.has_bias else None
        proj_out = _hf_batched_linear(proj_out, selected_weights, bias=selected_biases,
                                      is_transposed=self.is_transposed)
        if sentinel_mask is not None:
            sample_weights = sample_weights.masked_fill(sentinel_mask, 0.0)
        weighted_out = proj_out * sample_weights.unsqueeze(-1)
        final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
        return final_hidden_states.to(hidden_states.dtype)


def titan_run_experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert):
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    h = F.silu(torch._grouped_mm(x.bfloat16(), w1.bfloat16().transpose(-2, -1), offs=offsets))
    h = h * torch._grouped_mm(x.bfloat16(), w3.bfloat16().transpose(-2, -1), offs=offsets)
    out = torch._grouped_mm(h, w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)
    return out


def titan_run_experts_for_loop(w1, w2, w3, x, num_tokens_per_expert):
    num_tokens_per_expert_list = num_tokens_per_expert.tolist()
    num_padding = x.shape[0] - sum(num_tokens_per_expert_list)
    x_splits = torch.split(x[: sum(num_tokens_per_expert_list)], split_size_or_sections=num_tokens_per_expert_list,
                           dim=0)
    out_experts_splits = []
    for expert_idx, x_expert in enumerate(x_splits):
        h = F.silu(torch.matmul(x_expert, w1[expert_idx].transpose(-2, -1)))
        h = h * torch.matmul(x_expert, w3[expert_idx].transpose(-2, -1))
        h = torch.matmul(h, w2[expert_idx].transpose(-2, -1))
        out_experts_splits.append(h)
    out = torch.cat(out_experts_splits, dim=0)
    out = torch.vstack((out, out.new_zeros((num_padding, out.shape[-1]))))
    return out


class TitanGroupedExperts(nn.Module):
    """torchtitan 0.2.2 ``GroupedExperts`` on plain tensors: ``w1``/``w3`` [E, hidden, dim],
    ``w2`` [E, dim, hidden]; ``forward(x, num_tokens_per_expert)`` (tokens already sorted by
    expert, as its MoE layer hands them over)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool, dtype=torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape, s):
            return nn.Parameter((torch.randn(*shape, generator=g) * s).to(dtype))
        self.num_experts = num_experts
        self.w1 = p(num_experts, hidden_dim, dim, s=dim ** -0.5 * 2)
        self.w2 = p(num_experts, dim, hidden_dim, s=hidden_dim ** -0.5)
        self.w3 = p(num_experts, hidden_dim, dim, s=dim ** -0.5 * 2)
        self.use_grouped_mm = use_grouped_mm

    def forward(self, x, num_tokens_per_expert):
        run = titan_run_experts_grouped_mm if self.use_grouped_mm else titan_run_experts_for_loop
        return run(self.w1, self.w2, self.w3, x, num_tokens_per_expert)
