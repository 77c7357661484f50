"""The expert combine family: a mixture-of-experts block's down projection and the combine after
it, rewritten into ``glu_fusion::grouped_down_combine``.

The spelling is transformers 5.x ``grouped_mm`` experts (``integrations/moe.py``) after the gate,
rows sorted by expert with ``expert_ids_g, perm = torch.sort(expert_ids)``::

    proj = mm(h.to(dt), W_downᵀ, offs)           # or [E, N, D] storage as is (gpt-oss)
    proj.add_(down_bias[expert_ids_g])             # gpt-oss only
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm); inv_perm[perm] = torch.arange(S)   # or argsort(perm)
    out = weighted[inv_perm].view(T, k, D).sum(dim=1)

``perm`` must provably be a permutation (the indices of a ``sort``, an ``argsort``): the op
sends row ``r`` to token slot ``perm[r]``.  Left alone: rows zeroed by a mask after the GEMM
(expert parallelism's sentinel rows), routing weights of another dtype than the GEMM's output
(the multiply would promote), a sum over another dimension, a gather by anything but the inverse
of a permutation, intermediates with other users.  Rewritten only where the experts family is
(``experts.REWRITE_DEVICE_TYPES``).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch import fx
from torch._inductor.pattern_matcher import CallFunctionVarArgs, CallMethodVarArgs, Match, register_graph_pattern

from glu_fusion.compile.report import REPORT, Rewrite

from . import experts
from ._common import (Family, common_tensor_kind, copy_meta, fake, module_path,
                      ordered_pure_span, same_size, shape_str, site_resolves, source_line)

aten = torch.ops.aten
NAME = "expert_combine"
_MUL = [operator.mul, torch.mul, aten.mul.Tensor]


def _anchor_patterns() -> list[tuple[str, object]]:
    """Every ``.sum`` / ``torch.sum`` call; ``_summed_over_one`` reads its arguments (a pattern
    with keyword arguments trips the matcher on method calls that have fewer)."""
    return [("sum", CallMethodVarArgs("sum")), ("sum", CallFunctionVarArgs(torch.sum))]


def _summed_over_one(node: fx.Node) -> Optional[fx.Node]:
    """``x`` of ``x.sum(1)`` / ``x.sum(dim=1)`` / ``torch.sum(x, 1)`` (no keepdim, no dtype)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args or len(args) > 2 or set(kwargs) - {"dim"} or (len(args) == 2) == ("dim" in kwargs):
        return None
    dim = args[1] if len(args) == 2 else kwargs["dim"]
    if dim not in (1, (1,), [1]) or not isinstance(args[0], fx.Node):
        return None
    return args[0]


@dataclasses.dataclass
class _Site:
    h: fx.Node
    offs: fx.Node
    b: fx.Node                 # the grouped GEMM's [E, N, D] operand
    bias: Optional[fx.Node]    # [E, D]
    row_weights: fx.Node       # [S]
    perm: fx.Node              # [S]: row r's token slot
    topk: int
    nodes: list[fx.Node]
    in_place: tuple[fx.Node, ...]
    dead: tuple[fx.Node, ...]  # nodes only the site read, outside its span


def _only_users(node: fx.Node, users: set) -> bool:
    return set(node.users) <= users and len(node.users) > 0


