"""The rewrite report: what the pass changed, graph by graph, so nothing happens silently.

Every rewrite is logged on the ``glu_fusion`` logger (one INFO line) and kept in the process-wide
:class:`Report` that :func:`glu_fusion.report` returns.  Each time the pass runs on a graph it adds
one :class:`GraphRecord`, also when it rewrote nothing, so a caller can tell "the pass ran and
found nothing" from "the pass never ran".  A process that finds the compiled graph in Inductor's
cache does not run the pass; ``compile.cache_watch`` then counts the calls of our ops in the code
the cache served and adds a :class:`CachedGraph`, so the report says what that code runs.  Both
count in one vocabulary, fused sites per family: a cached graph's sites come from its op calls,
one per forward op call, its backward ops being part of that site (:func:`family_counts`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from typing import Iterator, Optional

__all__ = ["Rewrite", "Leftover", "GraphRecord", "CachedGraph", "Report", "REPORT", "report", "log",
           "FORWARD_OP_FAMILY", "BACKWARD_OPS", "family_counts"]

log = logging.getLogger("glu_fusion")

#: The ops the pass writes into a graph, each with the family of the site it fuses.
FORWARD_OP_FAMILY = {"swiglu": "swiglu", "swiglu_packed": "swiglu", "mlp_block": "mlp_block",
                     "mlp_block_packed": "mlp_block", "grouped_swiglu": "experts",
                     "grouped_swiglu_packed": "experts", "grouped_down_combine": "expert_combine",
                     "rms_norm": "rms_norm", "rms_norm_gated": "rms_norm_gated"}
#: The ops a forward op's backward calls: part of that forward op's site, never a site of their own.
BACKWARD_OPS = frozenset({"swiglu_preact", "swiglu_dh", "swiglu_dh_inplace", "mlp_dgated", "mlp_dgated_inplace",
                          "grouped_swiglu_dh", "grouped_swiglu_dx", "grouped_swiglu_dw",
                          "rms_norm_backward", "rms_norm_gated_backward"})


def family_counts(op_calls: dict[str, int]) -> dict[str, int]:
    """Fused sites per family from op calls in generated code, so that a cached graph counts in
    the rewrites' vocabulary: each forward op call is one site; backward ops add none."""
    sites: Counter = Counter()
    for op, calls in op_calls.items():
        family = FORWARD_OP_FAMILY.get(op)
        if family is not None:
            sites[family] += calls
    return dict(sites)


def _where(module: Optional[str], source: Optional[str]) -> str:
    """`` in <module>  at <file:line  code>``, each part where known."""
    return (f" in {module}" if module else "") + (f"  at {source}" if source else "")


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One fused site.

    ``family``: the pattern family (``"swiglu"``, ...); ``spelling``: how the user's code wrote it;
    ``shapes``: the input and weight shapes as strings; ``dtype``: the input dtype;
    ``source``: ``file:line  code`` of the user's line, when the graph carries it;
    ``module``: the qualified name of the innermost module the site sits in (``layers.0.mlp``).
    """

    family: str
    spelling: str
    shapes: tuple[str, ...]
    dtype: str
    source: Optional[str] = None
    module: Optional[str] = None

    def line(self) -> str:
        return f"{self.family}: {self.spelling} {' '.join(self.shapes)} {self.dtype}{_where(self.module, self.source)}"


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A site that looks like one a family fuses (a gated product of two projections, say) and
    that the pass left as it was, with the reason.

    ``family``: the family it resembles; ``reason``: why it was not rewritten; ``source`` and
    ``module`` as for :class:`Rewrite`.
    """

    family: str
    reason: str
    source: Optional[str] = None
    module: Optional[str] = None

    def line(self) -> str:
        return f"{self.family}-like site left: {self.reason}{_where(self.module, self.source)}"


@dataclasses.dataclass
class GraphRecord:
    """The rewrites of one run of the pass over one graph (a subgraph counts as its own graph)."""

    index: int
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  #: time the pass took on this graph (pattern registration included)
    #: device types of a graph the pass left alone because ``config.rewrite_devices`` names none
    #: of them (empty when the pass searched the graph)
    skipped_devices: tuple[str, ...] = ()
    #: look-alike sites the pass left, each with its reason
    left: list[Leftover] = dataclasses.field(default_factory=list)
    #: sites a family refused during this run, by their anchor node; :meth:`Report.settle_left`
    #: keeps those still in the graph once every pattern has run
    _candidates: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """Rewrites per family in this graph."""
        return dict(Counter(r.family for r in self.rewrites))

    def summary(self) -> str:
        """One line: the counts per family, or why nothing was rewritten."""
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
        left = f"{len(self.left)} look-alike site(s) left" if self.left else ""
        if counts:
            return f"{counts}; {left}" if left else counts
        if left:
            return f"nothing rewritten; {left}"
        if self.skipped_devices:
            devices = ",".join(self.skipped_devices)
            return (f"nothing rewritten: the graph is on {devices}, and only graphs on "
                    f"{','.join(_rewrite_devices())} are rewritten (set GLU_FUSION_DEVICES="
                    f"{','.join(sorted({*_rewrite_devices(), *self.skipped_devices}))} to include it)")
        return "nothing rewritten"


def _rewrite_devices() -> tuple[str, ...]:
    from .. import config
    return tuple(config.rewrite_devices)


