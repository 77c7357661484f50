"""The two entry points torch loads by name, kept apart from the ``glu_fusion`` package, and the
parser of the settings' environment variables, which both this module and ``glu_fusion.config``
use.

* ``torch.backends`` -> :func:`autoload`, run at every ``import torch``: it checks the
  ``GLU_FUSION*`` settings (warning once about a bad value), and ``GLU_FUSION=1`` turns the pass
  on for a plain ``torch.compile``.
* ``torch_dynamo_backends`` -> :func:`backend`: ``torch.compile(model, backend="glu_fusion")``.

This module imports nothing at its top beyond the standard library, and imports the package only
when it is asked for, so loading it cannot fail even when the package cannot be imported (a half
removed install, a missing dependency, a folder named ``glu_fusion`` shadowing it), and checking
the environment at every ``import torch`` stays cheap.  torch turns any exception from the
``torch.backends`` hook into a failed ``import torch``; :func:`autoload` therefore catches
everything, logs one warning and returns.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

__all__ = ["autoload", "backend", "shadowing_folder", "SettingError", "DEVICE_TYPES", "ENVIRONMENT",
           "DEFAULTS", "PARSERS", "read_environment", "warn_environment"]

_warned = False

# --- the settings' environment variables -------------------------------------------------------

#: Device types the pass can rewrite graphs for.
DEVICE_TYPES = ("cpu", "cuda")

#: The environment variable behind each setting of ``glu_fusion.config``.
ENVIRONMENT = {"enabled": "GLU_FUSION", "rewrite_devices": "GLU_FUSION_DEVICES",
               "recompute": "GLU_FUSION_RECOMPUTE"}

#: Each setting's value when its variable is unset, empty or rejected.
DEFAULTS: dict[str, Any] = {"enabled": False, "rewrite_devices": ("cuda",), "recompute": False}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_environment_warned: set[tuple[str, ...]] = set()


class SettingError(ValueError):
    """A setting was given a value outside the ones it accepts."""


def _flag(name: str, value: Any) -> bool:
    """An on/off setting from what users type: a bool, the ints 0 and 1, or a string such as
    ``"1"``, ``"true"``, ``"off"`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(f"glu_fusion: {name} must be one of {', '.join(_TRUE + _FALSE[:-1])} (any case; "
                       f"in code also True or False); got {value!r}")


def _devices(name: str, value: Any) -> tuple[str, ...]:
    """Device types from ``"cuda,cpu"`` or a sequence of names."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        names = sorted({str(p).strip().lower() for p in parts if str(p).strip()})
    except TypeError:
        names = []
    if not names or any(n not in DEVICE_TYPES for n in names):
        raise SettingError(f"glu_fusion: {name} must name device types among {', '.join(DEVICE_TYPES)} "
                           f"(comma-separated, e.g. 'cuda,cpu'); got {value!r}")
    return tuple(names)


#: The validating parser of each setting: ``parser(name, value) -> value``, raising SettingError.
PARSERS: dict[str, Callable[[str, Any], Any]] = {"enabled": _flag, "rewrite_devices": _devices,
                                                 "recompute": _flag}


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Every setting from ``environ``: (values, one message per rejected variable).  A rejected
    variable keeps its default; nothing raises."""
    values, errors = dict(DEFAULTS), []
    for attr, variable in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[attr] = PARSERS[attr](variable, raw)
        except SettingError as err:
            errors.append(str(err))
    return values, errors


def environment_warning(errors: list[str]) -> str:
    """The warning for rejected variables: what is wrong, and what still works meanwhile."""
    problems = "; ".join(e.removeprefix("glu_fusion: ") for e in errors)
    return (f"glu_fusion: ignoring an invalid environment setting: {problems}. Until it is fixed, "
            f"GLU_FUSION=1 stays off, while an explicit backend=glu_fusion.backend (or "
            f"backend=\"glu_fusion\") still runs the pass with the default for that setting")


def warn_environment(errors: list[str]) -> None:
    """Log the rejected variables once per process, whoever sees them first (this module's
    :func:`autoload` at ``import torch``, or ``glu_fusion.config`` at its import)."""
    key = tuple(errors)
    if not key or key in _environment_warned:
        return
    _environment_warned.add(key)
    import logging
    logging.getLogger("glu_fusion").warning("%s", environment_warning(errors))


# --- the entry points ----------------------------------------------------------------------------


def shadowing_folder():
    """The folder that ``import glu_fusion`` would load as an empty namespace package (a
    directory of that name without ``__init__.py``, e.g. a clone on ``sys.path``), or None."""
    import importlib.util
    spec = importlib.util.find_spec("glu_fusion")
    if spec is None or spec.origin not in (None, "namespace"):
        return None
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else None


def shadowing_message(folder: str) -> str:
    return (f"glu_fusion: the folder {folder} has no __init__.py but is named glu_fusion, so Python "
            f"imports it in place of the installed package; run from another directory, take its "
            f"parent off PYTHONPATH/sys.path, or rename it")


def _import_package():
    """``glu_fusion.compile`` imported, with a clear error when a folder shadows the package."""
    folder = shadowing_folder()
    if folder is not None:
        raise ImportError(shadowing_message(folder))
    import glu_fusion.compile.autoload  # noqa: F401
    import glu_fusion.compile.backend  # noqa: F401
    import glu_fusion.compile as compile_wing
    return compile_wing


def autoload() -> None:
    """``torch.backends`` entry point: warns once about a rejected ``GLU_FUSION*`` value (the
    pass then stays off), installs the pass when ``GLU_FUSION`` is on, and otherwise imports
    nothing.  Never raises: a failure is logged once and the pass stays off."""
    global _warned
    try:
        values, errors = read_environment(os.environ)
        if errors:
            warn_environment(errors)
            return
        if not values["enabled"]:
            return
        _import_package().autoload.autoload()
    except BaseException as err:  # noqa: BLE001  (anything escaping breaks ``import torch``)
        try:
            if not _warned:
                _warned = True
                import logging
                logging.getLogger("glu_fusion").warning(
                    "glu_fusion: GLU_FUSION is set but the package could not be loaded, the pass stays "
                    "off: %s: %s", type(err).__name__, err)
        except BaseException:  # noqa: BLE001
            pass


def backend(gm, example_inputs, **kwargs):
    """``backend="glu_fusion"``: :func:`glu_fusion.backend`, loaded on first use."""
    return _import_package().backend.backend(gm, example_inputs, **kwargs)
