"""Expert routings and problems shared by the grouped SwiGLU tests: tokens sorted by expert,
cumulative int32 offsets, weights in every storage the op reads in place, and a float64 oracle
that slices the weights itself (independent of the op's own view helpers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from glu_fusion import grouped_reference
from helpers.swiglu_cases import check_against_float64 as float64_check

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

#: name -> (tokens per expert, rows of padded tail)
ROUTINGS = {
    "hot_expert": ([0, 29, 0, 1], 0),          # one hot expert, empty ones, a one-token expert
    "padded_tail": ([5, 0, 7], 5),              # rows past offsets[-1] must come back zero
    "uneven": ([3, 17, 1, 0, 12], 0),           # T = 33: no multiple of any tile
    "first_empty_last_hot": ([0, 0, 2, 19], 3),
}

FORMS = ("separate", "concat", "interleaved", "transposed_interleaved")


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


@dataclass
class GroupedProblem:
    form: str
    x: torch.Tensor
    offsets: torch.Tensor
    weights: list            # the leaves, as the model stores them
    biases: list
    activation: str
    alpha: float
    limit: float

    @property
    def leaves(self) -> list:
        return [self.x, *self.weights, *self.biases]

    def halves(self, weights: list, biases: list):
        """(w_gate, w_up, b_gate, b_up) as [E, N, K] / [E, N] views, sliced here by hand."""
        if self.form == "separate":
            return (*weights, *(biases or (None, None)))
        w = weights[0].transpose(1, 2) if self.form == "transposed_interleaved" else weights[0]
        b = biases[0] if biases else None
        n = w.shape[1] // 2
        if self.form == "concat":
            return w[:, :n], w[:, n:], *((b[:, :n], b[:, n:]) if b is not None else (None, None))
        return w[:, 0::2], w[:, 1::2], *((b[:, 0::2], b[:, 1::2]) if b is not None else (None, None))

    def run(self, leaves: Optional[list] = None) -> torch.Tensor:
        """Our op through the functional API."""
        from glu_fusion.functional import grouped_swiglu as grouped_swiglu_api, grouped_swiglu_packed as grouped_swiglu_packed_api
        leaves = self.leaves if leaves is None else leaves
        x, rest = leaves[0], leaves[1:]
        nw = len(self.weights)
        weights, biases = rest[:nw], rest[nw:]
        kw = dict(activation=self.activation, alpha=self.alpha, limit=self.limit)
        if self.form == "separate":
            return grouped_swiglu_api(x, self.offsets, *weights, *(biases or (None, None)), **kw)
        w = weights[0].transpose(1, 2) if self.form == "transposed_interleaved" else weights[0]
        layout = "concat" if self.form == "concat" else "interleaved"
        return grouped_swiglu_packed_api(x, self.offsets, w, biases[0] if biases else None, layout, **kw)

    def oracle(self, leaves: list) -> torch.Tensor:
        x, rest = leaves[0], leaves[1:]
        nw = len(self.weights)
        wg, wu, bg, bu = self.halves(rest[:nw], rest[nw:])
        g, u = grouped_reference.grouped_preact(x, self.offsets, wg, wu, bg, bu)
        # Eager rounds each projection to the model's dtype before the gate; so does the oracle
        # (the gradient passes straight through the rounding), so that where gpt-oss's clamp is
        # active is decided on the same values.
        dtype = self.x.dtype
        g = g + (g.to(dtype).to(g.dtype) - g).detach()
        u = u + (u.to(dtype).to(u.dtype) - u).detach()
        return grouped_reference.gate(g, u, self.activation, self.alpha, self.limit)


def make_problem(routing: str, k: int, n: int, dtype: torch.dtype, form: str = "separate",
                 bias: bool = False, activation: str = "silu", counts=None, tail=None,
                 device: str = "cpu") -> GroupedProblem:
    if counts is None:
        counts, tail = ROUTINGS[routing]
    e, t = len(counts), sum(counts) + tail
    scale = k ** -0.5

    def leaf(*shape, s=1.0):
        return (torch.randn(*shape, device=device) * s).to(dtype).requires_grad_()

    x = leaf(t, k)

    if form == "separate":
        weights = [leaf(e, n, k, s=scale), leaf(e, n, k, s=scale)]
        biases = [leaf(e, n, s=0.5), leaf(e, n, s=0.5)] if bias else []
    elif form == "transposed_interleaved":
        weights = [leaf(e, k, 2 * n, s=scale)]
        biases = [leaf(e, 2 * n, s=0.5)] if bias else []
    else:
        weights = [leaf(e, 2 * n, k, s=scale)]
        biases = [leaf(e, 2 * n, s=0.5)] if bias else []
    problem = GroupedProblem(form, x, offsets_of(counts).to(device), weights, biases, activation,
                             grouped_reference.GPTOSS_ALPHA, grouped_reference.GPTOSS_LIMIT)
    if activation == "gptoss":
        problem.limit = clamp_limit_in_a_gap(problem)
    return problem


def clamp_limit_in_a_gap(problem: GroupedProblem) -> float:
    """A clamp limit that about a quarter of the pre-activations exceed, placed in the widest gap
    between neighbouring |values| there: rounding to fp16 then cannot move a value across it, so
    where the clamp is active is the same in the kernel and in the float64 oracle."""
    with torch.no_grad():
        wg, wu, bg, bu = problem.halves([w.double() for w in problem.weights],
                                        [b.double() for b in problem.biases])
        g, u = grouped_reference.grouped_preact(problem.x.double(), problem.offsets, wg, wu, bg, bu)
        values = torch.cat([g.flatten(), u.flatten().abs()]).sort().values
    if values.numel() < 8:
        return 0.5
    lo, hi = int(values.numel() * 0.6), int(values.numel() * 0.85)
    window = values[lo:hi + 1]
    gaps = window[1:] - window[:-1]
    i = int(gaps.argmax())
    return float((window[i] + window[i + 1]) / 2)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (0 when both are zero); NaN anywhere counts as failure."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    num = (got - want).norm()
    den = want.norm()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den).item()


def check_against_float64(problem: GroupedProblem, tol: float) -> dict:
    """Forward and every gradient against float64 autograd of the reference; also that the
    padded tail's output and the gradients of experts without tokens are exact zeros."""
    errors, (out, *grads) = float64_check(problem, tol)

    routed = int(problem.offsets[-1])
    assert (out[routed:] == 0).all() and (grads[0][routed:] == 0).all()
    counts = torch.diff(problem.offsets, prepend=problem.offsets.new_zeros(1))
    empty = (counts == 0).nonzero().flatten().tolist()
    for name, grad in zip(list(errors)[2:], grads[1:]):
        for e in empty:
            assert (grad[e] == 0).all(), f"{name} of empty expert {e} is not zero"
    return errors
