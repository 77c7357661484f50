"""Checks and graph helpers every pattern family needs.

A family matches nodes with Inductor's pattern matcher and then asks these helpers whether the
site is safe to rewrite: no kwargs the pattern did not declare, no mutation between its nodes,
inputs of one dtype on one device type the settings allow.  Anything unknown means "no".
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from glu_fusion import config

__all__ = ["Family", "fake", "same_size", "same_shape", "size_hint", "constant_size", "declared_kwargs_only", "ordered_pure_span",
           "metadata_only", "value_users", "single_value_user", "erase_dead", "common_tensor_kind", "source_line", "module_path", "copy_meta", "shape_str", "REWRITE_DTYPES"]

#: dtypes the fused ops run their kernels for; other dtypes are left alone.
REWRITE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Family:
    """One pattern family: its report name, how it registers its patterns, its source files.

    ``register(pass_)`` adds the family's patterns to an Inductor ``PatternMatcherPass``; it runs
    once per process.  ``sources`` take part in the pass's cache key.
    """

    name: str
    register: Callable[[object], None]
    sources: tuple[str, ...]


def fake(node: object) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo traced for ``node`` (``example_value``), or None when unknown."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def same_size(a: object, b: object) -> bool:
    """``a == b`` for sizes that may be symbolic; False unless provably equal (adds no guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # an expression the shape environment cannot decide
        return False


def same_shape(a: Sequence[object], b: Sequence[object]) -> bool:
    """Shapes provably equal, dimension by dimension (adds no guard)."""
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def size_hint(size: object) -> Optional[int]:
    """The value a size had when the graph was traced (adds no guard); None when unknown (an
    unbacked size, or not a size).

    For decisions about speed only, as Inductor picks its own kernel configurations from hints:
    a graph compiled for a symbolic size runs at every size, so whatever such a decision picks
    must be right at every size, not just at the hint's.
    """
    if isinstance(size, bool):
        return None
    if isinstance(size, int):
        return size
    if not isinstance(size, torch.SymInt):
        return None
    node = size.node
    try:
        hint = node.hint if node.has_hint() else None
    except Exception:  # a shape environment that cannot evaluate it
        return None
    return int(hint) if isinstance(hint, int) else None


def constant_size(size: object) -> Optional[int]:
    """``size`` as an int when it is one, or a symbolic size provably equal to its traced value
    (``D // (D // 16)`` with ``D`` a multiple of 16, as the last size of ``x.view(..., -1, 16)``
    traces under ``dynamic=True``); None otherwise.  Adds no guard."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    hint = size_hint(size)
    return hint if hint is not None and same_size(size, hint) else None


def declared_kwargs_only(match: object) -> bool:
    """Whether every matched node has only the kwargs its pattern declares.

    Older matchers ignore undeclared kwargs: ``F.linear(x, w, bias=b)`` would otherwise match a
    bias-free pattern and lose the bias.
    """
    for pattern, node in match.ctx.pattern_to_node.items():
        declared = getattr(pattern, "kwargs", None)
        if isinstance(node, fx.Node) and declared is not None and set(node.kwargs) - set(declared):
            return False
    return True


_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "stride", "numel", "nelement", "get_device",
                               "is_contiguous", "is_floating_point", "is_complex"})
_METADATA_FUNCTIONS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int,
                                 torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default,
                                 torch.numel, torch.is_floating_point, torch.is_complex})
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})


def metadata_only(user: fx.Node) -> bool:
    """Whether ``user`` reads only the metadata of its tensor argument (``t.size()``, ``t.dim()``,
    ``t.shape``, ``aten.sym_size``...), never its values.

    With symbolic shapes Dynamo writes ``t.view(s.shape)`` as a ``size()`` call on ``s``: such a
    reader does not keep the tensor's values alive, so it is no second user of an intermediate.
    """
    if user.op == "call_method":
        return user.target in _METADATA_METHODS
    if user.op != "call_function":
        return False
    if user.target in _METADATA_FUNCTIONS:
        return True
    return (user.target is getattr and len(user.args) == 2 and user.args[1] in _METADATA_ATTRIBUTES)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (metadata-only readers left out)."""
    return [u for u in node.users if not metadata_only(u)]


def single_value_user(node: fx.Node) -> Optional[fx.Node]:
    """The one user reading ``node``'s values, or None when there are none or several."""
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def erase_dead(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    """Erase the nodes of a rewritten site that nothing reads any more, last first, with the
    metadata-only readers left dangling on them."""
    for n in reversed(nodes):
        for u in list(n.users):
            if metadata_only(u) and not u.users:
                graph.erase_node(u)
        if not n.users:
            graph.erase_node(n)


_STATEFUL = re.compile(r"(^|_)(set|enter|exit|seed|setitem|delitem)(_|$)")

#: Python's augmented assignments: on a tensor ``a += b`` writes into ``a``.
IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift})


