"""The expert family: a mixture-of-experts block's gated projections computed with grouped GEMMs
over tokens sorted by expert, rewritten into ``glu_fusion::grouped_swiglu`` (two weights) or
``glu_fusion::grouped_swiglu_packed`` (one packed weight).

Spellings (``mm`` is ``torch._grouped_mm`` / ``F.grouped_mm`` with ``offs=`` cumulative counts;
the weight operand ``b`` is ``[E, K, N]``, often ``w.transpose(-2, -1)`` of a ``[E, N, K]``
parameter, and is read in place through a transposed view):

* torchtitan: ``silu(mm(x, w1ᵀ, offs)) * mm(x, w3ᵀ, offs)``, also with ``x.bfloat16()`` cast once
  per GEMM and ``w.bfloat16()`` weights (0.2.2's ``_run_experts_grouped_mm``);
* transformers 5.x ``@use_experts_implementation`` with ``grouped_mm``: ``mm(x.to(dt), W_gate_upᵀ,
  offs)`` then ``masked_fill(sentinel_mask, 0)`` of whole rows, then ``chunk(2)``; the mask is
  applied again to the op's output.  Under ``torch.compile`` weights other than bf16 trace to
  ``transformers::grouped_mm_fallback``, which counts as the grouped GEMM;
* packed: ``mm(x, w13ᵀ, offs)`` then ``chunk``/``split``/interleaved ``[..., ::2]`` slices;
* gpt-oss's gate on either: ``g = g.clamp(max=L); u = u.clamp(-L, L);
  (u + 1) * (g * sigmoid(g * alpha))``.

Left alone: other activations, gpt-oss-like clamps whose limits disagree, a product with
anything else inside (routing weights multiplied into ``up``), grouped GEMMs with a bias or an
``out_dtype``, different offsets or inputs for the two projections, intermediates with other
users, a row fill other than zero.  gpt-oss through transformers adds its per-row bias in place
(``out.add_(bias[expert_ids])``); that is matched where the ids are provably each row's expert
(sorted, and the offsets their histogram's running sum), and the op adds each expert's bias
itself.  A per-expert Python loop traces
to data-dependent shapes (one graph per routing, or a graph break on ``.tolist()``) and is not matched; the report lists such sites under this family
(``swiglu.PER_EXPERT_LOOP``).

transformers' ``batched_mm`` experts keep the rows in routing order (each token repeated top-k
times) and gather every row's expert weight: ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`` with
``W = gate_up_proj [E, 2I, H]``, or gpt-oss's ``bmm(x.unsqueeze(1), W[ids]).squeeze(1)`` with
``W [E, H, 2I]`` and ``out.add_(bias[ids])`` (``torch.matmul`` of the same 3-D operands too).
Row ``r`` is ``x[r]`` times expert ``ids[r]``'s weight whatever the ids, so the op computes the
same rows once they are sorted by expert: the rewrite sorts the ids, gathers the rows in that
order, counts each expert's rows for the offsets, and puts the op's rows back in routing order
(``argsort`` of the sort's permutation).  The gathered ``[T, 2I, H]`` weights are no longer
built; the down projection stays the model's ``bmm``.  Left alone: a ``bmm`` whose weights are
not gathered along their expert dimension by a 1-D integer tensor, gate and up gathered by
different ids, a bias gathered by other ids than the weight, ids on another device than ``x``.
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
from glu_fusion.compile.report import REPORT, Rewrite

from ._common import (Family, common_tensor_kind, constant_size, copy_meta, declared_kwargs_only, fake,
                      module_path, ordered_pure_span, same_shape, same_size, shape_str, site_resolves, source_line)
from .swiglu import _anchor_patterns, _halves_of_slices, _halves_of_split, _products

aten = torch.ops.aten
NAME = "experts"

#: Device types where expert blocks are rewritten: only where our grouped kernels were measured
#: faster than ``torch._grouped_mm`` under Inductor.  Empty by default: on the H200 they ran at
#: 0.10-0.88x its speed (benchmarks/NOTES.md, "Experts"), so expert blocks stay with Inductor.
#: Tests set it (it is part of the pass's cache key).
REWRITE_DEVICE_TYPES: tuple[str, ...] = ()

_GROUPED_MM = [t for t in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None),
                           getattr(aten, "_grouped_mm", None) and aten._grouped_mm.default) if t is not None]
_ADD = [operator.add, torch.add, aten.add.Tensor]
_MUL = [operator.mul, torch.mul, aten.mul.Tensor]
_SIGMOID = [torch.sigmoid, aten.sigmoid.default]
_CLAMP = [torch.clamp, aten.clamp.default]
_BMM = [torch.bmm, aten.bmm.default, torch.matmul, operator.matmul, aten.matmul.default]
_UNSQUEEZE = [torch.unsqueeze, aten.unsqueeze.default]
_SQUEEZE = [torch.squeeze, aten.squeeze.dim]


def _gptoss_anchor_patterns() -> list[tuple[str, object]]:
    """``(up + 1) * glu`` and ``glu * (up + 1)``; the clamps and ``glu`` are read by hand."""
    upc, glu = KeywordArg("upc"), KeywordArg("glu")
    plus_one = [CallFunction(_ADD, upc, 1), CallFunction(_ADD, upc, 1.0), CallMethod("add", upc, 1)]
    out = []
    for p in plus_one:
        out += [("(u+1)*glu", q) for q in _products(p, glu)]
        out += [("glu*(u+1)", q) for q in _products(glu, p)]
    return out


# --- reading the pieces ----------------------------------------------------------------------------

@dataclasses.dataclass
class _ExpertGEMM:
    """Rows times their experts' weights: a grouped GEMM over ``offs`` (rows sorted by expert) or
    a batched GEMM over gathered weights ``W[ids]`` (rows in routing order, ``ids`` each row's
    expert)."""

    node: fx.Node                     # the [T, N] output
    x: fx.Node                        # [T, K]
    w: fx.Node                        # [E, K, N], or [E, N, K] where ``w_nk``
    offs: Optional[fx.Node] = None
    ids: Optional[fx.Node] = None
    w_nk: bool = False                # ``w`` is already in the op's [E, N, K] layout
    nodes: tuple[fx.Node, ...] = ()   # the spelling's nodes before ``node`` (gather, unsqueeze, bmm)

    @property
    def width(self):
        """N, the output's last size."""
        return fake(self.w).shape[1 if self.w_nk else 2]

    @property
    def name(self) -> str:
        if self.ids is not None:
            return "batched_mm"
        return "grouped_mm" if self.node.target in _GROUPED_MM else "transformers fallback"


