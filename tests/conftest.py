"""Test-session set-up and shared fixtures for the pass tests.

Without CUDA, Triton's interpreter is switched on before anything imports Triton: it reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is decorated, its own library helpers
included.  The ops read the variable again at each call, so tests that want the plain-torch
reference path set it to ``0`` while they run.  Inductor's caches are off in this process: a
cache hit skips the pre-grad pass, and the tests inspect what the pass did (the cache test runs
its own processes with the cache on).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers every op: test files name them when they load)


def _import_every_kernel_module() -> None:
    """Decorate every Triton kernel now, while ``TRITON_INTERPRET`` holds the session's value:
    the ops import kernel modules lazily, and a first import inside a test that switched the
    interpreter off would build the kernels for a GPU this machine may not have.  Every module
    of every subpackage (portable/, norms/, engine/); the engine's only where this Triton has
    the Gluon Hopper API it is written against."""
    import importlib
    import pkgutil

    import glu_fusion.kernels
    from glu_fusion.kernels import engine
    for info in pkgutil.walk_packages(glu_fusion.kernels.__path__, "glu_fusion.kernels."):
        if info.name.startswith("glu_fusion.kernels.engine.") and not engine._gluon_hopper_api():
            continue
        importlib.import_module(info.name)


_import_every_kernel_module()
from glu_fusion.compile.report import REPORT


@pytest.fixture
def cpu_rewrites(monkeypatch):
    """Let the pass rewrite CPU graphs, on the reference path, with a fresh Dynamo and report.

    Inductor's graph caches are off: a cache hit skips the pass, so the report would stay empty.
    """
    import torch._functorch.config
    import torch._inductor.config
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cpu",))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    REPORT.reset()
    torch.manual_seed(0)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield REPORT
    torch._dynamo.reset()
    REPORT.reset()


@pytest.fixture
def dynamo_graph():
    """``grab(fn, *args, dynamic=False) -> GraphModule``: the single Dynamo graph of ``fn``
    (before any Inductor pass), for running the pass on it directly."""
    def grab(fn, *args, dynamic=False):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(fn, backend=keep, fullgraph=True, dynamic=dynamic)(*args)
        assert len(graphs) == 1
        return graphs[0]

    return grab


@pytest.fixture(autouse=True)
def rewrite_every_matched_site(monkeypatch):
    """Tests exercise the rewrite on every shape: the measured routing table, which leaves CUDA
    sites that measured no faster to Inductor, is tested on its own (test_routing.py)."""
    from glu_fusion.patterns import routing
    monkeypatch.setattr(routing, "ROUTE_BY_MEASUREMENT", False)
