"""``GLU_FUSION=1`` turns the pass on for a plain ``torch.compile``.

torch calls the ``torch.backends`` entry point (``glu_fusion_entry_points.autoload``) near the end
of ``import torch``; when ``GLU_FUSION`` is set it calls :func:`autoload` here.  Importing Inductor's config there
would add over a second to every ``import torch``, so instead a one-shot import hook waits for
``torch._inductor.config`` to be imported (which ``torch.compile`` does) and installs the pass into
it then.  Nothing here may raise: an exception would make ``import torch`` fail.  A setting
with a bad value (``config.env_errors``) leaves the pass off; the entry point has warned about it
already and does not call in here then.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

_TARGET = "torch._inductor.config"
_log = logging.getLogger("glu_fusion")


def _wanted() -> bool:
    """``GLU_FUSION`` is on and every setting read from the environment is valid."""
    from .. import config
    if not config.enabled:
        return False
    if config.env_errors:
        _log.warning("glu_fusion: GLU_FUSION is set but a setting is invalid (%s); the pass stays off",
                     "; ".join(config.env_errors))
        return False
    return True


def _install_into(module) -> None:
    try:
        from .backend import install
        install(module)
    except Exception as err:  # never break the user's import
        _log.warning("glu_fusion: GLU_FUSION is set but the pass could not be installed: %r", err)


class _HookLoader(importlib.abc.Loader):
    """Runs the real loader, then installs the pass into the freshly executed module."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and tools
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _install_into(module)


class _OneShotFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; on the first lookup of ``torch._inductor.config`` it removes
    itself from ``sys.meta_path`` and wraps that module's loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _HookLoader(spec.loader)
                return spec
        except Exception:
            pass
        _log.warning("glu_fusion: GLU_FUSION is set but %s could not be hooked; "
                     "call glu_fusion.enable() instead", fullname)
        return None  # let the normal finders load it


def autoload() -> None:
    """Entry point: does nothing unless ``GLU_FUSION`` is set to a true value and every setting
    is valid; never raises."""
    try:
        if not _wanted():
            return
        module = sys.modules.get(_TARGET)
        if module is not None:
            _install_into(module)
        elif not any(isinstance(f, _OneShotFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _OneShotFinder())
    except BaseException as err:  # noqa: BLE001  (nothing may escape into ``import torch``)
        try:
            _log.warning("glu_fusion: autoload failed, the pass stays off: %r", err)
        except BaseException:  # noqa: BLE001
            pass