#: transformers' ``grouped_mm_fallback(input, weight, offs)`` (``integrations/moe.py``): the
#: grouped GEMM it traces under ``torch.compile`` for weights other than bf16, a custom op looping
#: over experts with the same result (rows from ``offs[-1]`` on are zeros).  Known by name:
#: transformers is not a dependency and may be imported after this module.
_FALLBACK_OPS = frozenset({"transformers::grouped_mm_fallback"})


def _is_grouped_mm_target(target) -> bool:
    if target in _GROUPED_MM:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target.name() in _FALLBACK_OPS
    return isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name in _FALLBACK_OPS


def _grouped_mm(node: object) -> Optional[_ExpertGEMM]:
    """``mm(x, b, offs=offs)`` with no bias, scale or output dtype, x 2-D and b 3-D."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not _is_grouped_mm_target(node.target):
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) < 2 or len(args) > 3:
        return None
    offs = args[2] if len(args) == 3 else kwargs.pop("offs", None)
    if any(v is not None for v in kwargs.values()):   # bias=, out_dtype=: not what the op computes
        return None
    x, b = args[0], args[1]
    if not all(isinstance(n, fx.Node) for n in (x, b, offs)):
        return None
    tx, tb, to = fake(x), fake(b), fake(offs)
    if tx is None or tb is None or to is None or tx.dim() != 2 or tb.dim() != 3 or to.dim() != 1:
        return None
    if to.dtype not in (torch.int32, torch.int64) or not same_size(tx.shape[1], tb.shape[1]) \
            or not same_size(to.shape[0], tb.shape[0]):
        return None
    return _ExpertGEMM(node, x, b, offs=offs)


def _dim_arg(node: fx.Node, functions, method: str) -> Optional[tuple[fx.Node, object]]:
    """(input, dim) of ``t.<method>(dim)`` / ``torch.<method>(t, dim)``, dim positional or ``dim=``."""
    if not _call(node, functions, method):
        return None
    args = list(node.args)
    if set(node.kwargs) - {"dim"} or len(args) + len(node.kwargs) != 2:
        return None
    if "dim" in node.kwargs:
        args.append(node.kwargs["dim"])
    source, dim = args
    return (source, dim) if isinstance(source, fx.Node) and isinstance(dim, int) else None


def _expert_gather(node: object) -> Optional[tuple[fx.Node, fx.Node]]:
    """(W, ids) of ``W[ids]``: a 3-D W indexed along its expert dimension by a 1-D integer tensor
    (a bool tensor would be a mask, not one expert per row)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    w, ids = node.args
    if not isinstance(w, fx.Node) or not isinstance(ids, fx.Node):
        return None
    tw, ti = fake(w), fake(ids)
    if tw is None or ti is None or tw.dim() != 3 or ti.dim() != 1 or ti.dtype not in (torch.int32, torch.int64):
        return None
    return w, ids