@dataclasses.dataclass(frozen=True)
class CachedGraph:
    """A compiled graph Inductor served from its cache, so the pass did not run on it.

    ``op_calls``: the calls of our ops (``_nograd`` twins counted as their op) in the code the
    cache served, per op name, backward ops included; empty when that code calls none of them.
    :meth:`counts` and :attr:`total` count fused sites per family, as a :class:`GraphRecord` does.
    """

    index: int
    op_calls: dict[str, int]

    def counts(self) -> dict[str, int]:
        """Fused sites per family in this graph's code."""
        return family_counts(self.op_calls)

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
        return (f"served from Inductor's cache: {self.total} fused site(s)"
                + (f" ({counts})" if counts else ""))


class Report:
    """All graph records of this process since the last :meth:`reset`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: list[GraphRecord] = []
        self._cached: list[CachedGraph] = []
        self._local = threading.local()  # the record open in this thread, if any

    @property
    def graphs(self) -> list[GraphRecord]:
        """A copy of the records, oldest first."""
        with self._lock:
            return list(self._graphs)

    @property
    def rewrites(self) -> list[Rewrite]:
        """Every rewrite of every graph, in order."""
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def cached_graphs(self) -> list[CachedGraph]:
        """The graphs Inductor served from its cache (the pass did not run on them), oldest first."""
        with self._lock:
            return list(self._cached)

    def cached_counts(self) -> dict[str, int]:
        """Fused sites per family in the code of every graph served from the cache (the
        counterpart of :meth:`counts`, which counts the rewrites of the graphs the pass ran on)."""
        total: Counter = Counter()
        for g in self.cached_graphs:
            total.update(g.counts())
        return dict(total)

    def add_cached(self, op_calls: dict[str, int]) -> CachedGraph:
        """Record one graph served from Inductor's cache and log it."""
        with self._lock:
            record = CachedGraph(index=len(self._cached), op_calls=dict(op_calls))
            self._cached.append(record)
        log.info("cached graph %d: %s", record.index, record.summary())
        return record

    def counts(self) -> dict[str, int]:
        """Rewrites per family over all graphs."""
        return dict(Counter(r.family for r in self.rewrites))

    @property
    def total(self) -> int:
        return len(self.rewrites)

    @property
    def seconds(self) -> float:
        """Time the pass spent over all graphs."""
        return sum(g.seconds for g in self.graphs)

    def reset(self) -> None:
        """Forget every record (tests call this between cases)."""
        with self._lock:
            self._graphs.clear()
            self._cached.clear()

    @contextlib.contextmanager
    def graph(self) -> Iterator[GraphRecord]:
        """Open the record of one pass run; :meth:`add` calls inside it land there."""
        with self._lock:
            record = GraphRecord(index=len(self._graphs))
            self._graphs.append(record)
        previous = getattr(self._local, "current", None)
        self._local.current = record
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self._local.current = previous

    def add(self, rewrite: Rewrite) -> None:
        """Record and log one rewrite (outside a pass run it goes into a graph of its own)."""
        record = getattr(self._local, "current", None)
        with self._lock:
            if record is None:
                record = GraphRecord(index=len(self._graphs))
                self._graphs.append(record)
            record.rewrites.append(rewrite)
        log.info("rewrote %s", rewrite.line())

    def consider_left(self, anchor: object, leftover: Leftover) -> None:
        """Note that a family refused the site at ``anchor``, and why (the first reason noted
        for an anchor stands).  Whether it stays left is known only when every pattern has run:
        another pattern may still rewrite it (:meth:`settle_left`)."""
        record = getattr(self._local, "current", None)
        if record is not None:
            record._candidates.setdefault(anchor, leftover)

    def settle_left(self, record: GraphRecord) -> None:
        """Record and log the noted sites whose anchor node is still in the graph."""
        for anchor, leftover in record._candidates.items():
            if getattr(anchor, "_erased", False):
                continue
            with self._lock:
                record.left.append(leftover)
            log.info("left %s", leftover.line())
        record._candidates.clear()

    @property
    def left(self) -> list[Leftover]:
        """Every look-alike site left, over all graphs, in order."""
        return [lo for g in self.graphs for lo in g.left]

    def __str__(self) -> str:
        graphs, cached = self.graphs, self.cached_graphs
        head = (f"glu_fusion rewrite report: {sum(len(g.rewrites) for g in graphs)} rewrite(s) "
                f"in {len(graphs)} graph(s), pass time {1e3 * sum(g.seconds for g in graphs):.1f} ms")
        if cached:
            head += f"; {len(cached)} graph(s) served from Inductor's cache"
        lines = [head]
        for g in graphs:
            lines.append(f"  graph {g.index}: {g.summary()}")
            lines.extend(f"    {r.line()}" for r in g.rewrites)
            lines.extend(f"    {lo.line()}" for lo in g.left)
        lines.extend(f"  cached graph {c.index}: {c.summary()}" for c in cached)
        return "\n".join(lines)


#: The process-wide report; ``glu_fusion.report()`` returns it.
REPORT = Report()


def report() -> Report:
    """The process-wide rewrite report: ``.graphs`` (one record per graph the pass ran on, with
    ``.rewrites`` and ``.counts()``), ``.counts()`` per family, ``.total``, ``.reset()``;
    ``.cached_graphs`` and ``.cached_counts()`` (sites per family too) for graphs served from
    Inductor's cache;
    ``str(report())`` is a readable summary."""
    return REPORT