def _is_permutation(node: object) -> bool:
    """The indices of ``torch.sort`` / ``argsort`` of a 1-D tensor: a permutation of its rows."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 1:
        sort = node.args[0]
        return experts._call(sort, (torch.sort, aten.sort.default), "sort") and _one_dim(sort.args[0])
    return experts._call(node, (torch.argsort, aten.argsort.default), "argsort") and _one_dim(node.args[0])


def _one_dim(node: object) -> bool:
    t = fake(node)
    return t is not None and t.dim() == 1


def _inverse_of(inv: object) -> Optional[tuple[fx.Node, list[fx.Node], list[fx.Node]]]:
    """(perm, nodes, in-place nodes) of ``inv = empty_like(perm); inv[perm] = arange(S)`` or
    ``inv = argsort(perm)``, with ``perm`` a permutation; the nodes are the site's if only it reads
    them."""
    if not isinstance(inv, fx.Node):
        return None
    if experts._call(inv, (torch.argsort, aten.argsort.default), "argsort") and len(inv.args) == 1 \
            and not inv.kwargs and _is_permutation(inv.args[0]):
        return inv.args[0], [inv], []
    if not (inv.op == "call_function" and inv.target is torch.empty_like and len(inv.args) == 1 and not inv.kwargs):
        return None
    perm = inv.args[0]
    writes = [u for u in inv.users if u.op == "call_function" and u.target is operator.setitem]
    if len(writes) != 1 or not isinstance(perm, fx.Node) or not _is_permutation(perm):
        return None
    write = writes[0]
    if len(write.args) != 3 or write.args[0] is not inv or write.args[1] is not perm:
        return None
    ramp = write.args[2]
    if not experts._call(ramp, (torch.arange,)) or set(ramp.users) != {write} or len(ramp.args) != 1:
        return None
    tr, tp = fake(ramp), fake(perm)
    if tr is None or tp is None or tr.dim() != 1 or not same_size(tr.shape[0], tp.shape[0]) \
            or tr.dtype not in (torch.int64, torch.int32):
        return None
    return perm, [inv, ramp, write], [write]


def _row_scale(node: object, rows) -> Optional[tuple[fx.Node, fx.Node]]:
    """(weights, node) of ``w.unsqueeze(-1)`` / ``w.unsqueeze(1)`` / ``w[:, None]`` with ``w`` [S]."""
    if not isinstance(node, fx.Node):
        return None
    source = None
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2 and not node.kwargs \
            and node.args[1] in (-1, 1):
        source = node.args[0]
    elif node.op == "call_function" and node.target in (torch.unsqueeze,) and len(node.args) == 2 \
            and node.args[1] in (-1, 1):
        source = node.args[0]
    elif node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] in ((slice(None, None, None), None), (Ellipsis, None)):
        source = node.args[0]
    t = fake(source)
    if t is None or t.dim() != 1 or not same_size(t.shape[0], rows):
        return None
    return source, node


def _resolve(match: Match, form: str) -> Optional[_Site]:
    anchor = match.output_node()
    viewed = _summed_over_one(anchor)
    if viewed is None or set(viewed.users) != {anchor}:
        return None
    if not (viewed.op == "call_method" and viewed.target in ("view", "reshape") and not viewed.kwargs):
        return None
    gathered = viewed.args[0]
    tv, tg = fake(viewed), fake(gathered)
    if tv is None or tg is None or tv.dim() != 3 or tg.dim() != 2 or not isinstance(tv.shape[1], int):
        return None
    topk = tv.shape[1]
    if not same_size(tv.shape[2], tg.shape[1]) or not same_size(tv.shape[0] * topk, tg.shape[0]):
        return None
    if not (gathered.op == "call_function" and gathered.target is operator.getitem
            and set(gathered.users) == {viewed}):
        return None
    weighted, inv = gathered.args
    inverse = _inverse_of(inv)
    if inverse is None or not isinstance(weighted, fx.Node) or set(weighted.users) != {gathered}:
        return None
    perm, inverse_nodes, writes = inverse
    if set(inverse_nodes[0].users) != ({gathered} | set(writes)):
        return None
    if not experts._call(weighted, _MUL) or len(weighted.args) != 2 or weighted.kwargs:
        return None
    rows = tg.shape[0]
    for proj, scale in (weighted.args, weighted.args[::-1]):
        gm = experts._grouped_mm(proj)
        found = _row_scale(scale, rows) if gm is not None else None
        if found is not None:
            break
    else:
        return None
    row_weights, scale_node = found
    nodes, in_place, dead, bias = [anchor, viewed, gathered, *inverse_nodes, weighted, proj], [*writes], [], None
    bias_add = experts._expert_bias_add(proj, gm)
    if bias_add is not None:
        add, bias, bias_gather = bias_add
        nodes.append(add)
        in_place.append(add)
        if set(bias_gather.users) == {add}:
            dead.append(bias_gather)
    if set(proj.users) - {weighted, *in_place}:
        return None
    if set(scale_node.users) == {weighted}:
        nodes.append(scale_node)
    tp, tw, tx = fake(proj), fake(row_weights), fake(gm.x)
    if tp is None or tw is None or tx is None or not (tp.dtype == tw.dtype == tx.dtype) \
            or not same_size(tx.shape[0], rows):
        return None
    kind = common_tensor_kind([("h", gm.x), ("w", gm.w), ("bias", bias), ("weights", row_weights)])
    if kind is None or kind.device.type not in experts.REWRITE_DEVICE_TYPES:
        return None
    ordered = ordered_pure_span(nodes, anchor, allowed=in_place)
    if ordered is None:
        return None
    return _Site(gm.x, gm.offs, gm.w, bias, row_weights, perm, topk, ordered, tuple(in_place), tuple(dead))


def _check(match: Match, form: str) -> bool:
    return site_resolves(_resolve, match, form, NAME)


def _rewrite(match: Match, form: str) -> None:
    site = _resolve(match, form)
    if site is None:
        return
    anchor = match.output_node()
    graph = anchor.graph
    with graph.inserting_before(anchor):
        w_down = experts._transposed(graph, site.b)
        op = graph.call_function(torch.ops.glu_fusion.grouped_down_combine.default,
                                 (site.h, site.offs, w_down, site.bias, site.row_weights, site.perm, site.topk))
    copy_meta(anchor, op)
    th = fake(site.h)
    REPORT.add(Rewrite(
        family=NAME, spelling=f"grouped_mm down projection{' + expert bias' if site.bias is not None else ''}, "
                              f"routing-weight scale, inverse permutation, top-{site.topk} sum",
        shapes=(f"h{shape_str(site.h)}", f"w{shape_str(site.b)}"),
        dtype=str(th.dtype).replace("torch.", "") if th is not None else "?",
        source=source_line(anchor), module=module_path(anchor)))
    anchor.replace_all_uses_with(op)
    match.nodes = site.nodes
    match.erase_nodes()
    if experts._is_swap_of_last_two(site.b) and not site.b.users:
        graph.erase_node(site.b)
    for node in site.dead:
        if not node.users:
            graph.erase_node(node)


def register(pass_) -> None:
    for form, pattern in _anchor_patterns():
        register_graph_pattern(pattern, extra_check=lambda m, f=form: _check(m, f),
                               pass_dict=pass_)(lambda m, *a, f=form, **k: _rewrite(m, f))


FAMILY = Family(NAME, register, (__file__,))