#: The two batched spellings: (whether the gathered weight is the bmm's first operand, the dim of
#: the 3-D product, either index of it, where ``x`` is unsqueezed and the output squeezed).
_BMM_FORMS = ((True, (2, -1)), (False, (1, -2)))


def _gathered_bmm(node: object) -> Optional[_ExpertGEMM]:
    """``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`` (W ``[E, N, K]``, transformers' ``batched_mm``)
    or ``bmm(x.unsqueeze(1), W[ids]).squeeze(1)`` (W ``[E, K, N]``, its ``is_transposed``): row
    ``r`` is ``x[r]`` times expert ``ids[r]``'s weight.  The squeeze names its dim: a bare
    ``squeeze()`` would also drop a batch of one row."""
    if not isinstance(node, fx.Node):
        return None
    squeezed = _dim_arg(node, _SQUEEZE, "squeeze")
    for weight_first, dims in _BMM_FORMS:
        if squeezed is None or squeezed[1] not in dims:
            continue
        bmm = squeezed[0]
        if not _call(bmm, _BMM, "bmm") or bmm.kwargs or len(bmm.args) != 2 or set(bmm.users) != {node}:
            continue
        gathered, column = bmm.args if weight_first else bmm.args[::-1]
        found, unsqueezed = _expert_gather(gathered), _dim_arg(column, _UNSQUEEZE, "unsqueeze")
        if found is None or unsqueezed is None or unsqueezed[1] not in dims:
            continue
        (w, ids), x = found, unsqueezed[0]
        tw, tx, ti = fake(w), fake(x), fake(ids)
        if tx is None or tx.dim() != 2 or not same_size(ti.shape[0], tx.shape[0]) or ti.device != tx.device \
                or not same_size(tw.shape[2 if weight_first else 1], tx.shape[1]) \
                or constant_size(tw.shape[0]) is None:
            continue
        return _ExpertGEMM(node, x, w, ids=ids, w_nk=weight_first, nodes=(gathered, column, bmm))
    return None


def _expert_gemm(node: object) -> Optional[_ExpertGEMM]:
    return _grouped_mm(node) or _gathered_bmm(node)


def _is_last_dim_size(node: fx.Node, width) -> bool:
    t = fake(node)
    return t is not None and same_size(t.shape[-1], width)


