"""The SwiGLU family: ``silu(x·Wgᵀ + bg) * (x·Wuᵀ + bu)`` written in any of the usual ways,
rewritten into ``glu_fusion::swiglu`` (two weights) or ``glu_fusion::swiglu_packed`` (one); when
the product's only user is a down projection ``linear(h, Wd, bd)``, the whole MLP block goes
into ``glu_fusion::mlp_block`` / ``mlp_block_packed`` instead.

Matching runs in two steps so the number of patterns stays a sum, not a product, of spellings:

1. Anchor patterns (registered with the matcher) find ``act(gate) * up`` at the product node,
   for every activation spelling and both operand orders; ``gate`` and ``up`` are free.
2. ``_resolve`` then asks what ``gate`` and ``up`` are: two linears of the same input, or the
   two halves of one packed linear (chunk, split, unbind of a view, interleaved slices).  Small
   sub-patterns read those nodes; plain checks on the traced shapes decide the rest.

Only what is proven equal to the op is rewritten: every intermediate must be used by this site
alone, nothing between its first node and the product may mutate state, the split must cut the
last dimension into equal halves, and inputs must share one dtype and one allowed device type.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._inductor.pattern_matcher import (MULTIPLE, CallFunction, CallMethod, KeywordArg, Match,
                                             register_graph_pattern)

from glu_fusion import config
from glu_fusion.layouts import (CONCAT_GATE_FIRST, CONCAT_UP_FIRST, INTERLEAVED_GATE_EVEN,
                               INTERLEAVED_UP_EVEN)
from glu_fusion.compile.report import REPORT, Leftover, Rewrite

from .routing import mlp_rewrite_pays
from ._common import (REWRITE_DTYPES, Family, common_tensor_kind, copy_meta, declared_kwargs_only, fake,
                      module_path, ordered_pure_span, same_shape, same_size, shape_str, site_resolves,
                      source_line)

aten = torch.ops.aten
NAME = "swiglu"
BLOCK_NAME = "mlp_block"
#: Rewrite ``down(swiglu(x))`` into the whole-block op (on by default); off leaves the down
#: projection to Inductor and rewrites the SwiGLU alone (the benchmarks compare both).
REWRITE_BLOCK = os.environ.get("GLU_FUSION_BLOCK", "1").strip() != "0"

# --- spellings of the pieces ---------------------------------------------------------------------
# ``F.linear`` is ``torch._C._nn.linear``; ``aten.*`` spellings come from compiling an
# ``ExportedProgram.module()``.
_LINEAR = [torch._C._nn.linear, aten.linear.default]
#: ``x @ W``, ``torch.matmul(x, W)``, ``x.matmul(W)``, ``torch.mm``: a projection when ``W`` is a
#: stored 2-D weight (``[K, N]``, or the transpose of an ``[N, K]`` one).
_MATMUL_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.mm, aten.matmul.default,
                               aten.mm.default})
_MATMUL_METHODS = frozenset({"matmul", "mm", "__matmul__"})
#: Transposes of a 2-D weight: ``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)``,
#: ``W.permute(1, 0)``, ``W.swapaxes(0, 1)`` and their torch/aten functions (``W.T`` is
#: ``getattr(W, "T")`` in Dynamo graphs up to torch 2.13 and the packet ``aten.numpy_T`` from 2.14).


def _aten(*names: str) -> set:
    """The ``aten`` ops of this torch among ``names``: an overload (``"numpy_T.default"``) or a
    whole packet (``"numpy_T"``: Dynamo on torch 2.14 records ``W.T`` and ``W.mT`` as the packets
    ``aten.numpy_T`` and ``aten.mT``)."""
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if overload:
            op = getattr(op, overload, None)
        if op is not None:
            found.add(op)
    return found


_T_FUNCTIONS = frozenset({torch.t, *_aten("t.default", "numpy_T.default", "mT.default", "t", "numpy_T", "mT")})
_SWAP_FUNCTIONS = frozenset({torch.transpose, torch.swapaxes, torch.swapdims,
                             *_aten("transpose.int", "swapaxes.default", "swapdims.default")})
_PERMUTE_FUNCTIONS = frozenset({torch.permute, *_aten("permute.default")})
_SWAP_METHODS = frozenset({"transpose", "swapaxes", "swapdims"})
_MUL = [operator.mul, torch.mul, aten.mul.Tensor]
_SIGMOID = [torch.sigmoid, aten.sigmoid.default]
_SILU = [F.silu, aten.silu.default] + ([torch._C._nn.silu] if hasattr(torch._C._nn, "silu") else [])


def _products(a, b, users: object = 1) -> list:
    """``a * b`` as an operator, a torch function or a Tensor method."""
    return [CallFunction(_MUL, a, b, _users=users), CallMethod("mul", a, b, _users=users)]


def _activations(gate: KeywordArg) -> list[tuple[str, object]]:
    """Every spelling of ``silu(gate)``, named for the report.  (Matched whatever its user
    count, so that an activation with another user is reported, not silently passed over.)"""
    forms: list[tuple[str, object]] = [
        ("silu(g)", CallFunction(_SILU, gate, _users=MULTIPLE)),
        # nn.SiLU() records inplace=False
        ("silu(g)", CallFunction(F.silu, gate, inplace=False, _users=MULTIPLE)),
    ]
    for sig in (CallFunction(_SIGMOID, gate), CallMethod("sigmoid", gate)):
        forms += [("(g*sigmoid(g))", p) for p in _products(gate, sig, MULTIPLE)]
        forms += [("(sigmoid(g)*g)", p) for p in _products(sig, gate, MULTIPLE)]
    return forms


#: Forms of anchors that are never rewritten, only reported when they look like a SwiGLU: the
#: same gated product with an activation the ops do not compute.
_REPORT_ONLY = "not silu: "


def _other_activations(gate: KeywordArg) -> list[tuple[str, object]]:
    """GeGLU (``gelu``, exact or tanh) and the sigmoid GLU: look-alikes the report names."""
    return [("gelu (a GeGLU)", CallFunction([F.gelu, aten.gelu.default], gate)),
            ("gelu (a GeGLU)", CallFunction([F.gelu, aten.gelu.default], gate,
                                            approximate=KeywordArg("approximate"))),
            ("sigmoid (a sigmoid GLU)", CallFunction(_SIGMOID, gate)),
            ("sigmoid (a sigmoid GLU)", CallMethod("sigmoid", gate))]


def _anchor_patterns() -> list[tuple[str, object]]:
    """``act(gate) * up`` and ``up * act(gate)`` for every spelling of silu: the products the
    ops compute (the expert family anchors on these too)."""
    gate, up = KeywordArg("gate"), KeywordArg("up")
    out = []
    for act_name, act in _activations(gate):
        out += [(f"{act_name}*u", p) for p in _products(act, up)]
        out += [(f"u*{act_name}", p) for p in _products(up, act)]
    return out


def _report_only_patterns() -> list[tuple[str, object]]:
    """The same products with an activation the ops do not compute (forms starting with
    ``_REPORT_ONLY``): matched only to be reported, never rewritten."""
    gate, up = KeywordArg("gate"), KeywordArg("up")
    return [(_REPORT_ONLY + act_name, p) for act_name, act in _other_activations(gate)
            for p in _products(act, up) + _products(up, act)]


def _linear_patterns() -> list:
    """``linear(x, w)``, ``linear(x, w, b_or_None)``, ``linear(x, w, bias=b)``."""
    x, w, b = KeywordArg("x"), KeywordArg("w"), KeywordArg("b")
    return [CallFunction(_LINEAR, x, w, _users=MULTIPLE),
            CallFunction(_LINEAR, x, w, b, _users=MULTIPLE),
            CallFunction(_LINEAR, x, w, bias=b, _users=MULTIPLE)]


def _splitter_patterns() -> list[tuple[str, object]]:
    """Two-way splits of the packed projection ``y`` along ``dim``; ``n`` is a count or a size.
    (Matched at their root, so the user count is checked by the caller.)"""
    y, n, dim = KeywordArg("y"), KeywordArg("n"), KeywordArg("dim")
    out = []
    for kind, method, fns in (("chunk", "chunk", [torch.chunk, aten.chunk.default]),
                              ("split", "split", [torch.split, aten.split.Tensor,
                                                  aten.split_with_sizes.default])):
        out += [(kind, CallMethod(method, y, n, dim)), (kind, CallMethod(method, y, n, dim=dim)),
                (kind, CallFunction(fns, y, n, dim)), (kind, CallFunction(fns, y, n, dim=dim))]
    unbind = [torch.unbind, aten.unbind.int]
    out += [("unbind", CallMethod("unbind", y, dim)), ("unbind", CallMethod("unbind", y, dim=dim)),
            ("unbind", CallFunction(unbind, y, dim)), ("unbind", CallFunction(unbind, y, dim=dim))]
    return out


_VIEW_METHODS = ("view", "reshape", "unflatten")
_VIEW_FUNCTIONS = (torch.reshape, torch.unflatten, aten.view.default, aten.reshape.default,
                   aten.unflatten.int)


def _view_source(v: fx.Node) -> Optional[fx.Node]:
    """``y`` when ``v`` is a reshape of ``y`` used once (sizes are checked on the traced shapes;
    sizes are variadic, so this one is read directly rather than through a pattern)."""
    if len(v.users) != 1 or not v.args or not isinstance(v.args[0], fx.Node):
        return None
    if (v.op == "call_method" and v.target in _VIEW_METHODS) or \
            (v.op == "call_function" and v.target in _VIEW_FUNCTIONS):
        return v.args[0]
    return None


_GETITEM = CallFunction(operator.getitem, KeywordArg("seq"), KeywordArg("index"), _users=MULTIPLE)
_SLICE = CallFunction(aten.slice.Tensor, KeywordArg("seq"), KeywordArg("dim"), KeywordArg("start"),
                      KeywordArg("end"), KeywordArg("step"), _users=MULTIPLE)

_LINEARS = _linear_patterns()
_SPLITTERS = _splitter_patterns()


# --- reading the pieces ----------------------------------------------------------------------------

def _sub_match(patterns, node) -> Optional[Match]:
    """The first pattern that matches ``node`` with no undeclared kwargs."""
    if not isinstance(node, fx.Node):
        return None
    for pattern in patterns:
        m = pattern.match(node)
        if m and declared_kwargs_only(m):
            return m
    return None


@dataclasses.dataclass
class _Linear:
    """One projection ``x·Wᵀ (+ b)`` in the op's terms.

    ``w`` is the weight as the graph holds it.  ``transposed``: it is stored ``[K, N]`` (used as
    ``x @ W``), so the op reads the ``[N, K]`` view ``W.t()``; no copy is made.  ``views``: the
    transpose nodes between the weight and the matmul (``W.t()`` in ``x @ W.t()``), which the
    rewrite leaves to the dead-node clean-up.
    """

    node: fx.Node
    x: fx.Node
    w: fx.Node
    b: Optional[fx.Node]
    kind: str = "linear"
    transposed: bool = False
    views: tuple[fx.Node, ...] = ()


def _linear(node) -> Optional[_Linear]:
    m = _sub_match(_LINEARS, node)
    if m is None:
        return None
    x, w, b = m.kwargs["x"], m.kwargs["w"], m.kwargs.get("b")
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    if b is not None and not isinstance(b, fx.Node):
        return None
    return _Linear(node, x, w, b)


def _is_matmul(node: object) -> bool:
    if not isinstance(node, fx.Node) or len(node.args) != 2 or node.kwargs:
        return False
    return ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MATMUL_METHODS))


def _dims(dims: tuple) -> Optional[tuple[int, ...]]:
    """``dims`` of a 2-D tensor made non-negative, or None when they are not two valid dims."""
    if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and -2 <= d < 2
                                 for d in dims):
        return None
    return tuple(d % 2 for d in dims)


def _swapped(dims: tuple) -> bool:
    """``transpose(d0, d1)`` of a 2-D tensor swaps its dimensions."""
    return _dims(dims) in ((0, 1), (1, 0))


def _reversed(dims: tuple) -> bool:
    """``permute(dims)`` of a 2-D tensor swaps its dimensions."""
    return _dims(dims) == (1, 0)


def _transpose_source(node: object) -> Optional[fx.Node]:
    """``W`` when ``node`` is a transpose of the 2-D tensor ``W`` (``W.t()``, ``W.T``, ``W.mT``,
    ``W.transpose(0, 1)``, ``W.permute(1, 0)``...), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node) \
            or node.kwargs:
        return None
    src, rest = node.args[0], tuple(node.args[1:])
    tw = fake(src)
    if tw is None or tw.dim() != 2:
        return None
    if node.op == "call_function" and node.target is getattr:
        return src if rest in (("T",), ("mT",)) else None
    if node.op == "call_method":
        name = node.target
        if name == "t" and not rest:
            return src
        if name in _SWAP_METHODS:
            return src if _swapped(rest) else None
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            return src if _reversed(tuple(dims)) else None
        return None
    if node.op != "call_function":
        return None
    if node.target in _T_FUNCTIONS:
        return src if not rest else None
    if node.target in _SWAP_FUNCTIONS:
        return src if _swapped(rest) else None
    if node.target in _PERMUTE_FUNCTIONS and len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return src if _reversed(tuple(rest[0])) else None
    return None


