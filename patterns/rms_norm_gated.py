"""The gated RMSNorm family: an fp32 RMSNorm whose input or output is multiplied by ``act(z)``,
rewritten into ``glu_fusion::rms_norm_gated``.

Matching anchors on the one node every spelling has, ``rsqrt(var + eps)`` (or ``1/sqrt``), or
on ``F.rms_norm``; ``_walk`` then reads the graph around it:

* upstream: ``var = mean(s², -1, keepdim=True)`` (``pow(2)``, ``s*s``, ``square``), with ``s``
  an fp32 ``x`` (upcast or not) or ``x · act(z)`` (gate before the norm), or a view of one of
  those as ``[..., G, D // G]`` whose normalised value is merged back to ``[..., D]`` (groups);
* downstream from ``s · rstd``, in this order: an optional cast to x's dtype, an optional
  weight product (``w``, ``w.float()``, ``1 + w``), an optional cast, the gate product
  ``· act(z)`` (gate after the norm), an optional cast.

The casts found decide the op's rounding flags, so the fused op computes what the eager code
did within one rounding step.  Where x is fp32 and z is not, the gate's own ``z.float()``
becomes the op's z (:func:`_take_gate_upcast`: HF's Mamba-2 mixer in a bf16 model).  x and z
are taken as they are, views of one packed projection included (``chunk``, ``split``, slices).
Left alone: a mean-free (``sum``: L2) norm, a norm in low precision, a norm with no gate, a
site whose intermediate has another user, anything whose output dtype is not x's, and
mutations inside the span.

A site found is rewritten only where the measured routing table says it pays
(:func:`~glu_fusion.patterns.routing.gated_norm_rewrite_pays`: CUDA training graphs are left to
Inductor); a site it declines is listed in the report as "left to Inductor", with the measurement.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._inductor.pattern_matcher import CallFunction, CallMethod, KeywordArg, Match, register_graph_pattern

from glu_fusion import config
from glu_fusion.compile.report import REPORT, Leftover, Rewrite

from ._common import (REWRITE_DTYPES, Family, constant_size, copy_meta, erase_dead, fake, module_path,
                      ordered_pure_span, same_size, shape_str, single_value_user, site_resolves, source_line,
                      value_users)
from .routing import gated_norm_rewrite_pays

NAME = "rms_norm_gated"
_FP32 = torch.float32


def _is(node: object, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


_MUL_F, _MUL_M = (operator.mul, torch.mul), ("mul",)
_ADD_F, _ADD_M = (operator.add, torch.add), ("add",)


def _binary(node, functions, methods) -> Optional[tuple]:
    if _is(node, functions, methods) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _cast(node) -> Optional[tuple[fx.Node, torch.dtype]]:
    """(source, dtype) for ``t.to(dtype)``, ``t.float()``, ``t.half()``, ``t.bfloat16()``, ``t.type(dtype)``."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or not node.args:
        return None
    named = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
    if node.target in named and len(node.args) == 1 and not node.kwargs:
        return node.args[0], named[node.target]
    if node.target in ("to", "type"):
        dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
        extra = set(node.kwargs) - {"dtype"}
        if isinstance(dtype, torch.dtype) and not extra and len(node.args) <= 2:
            return node.args[0], dtype
    return None


def _uncast(node) -> tuple[object, list]:
    """Strip one cast: (source, [cast node]) or (node, [])."""
    c = _cast(node)
    return (c[0], [node]) if c else (node, [])


def _act(node) -> Optional[tuple[str, fx.Node]]:
    """("silu" | "sigmoid", operand) for ``F.silu(t)``, ``torch.sigmoid(t)``, ``t.sigmoid()``."""
    if _is(node, (F.silu, torch.ops.aten.silu.default)) and len(node.args) == 1 and \
            set(node.kwargs) <= {"inplace"} and not node.kwargs.get("inplace", False):
        return "silu", node.args[0]
    if _is(node, (torch.sigmoid,), ("sigmoid",)) and len(node.args) == 1 and not node.kwargs:
        return "sigmoid", node.args[0]
    return None


