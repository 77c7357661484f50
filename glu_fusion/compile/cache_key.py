"""The one cache-key recipe of the compile wing.

Inductor keys its caches on each custom pass's ``uuid()``.  Every pass of ours builds it here
from the same three parts: the package version, a digest of the source files that decide what
the pass writes, and the settings that change it (:func:`settings_key`), so a change to any of
them can never be served a graph compiled under the old rules.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable

from .. import config
from .._version import __version__

__all__ = ["pass_uuid", "settings_key", "sources_digest"]


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(os.path.basename(path).encode() + b"\0" + f.read()).digest()


def sources_digest(paths: Iterable[str]) -> str:
    """SHA-256 over the given source files (each read once per process), order-independent."""
    digest = hashlib.sha256()
    for path in sorted(set(os.path.abspath(p) for p in paths)):
        digest.update(_file_digest(path))
    return digest.hexdigest()


def settings_key() -> str:
    """Every setting that changes what a compiled graph contains, and nothing else: the user
    settings ``config.cache_key()`` names, plus the pattern switches that change what the pass
    writes (the measured routing, the whole-block rewrite, the device types the norm and expert
    rewrites cover)."""
    from ..patterns import experts as expert_patterns, rms_norm as norm_patterns, routing, swiglu as swiglu_patterns
    return (f"{config.cache_key()};route={int(routing.ROUTE_BY_MEASUREMENT)};"
            f"block={int(swiglu_patterns.REWRITE_BLOCK)};rms_norm={','.join(norm_patterns.REWRITE_DEVICE_TYPES)};"
            f"experts={','.join(expert_patterns.REWRITE_DEVICE_TYPES)}")


def pass_uuid(name: str, sources: Iterable[str], *extra: object) -> str:
    """``name``, version, source digest, the settings key, then any pass-specific ``extra``."""
    parts = [f"glu_fusion-{name}", __version__, sources_digest(sources), settings_key()]
    parts.extend(str(e) for e in extra)
    return "-".join(parts)
