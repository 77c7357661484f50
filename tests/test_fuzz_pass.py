"""Differential fuzzing of the compile pass: random small modules, compiled vs eager.

Hypothesis draws modules from the grammar in ``helpers/fuzz_grammar.py`` (real SwiGLU, MLP-block
and gated-norm spellings, and look-alikes that must stay untouched) together with an execution
context (dtype, autocast, checkpointing, grad mode, dynamic shapes, frozen/tied/LoRA weights).
Each case is compiled with ``glu_fusion.backend`` and checked against eager on the same inputs,
outputs and every gradient, and against the rewrite report.

The budget is fixed and the draws are derandomised, so CI runs the same cases every time.
``GLU_FUZZ_EXAMPLES=<n>`` multiplies nothing but sets every test's example count, for longer local
runs (set ``GLU_FUZZ_SEED`` too, to draw other cases); a failure prints the :class:`Case` to
paste into ``test_fuzz_regressions.py``.
"""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers.fuzz_grammar import (ACTIVATIONS, DYNAMIC, GRAD_MODES, MATMUL_WEIGHTS, NORM_LOOKALIKES, PRODUCTS, PROJECTIONS,  # noqa: E402
                                  SOURCES, SWIGLU_LOOKALIKES, Case, norm_group, norm_spellings,
                                  run_case)

_EXAMPLES = os.environ.get("GLU_FUZZ_EXAMPLES")
_SEED = int(os.environ.get("GLU_FUZZ_SEED", "0"))


def budget(n: int):
    """Settings for one fuzz test: ``n`` derandomised examples, no deadline (compiling is slow),
    no shrinking (each step recompiles; failures print their whole case instead)."""
    return settings(max_examples=int(_EXAMPLES) if _EXAMPLES else n, deadline=None,
                    derandomize=not _SEED, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck), print_blob=False)


RUN = {"cases": 0, "seconds": 0.0, "families": {}}


def _run(case: Case) -> None:
    start = time.perf_counter()
    try:
        counts = run_case(case)
    except Exception as e:
        raise AssertionError(f"fuzz case failed: {case!r}") from e
    RUN["cases"] += 1
    RUN["seconds"] += time.perf_counter() - start
    for family, count in counts.items():
        RUN["families"][family] = RUN["families"].get(family, 0) + count


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Print how many cases ran and how long they took (shown even with output captured)."""
    yield
    line = (f"fuzz: {RUN['cases']} case(s) in {RUN['seconds']:.1f} s, "
            f"rewrites by family {dict(sorted(RUN['families'].items()))}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")


# --- strategies -----------------------------------------------------------------------------------

_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def _lead(draw, min_rows: int = 1):
    rows = draw(st.integers(min_rows, 17))
    if draw(st.booleans()):
        return (rows,)
    first = draw(st.sampled_from([d for d in range(max(min_rows, 1), rows + 1) if rows % d == 0]))
    return (first, rows // first)


@st.composite
def _context(draw, allow_autocast: bool):
    dynamic = draw(st.sampled_from(DYNAMIC))
    return dict(
        grad=draw(st.sampled_from(GRAD_MODES)),
        dynamic=dynamic,
        checkpointed=draw(st.booleans()),
        lead=draw(_lead(min_rows=2 if dynamic == "mark_dynamic" else 1)),
        autocast=allow_autocast and draw(st.integers(0, 3)) == 0,
        kernels=draw(st.integers(0, 2)) == 0,  # the interpreter is slow: a third of the cases
        seed=draw(st.integers(0, 2 ** 16)),
    )


@st.composite
def swiglu_cases(draw):
    kind = draw(st.sampled_from(["swiglu", "mlp_block"]))
    source = draw(st.sampled_from(SOURCES))
    weights = draw(st.sampled_from(
        ("plain", "modules", "frozen", "tied", "lora") if source == "separate" else ("plain", "frozen", "lora")))
    ctx = draw(_context(allow_autocast=True))
    dtype = torch.float32 if ctx["autocast"] else draw(_DTYPES)
    return Case(kind=kind, k=draw(st.integers(8, 48)), n=draw(st.integers(8, 48)), dtype=dtype,
                source=source, halves_up_first=draw(st.booleans()), act=draw(st.sampled_from(ACTIVATIONS)),
                product=draw(st.sampled_from(PRODUCTS)), up_first=draw(st.booleans()),
                bias=draw(st.booleans()), down_bias=kind == "mlp_block" and draw(st.booleans()),
                residual=kind == "mlp_block" and draw(st.booleans()), extra_user=draw(st.booleans()),
                weights=weights,
                projection=draw(st.sampled_from(PROJECTIONS)) if weights in MATMUL_WEIGHTS else "F.linear",
                **ctx)


@st.composite
def norm_cases(draw):
    spelling = draw(st.sampled_from(sorted(norm_spellings())))
    group = norm_group(spelling)
    k = group * draw(st.integers(max(1, -(-8 // group)), 48 // group))
    return Case(kind="rms_norm_gated", spelling=spelling, k=k, dtype=draw(_DTYPES),
                weights=draw(st.sampled_from(("plain", "frozen"))), **draw(_context(allow_autocast=False)))


@st.composite
def lookalike_cases(draw):
    names = sorted(SWIGLU_LOOKALIKES) + sorted(NORM_LOOKALIKES)
    spelling = draw(st.sampled_from(names))
    dtype = draw(_DTYPES)
    if spelling == "norm_in_low_precision" and dtype == torch.float32:
        dtype = torch.float16  # an fp32 norm written this way is the real thing
    weights = ("plain", "frozen") if spelling in NORM_LOOKALIKES else ("plain", "frozen", "modules")
    return Case(kind="lookalike", spelling=spelling, k=draw(st.integers(8, 48)), n=draw(st.integers(8, 48)),
                dtype=dtype, bias=draw(st.booleans()),
                weights=draw(st.sampled_from(weights)), **draw(_context(allow_autocast=False)))


# --- the fuzz tests -------------------------------------------------------------------------------

@seed(_SEED)
@budget(40)
@given(swiglu_cases())
def test_fuzz_swiglu_and_mlp_block(case):
    _run(case)


@seed(_SEED)
@budget(20)
@given(norm_cases())
def test_fuzz_gated_norm(case):
    _run(case)


@seed(_SEED)
@budget(20)
@given(lookalike_cases())
def test_fuzz_lookalikes_left_alone(case):
    _run(case)


# --- the oracle itself can fail -------------------------------------------------------------------

def test_oracle_rejects_an_error_above_the_dtype_tolerance():
    from helpers.fuzz_grammar import TOLERANCE, assert_close

    expected = torch.randn(64, dtype=torch.float64).float()
    for dtype, tol in TOLERANCE.items():
        scale = expected.abs().max().item()
        bump = torch.zeros_like(expected)
        bump[3] = 3 * tol * scale
        assert_close(expected + bump / 10, expected, dtype, "within")
        with pytest.raises(AssertionError):
            assert_close(expected + bump, expected, dtype, "beyond")


def test_oracle_fails_a_positive_case_the_pass_did_not_rewrite(monkeypatch):
    """With CPU rewriting left off, a SwiGLU that must be fused is reported as not rewritten."""
    import helpers.fuzz_grammar as grammar

    cuda_only = grammar.rewriting_cpu_graphs
    monkeypatch.setattr(grammar, "rewriting_cpu_graphs", lambda: cuda_only(devices=("cuda",)))
    with pytest.raises(AssertionError, match="not rewritten"):
        run_case(Case("swiglu", kernels=False))