@dataclasses.dataclass
class _Site:
    spelling: str
    x: fx.Node
    offs: Optional[fx.Node]           # None where the rows are in routing order (``ids``)
    weights: tuple[fx.Node, ...]      # each [E, K, N'] (the grouped GEMM's operand), or [E, N', K]
    layout: Optional[int]             # packed layout; None for two weights
    nodes: list[fx.Node]
    row_mask: Optional[fx.Node] = None   # [T, 1] bool: rows zeroed after the GEMM (and after the op)
    spare_casts: tuple[fx.Node, ...] = ()   # a second cast of x that only the up GEMM read
    bias: Optional[fx.Node] = None        # [E, N'] per-expert bias of the packed GEMM
    in_place: tuple[fx.Node, ...] = ()    # the site's own in-place nodes (the bias add)
    dead: tuple[fx.Node, ...] = ()        # nodes only the site read, outside its span (the gather)
    ids: Optional[fx.Node] = None         # [T] each row's expert, rows in routing order (batched_mm)
    weights_nk: bool = False              # the weights are already [E, N', K]


_CASTS = {"bfloat16": torch.bfloat16, "half": torch.float16, "float": torch.float32, "double": torch.float64}


def _cast(node: fx.Node) -> Optional[tuple[fx.Node, torch.dtype]]:
    """(source, dtype) of ``t.bfloat16()`` / ``t.float()`` / ``t.to(dtype)``; None otherwise."""
    if node.op != "call_method" or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    if node.target in _CASTS and len(node.args) == 1:
        return node.args[0], _CASTS[node.target]
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return node.args[0], node.args[1]
    return None


def _same_input(a: fx.Node, b: fx.Node) -> bool:
    """``a`` is ``b``, or both cast one tensor to one dtype (torchtitan casts ``x.bfloat16()`` once
    per GEMM); with nothing that may mutate state between the two casts."""
    if a is b:
        return True
    ca, cb = _cast(a), _cast(b)
    if ca is None or cb is None or ca[0] is not cb[0] or ca[1] != cb[1]:
        return False
    return ordered_pure_span([a], b) is not None or ordered_pure_span([b], a) is not None


