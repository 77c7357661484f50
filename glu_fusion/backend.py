"""The ``torch.compile`` backend and the global switch, both built on Inductor's pre-grad hook.

``backend`` is Inductor with ``GluPass`` added to ``pre_grad_custom_pass`` for its own compile;
``install``/``uninstall`` add it to (remove it from) Inductor's global config.  Either way a pass
the user already set there keeps running: we chain, never replace (``graph_pass.with_glu_pass``).

This module is imported with the package, also at ``import torch`` through the entry point, so
it imports nothing from ``torch._inductor`` (over a second) until a function is called.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["backend", "install", "uninstall"]


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.compile(model, backend=glu_fusion.backend)``: Inductor plus the fusion pass.

    Also reachable as ``backend="glu_fusion"``.  ``kwargs`` go to Inductor's ``compile_fx``.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from .graph_pass import with_glu_pass

    patches = dict(kwargs.pop("config_patches", None) or {})
    current = patches.get("pre_grad_custom_pass", inductor_config.pre_grad_custom_pass)
    patches["pre_grad_custom_pass"] = with_glu_pass(current)
    return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)


def install(inductor_config: Any = None) -> None:
    """Make every Inductor compile in this process use the pass (``glu_fusion.enable()``)."""
    from .graph_pass import with_glu_pass

    if inductor_config is None:
        from torch._inductor import config as inductor_config
    inductor_config.pre_grad_custom_pass = with_glu_pass(inductor_config.pre_grad_custom_pass)


def uninstall() -> None:
    """Undo :func:`install`, leaving any pass of the user's in place (``glu_fusion.disable()``)."""
    from torch._inductor import config as inductor_config

    from .graph_pass import without_glu_pass
    inductor_config.pre_grad_custom_pass = without_glu_pass(inductor_config.pre_grad_custom_pass)
