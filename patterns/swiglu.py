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
from glu_fusion.compile.report import REPORT, Rewrite, log

from .routing import mlp_rewrite_pays
from ._common import (Family, common_tensor_kind, copy_meta, declared_kwargs_only, fake, module_path,
                      ordered_pure_span, same_shape, same_size, shape_str, site_resolves, source_line)

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
_MUL = [operator.mul, torch.mul, aten.mul.Tensor]
_SIGMOID = [torch.sigmoid, aten.sigmoid.default]
_SILU = [F.silu, aten.silu.default] + ([torch._C._nn.silu] if hasattr(torch._C._nn, "silu") else [])


def _products(a, b) -> list:
    """``a * b`` as an operator, a torch function or a Tensor method."""
    return [CallFunction(_MUL, a, b), CallMethod("mul", a, b)]


def _activations(gate: KeywordArg) -> list[tuple[str, object]]:
    """Every spelling of ``silu(gate)``, named for the report."""
    forms: list[tuple[str, object]] = [
        ("silu(g)", CallFunction(_SILU, gate)),
        ("silu(g)", CallFunction(F.silu, gate, inplace=False)),  # nn.SiLU() records inplace=False
    ]
    for sig in (CallFunction(_SIGMOID, gate), CallMethod("sigmoid", gate)):
        forms += [("(g*sigmoid(g))", p) for p in _products(gate, sig)]
        forms += [("(sigmoid(g)*g)", p) for p in _products(sig, gate)]
    return forms


def _anchor_patterns() -> list[tuple[str, object]]:
    """``act(gate) * up`` and ``up * act(gate)`` for every activation spelling."""
    gate, up = KeywordArg("gate"), KeywordArg("up")
    out = []
    for act_name, act in _activations(gate):
        out += [(f"{act_name}*u", p) for p in _products(act, up)]
        out += [(f"u*{act_name}", p) for p in _products(up, act)]
    return out


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
    node: fx.Node
    x: fx.Node
    w: fx.Node
    b: Optional[fx.Node]


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


@dataclasses.dataclass
class _Site:
    """What the matched nodes compute, in the op's terms."""

    spelling: str
    x: fx.Node
    weights: tuple[fx.Node, ...]     # (w_gate, w_up) or (packed,)
    biases: tuple[Optional[fx.Node], ...]
    layout: Optional[int]           # packed layout, None for two weights
    nodes: list[fx.Node]            # every node the op replaces, the product last


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


def _halves_of_slices(gate: fx.Node, up: fx.Node):
    pg, pu = _parity(gate), _parity(up)
    if pg is None or pu is None or pg[0] is not pu[0] or {pg[1], pu[1]} != {0, 1}:
        return None
    y = pg[0]
    if set(y.users) != {gate, up}:
        return None
    layout = INTERLEAVED_GATE_EVEN if pg[1] == 0 else INTERLEAVED_UP_EVEN
    return "interleaved", layout, [y, gate, up], y


def _two_linears(gate: fx.Node, up: fx.Node) -> Optional[_Site]:
    lg, lu = _linear(gate), _linear(up)
    if lg is None or lu is None or lg.x is not lu.x:
        return None
    if (lg.b is None) != (lu.b is None):  # the op takes both biases or neither
        return None
    tg, tu = fake(lg.w), fake(lu.w)
    if tg is None or tu is None or tg.dim() != 2 or not same_shape(tg.shape, tu.shape):
        return None
    for b in (lg.b, lu.b):
        tb = fake(b) if b is not None else None
        if b is not None and (tb is None or not same_shape(tb.shape, tg.shape[:1])):
            return None
    spelling = "linear x2" + (" +bias" if lg.b is not None else "")
    return _Site(spelling, lg.x, (lg.w, lu.w), (lg.b, lu.b), None, [gate, up])


def _packed(gate: fx.Node, up: fx.Node) -> Optional[_Site]:
    found = _halves_of_split(gate, up) or _halves_of_slices(gate, up)
    if found is None:
        return None
    kind, layout, nodes, y = found
    lin = _linear(y)
    if lin is None or len(y.users) != (2 if kind == "interleaved" else 1):
        return None
    tw, ty, tg = fake(lin.w), fake(y), fake(gate)
    if tw is None or ty is None or tg is None or tw.dim() != 2 or not isinstance(tw.shape[0], int) \
            or tw.shape[0] % 2:
        return None
    if not same_size(ty.shape[-1], tw.shape[0]) or not same_size(tg.shape[-1] * 2, tw.shape[0]):
        return None
    tb = fake(lin.b) if lin.b is not None else None
    if lin.b is not None and (tb is None or not same_shape(tb.shape, tw.shape[:1])):
        return None
    first = "gate-first" if layout in (CONCAT_GATE_FIRST, INTERLEAVED_GATE_EVEN) else "up-first"
    spelling = f"packed {kind} {first}" + (" +bias" if lin.b is not None else "")
    return _Site(spelling, lin.x, (lin.w,), (lin.b,), layout, nodes)