def _may_mutate(node: fx.Node, allowed: frozenset = frozenset()) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return False
    if node in allowed:
        return False
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS:
        return True
    if node.op == "call_module":
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    if not isinstance(name, str):
        return True
    if name.endswith("_") and not name.endswith("__"):
        return True
    if _STATEFUL.search(name.strip("_")):
        return True
    return node.kwargs.get("out") is not None


def ordered_pure_span(nodes: Iterable[fx.Node], last: fx.Node,
                      allowed: Iterable[fx.Node] = ()) -> Optional[list[fx.Node]]:
    """``nodes`` and ``last`` in graph order, or None when a node from the earliest of them up to
    ``last`` may mutate state (or one of them does not come before ``last``).

    The fused op replaces the whole site at ``last``; a mutation anywhere in between (of an input,
    of a view, an autocast or grad-mode switch, ``t *= 2``) could make that move change results.
    ``allowed`` names in-place nodes of the site itself that the family has checked write only
    an intermediate nothing else reads (the op computes their value).
    """
    allowed = frozenset(allowed)
    pending = {n for n in nodes if n is not last}
    ordered = [last]
    node = last
    while pending:
        node = node.prev
        if node.op == "root":
            return None
        if node in pending:
            pending.discard(node)
            ordered.append(node)
        if _may_mutate(node, allowed):
            return None
    ordered.reverse()
    return ordered


def common_tensor_kind(named: Sequence[tuple[str, Optional[fx.Node]]]) -> Optional[torch.Tensor]:
    """The first tensor's fake value when all given nodes are tensors of one dtype in
    ``REWRITE_DTYPES`` on one device whose type the settings allow; None otherwise.

    ``None`` entries (absent biases) are skipped.
    """
    first = None
    for _, node in named:
        if node is None:
            continue
        t = fake(node)
        if t is None or t.dtype not in REWRITE_DTYPES:
            return None
        if first is None:
            if t.device.type not in config.rewrite_devices:
                return None
            first = t
        elif t.dtype != first.dtype or t.device != first.device:
            return None
    return first


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def source_line(node: fx.Node) -> Optional[str]:
    """``file:line  code`` of the innermost user frame in the node's stack trace, if any."""
    trace = node.meta.get("stack_trace")
    if not isinstance(trace, str):
        return None
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    path, line, code = frames[-1]
    return f"{path}:{line}  {code.strip()}"


def module_path(node: fx.Node) -> Optional[str]:
    """Qualified name of the innermost ``nn.Module`` the node was traced in, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not isinstance(stack, dict) or not stack:
        return None
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, tuple) and entry else None
    if not isinstance(path, str):
        return None
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)  # L['self'].a[0] -> L.self.a.0
    path = re.sub(r"(^|\.)_modules\.", r"\1", path)
    path = re.sub(r"^L\.self\.?|^self\.?", "", path)
    return path or None


def copy_meta(src: fx.Node, dst: fx.Node, with_value: bool = True) -> None:
    """Give a new node the provenance (and optionally the traced value) of the node it replaces."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "mutation_region_id"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if with_value:
        for key in ("example_value", "val"):
            if key in src.meta:
                dst.meta[key] = src.meta[key]


def shape_str(node: Optional[fx.Node]) -> str:
    t = fake(node)
    if t is None:
        return "?"
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def site_resolves(resolve: Callable, match: object, kind: str, family: str) -> bool:
    """The matcher's extra check for a family: does ``resolve(match, kind)`` find a rewritable
    site?  A surprise in the user's graph means "do not rewrite", with a warning, never a
    failed compile."""
    from glu_fusion.compile.report import log

    try:
        return resolve(match, kind) is not None
    except Exception as err:  # an unforeseen spelling must never break the user's compile
        log.warning("glu_fusion: %s site at %s left alone: %r", family,
                    source_line(match.output_node()) or "?", err)
        return False