def _stored(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor the graph takes as input (a parameter, buffer or argument)
    rather than computes: only such a second operand of a matmul is read as a weight."""
    return node.op in ("placeholder", "get_attr")


#: Why a SwiGLU over one expert's slices ``W[i]`` of stacked ``[E, N, K]`` weights is left: such
#: sites come from a per-expert Python loop (torchtitan's ``_run_experts_for_loop``, transformers'
#: ``eager`` experts), reported under the expert family.
PER_EXPERT_LOOP = ("a per-expert loop: the weight is one expert's slice W[i] of a stacked [E, N, K] "
                   "parameter and each expert's token count is a Python number in this graph (data-dependent "
                   "shapes: one graph per routing, nothing grouped to fuse); the expert family fuses the "
                   "grouped-GEMM spelling (torch._grouped_mm over offsets) of the same block")


def _expert_slice(node: fx.Node) -> bool:
    """``W[i]`` with ``W`` a stored 3-D tensor and ``i`` a Python int."""
    if node.op != "call_function" or node.target is not operator.getitem or node.kwargs:
        return False
    source, index = node.args
    tw = fake(source) if isinstance(source, fx.Node) else None
    return (isinstance(index, int) and not isinstance(index, bool) and isinstance(source, fx.Node)
            and _stored(source) and tw is not None and tw.dim() == 3)


def _projection(node) -> "Optional[_Linear] | str":
    """``node`` as a projection: an ``F.linear`` or a matmul by a stored 2-D weight.

    None: ``node`` is neither; a string: a matmul that is not a projection of its first
    operand, and why."""
    lin = _linear(node)
    if lin is not None:
        return lin
    if not _is_matmul(node):
        return None
    x, b = node.args
    if not isinstance(x, fx.Node) or not isinstance(b, fx.Node):
        return "a matmul operand is not a tensor"
    source = _transpose_source(b)
    w = source if source is not None else b
    tw, tx = fake(w), fake(x)
    if tw is None or tx is None:
        return "the shapes of a matmul are unknown"
    if tw.dim() != 2:
        return (f"x @ W with a {tw.dim()}-D W{shape_str(w)} is a batched matmul, not a projection "
                f"by a [K, N] weight" if tw.dim() > 2 else
                f"x @ v with a 1-D v{shape_str(w)} is a matrix-vector product, not a projection")
    if tx.dim() < 1:
        return "x @ W with a 0-D x"
    if _expert_slice(w):
        return PER_EXPERT_LOOP
    if not _stored(w) or w is x:
        return (f"the second operand of x @ W ({w.name}) is computed in the graph, not a stored "
                f"weight")
    if source is not None:
        return _Linear(node, x, w, None, "matmul W.t()", False, (b,))
    return _Linear(node, x, w, None, "matmul W[K,N]", True)


@dataclasses.dataclass
class _Site:
    """What the matched nodes compute, in the op's terms."""

    spelling: str
    x: fx.Node
    weights: tuple[fx.Node, ...]     # (w_gate, w_up) or (packed,)
    biases: tuple[Optional[fx.Node], ...]
    layout: Optional[int]           # packed layout, None for two weights
    nodes: list[fx.Node]            # every node the op replaces, the product last
    transposed: tuple[bool, ...] = ()   # per weight: stored [K, N], the op reads its .t() view
    views: tuple[fx.Node, ...] = ()     # weight transposes the matmuls read (erased when unused)


def _is_last_dim(dim: object, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _halves_of_split(gate: fx.Node, up: fx.Node) -> Optional[tuple[str, int, list[fx.Node], fx.Node]]:
    """(kind, layout, nodes, packed projection) for ``gate, up = <split>(y)[i], [1 - i]``."""
    mg, mu = _sub_match([_GETITEM], gate), _sub_match([_GETITEM], up)
    if mg is None or mu is None or mg.kwargs["seq"] is not mu.kwargs["seq"]:
        return None
    seq = mg.kwargs["seq"]
    gi, ui = mg.kwargs["index"], mu.kwargs["index"]
    if not (isinstance(gi, int) and isinstance(ui, int) and {gi, ui} == {0, 1}) or len(seq.users) != 2:
        return None
    for kind, pattern in _SPLITTERS:
        m = pattern.match(seq)
        if not m or not declared_kwargs_only(m):
            continue
        y, dim = m.kwargs["y"], m.kwargs["dim"]
        if kind == "unbind":
            return _halves_of_unbind(y, dim, seq, gi, gate, up)
        ty = fake(y)
        if ty is None or not _is_last_dim(dim, ty.dim()):
            return None
        n, width = m.kwargs["n"], ty.shape[-1]
        if kind == "chunk" and n != 2:
            return None
        if kind == "split":
            sizes = list(n) if isinstance(n, (list, tuple)) else [n, n]
            if len(sizes) != 2 or not all(isinstance(s, int) for s in sizes):
                return None
            if not (sizes[0] == sizes[1] and same_size(2 * sizes[0], width)):
                return None
        layout = CONCAT_GATE_FIRST if gi == 0 else CONCAT_UP_FIRST
        return kind, layout, [y, seq, gate, up], y
    return None


def _halves_of_unbind(v, dim, seq, gi, gate, up):
    """``y.view(..., 2, N).unbind(-2)`` (concatenated) or ``y.view(..., N, 2).unbind(-1)``
    (interleaved); the view must only split the last dimension of ``y``."""
    y = _view_source(v) if isinstance(v, fx.Node) else None
    if y is None:
        return None
    ty, tv = fake(y), fake(v)
    if ty is None or tv is None or tv.dim() != ty.dim() + 1 or not isinstance(dim, int):
        return None
    if not all(same_size(a, b) for a, b in zip(ty.shape[:-1], tv.shape[:-2])):
        return None
    rows, cols = tv.shape[-2], tv.shape[-1]
    if dim in (-2, tv.dim() - 2) and same_size(rows, 2):
        layout = CONCAT_GATE_FIRST if gi == 0 else CONCAT_UP_FIRST
        kind = "unbind"
    elif dim in (-1, tv.dim() - 1) and same_size(cols, 2):
        layout = INTERLEAVED_GATE_EVEN if gi == 0 else INTERLEAVED_UP_EVEN
        kind = "unbind interleaved"
    else:
        return None
    return kind, layout, [y, v, seq, gate, up], y


def _parity(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(y, 0 or 1) when ``node`` is ``y[..., 0::2]`` / ``y[..., 1::2]`` along y's last dim."""
    m = _sub_match([_GETITEM], node)
    if m is not None:
        y, index = m.kwargs["seq"], m.kwargs["index"]
        ty = fake(y)
        if ty is None or not isinstance(index, tuple) or not index:
            return None
        *lead, last = index
        full = slice(None, None, None)
        if not (lead == [Ellipsis] or (len(lead) == ty.dim() - 1 and all(s == full for s in lead))):
            return None
        if not isinstance(last, slice) or last.step != 2 or last.stop is not None:
            return None
        start = 0 if last.start is None else last.start
        return (y, start) if start in (0, 1) else None
    m = _sub_match([_SLICE], node)
    if m is None:
        return None
    y, ty = m.kwargs["seq"], fake(m.kwargs["seq"])
    if ty is None or not _is_last_dim(m.kwargs["dim"], ty.dim()) or m.kwargs["step"] != 2:
        return None
    start, end = m.kwargs["start"], m.kwargs["end"]
    if start not in (0, 1) or not isinstance(end, int) or not isinstance(ty.shape[-1], int) \
            or end < ty.shape[-1]:
        return None
    return y, start


def _halves_of_slices(gate: fx.Node, up: fx.Node, also_read_by=lambda node: False):
    """``y[..., ::2]`` and ``y[..., 1::2]``; ``y`` read by nothing else (but the nodes
    ``also_read_by`` accepts, which the caller checks itself)."""
    pg, pu = _parity(gate), _parity(up)
    if pg is None or pu is None or pg[0] is not pu[0] or {pg[1], pu[1]} != {0, 1}:
        return None
    y = pg[0]
    if {u for u in y.users if not also_read_by(u)} != {gate, up}:
        return None
    layout = INTERLEAVED_GATE_EVEN if pg[1] == 0 else INTERLEAVED_UP_EVEN
    return "interleaved", layout, [y, gate, up], y


def _op_shape(lin: _Linear) -> Optional[tuple]:
    """The shape of the weight view the op reads (``[N, K]``), or None when unknown."""
    tw = fake(lin.w)
    if tw is None:
        return None
    return tuple(reversed(tw.shape)) if lin.transposed else tuple(tw.shape)


def _spelling(lins: tuple[_Linear, ...]) -> str:
    kinds = [lin.kind for lin in lins]
    return f"{kinds[0]} x2" if len(set(kinds)) == 1 else " + ".join(kinds)


def _two_linears(gate: fx.Node, up: fx.Node) -> "Optional[_Site] | str":
    lg, lu = _projection(gate), _projection(up)
    for found in (lg, lu):
        if isinstance(found, str):
            return found
    if lg is None or lu is None:
        return None
    if lg.x is not lu.x:
        return "gate and up project different inputs"
    if (lg.b is None) != (lu.b is None):  # the op takes both biases or neither
        return "only one of gate and up has a bias"
    sg, su = _op_shape(lg), _op_shape(lu)
    if sg is None or su is None or len(sg) != 2:
        return "the gate weight is not a 2-D [N, K] weight"
    if not same_shape(sg, su):
        return f"the gate and up weights differ in shape ({shape_str(lg.w)} and {shape_str(lu.w)})"
    for b in (lg.b, lu.b):
        tb = fake(b) if b is not None else None
        if b is not None and (tb is None or not same_shape(tb.shape, sg[:1])):
            return "a bias does not match its weight's rows"
    spelling = _spelling((lg, lu)) + (" +bias" if lg.b is not None else "")
    return _Site(spelling, lg.x, (lg.w, lu.w), (lg.b, lu.b), None, [gate, up],
                 (lg.transposed, lu.transposed), lg.views + lu.views)


def _packed(gate: fx.Node, up: fx.Node) -> "Optional[_Site] | str":
    found = _halves_of_split(gate, up) or _halves_of_slices(gate, up)
    if found is None:
        return None
    kind, layout, nodes, y = found
    lin = _projection(y)
    if isinstance(lin, str) or lin is None:
        return lin
    if len(y.users) != (2 if kind == "interleaved" else 1):
        return "the packed projection has another user"
    tw, ty, tg = _op_shape(lin), fake(y), fake(gate)
    if tw is None or ty is None or tg is None or len(tw) != 2 or not isinstance(tw[0], int) or tw[0] % 2:
        return "the packed weight has no even number of output features"
    if not same_size(ty.shape[-1], tw[0]) or not same_size(tg.shape[-1] * 2, tw[0]):
        return "gate and up are not the two halves of the packed projection"
    tb = fake(lin.b) if lin.b is not None else None
    if lin.b is not None and (tb is None or not same_shape(tb.shape, tw[:1])):
        return "the packed bias does not match the weight's rows"
    first = "gate-first" if layout in (CONCAT_GATE_FIRST, INTERLEAVED_GATE_EVEN) else "up-first"
    packed = "packed" if lin.kind == "linear" else f"packed {lin.kind}"
    spelling = f"{packed} {kind} {first}" + (" +bias" if lin.b is not None else "")
    return _Site(spelling, lin.x, (lin.w,), (lin.b,), layout, nodes, (lin.transposed,), lin.views)


def _kind_mismatch(site: _Site) -> Optional[str]:
    """Why the site's tensors are not of one rewritable dtype on one allowed device."""
    named = [site.x, *site.weights, *(b for b in site.biases if b is not None)]
    if common_tensor_kind([("t", n) for n in named]) is not None:
        return None
    values = [fake(n) for n in named]
    if any(v is None for v in values):
        return "a tensor of the site has no traced value"
    dtypes = {v.dtype for v in values}
    if len(dtypes) > 1:
        return "its tensors mix dtypes (" + ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) + ")"
    dtype = values[0].dtype
    if dtype not in REWRITE_DTYPES:
        return (f"its dtype {str(dtype).replace('torch.', '')} is not one the ops are rewritten for "
                f"(float32, float16, bfloat16)")
    if len({v.device for v in values}) > 1:
        return "its tensors live on different devices"
    return f"device type {values[0].device.type} is not in the rewritten devices"


def _looks_projected(node: object, hops: int = 4) -> bool:
    """Whether ``node`` is a projection (linear or matmul), or a piece of one reached through
    splits, slices and reshapes: what makes ``act(gate) * up`` look like a SwiGLU."""
    if not isinstance(node, fx.Node):
        return False
    if _linear(node) is not None or _is_matmul(node):
        return True
    if hops == 0 or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    through = ((node.op == "call_function" and node.target in _PIECE_FUNCTIONS)
               or (node.op == "call_method" and node.target in _PIECE_METHODS))
    return through and _looks_projected(node.args[0], hops - 1)


_PIECE_METHODS = frozenset({"chunk", "split", "unbind", "contiguous", *_VIEW_METHODS})
_PIECE_FUNCTIONS = frozenset({operator.getitem, torch.chunk, torch.split, torch.unbind,
                              aten.slice.Tensor, aten.chunk.default, aten.split.Tensor,
                              aten.split_with_sizes.default, aten.unbind.int, *_VIEW_FUNCTIONS})


def _resolve(match: Match, form: str) -> "Optional[_Site] | str":
    """The site behind an anchor match; None when this pattern does not describe it, or why it
    is not exactly a SwiGLU we can fuse."""
    if not declared_kwargs_only(match):
        return None
    gate, up = match.kwargs["gate"], match.kwargs["up"]
    if not isinstance(gate, fx.Node) or not isinstance(up, fx.Node) or gate is up:
        return None
    if form.startswith(_REPORT_ONLY):
        return f"the activation is {form[len(_REPORT_ONLY):]}, and the ops compute silu"
    anchor = match.output_node()
    act_nodes = [n for n in match.nodes if n is not anchor]
    # Each intermediate feeds this site only.
    if any(not set(n.users) <= set(match.nodes) for n in act_nodes):
        return "the activation has another user"
    if set(gate.users) != {n for n in act_nodes if gate in n.all_input_nodes}:
        return "the gate projection has another user"
    if set(up.users) != {anchor}:
        return "the up projection has another user"
    site = _two_linears(gate, up)
    if site is None:
        site = _packed(gate, up)
    if site is None:
        return ("gate and up are neither two projections of one input nor the two equal halves "
                "of one projection's last dimension")
    if isinstance(site, str):
        return site
    mismatch = _kind_mismatch(site)
    if mismatch is not None:
        return mismatch
    ordered = ordered_pure_span([*site.nodes, *act_nodes], anchor)
    if ordered is None:
        return "a node between the projections and the product may mutate state"
    site.nodes = ordered
    site.spelling = f"{site.spelling}, {form}"
    reason = _left_to_inductor(site, anchor)
    if reason is not None:
        return f"left to Inductor: {reason}"
    return site


def _left_to_inductor(site: _Site, anchor: fx.Node) -> Optional[str]:
    """Why the routing table sends this site to Inductor, or None."""
    tx, traced = fake(site.x), fake(anchor)
    if tx is None:
        return None
    tokens = 1
    for d in tx.shape[:-1]:
        tokens = tokens * d if isinstance(d, int) and isinstance(tokens, int) else None
    return mlp_rewrite_pays(tx.device.type, tokens, traced is None or traced.requires_grad)


def _resolved(match: Match, form: str) -> Optional[_Site]:
    """``_resolve`` for the matcher: a site, or None with the reason noted for the report when
    the match looks like a SwiGLU (both operands come from projections)."""
    found = _resolve(match, form)
    if not isinstance(found, str):
        return found
    gate, up = match.kwargs["gate"], match.kwargs["up"]
    if _looks_projected(gate) and _looks_projected(up):
        anchor = match.output_node()
        family = "experts" if found == PER_EXPERT_LOOP else NAME
        REPORT.consider_left(anchor, Leftover(family, found, source_line(anchor), module_path(anchor)))
    return None


def _check(match: Match, form: str) -> bool:
    return site_resolves(_resolved, match, form, "swiglu")


def _down_projection(site: _Site, anchor: fx.Node) -> Optional[_Linear]:
    """The down projection ``linear(h, Wd, bd)`` (or ``h @ Wd.t()``, or ``h @ Wd`` with ``Wd``
    stored ``[N, D]``) when it is the product's only user, of the same dtype and device, with
    nothing that may mutate state between the site and it."""
    if len(anchor.users) != 1:
        return None
    down = _projection(next(iter(anchor.users)))
    if not isinstance(down, _Linear) or down.x is not anchor:
        return None
    th, tw = fake(anchor), _op_shape(down)
    if th is None or tw is None or len(tw) != 2 or not same_size(tw[1], th.shape[-1]):
        return None
    tb = fake(down.b) if down.b is not None else None
    if down.b is not None and (tb is None or not same_shape(tb.shape, tw[:1])):
        return None
    if common_tensor_kind([("x", site.x), ("w_down", down.w), ("b_down", down.b)]) is None:
        return None
    if ordered_pure_span([site.nodes[0], anchor], down.node) is None:
        return None
    return down


def _weight_view(graph: fx.Graph, w: fx.Node, transposed: bool) -> fx.Node:
    """``w`` itself, or (stored ``[K, N]``) a ``w.t()`` node: the ``[N, K]`` view the op reads in
    place, through which autograd hands the gradient back to ``w`` as it is stored."""
    if not transposed:
        return w
    view = graph.call_function(torch.t, (w,))
    tw = fake(w)
    if tw is not None:
        view.meta["example_value"] = tw.t()
    return view


def _rewrite(match: Match, form: str) -> None:
    site = _resolve(match, form)
    if not isinstance(site, _Site):  # the extra check said yes; nothing may have changed since
        return
    anchor = match.output_node()
    graph = anchor.graph
    down = _down_projection(site, anchor) if REWRITE_BLOCK else None
    last = down.node if down is not None else anchor
    # Pre-activations are only worth writing when a backward can follow (not under no_grad,
    # not with frozen weights and inputs) and recomputing is not asked for.
    traced = fake(last)
    save_preact = not config.recompute and (traced is None or traced.requires_grad)
    with graph.inserting_before(last):
        flags = site.transposed or (False,) * len(site.weights)
        weights = tuple(_weight_view(graph, w, t) for w, t in zip(site.weights, flags))
        down_args = (_weight_view(graph, down.w, down.transposed), down.b) if down is not None else ()
        if site.layout is None:
            target = torch.ops.glu_fusion.mlp_block if down is not None else torch.ops.glu_fusion.swiglu
            args = (site.x, *weights, *site.biases, *down_args, save_preact)
        else:
            target = (torch.ops.glu_fusion.mlp_block_packed if down is not None
                      else torch.ops.glu_fusion.swiglu_packed)
            args = (site.x, weights[0], site.biases[0], site.layout, *down_args, save_preact)
        op = graph.call_function(target.default, args)
        out = graph.call_function(operator.getitem, (op, 0))
    copy_meta(last, op, with_value=False)
    copy_meta(last, out)
    tx = fake(site.x)
    shapes = (f"x{shape_str(site.x)}", *(f"w{shape_str(w)}" for w in site.weights))
    if down is not None:
        shapes += (f"w_down{shape_str(down.w)}",)
    down_kind = ("" if down is None or down.kind == "linear" else f" ({down.kind})")
    REPORT.add(Rewrite(
        family=BLOCK_NAME if down is not None else NAME,
        spelling=site.spelling + (", down" + down_kind + (" +bias" if down.b is not None else "")
                                  if down is not None else ""),
        shapes=shapes,
        dtype=str(tx.dtype).replace("torch.", "") if tx is not None else "?",
        source=source_line(last), module=module_path(last)))
    last.replace_all_uses_with(out)
    match.nodes = site.nodes + ([down.node] if down is not None else [])
    match.erase_nodes()
    for view in (*site.views, *(down.views if down is not None else ())):
        if not view._erased and not view.users:
            graph.erase_node(view)


def register(pass_) -> None:
    """Add the anchor patterns to an Inductor ``PatternMatcherPass``."""
    for form, pattern in [*_anchor_patterns(), *_report_only_patterns()]:
        register_graph_pattern(pattern, extra_check=lambda m, f=form: _check(m, f),
                               pass_dict=pass_)(lambda m, *a, f=form, **k: _rewrite(m, f))


FAMILY = Family(NAME, register, (__file__,))