def _eps_value(eps: object) -> bool:
    """A Python float, or a graph value that is a symbolic float.

    Under ``torch.compile(dynamic=True)`` a float held by a module or a global is not baked in:
    Dynamo passes it as a 0-dim tensor input and reads it with ``.item()``, a node whose traced
    value is a ``SymFloat``.  The op's ``float`` argument takes that node as it is, so the compiled
    code reads the eps of each call (a tensor-valued eps is a different computation: left alone).
    """
    if isinstance(eps, float):
        return True
    if not isinstance(eps, fx.Node):
        return False
    value = eps.meta.get("example_value", eps.meta.get("val"))
    return isinstance(value, torch.SymFloat)


@dataclasses.dataclass
class _Site:
    x: fx.Node
    z: Optional[fx.Node] = None
    weight: Optional[fx.Node] = None
    eps: object = 0.0  # a float, or a node with a SymFloat value (see _eps_value)
    activation: str = "silu"
    norm_before_gate: bool = True
    offset: float = 0.0
    downcast: str = "none"
    gate_low: bool = False
    group_size: Optional[int] = None
    z_upcast: Optional[fx.Node] = None  # the gate's ``z.float()`` (see _take_gate_upcast)
    widths: list = dataclasses.field(default_factory=list)  # sizes proven equal to x's last (see _weight)
    spelling: list = dataclasses.field(default_factory=list)
    nodes: list = dataclasses.field(default_factory=list)
    in_place: list = dataclasses.field(default_factory=list)  # ``h *= t`` nodes on the site's own h
    out: Optional[fx.Node] = None


def _gate(node, site: _Site) -> Optional[fx.Node]:
    """``act(z)``, ``act(z.float())`` or ``act(z.float()).to(z.dtype)``: records z, the
    activation and the gate's precision (the last spelling rounds like ``act(z)`` in z's dtype,
    which computes in fp32 and rounds once)."""
    found, outer = _act(node), []
    if found is None:
        cast = _cast(node)
        found = _act(cast[0]) if cast is not None and isinstance(cast[0], fx.Node) else None
        if found is None:
            return None
        outer, node = [node], cast[0]
    site.activation, operand = found
    z, casts = _uncast(operand)
    tz = fake(z)
    if tz is None or (casts and _cast(casts[0])[1] != _FP32):
        return None
    if outer and (not casts or _cast(outer[0])[1] != tz.dtype):
        return None
    site.z = z
    site.z_upcast = casts[0] if casts and not outer else None
    site.gate_low = (not casts or bool(outer)) and tz.dtype != _FP32
    site.nodes += [*outer, node, *casts]
    return outer[0] if outer else node


def _norm_input(s: fx.Node, site: _Site) -> bool:
    """``s`` is fp32 x, or fp32 ``x · act(z)``; fills x (and z) into the site."""
    ts = fake(s)
    if ts is None or ts.dtype != _FP32:
        return False
    base, casts = _uncast(s)
    prod = _binary(base, _MUL_F, _MUL_M)
    if prod is not None:
        for a, b in (prod, prod[::-1]):
            if isinstance(b, fx.Node) and _act(b) is not None:
                if casts:  # (x · act(z)).float(): the product was in x's dtype
                    if _gate(b, site) is None or not site.gate_low:
                        return False
                elif _gate(b, site) is None:
                    return False
                x, x_casts = _uncast(a)
                site.x, site.norm_before_gate = x, False
                site.nodes += [*casts, base, *x_casts]
                site.spelling.append("gate-first")
                return isinstance(x, fx.Node)
    site.x = base
    site.nodes += casts
    return isinstance(base, fx.Node)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node reading ``node``'s values; ``size()``/``.shape`` readers do not count."""
    return single_value_user(node)


def _other(args, node):
    a, b = args
    return b if a is node else (a if b is node else None)


