"""Shared helpers for the SwiGLU op tests: random problems and a float64 oracle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import glu_fusion
from glu_fusion import reference
from glu_fusion.layouts import LAYOUTS
from glu_fusion.ops.swiglu import packed_views

ALL_LAYOUTS = ("separate",) + tuple(LAYOUTS)
# Relative-error bounds against float64, by dtype (rounded inputs and outputs included).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class Problem:
    """One SwiGLU call: its inputs (leaf tensors) and how to apply the op and the oracle."""
    layout: str
    x: torch.Tensor
    weights: list  # [w_gate, w_up] or [packed]
    biases: list   # [] or [b_gate, b_up] or [packed]

    @property
    def leaves(self) -> list:
        return [self.x, *self.weights, *self.biases]

    def run(self, leaves: Optional[list] = None) -> torch.Tensor:
        x, *rest = leaves if leaves is not None else self.leaves
        nw = len(self.weights)
        weights, biases = rest[:nw], rest[nw:]
        if self.layout == "separate":
            return glu_fusion.swiglu(x, *weights, *biases)
        return glu_fusion.swiglu_packed(x, weights[0], biases[0] if biases else None, layout=self.layout)

    def unpack(self, leaves: list) -> tuple:
        """``(x, w_gate, w_up, b_gate, b_up)`` of the given leaves, packed weights split as
        views in this problem's layout."""
        x, *rest = leaves
        nw = len(self.weights)
        weights, biases = rest[:nw], rest[nw:]
        if self.layout == "separate":
            wg, wu = weights
            bg, bu = biases if biases else (None, None)
        else:
            wg, wu = packed_views(weights[0], LAYOUTS[self.layout])
            bg, bu = packed_views(biases[0], LAYOUTS[self.layout]) if biases else (None, None)
        return x, wg, wu, bg, bu

    def oracle(self, leaves: list) -> torch.Tensor:
        """The reference formula on the given (float64) leaves."""
        return reference.swiglu(*self.unpack(leaves))


def make_problem(layout: str, lead: tuple, k: int, n: int, dtype: torch.dtype, bias: bool,
                 device: str = "cpu", requires_grad: bool = True) -> Problem:
    """Fresh random inputs scaled so that activations stay O(1) at any K."""
    def leaf(*shape, scale=1.0):
        t = (torch.randn(*shape, device=device) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    x = leaf(*lead, k)
    ws = k ** -0.5
    if layout == "separate":
        weights = [leaf(n, k, scale=ws), leaf(n, k, scale=ws)]
        biases = [leaf(n, scale=0.5), leaf(n, scale=0.5)] if bias else []
    else:
        weights = [leaf(2 * n, k, scale=ws)]
        biases = [leaf(2 * n, scale=0.5)] if bias else []
    return Problem(layout, x, weights, biases)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN anywhere counts as failure (inf)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_against_float64(problem, tol: float) -> tuple[dict, list]:
    """Run forward and backward, compare output and every gradient with float64 autograd of
    the reference; assert each is within ``tol``.  Returns the errors by name and the output
    and gradients.  ``problem`` has ``run()``, ``oracle(leaves)``, ``leaves``, ``weights``,
    ``biases`` and ``x`` (the SwiGLU and expert problems both do)."""
    out = problem.run()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, problem.leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    out64 = problem.oracle(leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    names = ["out", "x"] + [f"w{i}" for i in range(len(problem.weights))] + \
        [f"b{i}" for i in range(len(problem.biases))]
    errors = {}
    for name, got, want in zip(names, [out, *grads], [out64, *grads64]):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.dtype == problem.x.dtype, (name, got.dtype)
        errors[name] = rel_error(got, want)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors over {tol}: {bad}"
    return errors, [out, *grads]