def _zero_row_mask(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(source, mask) of ``source.masked_fill(mask, 0)`` with a ``[T, 1]`` bool mask: whole rows
    set to zero, as transformers zeroes the rows of tokens routed to no local expert."""
    if node.op == "call_method" and node.target == "masked_fill":
        pass
    elif not (node.op == "call_function" and node.target in (torch.masked_fill, aten.masked_fill.Scalar)):
        return None
    if node.kwargs or len(node.args) != 3:
        return None
    source, mask, value = node.args
    if not isinstance(source, fx.Node) or not isinstance(mask, fx.Node) or _number(value) != 0.0:
        return None
    ts, tm = fake(source), fake(mask)
    if ts is None or tm is None or tm.dtype != torch.bool or ts.dim() != 2 or tm.dim() != 2 \
            or not same_size(tm.shape[-1], 1) or not same_size(tm.shape[0], ts.shape[0]):
        return None
    return source, mask


def _call(node: object, targets, method: Optional[str] = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in targets) or \
        (method is not None and node.op == "call_method" and node.target == method)


def _sorted_expert_ids(ids: fx.Node, offs: fx.Node, experts: int) -> bool:
    """Whether ``ids`` are expert ids sorted ascending (``torch.sort(...)[0]``) and ``offs`` their
    histogram's running sum (``cumsum(histc(ids, bins=E, min=0, max=E-1))``, ids cast as
    transformers casts them): then ``ids[r]`` is row ``r``'s expert for every row below
    ``offs[-1]``, whatever is written into ``ids`` past those rows."""
    if not (ids.op == "call_function" and ids.target is operator.getitem and ids.args[1] == 0):
        return False
    sort = ids.args[0]
    if not _call(sort, (torch.sort, aten.sort.default), "sort") or len(sort.args) != 1:
        return False
    if any(k not in ("dim", "descending", "stable") for k in sort.kwargs) or sort.kwargs.get("descending", False):
        return False
    t_src = fake(sort.args[0])
    if t_src is None or t_src.dim() != 1 or sort.kwargs.get("dim", -1) not in (0, -1):
        return False
    if not _call(offs, (torch.cumsum, aten.cumsum.default), "cumsum") or len(offs.args) < 1:
        return False
    hist = offs.args[0]
    if not _call(hist, (torch.histc, aten.histc.default), "histc") or len(hist.args) != 1:
        return False
    if (hist.kwargs.get("bins"), _number(hist.kwargs.get("min")), _number(hist.kwargs.get("max"))) \
            != (experts, 0.0, float(experts - 1)):
        return False
    source = hist.args[0]
    cast = _cast(source) if isinstance(source, fx.Node) else None
    if cast is not None and source.op == "call_method" and source.target in ("float", "int", "long", "to"):
        source = cast[0]
    return source is ids


def _is_in_place_add(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "add_"


def _rows_experts(ids: fx.Node, gemm: _ExpertGEMM, experts) -> bool:
    """Whether ``ids[r]`` is row ``r``'s expert in ``gemm`` (of ``experts`` experts): the very ids
    that gathered its weights, or sorted ids whose histogram the offsets sum."""
    if gemm.ids is not None:
        return ids is gemm.ids and same_size(fake(gemm.w).shape[0], experts)
    return _sorted_expert_ids(ids, gemm.offs, experts)


def _expert_bias_add(source: fx.Node, gemm: _ExpertGEMM) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(add node, bias, gather) of ``source.add_(bias[ids])``: transformers' gpt-oss adds each
    row's expert bias, gathered by the ids of the rows' experts, in place to the GEMM's output."""
    width = gemm.width
    adds = [u for u in source.users if _is_in_place_add(u)]
    if len(adds) != 1:
        return None
    add = adds[0]
    if add.kwargs or len(add.args) != 2 or add.args[0] is not source or add.users:
        return None
    gathered = add.args[1]
    if not (isinstance(gathered, fx.Node) and gathered.op == "call_function" and gathered.target is operator.getitem):
        return None
    bias, ids = gathered.args
    if not isinstance(bias, fx.Node) or not isinstance(ids, fx.Node):
        return None
    tb = fake(bias)
    if tb is None or tb.dim() != 2 or not isinstance(tb.shape[0], int) or not same_size(tb.shape[1], width):
        return None
    if not _rows_experts(ids, gemm, tb.shape[0]):
        return None
    return add, bias, gathered


def _projections(gate: fx.Node, up: fx.Node) -> Optional[_Site]:
    """Two expert GEMMs of one input and one routing, or the halves of one packed GEMM (whose
    rows a ``masked_fill(mask, 0)`` may zero in between: the gate maps a zero row to zeros)."""
    mg, mu = _expert_gemm(gate), _expert_gemm(up)
    if mg is not None and mu is not None:
        if not _same_input(mg.x, mu.x) or mg.offs is not mu.offs or mg.ids is not mu.ids or mg.w_nk != mu.w_nk:
            return None
        if not same_shape(fake(mg.w).shape, fake(mu.w).shape):
            return None
        spare = (mu.x,) if mu.x is not mg.x and set(mu.x.users) == {up} else ()
        return _Site(f"{mg.name} x2", mg.x, mg.offs, (mg.w, mu.w), None, [*mg.nodes, *mu.nodes, gate, up],
                     spare_casts=spare, ids=mg.ids, weights_nk=mg.w_nk)
    found = _halves_of_split(gate, up) or _halves_of_slices(gate, up, also_read_by=_is_in_place_add)
    if found is None:
        return None
    kind, layout, nodes, y = found
    mask = None
    slices = 2 if kind.startswith("interleaved") else 1
    gemm, m = y, _expert_gemm(y)
    if m is None:
        masked = _zero_row_mask(y)
        if masked is None:
            return None
        gemm, mask = masked
        m = _expert_gemm(gemm)
        if m is None or len(y.users) != slices:
            return None
    # gpt-oss through transformers adds each row's expert bias to the GEMM's output in place
    bias_add = None
    if any(_is_in_place_add(u) for u in gemm.users):
        bias_add = _expert_bias_add(gemm, m)
        if bias_add is None:
            return None
        kind = f"{kind}, per-row expert bias"
    readers = (1 if mask is not None else slices) + (bias_add is not None)
    if len(gemm.users) != readers:
        return None
    if bias_add is not None:
        nodes = [bias_add[0], *nodes]
    if mask is not None:   # the slices' nodes hold the masked output; the GEMM comes first
        nodes = [gemm, *nodes]
        kind = f"{kind}, zeroed rows"
    width, tg = m.width, fake(gate)
    if tg is None or not isinstance(width, int) or width % 2 or not same_size(tg.shape[-1] * 2, width):
        return None
    site = _Site(f"{m.name} packed {kind}", m.x, m.offs, (m.w,), layout, [*m.nodes, *nodes], row_mask=mask,
                 ids=m.ids, weights_nk=m.w_nk)
    if bias_add is not None:
        add, site.bias, gathered = bias_add
        site.in_place = (add,)
        if m.ids is None:
            site.dead = (gathered,)
        else:   # the op reads the ids at its own place: no write to them after the gather
            site.nodes.append(gathered)
    return site


