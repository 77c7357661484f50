"""Autograd-free twins of the ops, for the graphs Inductor compiles after AOTAutograd."""
from __future__ import annotations

import torch

from .libraries import new_library

#: Each op's autograd-free twin (OpOverload -> OpOverload): ``compile.post_grad.use_graph_ops``
#: points compiled calls at it.
GRAPH_TWINS: dict = {}

TWIN_SUFFIX = "_nograd"


def register_graph_twins(*ops) -> None:
    """Define ``<name>_nograd`` beside each custom op: its schema, implementation and fake
    implementation, with autograd a fallthrough and no autocast rule.

    A call of a ``torch.library`` custom op always passes the op's Python autograd layer, which
    in compiled code only finds that no graph is wanted and redispatches: host time on every
    call (benchmarks/NOTES.md, run 20).  Nothing differentiates a graph Inductor compiles after
    AOTAutograd (its own kernels have no autograd either), and autocast was applied when it was
    traced, so there the twin computes the same thing with neither layer in the way.  Eager
    code must keep calling the op itself: the twin records no autograd graph.
    """
    lib = new_library("FRAGMENT")
    for op in ops:
        impl, fake = getattr(op, "_init_fn", None), getattr(op, "_abstract_fn", None)
        if impl is None or fake is None:  # a torch without these attributes: no twin
            continue
        name = op._name.split("::")[-1]
        original = getattr(torch.ops.glu_fusion, name).default
        twin_name = name + TWIN_SUFFIX
        schema = str(original._schema).split("::", 1)[1]
        lib.define(twin_name + schema[len(name):], tags=tuple(original.tags))
        for key in ("CUDA", "CPU"):
            lib.impl(twin_name, impl, key)
        lib.impl(twin_name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"glu_fusion::{twin_name}", fake, lib=lib)
        GRAPH_TWINS[original] = getattr(torch.ops.glu_fusion, twin_name).default
