"""One compiled forward and backward through the backend against eager: the check the pass
tests share for every spelling they rewrite."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import glu_fusion


def close(got: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """Elementwise within ``tol`` of the tensor's largest magnitude: low-precision eager rounds
    every step of the gate, the op rounds once, so single small elements of a sum may differ
    by a few percent of the scale while neither is wrong."""
    scale = expected.detach().float().abs().max().item()
    torch.testing.assert_close(got, expected, atol=tol * max(scale, 1e-3), rtol=tol,
                               msg=lambda m: f"{name}: {m}")


def train_step_matches(module: nn.Module, x: torch.Tensor, tol: float, **compile_kw) -> torch.Tensor:
    """One forward/backward compiled with the backend against eager: output, x grad and the grad
    of every parameter (a parameter the spelling does not use has none on either side).
    Returns the compiled output."""
    compiled_module = copy.deepcopy(module)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = module(xe)
    got = torch.compile(compiled_module, backend=glu_fusion.backend, **compile_kw)(xc)
    close(got, expected, tol, "output")
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    close(xc.grad, xe.grad, tol, "x")
    compiled = dict(compiled_module.named_parameters())
    for name, p in module.named_parameters():
        if p.grad is None:
            assert compiled[name].grad is None, name
        else:
            assert compiled[name].grad.shape == p.shape
            close(compiled[name].grad, p.grad, tol, name)
    return got
