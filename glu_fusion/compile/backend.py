"""The ``torch.compile`` backend and the global switch, both built on Inductor's graph-pass hooks.

Three passes: ``GluPass`` in ``pre_grad_custom_pass`` rewrites the patterns into our ops
(``pre_grad``); in ``post_grad_custom_post_pass``, the passes of ``post_grad.POST_GRAD_PASSES``
in their order (the compiled SwiGLU backward reuses the saved pre-activations' buffer, then the
compiled calls go to the ops' autograd-free twins).  ``backend`` adds them for its own compile;
``install``/``uninstall`` add them to (remove them from) Inductor's global config.  Either way a
pass the user already set there keeps running: we chain, never replace (``passes.with_pass``).

This module is imported with the package, also at ``import torch`` through the entry point, so
it imports nothing from ``torch._inductor`` (over a second) until a function is called.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["backend", "install", "uninstall", "enable", "disable"]


def _our_passes() -> list:
    """(Inductor hook, pass class) pairs, in the order each hook runs them."""
    from .post_grad import POST_GRAD_PASSES
    from .pre_grad import GluPass
    return [("pre_grad_custom_pass", GluPass),
            *(("post_grad_custom_post_pass", kind) for kind in POST_GRAD_PASSES)]


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.compile(model, backend=glu_fusion.backend)``: Inductor plus the fusion pass.

    Also reachable as ``backend="glu_fusion"``.  ``kwargs`` go to Inductor's ``compile_fx``.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from .cache_watch import watch
    from .passes import with_pass

    patches = dict(kwargs.pop("config_patches", None) or {})
    for hook, kind in _our_passes():
        patches[hook] = with_pass(patches.get(hook, getattr(inductor_config, hook)), kind)
    with watch():  # a cache hit runs no pass: the report then counts the ops the cached code calls
        return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)


def install(inductor_config: Any = None) -> None:
    """Make every Inductor compile in this process use the passes (``glu_fusion.enable()``)."""
    from .cache_watch import install_dynamo_callbacks
    from .passes import with_pass

    if inductor_config is None:
        from torch._inductor import config as inductor_config
    for hook, kind in _our_passes():
        setattr(inductor_config, hook, with_pass(getattr(inductor_config, hook), kind))
    install_dynamo_callbacks()  # so the report also sees graphs served from Inductor's cache


def uninstall() -> None:
    """Undo :func:`install`, leaving any pass of the user's in place (``glu_fusion.disable()``)."""
    from torch._inductor import config as inductor_config

    from .passes import without_pass
    for hook, kind in _our_passes():
        setattr(inductor_config, hook, without_pass(getattr(inductor_config, hook), kind))


def enable() -> None:
    """Make every ``torch.compile`` with Inductor in this process use the fusion pass (as
    ``GLU_FUSION=1`` does); a ``pre_grad_custom_pass`` already set keeps running before it."""
    install()


def disable() -> None:
    """Remove the fusion pass from Inductor's global config (graphs compiled before stay fused)."""
    uninstall()