def _downstream(h: fx.Node, site: _Site, stage: int = 0) -> None:
    """Cast, weight, cast, gate, cast after the normalised value ``h``, in that order, from
    ``stage`` on (0: before the weight, 1: after it, 2: after the gate)."""
    tx = fake(site.x)
    while True:
        nxt = _single_user(h)
        if nxt is None:
            break
        c = _cast(nxt)
        if c is not None and c[0] is h:
            if c[1] != tx.dtype:
                break
            if tx.dtype != _FP32 and site.downcast == "none" and stage < 2:
                site.downcast = "before_weight" if stage == 0 else "after_weight"
            site.nodes.append(nxt)
            h = nxt
            continue
        in_place = _in_place_product(nxt, h)
        args = _binary(nxt, _MUL_F, _MUL_M) or in_place
        other = _other(args, h) if args else None
        if not isinstance(other, fx.Node):
            break
        if stage == 0 and site.weight is None and _weight(other, site, h):
            stage = 1
        elif site.norm_before_gate and site.z is None and stage < 2 and _gate(other, site) is not None:
            stage = 2
        else:
            break
        site.nodes.append(nxt)
        if in_place:
            site.in_place.append(nxt)
        h = nxt
    site.out = h


def _in_place_product(node, h: fx.Node) -> Optional[tuple]:
    """``h *= t`` (``operator.imul``) on the site's own intermediate ``h``, whose only reader it
    is: the same value as ``h * t`` (nothing else sees ``h`` change)."""
    if _is(node, (operator.imul,)) and len(node.args) == 2 and not node.kwargs and node.args[0] is h:
        return node.args
    return None


def _weight(node: fx.Node, site: _Site, normed: Optional[fx.Node] = None) -> bool:
    """``w``, ``w.float()``, ``1 + w``, ``w + 1`` with w a ``[D]`` tensor.

    ``normed``, the value w multiplies, may stand between the two widths: under ``dynamic=True``
    a static weight's width can be provably that of the grouped norm's merged value, itself
    provably x's width, where the shape environment does not chain the two equalities."""
    added = _binary(node, _ADD_F, _ADD_M)
    nodes = []
    offset = 0.0
    if added is not None:
        consts = [a for a in added if isinstance(a, (int, float)) and not isinstance(a, bool)]
        tensors = [a for a in added if isinstance(a, fx.Node)]
        if len(consts) != 1 or len(tensors) != 1:
            return False
        offset, nodes, node = float(consts[0]), [node], tensors[0]
    w, casts = _uncast(node)
    tw, tx = fake(w), fake(site.x)
    if tw is None or tw.dim() != 1 or tw.dtype not in REWRITE_DTYPES:
        return False
    tn = fake(normed)
    if not (same_size(tw.shape[0], tx.shape[-1]) or (
            tn is not None and tn.dim() >= 1 and same_size(tw.shape[0], tn.shape[-1])
            and same_size(tn.shape[-1], tx.shape[-1]))):
        return False
    site.weight, site.offset = w, offset
    site.widths.append(tw.shape[0])
    site.nodes += nodes + casts
    site.spelling.append("(1+w)" if offset else "w")
    return True