def _resolve(match: Match, form: str) -> Optional[_Site]:
    """The site behind an anchor match, or None when it is not exactly a SwiGLU we can fuse."""
    if not declared_kwargs_only(match):
        return None
    gate, up = match.kwargs["gate"], match.kwargs["up"]
    if not isinstance(gate, fx.Node) or not isinstance(up, fx.Node) or gate is up:
        return None
    anchor = match.output_node()
    act_nodes = [n for n in match.nodes if n is not anchor]
    # Each intermediate feeds this site only.
    if set(gate.users) != {n for n in act_nodes if gate in n.all_input_nodes}:
        return None
    if set(up.users) != {anchor}:
        return None
    site = _two_linears(gate, up) or _packed(gate, up)
    if site is None:
        return None
    if common_tensor_kind([("x", site.x), *[("w", w) for w in site.weights],
                           *[("b", b) for b in site.biases]]) is None:
        return None
    ordered = ordered_pure_span([*site.nodes, *act_nodes], anchor)
    if ordered is None:
        return None
    site.nodes = ordered
    site.spelling = f"{site.spelling}, {form}"
    if _left_to_inductor(site, anchor):
        return None
    return site


def _left_to_inductor(site: _Site, anchor: fx.Node) -> bool:
    """Whether the routing table sends this site to Inductor (logged once per site)."""
    tx, traced = fake(site.x), fake(anchor)
    if tx is None:
        return False
    tokens = 1
    for d in tx.shape[:-1]:
        tokens = tokens * d if isinstance(d, int) and isinstance(tokens, int) else None
    reason = mlp_rewrite_pays(tx.device.type, tokens, traced is None or traced.requires_grad)
    if reason is not None:
        log.info("left %s at %s to Inductor: %s", NAME, source_line(anchor) or "?", reason)
    return reason is not None


def _check(match: Match, form: str) -> bool:
    return site_resolves(_resolve, match, form, "swiglu")


def _down_projection(site: _Site, anchor: fx.Node) -> Optional[_Linear]:
    """The down projection ``linear(h, Wd, bd)`` when it is the product's only user, of the same
    dtype and device, with nothing that may mutate state between the site and it."""
    if len(anchor.users) != 1:
        return None
    down = _linear(next(iter(anchor.users)))
    if down is None or down.x is not anchor:
        return None
    th, tw = fake(anchor), fake(down.w)
    if th is None or tw is None or tw.dim() != 2 or not same_size(tw.shape[1], th.shape[-1]):
        return None
    tb = fake(down.b) if down.b is not None else None
    if down.b is not None and (tb is None or not same_shape(tb.shape, tw.shape[:1])):
        return None
    if common_tensor_kind([("x", site.x), ("w_down", down.w), ("b_down", down.b)]) is None:
        return None
    if ordered_pure_span([site.nodes[0], anchor], down.node) is None:
        return None
    return down


def _rewrite(match: Match, form: str) -> None:
    site = _resolve(match, form)
    if site is None:  # the extra check said yes; nothing may have changed since
        return
    anchor = match.output_node()
    graph = anchor.graph
    down = _down_projection(site, anchor) if REWRITE_BLOCK else None
    last = down.node if down is not None else anchor
    # Pre-activations are only worth writing when a backward can follow (not under no_grad,
    # not with frozen weights and inputs) and recomputing is not asked for.
    traced = fake(last)
    save_preact = not config.recompute and (traced is None or traced.requires_grad)
    down_args = (down.w, down.b) if down is not None else ()
    with graph.inserting_before(last):
        if site.layout is None:
            target = torch.ops.glu_fusion.mlp_block if down is not None else torch.ops.glu_fusion.swiglu
            args = (site.x, *site.weights, *site.biases, *down_args, save_preact)
        else:
            target = (torch.ops.glu_fusion.mlp_block_packed if down is not None
                      else torch.ops.glu_fusion.swiglu_packed)
            args = (site.x, site.weights[0], site.biases[0], site.layout, *down_args, save_preact)
        op = graph.call_function(target.default, args)
        out = graph.call_function(operator.getitem, (op, 0))
    copy_meta(last, op, with_value=False)
    copy_meta(last, out)
    tx = fake(site.x)
    shapes = (f"x{shape_str(site.x)}", *(f"w{shape_str(w)}" for w in site.weights))
    if down is not None:
        shapes += (f"w_down{shape_str(down.w)}",)
    REPORT.add(Rewrite(
        family=BLOCK_NAME if down is not None else NAME,
        spelling=site.spelling + (", down" + (" +bias" if down.b is not None else "") if down is not None else ""),
        shapes=shapes,
        dtype=str(tx.dtype).replace("torch.", "") if tx is not None else "?",
        source=source_line(last), module=module_path(last)))
    last.replace_all_uses_with(out)
    match.nodes = site.nodes + ([down.node] if down is not None else [])
    match.erase_nodes()


def register(pass_) -> None:
    """Add the anchor patterns to an Inductor ``PatternMatcherPass``."""
    for form, pattern in _anchor_patterns():
        register_graph_pattern(pattern, extra_check=lambda m, f=form: _check(m, f),
                               pass_dict=pass_)(lambda m, *a, f=form, **k: _rewrite(m, f))


FAMILY = Family(NAME, register, (__file__,))