def _only_used_by(node: fx.Node, users: set) -> bool:
    return set(node.users) <= users and len(node.users) > 0


# gpt-oss gate -------------------------------------------------------------------------------------

def _clamp_bounds(node: object) -> Optional[tuple[fx.Node, object, object]]:
    """(input, min, max) of ``t.clamp(min, max)`` / ``torch.clamp`` / ``clamp_max``; None if not one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in ("clamp", "clip") or \
            node.op == "call_function" and node.target in _CLAMP:
        names = ("input", "min", "max")
        values = dict(zip(names, node.args))
        for key, value in node.kwargs.items():
            if key not in names or key in values:
                return None
            values[key] = value
        return values.get("input"), values.get("min"), values.get("max")
    if (node.op == "call_method" and node.target == "clamp_max") or \
            (node.op == "call_function" and node.target in (torch.clamp_max, aten.clamp_max.default)):
        if len(node.args) == 2 and not node.kwargs:
            return node.args[0], None, node.args[1]
    return None


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sigmoid_input(node: fx.Node) -> Optional[fx.Node]:
    if node.op == "call_function" and node.target in _SIGMOID and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if node.op == "call_method" and node.target == "sigmoid" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def _mul_operands(node: object) -> Optional[tuple]:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in _MUL) or (node.op == "call_method" and node.target == "mul"):
        return node.args
    return None


def _gptoss_glu(glu: fx.Node) -> Optional[tuple[fx.Node, float, list[fx.Node]]]:
    """(clamped gate node, alpha, nodes) for ``gc * sigmoid(gc * alpha)`` in any operand order."""
    ops = _mul_operands(glu)
    if ops is None:
        return None
    for gc, sig in (ops, ops[::-1]):
        if not isinstance(sig, fx.Node) or not isinstance(gc, fx.Node):
            continue
        inner = _sigmoid_input(sig)
        scaled = _mul_operands(inner)
        if scaled is None:
            continue
        for a, b in (scaled, scaled[::-1]):
            alpha = _number(b)
            if a is gc and alpha is not None:
                return gc, alpha, [inner, sig, glu]
    return None


def _resolve_gptoss(match: Match, form: str) -> Optional[tuple[_Site, float, float]]:
    upc, glu = match.kwargs["upc"], match.kwargs["glu"]
    if not isinstance(upc, fx.Node) or not isinstance(glu, fx.Node):
        return None
    found = _gptoss_glu(glu)
    if found is None:
        return None
    gc, alpha, glu_nodes = found
    cg, cu = _clamp_bounds(gc), _clamp_bounds(upc)
    if cg is None or cu is None:
        return None
    gate, g_min, g_max = cg
    up, u_min, u_max = cu
    limit = _number(g_max)
    if limit is None or g_min is not None or _number(u_max) != limit or _number(u_min) != -limit:
        return None
    if not isinstance(gate, fx.Node) or not isinstance(up, fx.Node) or gate is up:
        return None
    anchor = match.output_node()
    plus = [n for n in match.nodes if n is not anchor and n is not glu]
    inner, sig, _ = glu_nodes
    # Each intermediate feeds this site only.
    if not (_only_used_by(gate, {gc}) and _only_used_by(up, {upc}) and _only_used_by(gc, {inner, glu})
            and _only_used_by(inner, {sig}) and _only_used_by(sig, {glu}) and _only_used_by(glu, {anchor})
            and _only_used_by(upc, set(plus)) and all(_only_used_by(p, {anchor}) for p in plus)):
        return None
    site = _projections(gate, up)
    if site is None:
        return None
    site.nodes = [*site.nodes, gc, upc, inner, sig, glu, *plus]
    site.spelling = f"{site.spelling}, gpt-oss {form}"
    return site, alpha, limit


def _resolve_silu(match: Match, form: str) -> Optional[_Site]:
    gate, up = match.kwargs["gate"], match.kwargs["up"]
    if not isinstance(gate, fx.Node) or not isinstance(up, fx.Node) or gate is up:
        return None
    anchor = match.output_node()
    act_nodes = [n for n in match.nodes if n is not anchor]
    if set(gate.users) != {n for n in act_nodes if gate in n.all_input_nodes}:
        return None
    if set(up.users) != {anchor}:
        return None
    site = _projections(gate, up)
    if site is None:
        return None
    site.nodes = [*site.nodes, *act_nodes]
    site.spelling = f"{site.spelling}, {form}"
    return site


def _resolve(match: Match, form: str):
    """(site, activation, alpha, limit) behind an anchor match, or None."""
    if not declared_kwargs_only(match):
        return None
    if "upc" in match.kwargs:
        found = _resolve_gptoss(match, form)
        if found is None:
            return None
        site, alpha, limit = found
        activation = "gptoss"
    else:
        site = _resolve_silu(match, form)
        if site is None:
            return None
        activation, alpha, limit = "silu", 1.702, 7.0
    kind = common_tensor_kind([("x", site.x), *[("w", w) for w in site.weights], ("bias", site.bias)])
    if kind is None or kind.device.type not in REWRITE_DEVICE_TYPES:
        return None
    anchor = match.output_node()
    ordered = ordered_pure_span(site.nodes, anchor, allowed=site.in_place)
    if ordered is None:
        return None
    site.nodes = ordered
    return site, activation, alpha, limit


def _check(match: Match, form: str) -> bool:
    return site_resolves(_resolve, match, form, NAME)


# --- the rewrite -----------------------------------------------------------------------------------

def _is_swap_of_last_two(node: fx.Node) -> bool:
    """``w.transpose(-2, -1)`` (any spelling of the last two dims of a 3-D tensor) or ``w.mT``."""
    if node.op == "call_method" and node.target in ("transpose", "swapaxes") and not node.kwargs \
            and len(node.args) == 3:
        return {d % 3 for d in node.args[1:] if isinstance(d, int)} == {1, 2}
    return False


def _transposed(graph: fx.Graph, b: fx.Node) -> fx.Node:
    """The ``[E, N, K]`` view of a grouped GEMM's ``[E, K, N]`` operand: the parameter itself when
    ``b`` only transposed it for this GEMM, else ``b.transpose(-2, -1)``."""
    if _is_swap_of_last_two(b) and len(b.users) == 1 and isinstance(b.args[0], fx.Node):
        return b.args[0]
    node = graph.call_method("transpose", (b, -2, -1))
    tb = fake(b)
    if tb is not None:
        node.meta["example_value"] = tb.transpose(-2, -1)
    return node


def _rows_by_expert(graph: fx.Graph, site: _Site) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(rows sorted by expert, offsets, the sort's permutation) for rows in routing order.

    The ids are taken modulo E first: ``W[ids]`` reads ``W[id + E]`` for a negative id, as
    indexing does.  The offsets count the sorted ids below each expert's end (``searchsorted``
    against ``1..E``): cumulative counts of a fixed size E, with no histogram of floats."""
    experts = constant_size(fake(site.weights[0]).shape[0])
    ti = fake(site.ids)
    ids = graph.call_method("remainder", (site.ids, experts))
    order = graph.call_function(torch.sort, (ids,))
    sorted_ids = graph.call_function(operator.getitem, (order, 0))
    perm = graph.call_function(operator.getitem, (order, 1))
    ends = graph.call_function(torch.arange, (1, experts + 1), {"dtype": ti.dtype, "device": ti.device})
    offs = graph.call_function(torch.searchsorted, (sorted_ids, ends), {"out_int32": True})
    rows = graph.call_function(operator.getitem, (site.x, perm))
    return rows, offs, perm


