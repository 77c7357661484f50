"""Readable, stable renderings of FX graphs for snapshot tests."""
from __future__ import annotations

import operator

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from glu_fusion.compile.pre_grad import GluPass


def _name(node: torch.fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return "in"
    if node.op == "call_method":
        return "." + node.target
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    name = getattr(target, "__name__", str(target))
    return "auto_functionalized" if name.startswith("auto_functionalized") else name


def _arg(a, keep_ints: bool) -> str:
    if isinstance(a, torch.fx.Node):
        return _name(a)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x, keep_ints) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, int) and not isinstance(a, bool) and not keep_ints:
        return "#"  # a size or an index: differs with shapes and torch versions
    return repr(a)


def _functionalized_call(node: torch.fx.Node) -> str:
    """``auto_functionalized(op, arg=..., mutated=base)``: the same text for v1 and v2 of
    torch's wrapper of a mutating op (v2 passes mutated tensors as bases and indices)."""
    op, kwargs = node.args[0], dict(node.kwargs)
    bases = kwargs.pop("_all_bases", None)
    named = []
    for key, value in kwargs.items():
        if key.startswith("_") and key.endswith("_base_index"):
            named.append(f"{key[1:-len('_base_index')]}={_arg(bases[value], False)}")
        elif not key.startswith("_"):
            named.append(f"{key}={_arg(value, False)}")
    return f"auto_functionalized({op}, {', '.join(sorted(named))})"


def render(graph: torch.fx.Graph) -> str:
    lines = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if getattr(node.target, "__name__", "").startswith("auto_functionalized"):
            lines.append(_functionalized_call(node))
            continue
        keep = (node.op != "call_function" or node.target is operator.getitem
                or str(node.target).startswith("glu_fusion."))
        args = [_arg(a, keep) for a in node.args] + [f"{k}={_arg(v, keep)}" for k, v in node.kwargs.items()]
        if node.op == "output":
            lines.append(f"return {', '.join(args)}")
        else:
            lines.append(f"{_name(node)}({', '.join(args)})")
    return "\n".join(lines)


class Captured:
    """A backend that runs the pass on the Dynamo graph, then AOTAutograd without decompositions,
    keeping the three graphs' text."""

    def __init__(self) -> None:
        self.pre_grad = self.forward = self.backward = ""

    def __call__(self, gm, example_inputs):
        GluPass()(gm.graph)
        gm.recompile()
        self.pre_grad = render(gm.graph)

        def fw(g, _):
            self.forward = render(g.graph)
            return make_boxed_func(g.forward)

        def bw(g, _):
            self.backward = render(g.graph)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)


def capture_training_graphs(module, *inputs: torch.Tensor) -> Captured:
    """Compile ``module`` through :class:`Captured`, run one forward and backward of ``inputs``
    (each made to require grad)."""
    cap = Captured()
    torch.compile(module, backend=cap, fullgraph=True)(*(t.requires_grad_() for t in inputs)).sum().backward()
    return cap
