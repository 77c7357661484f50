"""Pattern families the pass applies, in order.

Where it lives: this folder sits at the top of the repository and is installed as the
subpackage ``glu_fusion.patterns`` (``[tool.setuptools.package-dir]`` in pyproject.toml), so that
the spellings we match are one folder a reader finds first.  Import it as
``glu_fusion.patterns``, never as ``patterns``.

What it may import, one way only: the package's settings (``glu_fusion.config``), the op
argument codes (``glu_fusion.layouts``) and the rewrite report (``glu_fusion.compile.report``,
a leaf module); the replacements call our ops by name (``torch.ops.glu_fusion.*``).  It imports
no op implementation and no kernel; modules inside it import each other relatively.

Each family is a module exposing ``FAMILY`` (a :class:`~glu_fusion.patterns._common.Family`):
its report name, a ``register(pass_)`` that adds its patterns to the pass's Inductor
``PatternMatcherPass`` (called once per process), and its source files (part of the pass's
cache key).  Its handlers record each rewrite with ``glu_fusion.compile.report.REPORT.add(Rewrite(
family=<name>, ...))``; ``_common`` has the shared safety checks.

Adding a family is one line: import its module and append its ``FAMILY`` to ``FAMILIES``.
"""
from __future__ import annotations

from . import _common, expert_combine, experts, rms_norm, rms_norm_gated, routing, swiglu
from ._common import Family

__all__ = ["FAMILIES", "Family", "register_all", "source_files"]

#: Every family, in the order their patterns are tried.
FAMILIES: list[Family] = [
    swiglu.FAMILY,
    rms_norm_gated.FAMILY,
    rms_norm.FAMILY,  # after the gated family: both anchor on rsqrt, a gated norm is theirs
    experts.FAMILY,
    expert_combine.FAMILY,
]


def register_all(pass_) -> None:
    """Register every family's patterns into one ``PatternMatcherPass``."""
    for family in FAMILIES:
        family.register(pass_)


def source_files() -> tuple[str, ...]:
    """The files whose text decides what the families rewrite (the routing table included)."""
    files = [__file__, _common.__file__, routing.__file__]
    for family in FAMILIES:
        files.extend(family.sources)
    return tuple(files)