def _routing_order(graph: fx.Graph, out: fx.Node, perm: fx.Node) -> fx.Node:
    """The op's rows (sorted by expert) back in routing order: row ``perm[j]`` is sorted row ``j``."""
    inverse = graph.call_function(torch.argsort, (perm,))
    return graph.call_function(operator.getitem, (out, inverse))


def _rewrite(match: Match, form: str) -> None:
    found = _resolve(match, form)
    if found is None:
        return
    site, activation, alpha, limit = found
    anchor = match.output_node()
    graph = anchor.graph
    traced = fake(anchor)
    save_preact = not config.recompute and (traced is None or traced.requires_grad)
    with graph.inserting_before(anchor):
        x, offs, perm = site.x, site.offs, None
        if site.ids is not None:
            x, offs, perm = _rows_by_expert(graph, site)
        weights = list(site.weights) if site.weights_nk else [_transposed(graph, w) for w in site.weights]
        if site.layout is None:
            args = (x, offs, *weights, None, None, activation, alpha, limit, save_preact)
            op = graph.call_function(torch.ops.glu_fusion.grouped_swiglu.default, args)
        else:
            args = (x, offs, weights[0], site.bias, site.layout, activation, alpha, limit, save_preact)
            op = graph.call_function(torch.ops.glu_fusion.grouped_swiglu_packed.default, args)
        out = graph.call_function(operator.getitem, (op, 0))
        if perm is not None:
            copy_meta(anchor, out, with_value=False)
            out = _routing_order(graph, out, perm)
        if site.row_mask is not None:   # zero the same rows, as the model did before its gate
            masked = graph.call_method("masked_fill", (out, site.row_mask, 0.0))
    copy_meta(anchor, op, with_value=False)
    copy_meta(anchor, out)
    if site.row_mask is not None:
        copy_meta(anchor, masked)
        out = masked
    tx = fake(site.x)
    REPORT.add(Rewrite(
        family=NAME, spelling=site.spelling,
        shapes=(f"x{shape_str(site.x)}", *(f"w{shape_str(w)}" for w in site.weights)),
        dtype=str(tx.dtype).replace("torch.", "") if tx is not None else "?",
        source=source_line(anchor), module=module_path(anchor)))
    anchor.replace_all_uses_with(out)
    match.nodes = site.nodes
    match.erase_nodes()
    for b in site.weights:   # a transpose only the grouped GEMM read is unused now
        if _is_swap_of_last_two(b) and not b.users:
            graph.erase_node(b)
    for cast in (*site.spare_casts, *site.dead):
        if not cast.users:
            graph.erase_node(cast)


def register(pass_) -> None:
    """Add the silu and gpt-oss anchors to an Inductor ``PatternMatcherPass``; the silu anchors
    are the SwiGLU family's, tried with this family's check (grouped GEMMs, not linears)."""
    for form, pattern in [*_anchor_patterns(), *_gptoss_anchor_patterns()]:
        register_graph_pattern(pattern, extra_check=lambda m, f=form: _check(m, f),
                               pass_dict=pass_)(lambda m, *a, f=form, **k: _rewrite(m, f))


FAMILY = Family(NAME, register, (__file__,))