def _from_rsqrt(match: Match) -> Optional[_Site]:
    anchor = match.output_node()
    inv = anchor
    if _is(anchor, (torch.sqrt,), ("sqrt",)):  # 1 / sqrt(v) or sqrt(v).reciprocal()
        inv = _single_user(anchor)
        div = _binary(inv, (operator.truediv, torch.div), ("div",)) if inv is not None else None
        if not ((div and div[0] == 1 and div[1] is anchor) or _is(inv, (torch.reciprocal,), ("reciprocal",))):
            return None
    site = _Site(x=anchor)
    added = _binary(anchor.args[0], _ADD_F, _ADD_M)
    if added is None:
        return None
    var, eps = added if _is(added[0], (torch.mean,), ("mean",)) else added[::-1]
    if not _eps_value(eps) or not _is(var, (torch.mean,), ("mean",)):
        return None
    dims = var.args[1:] or (var.kwargs.get("dim"),)
    if len(dims) != 1 or dims[0] not in (-1, [-1], (-1,)) or var.kwargs.get("keepdim") is not True or \
            set(var.kwargs) - {"dim", "keepdim"}:
        return None
    sq = var.args[0]
    if _is(sq, (torch.pow,), ("pow",)) and len(sq.args) == 2 and sq.args[1] == 2:
        s = sq.args[0]
    elif _is(sq, (torch.square,), ("square",)) and len(sq.args) == 1:
        s = sq.args[0]
    else:
        pair = _binary(sq, _MUL_F, _MUL_M)
        if pair is None or pair[0] is not pair[1]:
            return None
        s = pair[0]
    prod = _single_user(inv)
    pargs = _binary(prod, _MUL_F, _MUL_M) if prod is not None else None
    if not pargs or _other(pargs, inv) is not s:
        return None
    site.eps = eps
    site.nodes += [sq, var, anchor.args[0], anchor] + ([inv] if inv is not anchor else []) + [prod]
    grouped = _group_view(s)
    grouped_weight = None
    if grouped is not None:  # s = x.view(..., G, D // G): normalise each group (Mamba-2)
        ungroup = _single_user(prod)
        grouped_weight = _grouped_weight_product(ungroup, prod, grouped[1])
        if grouped_weight is not None:  # w.view(G, D // G) * normed, then the merge
            site.nodes += list(grouped_weight[1:])
            ungroup = _single_user(grouped_weight[1])
        if ungroup is None or not _is_ungroup(ungroup, grouped[0]):
            return None
        site.group_size = grouped[1]
        site.nodes += [s, ungroup]
        site.spelling.append(f"groups of {grouped[1]}")
        s, prod = grouped[0], ungroup
    if not _norm_input(s, site):
        return None
    if s is not site.x:
        site.nodes.append(s)
    if grouped_weight is not None and not _weight(grouped_weight[0], site):
        return None
    _downstream(prod, site, stage=1 if grouped_weight is not None else 0)
    return site


def _grouped_weight_product(node, normed: fx.Node, group: int) -> Optional[tuple]:
    """``(w, product, view)`` for ``w.view(G, group) * normed`` (or ``reshape``, either order):
    the weight applied while the normalised value is still grouped."""
    args = _binary(node, _MUL_F, _MUL_M) if node is not None else None
    view = _other(args, normed) if args else None
    if not (_is(view, (torch.reshape,), ("view", "reshape")) and isinstance(view.args[0], fx.Node)):
        return None
    tv, tw = fake(view), fake(view.args[0])
    if tv is None or tw is None or tw.dim() != 1 or tv.dim() != 2 or not same_size(tv.shape[-1], group):
        return None
    return view.args[0], node, view


_VIEWS_M = ("view", "reshape", "unflatten")
_FLATTEN_F, _FLATTEN_M = (torch.flatten, torch.reshape), ("view", "reshape", "flatten")


