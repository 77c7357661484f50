"""The ``torch.library.Library`` handles our registrations live in, kept for the process's life
(a library that is garbage-collected takes its registrations with it)."""
from __future__ import annotations

import torch

_LIBS: list = []


def new_library(kind: str) -> torch.library.Library:
    """A new ``glu_fusion`` library of ``kind`` (``"IMPL"`` or ``"FRAGMENT"``), kept alive."""
    lib = torch.library.Library("glu_fusion", kind)
    _LIBS.append(lib)
    return lib
