"""The two entry points torch loads by name, kept apart from the ``glu_fusion`` package.

* ``torch.backends`` -> :func:`autoload`, run at every ``import torch``: ``GLU_FUSION=1`` turns
  the pass on for a plain ``torch.compile``.
* ``torch_dynamo_backends`` -> :func:`backend`: ``torch.compile(model, backend="glu_fusion")``.

This module imports nothing at its top beyond the standard library, and imports the package only
when it is asked for, so loading it cannot fail even when the package cannot be imported (a half
removed install, a missing dependency, a folder named ``glu_fusion`` shadowing it).  torch turns
any exception from the ``torch.backends`` hook into a failed ``import torch``; :func:`autoload`
therefore catches everything, logs one warning and returns.
"""
from __future__ import annotations

import os

__all__ = ["autoload", "backend", "shadowing_folder"]

_OFF = ("", "0", "false", "no", "off")
_warned = False


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
    """``torch.backends`` entry point: installs the pass when ``GLU_FUSION`` is set; otherwise
    imports nothing.  Never raises: a failure is logged once and the pass stays off."""
    global _warned
    try:
        if os.environ.get("GLU_FUSION", "").strip().lower() in _OFF:
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
