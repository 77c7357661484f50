"""The three user settings of glu_fusion, typed and validated.

=======================  ==========================  ===========================================
attribute                environment variable        meaning
=======================  ==========================  ===========================================
``enabled``              ``GLU_FUSION``              a plain ``torch.compile`` uses the pass
``rewrite_devices``      ``GLU_FUSION_DEVICES``      device types whose graphs are rewritten
``recompute``            ``GLU_FUSION_RECOMPUTE``    SwiGLU backward recomputes its pre-activations
=======================  ==========================  ===========================================

Values are read from the environment when this module is imported, by the parser the
``import torch`` entry point uses too (``glu_fusion_entry_points``, standard library only).  A
bad value there never raises: it is logged once per process (by whichever of the two sees it
first), the default is kept, and ``env_errors`` lists it, which keeps ``GLU_FUSION=1`` off; an
explicit ``backend=glu_fusion.backend`` still runs the pass.  Assigning an attribute afterwards
(``glu_fusion.config.recompute = 1``) validates the value (on/off settings take bools, 0/1 and
strings such as ``"true"``) and raises :class:`SettingError` on a bad one.  :func:`cache_key`
says which settings change what the pass writes into a graph.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any

from glu_fusion_entry_points import (DEVICE_TYPES, ENVIRONMENT, PARSERS as _PARSERS, SettingError,
                                     read_environment, warn_environment)

__all__ = ["SettingError", "DEVICE_TYPES", "ENVIRONMENT", "enabled", "rewrite_devices", "recompute",
           "env_errors", "cache_key", "read_environment"]

_values, _errors = read_environment(os.environ)

#: ``GLU_FUSION=1``: a plain ``torch.compile`` uses the pass (read by ``compile.autoload``).
enabled: bool = _values["enabled"]
#: ``GLU_FUSION_DEVICES`` (default ``cuda``): device types whose graphs the pass rewrites; ``cpu``
#: runs the fused ops through the Triton interpreter or the plain-torch reference (tests use it).
rewrite_devices: tuple[str, ...] = _values["rewrite_devices"]
#: ``GLU_FUSION_RECOMPUTE=1``: the SwiGLU op saves only its input for backward and recomputes the
#: ``[M, 2N]`` pre-activations there (less memory, one more GEMM).  Default: save them.
recompute: bool = _values["recompute"]
#: The environment variables rejected at import, as messages; non-empty keeps autoload off.
env_errors: tuple[str, ...] = tuple(_errors)
warn_environment(_errors)  # once per process: a no-op when the entry point warned at ``import torch``
del _values, _errors


def cache_key() -> str:
    """The user settings that change what the pass writes into a graph, as a stable string
    (part of every pass's Inductor cache key; ``enabled`` only decides whether a pass runs)."""
    module = sys.modules[__name__]
    return f"devices={','.join(module.rewrite_devices)};recompute={int(module.recompute)}"


class _ValidatedModule(types.ModuleType):
    """This module's type: assigning a setting validates it first, and a name that is no
    setting (a typo, or a retired setting) is refused instead of silently doing nothing."""

    def __setattr__(self, name: str, value: Any) -> None:
        parser = _PARSERS.get(name)
        if parser is not None:
            value = parser(name, value)
        elif not name.startswith("_") and name not in self.__dict__:
            raise AttributeError(f"glu_fusion.config has no setting {name!r}; the settings are "
                                 f"{', '.join(_PARSERS)}")
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ValidatedModule
