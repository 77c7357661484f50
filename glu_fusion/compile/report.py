"""The rewrite report: what the pass changed, graph by graph, so nothing happens silently.

Every rewrite is logged on the ``glu_fusion`` logger (one INFO line) and kept in the process-wide
:class:`Report` that :func:`glu_fusion.report` returns.  Each time the pass runs on a graph it adds
one :class:`GraphRecord`, also when it rewrote nothing, so a caller can tell "the pass ran and
found nothing" from "the pass never ran".  A process that finds the compiled graph in Inductor's
cache does not run the pass and so records nothing for that graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from typing import Iterator, Optional

__all__ = ["Rewrite", "GraphRecord", "Report", "REPORT", "report", "log"]

log = logging.getLogger("glu_fusion")


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
        where = f" in {self.module}" if self.module else ""
        where += f"  at {self.source}" if self.source else ""
        return f"{self.family}: {self.spelling} {' '.join(self.shapes)} {self.dtype}{where}"


@dataclasses.dataclass
class GraphRecord:
    """The rewrites of one run of the pass over one graph (a subgraph counts as its own graph)."""

    index: int
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  #: time the pass took on this graph (pattern registration included)

    def counts(self) -> dict[str, int]:
        """Rewrites per family in this graph."""
        return dict(Counter(r.family for r in self.rewrites))


class Report:
    """All graph records of this process since the last :meth:`reset`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: list[GraphRecord] = []
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

    def __str__(self) -> str:
        graphs = self.graphs
        lines = [f"glu_fusion rewrite report: {sum(len(g.rewrites) for g in graphs)} rewrite(s) "
                 f"in {len(graphs)} graph(s), pass time {1e3 * sum(g.seconds for g in graphs):.1f} ms"]
        for g in graphs:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(g.counts().items())) or "nothing rewritten"
            lines.append(f"  graph {g.index}: {counts}")
            lines.extend(f"    {r.line()}" for r in g.rewrites)
        return "\n".join(lines)


#: The process-wide report; ``glu_fusion.report()`` returns it.
REPORT = Report()


def report() -> Report:
    """The process-wide rewrite report: ``.graphs`` (one record per graph the pass ran on, with
    ``.rewrites`` and ``.counts()``), ``.counts()`` per family, ``.total``, ``.reset()``;
    ``str(report())`` is a readable summary."""
    return REPORT
