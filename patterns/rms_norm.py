"""The RMSNorm family: a decoder layer's ``h = x + residual; y = rmsnorm(h) · w`` (or a plain
norm without the add), rewritten into ``glu_fusion::rms_norm``, which returns both y and h.

The spellings, found by the same graph walk as the gated family (``rms_norm_gated._from_rsqrt``,
anchored on ``rsqrt``/``1/sqrt``), or on ``F.rms_norm`` / ``nn.RMSNorm``:

* HF Llama / Qwen3: ``h.to(fp32)``, ``pow(2).mean(-1, keepdim=True)``, ``h * rsqrt(var + eps)``,
  downcast, then ``weight * ...``;
* Gemma: ``(1 + w.float())`` multiplied in fp32, then ``type_as(x)``;
* ``F.rms_norm(h, (D,), w, eps)`` and ``nn.RMSNorm`` (``eps=None``: fp32 machine epsilon).

When the norm's input is ``a + b`` of two tensors of its shape and dtype, the add moves into the
op and every other user of the sum reads the op's ``h`` (the residual stream of the next
block).  Left alone: gated norms (the gated family's), grouped norms, LayerNorm (a centred
input), L2 norms (``sum``), norms computed in low precision, a site whose intermediate has
another user, mutations inside the span, and anything :func:`worth_rewriting` declines.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx
from torch._inductor.pattern_matcher import Match, register_graph_pattern

from glu_fusion import config
from glu_fusion.compile.report import REPORT, Rewrite, log

from ._common import (REWRITE_DTYPES, Family, copy_meta, erase_dead, fake, ordered_pure_span, same_shape, same_size,
                      shape_str, site_resolves, size_hint, source_line, value_users)
from .rms_norm_gated import _ADD_F, _ADD_M, _Site, _binary, _eps_value, _is, _single_user, _traced_size
from .rms_norm_gated import _from_rsqrt as _gated_walk
from .rms_norm_gated import norm_anchors

NAME = "rms_norm"
_FP32 = torch.float32

# --- where the rewrite pays ------------------------------------------------------------------------

#: Device types where the plain norm is rewritten: only where our kernels were measured faster
#: than Inductor's generated norm kernel (benchmarks/bench_norms.py; benchmarks/NOTES.md,
#: "RMSNorm").  Empty by default: a rewrite that is not measured faster is left to Inductor.
#: Tests and the benchmark set it (it is part of the pass's cache key).
REWRITE_DEVICE_TYPES: tuple[str, ...] = ()

#: Widest row the kernels take in one tile (``kernels.norms.rms_norm.MAX_D``); wider rows stay.
MAX_D = 32768


def worth_rewriting(device_type: str, d: int, rows: Optional[int]) -> bool:
    """Whether to rewrite a norm over rows of ``d`` columns (``rows``: None when symbolic).

    The one place the rewrite decision lives: set the device types and the row and width ranges
    here from the GPU benchmark, where the kernels measured faster than Inductor's.  A symbolic
    width (``dynamic=True``) comes as the width the graph was traced with: the op takes rows
    wider than its kernels to the reference itself, so the compiled graph stays right at every
    width and this only decides what pays.
    """
    if device_type not in config.rewrite_devices:
        return False
    return device_type in REWRITE_DEVICE_TYPES and d <= MAX_D


# --- site resolution ---------------------------------------------------------------------------------

def _type_as(node, dtype: torch.dtype) -> bool:
    """``node`` is ``t.type_as(other)`` with ``other`` of ``dtype``."""
    if not (_is(node, (), ("type_as",)) and len(node.args) == 2 and not node.kwargs):
        return False
    other = fake(node.args[1])
    return other is not None and other.dtype == dtype


def _is_centred(node) -> bool:
    """``t - t.mean(...)``: a LayerNorm's centred input, Inductor's to fuse, not ours."""
    diff = _binary(node, (operator.sub, torch.sub), ("sub",))
    return diff is not None and _is(diff[1], (torch.mean,), ("mean",))


def _offset_add_dtype(site: _Site) -> Optional[torch.dtype]:
    """The dtype ``1 + w`` was computed in (the add node among the site's nodes)."""
    for n in site.nodes:
        args = _binary(n, _ADD_F, _ADD_M)
        if args is not None and any(isinstance(a, (int, float)) for a in args) and \
                any(a is site.weight or (isinstance(a, fx.Node) and site.weight in a.all_input_nodes) for a in args):
            t = fake(n)
            return t.dtype if t is not None else None
    return None


def _weight_rounding_fits(site: _Site) -> bool:
    """Map the ``(1 + w)`` precision onto the op's flags: with a downcast the op rounds
    ``1 + w`` to w's dtype, without one it does not.  A spelling that fits neither stays."""
    if site.offset == 0.0 or site.weight is None:
        return True
    tw = fake(site.weight)
    add_dtype = _offset_add_dtype(site)
    if tw is None or add_dtype is None:
        return False
    rounded = add_dtype == tw.dtype and tw.dtype != _FP32
    if rounded:
        return site.downcast != "none"
    if site.downcast == "after_weight":
        site.downcast = "none"  # one rounding after an fp32 weight product: the same values
    return site.downcast == "none" or tw.dtype == _FP32


def _from_rsqrt(match: Match) -> Optional[_Site]:
    site = _gated_walk(match)
    if site is None or site.z is not None or site.group_size is not None or site.out is None:
        return None
    if site.weight is None and len(value_users(site.out)) > 1:
        return None  # the normalised value read twice before any weight: not a norm layer's output
    tx = fake(site.x)
    nxt = _single_user(site.out)
    if tx is not None and nxt is not None and _type_as(nxt, tx.dtype):
        site.nodes.append(nxt)
        site.out = nxt
    if _is_centred(site.x) or not _weight_rounding_fits(site):
        return None
    site.spelling.insert(0, "rsqrt")
    return site


def _from_rms_norm(match: Match) -> Optional[_Site]:
    node = match.output_node()
    if len(node.args) < 2 or set(node.kwargs) - {"weight", "eps"}:
        return None
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    tx = fake(x)
    if tx is None or not isinstance(shape, (list, tuple)) or len(shape) != 1 or \
            not same_size(_traced_size(shape[0]), tx.shape[-1]):  # (x.shape[-1],): a SymInt node when dynamic
        return None
    if eps is None:
        eps = torch.finfo(torch.promote_types(tx.dtype, _FP32)).eps  # what F.rms_norm uses
    if not _eps_value(eps):
        return None
    site = _Site(x=x, eps=eps, nodes=[node], spelling=["rms_norm"], out=node)
    if w is not None:
        tw = fake(w)
        if not isinstance(w, fx.Node) or tw is None or tw.dtype != tx.dtype:
            return None
        site.weight = w
        site.spelling.append("w")
    site.downcast = "after_weight" if tx.dtype != _FP32 else "none"
    return site


def _residual_add(site: _Site) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(a, b)`` when the norm's input is ``a + b``, both of its shape and dtype (no broadcast)."""
    args = _binary(site.x, _ADD_F, _ADD_M)
    if args is None or not all(isinstance(a, fx.Node) for a in args):
        return None
    th, ta, tb = fake(site.x), fake(args[0]), fake(args[1])
    if th is None or ta is None or tb is None or not (ta.dtype == tb.dtype == th.dtype):
        return None
    if not (same_shape(ta.shape, th.shape) and same_shape(tb.shape, th.shape)):
        return None
    return args[0], args[1]


class _Plan:
    """A resolved site: the op's arguments, the nodes it replaces and where it goes."""

    def __init__(self, site: _Site, x: fx.Node, residual: Optional[fx.Node], add: Optional[fx.Node],
                 at: fx.Node):
        self.site, self.x, self.residual, self.add, self.at = site, x, residual, add, at


def _resolve(match: Match, kind: str) -> Optional[_Plan]:
    site = _from_rms_norm(match) if kind == "rms_norm" else _from_rsqrt(match)
    if site is None or site.out is None or site.z is not None:
        return None
    tx, ty = fake(site.x), fake(site.out)
    if tx is None or ty is None or tx.dtype not in REWRITE_DTYPES or ty.dtype != tx.dtype:
        return None
    if tx.dim() < 1 or not same_shape(tx.shape, ty.shape):
        return None
    width = size_hint(tx.shape[-1])  # symbolic under dynamic=True: the traced width (no guard)
    if width is None:
        log.info("left %s at %s alone: its width %s has no traced value to decide on", NAME,
                 source_line(site.out) or "?", tx.shape[-1])
        return None
    rows = 1
    for s in tx.shape[:-1]:
        rows = rows * s if isinstance(s, int) and rows is not None else None
    if not worth_rewriting(tx.device.type, width, rows):
        return None
    if site.weight is not None:
        tw = fake(site.weight)
        if tw is None or tw.device != tx.device or tw.dim() != 1:
            return None
    site.nodes = list(dict.fromkeys(site.nodes))
    inner = set(site.nodes)
    if site.x in inner or (site.weight is not None and site.weight in inner):
        return None
    for n in site.nodes:
        if n is not site.out and not set(value_users(n)) <= inner:
            return None
    pair = _residual_add(site)
    add = site.x if pair is not None else None
    if add is not None:
        x, residual = pair
        span = site.nodes + [add]
    else:
        x, residual = site.x, None
        span = site.nodes
    ordered = ordered_pure_span(span, site.out, allowed=site.in_place)
    if ordered is None:
        return None
    site.nodes = [n for n in ordered if n is not add]
    order = {n: i for i, n in enumerate(site.out.graph.nodes)}
    at = site.out
    if add is not None:  # the op must come before every reader of h
        at = min([site.out, *(u for u in add.users if u not in inner)], key=order.__getitem__)
    for needed in (x, residual, site.weight):
        if needed is not None and order[needed] >= order[at]:
            return None
    return _Plan(site, x, residual, add, at)


def _check(match: Match, kind: str) -> bool:
    return site_resolves(_resolve, match, kind, "RMSNorm")


def _rewrite(match: Match, kind: str) -> None:
    plan = _resolve(match, kind)
    if plan is None:
        return
    site = plan.site
    graph = site.out.graph
    eps = site.eps if isinstance(site.eps, fx.Node) else float(site.eps)  # a SymFloat node under dynamic=True
    args = (plan.x, site.weight, plan.residual, eps, float(site.offset), site.downcast)
    with graph.inserting_before(plan.at):
        op = graph.call_function(torch.ops.glu_fusion.rms_norm.default, args)
        y = graph.call_function(operator.getitem, (op, 0))
        h = graph.call_function(operator.getitem, (op, 1)) if plan.add is not None else None
    copy_meta(site.out, op, with_value=False)
    copy_meta(site.out, y)
    if h is not None:
        copy_meta(plan.add, h)
    spelling = ", ".join(site.spelling + (["residual"] if plan.add is not None else [])
                         + [f"downcast={site.downcast}"])
    tx = fake(plan.x)
    REPORT.add(Rewrite(family=NAME, spelling=spelling, shapes=(f"x{shape_str(plan.x)}",),
                       dtype=str(tx.dtype).replace("torch.", ""), source=source_line(site.out)))
    site.out.replace_all_uses_with(y)
    erase_dead(graph, site.nodes)
    if h is not None:
        plan.add.replace_all_uses_with(h)
        graph.erase_node(plan.add)


def register(pass_) -> None:
    """Anchor patterns: ``rsqrt``/``sqrt`` in function and method form, and ``F.rms_norm``.
    Registered after the gated family, whose patterns share these anchors and come first."""
    for kind, pattern in norm_anchors():
        register_graph_pattern(pattern, extra_check=lambda m, k=kind: _check(m, k),
                               pass_dict=pass_)(lambda m, *a, k=kind, **kw: _rewrite(m, k))


FAMILY = Family(NAME, register, (__file__,))