def _group_view(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(source, group size) when ``node`` splits the last dimension D of its source into
    ``[..., G, D // G]`` (``view``/``reshape``/``unflatten``) with a constant group size.

    Under ``dynamic=True`` D is a symbol and the group's size is traced as an expression in it
    that is provably the constant (``D // (D // 16)``): that counts as constant."""
    if not (_is(node, (torch.reshape,), _VIEWS_M) and node.args and isinstance(node.args[0], fx.Node)):
        return None
    src = node.args[0]
    ts, tv = fake(src), fake(node)
    if ts is None or tv is None or tv.dim() != ts.dim() + 1:
        return None
    group = constant_size(tv.shape[-1])
    if group is None or group <= 0 or not all(
            same_size(a, b) for a, b in zip(tv.shape[:-2], ts.shape[:-1])):
        return None
    # A view keeps the element count: with x's leading sizes in front and the group last, it cuts
    # D into D // group groups.  A symbolic D need not be provably a multiple of the group (the
    # view raises for any other D, and so does the op); a static D is checked.
    if isinstance(ts.shape[-1], int) and not same_size(tv.shape[-2] * group, ts.shape[-1]):
        return None
    return src, group


def _is_ungroup(node: fx.Node, like: fx.Node) -> bool:
    """``node`` merges the last two dimensions back into the shape of ``like``."""
    if not (_is(node, _FLATTEN_F, _FLATTEN_M) and node.args):
        return False
    tn, tl = fake(node), fake(like)
    return (tn is not None and tl is not None and tn.dim() == tl.dim()
            and all(same_size(a, b) for a, b in zip(tn.shape, tl.shape)))


def _traced_size(v: object) -> object:
    """A size argument as traced: a graph node (``x.size()[-1]`` under dynamic shapes) stands
    for the SymInt Dynamo recorded for it."""
    if isinstance(v, fx.Node):
        return v.meta.get("example_value", v.meta.get("val"))
    return v


def _from_rms_norm(match: Match) -> Optional[_Site]:
    node = match.output_node()
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    tx = fake(x)
    if tx is None or not _eps_value(eps) or len(shape) != 1 or not same_size(_traced_size(shape[0]), tx.shape[-1]):
        return None
    site = _Site(x=x, eps=eps, nodes=[node], spelling=["rms_norm"])
    if w is not None:
        tw = fake(w)
        if tw is None or tw.dtype != tx.dtype:
            return None
        site.weight = w
    site.downcast = "after_weight" if tx.dtype != _FP32 else "none"
    h = node
    nxt = _single_user(h)
    args = _binary(nxt, _MUL_F, _MUL_M) if nxt is not None else None
    other = _other(args, h) if args else None
    if not isinstance(other, fx.Node) or _gate(other, site) is None:
        return None
    site.nodes.append(nxt)
    site.out = nxt
    nxt2 = _single_user(nxt)
    c = _cast(nxt2) if nxt2 is not None else None
    if c is not None and c[1] == tx.dtype:
        site.nodes.append(nxt2)
        site.out = nxt2
    return site


def _resolve(match: Match, kind: str) -> Optional[_Site]:
    site = _from_rms_norm(match) if kind == "rms_norm" else _from_rsqrt(match)
    if site is None or site.z is None or site.out is None:
        return None
    tx, tz, ty = fake(site.x), fake(site.z), fake(site.out)
    if tx is None or tz is None or ty is None or tx.dtype not in REWRITE_DTYPES:
        return None
    if tz.dtype != tx.dtype:
        if not _take_gate_upcast(site):
            return None
        tz = fake(site.z)
    if tz.dim() != tx.dim() or ty.dim() != tx.dim():
        return None
    lead = zip(tx.shape[:-1], tz.shape[:-1], ty.shape[:-1])
    if not all(same_size(a, b) and same_size(a, c) for a, b, c in lead) or \
            not same_size(tx.shape[-1], tz.shape[-1]) or not _is_width(site, ty.shape[-1]):
        return None
    if ty.dtype != tx.dtype or tx.device.type not in config.rewrite_devices:
        return None
    site.nodes = list(dict.fromkeys(site.nodes))
    inner = set(site.nodes)
    if site.x in inner or site.z in inner or (site.weight is not None and site.weight in inner):
        return None
    for n in site.nodes:
        if n is not site.out and not set(value_users(n)) <= inner:
            return None
    ordered = ordered_pure_span(site.nodes, site.out, allowed=site.in_place)
    if ordered is None:
        return None
    site.nodes = ordered
    reason = _left_to_inductor(site)
    if reason is not None:
        REPORT.consider_left(match.output_node(), Leftover(NAME, f"left to Inductor: {reason}",
                                                           source_line(site.out), module_path(site.out)))
        return None
    return site


def _take_gate_upcast(site: _Site) -> bool:
    """Give the op the gate's ``z.float()`` as its z, where x is fp32 and z is not.

    HF's Mamba-2 mixer (``torch_forward``, the path Dynamo traces) in a bf16 model normalises the
    scan's fp32 output with a gate that is a bf16 slice of the input projection, upcast by the
    norm (``silu(gate.to(float32))``).  The op reads the very fp32 tensor eager's activation
    reads, so it computes what eager does; the cast stays in the graph, where autograd rounds dz
    to z's dtype as eager's ``.to`` does.  A gate computed or rounded in z's dtype (``silu(z)``,
    ``silu(z.float()).to(z.dtype)``) has no such cast and is left alone: the op would round it
    to x's dtype instead."""
    up = site.z_upcast
    tx, tu = fake(site.x), fake(up)
    if up is None or tx.dtype != _FP32 or tu is None or tu.dtype != _FP32:
        return False
    site.nodes = [n for n in site.nodes if n is not up]
    site.z = up
    site.spelling.append(f"{str(fake(up.args[0]).dtype).replace('torch.', '')} gate upcast")
    return True


def _is_width(site: _Site, size: object) -> bool:
    """``size`` is provably x's last size, directly or through the weight's width.

    Under ``dynamic=True`` a static weight multiplied last (``w * h.to(dt)`` after the grouped
    norm) gives the output the weight's width; the shape environment proves that width equal to
    the merged value's, and that to x's (:func:`_weight` checked both), but not the two ends
    against each other."""
    return any(same_size(w, size) for w in (fake(site.x).shape[-1], *site.widths))


def _left_to_inductor(site: _Site) -> Optional[str]:
    """Why the routing table sends this site to Inductor, or None.  A graph whose output
    requires grad (or whose traced value is unknown) counts as a training graph."""
    tx, traced = fake(site.x), fake(site.out)
    upcast = site.z_upcast is not None and site.z is site.z_upcast
    return gated_norm_rewrite_pays(tx.device.type, traced is None or traced.requires_grad, gate_upcast=upcast)


def _check(match: Match, kind: str) -> bool:
    return site_resolves(_resolve, match, kind, "gated RMSNorm")


def _rewrite(match: Match, kind: str) -> None:
    site = _resolve(match, kind)
    if site is None:
        return
    graph = site.out.graph
    args = (site.x, site.z, site.weight, site.eps, site.group_size, site.norm_before_gate, site.activation,
            site.offset, site.downcast, site.gate_low)
    with graph.inserting_before(site.out):
        op = graph.call_function(torch.ops.glu_fusion.rms_norm_gated.default, args)
        out = graph.call_function(operator.getitem, (op, 0))
    copy_meta(site.out, op, with_value=False)
    copy_meta(site.out, out)
    spelling = ", ".join(site.spelling + [site.activation, f"downcast={site.downcast}"]
                         + (["gate in input dtype"] if site.gate_low else []))
    tx = fake(site.x)
    REPORT.add(Rewrite(family=NAME, spelling=spelling, shapes=(f"x{shape_str(site.x)}",),
                       dtype=str(tx.dtype).replace("torch.", ""), source=source_line(site.out)))
    site.out.replace_all_uses_with(out)
    erase_dead(graph, site.nodes)


def norm_anchors() -> list[tuple[str, object]]:
    """Where an RMSNorm is anchored: ``rsqrt``/``sqrt`` in function and method form (kind
    ``"rsqrt"``), and ``F.rms_norm`` / ``torch.rms_norm`` with 2-4 arguments (``"rms_norm"``).
    Both norm families start from these."""
    v = KeywordArg("v")
    anchors = [("rsqrt", CallFunction(torch.rsqrt, v)), ("rsqrt", CallMethod("rsqrt", v)),
               ("rsqrt", CallFunction(torch.sqrt, v)), ("rsqrt", CallMethod("sqrt", v))]
    for target in (F.rms_norm, torch.rms_norm):
        for n in (2, 3, 4):
            anchors.append(("rms_norm", CallFunction(target, *[KeywordArg(f"a{i}") for i in range(n)])))
    return anchors


def register(pass_) -> None:
    """Register the norm anchors with this family's check and rewrite."""
    for kind, pattern in norm_anchors():
        register_graph_pattern(pattern, extra_check=lambda m, k=kind: _check(m, k),
                               pass_dict=pass_)(lambda m, *a, k=kind, **kw: _rewrite(m, k))


FAMILY = Family(NAME, register, (__file__,))
