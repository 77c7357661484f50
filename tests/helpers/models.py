"""Small modules the pass tests compile: real spellings of the fused families."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Packed(nn.Module):
    def __init__(self, k=16, n=24, interleaved=False):
        super().__init__()
        self.fc = nn.Linear(k, 2 * n)
        self.interleaved = interleaved

    def forward(self, x):
        y = self.fc(x)
        g, u = (y[..., ::2], y[..., 1::2]) if self.interleaved else y.chunk(2, -1)
        return F.silu(g) * u


class TwoWeights(nn.Module):
    def __init__(self, k=16, n=24):
        super().__init__()
        self.w1 = nn.Linear(k, n, bias=False)
        self.w3 = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return F.silu(self.w1(x)) * self.w3(x)


class GatedNormQwen3Next(nn.Module):
    """The gated RMSNorm of a gated delta-net layer, written as HF Qwen3-Next writes it:
    normalise in fp32, downcast, weight in the input dtype, gate in fp32."""

    def __init__(self, d=16, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        hidden_states, gate = x.chunk(2, -1)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight * hidden_states.to(input_dtype)
        hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        return hidden_states.to(input_dtype)
