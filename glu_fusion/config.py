"""The three user settings of glu_fusion, typed and validated.

=======================  ==========================  ===========================================
attribute                environment variable        meaning
=======================  ==========================  ===========================================
``enabled``              ``GLU_FUSION``              a plain ``torch.compile`` uses the pass
``rewrite_devices``      ``GLU_FUSION_DEVICES``      device types whose graphs are rewritten
``recompute``            ``GLU_FUSION_RECOMPUTE``    SwiGLU backward recomputes its pre-activations
=======================  ==========================  ===========================================

Values are read from the environment when this module is imported.  A bad value there never
raises (this module is imported at every ``import torch`` through the entry point): it is logged
as a warning, the default is kept, and ``env_errors`` lists it, which keeps ``GLU_FUSION``'s
global switch off.  Assigning an attribute afterwards (``glu_fusion.config.recompute = True``)
validates the value and raises :class:`SettingError` on a bad one.  :func:`cache_key` says which
settings change what the pass writes into a graph.
"""
from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any, Callable, Mapping

__all__ = ["SettingError", "DEVICE_TYPES", "ENVIRONMENT", "enabled", "rewrite_devices", "recompute",
           "env_errors", "cache_key", "read_environment"]

_log = logging.getLogger("glu_fusion")

#: Device types the pass can rewrite graphs for.
DEVICE_TYPES = ("cpu", "cuda")

#: The environment variable behind each setting.
ENVIRONMENT = {"enabled": "GLU_FUSION", "rewrite_devices": "GLU_FUSION_DEVICES",
               "recompute": "GLU_FUSION_RECOMPUTE"}

_DEFAULTS: dict[str, Any] = {"enabled": False, "rewrite_devices": ("cuda",), "recompute": False}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingError(ValueError):
    """A setting was given a value outside the ones it accepts."""


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(f"glu_fusion: {name} must be one of 1, 0, true, false, yes, no, on, off; "
                       f"got {value!r}")


def _devices(name: str, value: Any) -> tuple[str, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        names = sorted({str(p).strip().lower() for p in parts if str(p).strip()})
    except TypeError:
        names = []
    if not names or any(n not in DEVICE_TYPES for n in names):
        raise SettingError(f"glu_fusion: {name} must name device types among {', '.join(DEVICE_TYPES)} "
                           f"(comma-separated, e.g. 'cuda,cpu'); got {value!r}")
    return tuple(names)


_PARSERS: dict[str, Callable[[str, Any], Any]] = {"enabled": _flag, "rewrite_devices": _devices,
                                                  "recompute": _flag}


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Every setting from ``environ``: (values, one message per rejected variable).  A rejected
    variable keeps its default; nothing raises."""
    values, errors = dict(_DEFAULTS), []
    for attr, variable in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[attr] = _PARSERS[attr](variable, raw)
        except SettingError as err:
            errors.append(str(err))
    return values, errors


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
for _message in env_errors:
    _log.warning("%s; the default is kept and GLU_FUSION's global switch stays off", _message)
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
