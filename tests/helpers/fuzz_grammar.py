"""A grammar of small modules for differential testing of the compile pass.

A :class:`Case` names one module and how it is run: the family the pass should find in it (or
none, for a look-alike), the spelling of every piece (activation, product, operand order, how a
packed weight is cut), the weights (separate, ``nn.Linear`` modules, frozen, tied, LoRA-style),
and the execution context (dtype, autocast, checkpointing, grad mode, dynamic shapes).

:func:`run_case` compiles the module with ``glu_fusion.backend``, runs it and eager on the same
inputs, compares the outputs and every gradient (inputs and parameters) within a tolerance scaled
to the dtype, and checks the rewrite report: positive cases were rewritten into their family,
look-alikes were left alone.  The hypothesis strategies that draw cases live in the fuzz test
file; this module only builds and checks them, so a failing draw can be replayed as a plain
:class:`Case` in a regression test.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import glu_fusion

# --- the one place that touches glu_fusion's settings ---------------------------------------------


@contextlib.contextmanager
def rewriting_cpu_graphs(devices: tuple = ("cpu", "cuda")):
    """Let the pass rewrite CPU graphs (it rewrites CUDA graphs only by default), with Inductor's
    caches off: a cache hit skips the pass and the report would stay empty.  ``devices`` other
    than the default let a test switch CPU rewriting off."""
    import torch._functorch.config
    import torch._inductor.config

    saved = glu_fusion.config.rewrite_devices
    glu_fusion.config.rewrite_devices = tuple(devices)
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield
    finally:
        glu_fusion.config.rewrite_devices = saved


# --- what a case is -------------------------------------------------------------------------------

#: Report families a case of each kind may be rewritten into (the MLP block may be fused whole or
#: as its SwiGLU alone).
FAMILIES = {
    "swiglu": frozenset({"swiglu"}),
    "mlp_block": frozenset({"swiglu", "mlp_block"}),
    "rms_norm_gated": frozenset({"rms_norm_gated"}),
    "lookalike": frozenset(),
}

ACTIVATIONS = ("F.silu", "nn.SiLU", "g*sigmoid(g)", "sigmoid(g)*g", "g*g.sigmoid()")
PRODUCTS = ("*", "torch.mul", ".mul")
SOURCES = ("separate", "chunk", "split", "split_sizes", "unbind_view", "interleaved", "interleaved_unbind")
WEIGHTS = ("plain", "modules", "frozen", "tied", "lora")
#: How a bias-free projection by a stored weight is written (``W[K,N]``: the weight is stored
#: transposed and used as ``x @ W``); projections with a bias, ``nn.Linear`` modules and LoRA
#: weights keep ``F.linear``.
PROJECTIONS = ("F.linear", "x @ W.t()", "x @ W.T", "torch.matmul(x, W.mT)", "x @ W[K,N]")
#: The weight kinds a matmul projection is drawn for.
MATMUL_WEIGHTS = ("plain", "frozen", "tied")
GRAD_MODES = ("train", "no_grad", "inference_mode")
DYNAMIC = ("static", "dynamic", "mark_dynamic")

#: Largest elementwise difference allowed, as a fraction of the reference tensor's largest
#: magnitude, per dtype the computation actually runs in.  Eager rounds after each step of the
#: gate in fp16/bf16 while the op rounds once, so low precision gets percent-level slack.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

#: Whether the Triton kernels can run here through the interpreter (set at import by conftest when
#: there is no CUDA device); elsewhere CPU cases take the plain-torch reference path.
KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Case:
    """One module and the way it is run; see the module docstring."""

    kind: str                       # a key of FAMILIES
    k: int = 16                     # input width (the norm's width for rms_norm_gated)
    n: int = 24                     # SwiGLU width
    lead: tuple = (5,)              # leading dimensions of the input
    dtype: torch.dtype = torch.float32
    # SwiGLU / MLP block spelling
    source: str = "separate"        # two weights, or how one packed weight's output is cut
    halves_up_first: bool = False   # packed: the up half comes first
    act: str = "F.silu"
    product: str = "*"
    up_first: bool = False          # operand order of the product
    bias: bool = False
    down_bias: bool = False
    residual: bool = False          # mlp_block: x + down(h)
    extra_user: bool = False        # the SwiGLU output h also feeds a second output
    weights: str = "plain"
    projection: str = "F.linear"    # a key of PROJECTIONS, for bias-free projections
    # gated norm / look-alike spelling
    spelling: str = ""
    # execution context
    grad: str = "train"
    dynamic: str = "static"
    autocast: bool = False          # fp32 module run under torch.autocast("cpu", bfloat16)
    checkpointed: bool = False
    kernels: bool = True            # run the fused ops' Triton kernels (interpreted) where possible
    seed: int = 0

    @property
    def families(self) -> frozenset:
        return FAMILIES[self.kind]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.autocast else self.dtype

    @property
    def interpreted(self) -> bool:
        """Run the fused ops' Triton kernels through the interpreter, or else the plain-torch
        reference path (which still checks what the pass wired into the graph).
        The interpreter's bf16 ``tl.dot`` is wrong, so bf16 always takes the reference."""
        return self.kernels and KERNELS_INTERPRETED and self.compute_dtype != torch.bfloat16


# --- spellings ------------------------------------------------------------------------------------

def _halves(m: "FuzzModule", c: Case, x):
    """(gate, up) pre-activations, from two projections or one packed projection cut in two."""
    if c.source == "separate":
        return m.proj("g", x), m.proj("u", x)
    y = m.proj("p", x)
    n = c.n
    if c.source == "chunk":
        a, b = y.chunk(2, dim=-1)
    elif c.source == "split":
        a, b = y.split(n, dim=-1)
    elif c.source == "split_sizes":
        a, b = torch.split(y, [n, n], dim=-1)
    elif c.source == "unbind_view":
        a, b = y.view(*y.shape[:-1], 2, n).unbind(-2)
    elif c.source == "interleaved":
        a, b = y[..., ::2], y[..., 1::2]
    elif c.source == "interleaved_unbind":
        a, b = y.unflatten(-1, (n, 2)).unbind(-1)
    else:
        raise ValueError(c.source)
    return (b, a) if c.halves_up_first else (a, b)


def _activate(m: "FuzzModule", c: Case, g):
    if c.act == "F.silu":
        return F.silu(g)
    if c.act == "nn.SiLU":
        return m.act(g)
    if c.act == "g*sigmoid(g)":
        return g * torch.sigmoid(g)
    if c.act == "sigmoid(g)*g":
        return torch.sigmoid(g) * g
    if c.act == "g*g.sigmoid()":
        return g * g.sigmoid()
    raise ValueError(c.act)


def _multiply(c: Case, a, b):
    if c.up_first:
        a, b = b, a
    if c.product == "*":
        return a * b
    if c.product == "torch.mul":
        return torch.mul(a, b)
    if c.product == ".mul":
        return a.mul(b)
    raise ValueError(c.product)


def swiglu_body(m: "FuzzModule", c: Case, x):
    g, u = _halves(m, c, x)
    return _multiply(c, _activate(m, c, g), u)


# Look-alikes: ``fn(m, c, x)`` with two projections g/u or one packed projection p (2N rows).

def _geglu(m, c, x):
    return F.gelu(m.proj("g", x)) * m.proj("u", x)


def _geglu_tanh(m, c, x):
    return F.gelu(m.proj("g", x), approximate="tanh") * m.proj("u", x)


def _sigmoid_glu(m, c, x):
    return torch.sigmoid(m.proj("g", x)) * m.proj("u", x)


def _scaled_sigmoid_gate(m, c, x):
    g = m.proj("g", x)
    return g * torch.sigmoid(1.702 * g) * m.proj("u", x)


def _gpt_oss_gate(m, c, x, limit=7.0, alpha=1.702):
    y = m.proj("p", x)
    g, u = y[..., ::2], y[..., 1::2]
    g = g.clamp(min=None, max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def _unequal_split(m, c, x):
    g, u = m.proj("p", x).split([1, 2 * c.n - 1], dim=-1)  # [..., 1] broadcasts against the rest
    return F.silu(g) * u


def _shifted_halves(m, c, x):
    y = m.proj("p", x)  # equal widths, but not the two halves: columns 0..N-2 and N+1..2N-1
    return F.silu(y[..., : c.n - 1]) * y[..., c.n + 1:]


def _strided_halves(m, c, x):
    y = m.proj("p", x)  # every other column of the first half against the second half's
    return F.silu(y[..., : c.n : 2]) * y[..., c.n :: 2]


def _gate_has_other_user(m, c, x):
    g = m.proj("g", x)
    return F.silu(g) * m.proj("u", x) + g


def _up_has_other_user(m, c, x):
    u = m.proj("u", x)
    return F.silu(m.proj("g", x)) * u - 0.5 * u


def _activation_has_other_user(m, c, x):
    a = F.silu(m.proj("g", x))
    return a * m.proj("u", x), a.sum()


def _packed_output_has_other_user(m, c, x):
    y = m.proj("p", x)
    g, u = y.chunk(2, dim=-1)
    return F.silu(g) * u, y


def _silu_times_gate(m, c, x):
    g = m.proj("g", x)
    return F.silu(g) * g


def _different_inputs(m, c, x):
    return F.silu(m.proj("g", x)) * m.proj("u", 2.0 * x)


EPS = 1e-5


def _l2_gate(m, c, x, z):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + EPS) * m.w_n * F.silu(z.float())).to(x.dtype)


def _plain_rms_plus_z(m, c, x, z):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * m.w_n).to(x.dtype) + z


def _norm_intermediate_returned(m, c, x, z):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (normed * m.w_n * F.silu(z.float())).to(x.dtype), normed


def _gelu_gated_norm(m, c, x, z):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * m.w_n * F.gelu(z.float())).to(x.dtype)


def _norm_in_low_precision(m, c, x, z):
    """Only a look-alike below fp32 (in fp32 it is a genuine gated norm)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * m.w_n * F.silu(z)


#: Look-alike SwiGLUs: name -> (fn, needs a packed weight).
SWIGLU_LOOKALIKES: dict[str, tuple[Callable, bool]] = {
    "geglu": (_geglu, False), "geglu_tanh": (_geglu_tanh, False), "sigmoid_glu": (_sigmoid_glu, False),
    "scaled_sigmoid_gate": (_scaled_sigmoid_gate, False), "gpt_oss_gate": (_gpt_oss_gate, True),
    "unequal_split": (_unequal_split, True), "shifted_halves": (_shifted_halves, True),
    "strided_halves": (_strided_halves, True), "gate_has_other_user": (_gate_has_other_user, False),
    "up_has_other_user": (_up_has_other_user, False),
    "activation_has_other_user": (_activation_has_other_user, False),
    "packed_output_has_other_user": (_packed_output_has_other_user, True),
    "silu_times_gate": (_silu_times_gate, False), "different_inputs": (_different_inputs, False),
}

#: Look-alike gated norms: name -> fn(m, c, x, z).
NORM_LOOKALIKES: dict[str, Callable] = {
    "l2_gate": _l2_gate, "plain_rms_plus_z": _plain_rms_plus_z,
    "norm_intermediate_returned": _norm_intermediate_returned, "gelu_gated_norm": _gelu_gated_norm,
    "norm_in_low_precision": _norm_in_low_precision,
}


def grouped_gated_norm(group: int, norm_before_gate: bool):
    """The Mamba-2 gated norm over groups of ``group`` columns, all in fp32."""
    def fn(x, z, w, eps):
        dtype = x.dtype
        xf, zf = x.float(), z.float()
        if not norm_before_gate:
            xf = xf * F.silu(zf)
        xg = xf.view(*xf.shape[:-1], -1, group)
        y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).view(xf.shape) * w.float()
        if norm_before_gate:
            y = y * F.silu(zf)
        return y.to(dtype)
    return fn


def norm_spellings() -> dict[str, Callable]:
    """Gated-norm spellings the pass matches: fn(x, z, w, eps).  The ungrouped ones are the real
    model spellings of the op tests; grouped ones are named ``grouped<G>_<order>``."""
    from helpers.norm_cases import SPELLINGS

    table = {s.name: s.fn for s in SPELLINGS if s.group is None}
    for group in (4, 8, 16):
        table[f"grouped{group}_gate_first"] = grouped_gated_norm(group, norm_before_gate=False)
        table[f"grouped{group}_norm_first"] = grouped_gated_norm(group, norm_before_gate=True)
    return table


def norm_group(spelling: str) -> int:
    return int(spelling[len("grouped"):].split("_")[0]) if spelling.startswith("grouped") else 1


# --- the module -----------------------------------------------------------------------------------

class FuzzModule(nn.Module):
    """The weights one case needs and its forward spelling."""

    def __init__(self, c: Case) -> None:
        super().__init__()
        self.case = c
        self.act = nn.SiLU()
        gen = torch.Generator().manual_seed(c.seed)

        def param(*shape, scale=1.0, shift=0.0):
            return nn.Parameter(scale * torch.randn(*shape, generator=gen) + shift)

        k, n = c.k, c.n
        if self._is_norm():
            self.w_n = param(k, scale=0.2, shift=1.0)
            if c.kind == "rms_norm_gated":
                self.norm_fn = norm_spellings()[c.spelling]
        else:
            packed = c.source != "separate" or (c.kind == "lookalike" and SWIGLU_LOOKALIKES[c.spelling][1])
            shapes = {"p": (2 * n, k)} if packed else {"g": (n, k), "u": (n, k)}
            if c.kind == "mlp_block":
                shapes["d"] = (k, n)
            for name, (rows, cols) in shapes.items():
                has_bias = c.down_bias if name == "d" else c.bias
                if c.weights == "modules":
                    lin = nn.Linear(cols, rows, bias=has_bias)
                    with torch.no_grad():
                        lin.weight.copy_(torch.randn(rows, cols, generator=gen) / math.sqrt(cols))
                        if has_bias:
                            lin.bias.copy_(0.1 * torch.randn(rows, generator=gen))
                    setattr(self, f"proj_{name}", lin)
                    continue
                if c.weights == "tied" and name == "u":
                    self.w_u = self.w_g  # one Parameter under two names
                elif c.projection == "x @ W[K,N]" and not has_bias:
                    setattr(self, f"w_{name}", param(cols, rows, scale=1 / math.sqrt(cols)))
                else:
                    setattr(self, f"w_{name}", param(rows, cols, scale=1 / math.sqrt(cols)))
                if has_bias:
                    setattr(self, f"bias_{name}", param(rows, scale=0.1))
                if c.weights == "lora":
                    getattr(self, f"w_{name}").requires_grad_(False)  # the frozen base weight
                    setattr(self, f"lora_a_{name}", param(rows, 2, scale=0.3))
                    setattr(self, f"lora_b_{name}", param(2, cols, scale=0.3 / math.sqrt(cols)))
        if c.weights == "frozen":
            self.requires_grad_(False)

    def _is_norm(self) -> bool:
        return self.case.kind == "rms_norm_gated" or self.case.spelling in NORM_LOOKALIKES

    def weight(self, name: str):
        w = getattr(self, f"w_{name}")
        if self.case.weights == "lora":
            w = w + getattr(self, f"lora_a_{name}") @ getattr(self, f"lora_b_{name}")
        return w

    def proj(self, name: str, x):
        if self.case.weights == "modules":
            return getattr(self, f"proj_{name}")(x)
        bias = getattr(self, f"bias_{name}", None)
        spelling = self.case.projection
        if bias is not None or spelling == "F.linear":
            return F.linear(x, self.weight(name), bias)
        w = self.weight(name)
        if spelling == "x @ W.t()":
            return x @ w.t()
        if spelling == "x @ W.T":
            return x @ w.T
        if spelling == "torch.matmul(x, W.mT)":
            return torch.matmul(x, w.mT)
        if spelling == "x @ W[K,N]":
            return x @ w
        raise ValueError(spelling)

    def body(self, *inputs):
        c = self.case
        if c.kind == "rms_norm_gated":
            x, z = inputs
            return self.norm_fn(x, z, self.w_n, EPS)
        if c.kind == "lookalike":
            if c.spelling in NORM_LOOKALIKES:
                return NORM_LOOKALIKES[c.spelling](self, c, *inputs)
            return SWIGLU_LOOKALIKES[c.spelling][0](self, c, *inputs)
        (x,) = inputs
        h = swiglu_body(self, c, x)
        out = self.proj("d", h) if c.kind == "mlp_block" else h
        if c.residual:
            out = x + out
        return (out, h.square().mean(-1)) if c.extra_user else out

    def forward(self, *inputs):
        if self.case.checkpointed:
            return checkpoint(self.body, *inputs, use_reentrant=False)
        return self.body(*inputs)


def make_inputs(c: Case, lead: Optional[Sequence[int]] = None, seed: int = 1) -> list:
    """The case's inputs: ``x`` (and the gate ``z`` for norms), fresh random values."""
    gen = torch.Generator().manual_seed(c.seed * 7919 + seed)
    lead = tuple(lead if lead is not None else c.lead)
    n_inputs = 2 if (c.kind == "rms_norm_gated" or c.spelling in NORM_LOOKALIKES) else 1
    out = [torch.randn(*lead, c.k, generator=gen).to(c.dtype)]
    if n_inputs == 2:
        out.append((2 * torch.randn(*lead, c.k, generator=gen)).to(c.dtype))
    return out


def build(c: Case) -> FuzzModule:
    module = FuzzModule(c)
    return module.to(c.dtype)


# --- the oracle -----------------------------------------------------------------------------------

def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` within the dtype's tolerance of ``expected``, relative to its largest magnitude."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, \
        f"{what}: {got.shape} {got.dtype} vs {expected.shape} {expected.dtype}"
    tol = TOLERANCE[dtype]
    scale = max(expected.detach().double().abs().max().item() if expected.numel() else 0.0, 1e-3)
    torch.testing.assert_close(got.detach(), expected.detach(), atol=tol * scale, rtol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _grad_mode(c: Case):
    if c.grad == "no_grad":
        return torch.no_grad()
    if c.grad == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


def _autocast(c: Case):
    return torch.autocast("cpu", dtype=torch.bfloat16) if c.autocast else contextlib.nullcontext()


def _leaves(module: nn.Module, inputs: list) -> tuple[list, list]:
    names = [f"input{i}" for i, t in enumerate(inputs) if t.requires_grad]
    tensors = [t for t in inputs if t.requires_grad]
    for name, p in module.named_parameters():
        if p.requires_grad:
            names.append(name)
            tensors.append(p)
    return names, tensors


def known_missed_rewrite(c: Case) -> Optional[str]:
    """Why the pass is known to leave this positive case alone (results stay right), or None.
    Each reason has a strict-xfail test in ``test_fuzz_regressions.py`` that fails once fixed."""
    return None


def run_case(c: Case) -> dict:
    """Compile ``c`` with the backend, check it against eager and check the report.

    Returns the report's counts.  Raises AssertionError on any mismatch."""
    torch._dynamo.reset()
    report = glu_fusion.report()
    report.reset()
    eager = build(c)
    compiled_module = copy.deepcopy(eager)
    train = c.grad == "train"
    base = make_inputs(c)
    eager_in = [t.clone().requires_grad_(train) for t in base]
    comp_in = [t.clone().requires_grad_(train) for t in base]
    if c.dynamic == "mark_dynamic":
        for t in comp_in:
            torch._dynamo.mark_dynamic(t, 0)
    compiled = torch.compile(compiled_module, backend=glu_fusion.backend,
                             dynamic=True if c.dynamic == "dynamic" else None)
    dtype = c.compute_dtype
    with rewriting_cpu_graphs(), _env("TRITON_INTERPRET", "1" if c.interpreted else "0"):
        with _grad_mode(c), _autocast(c):
            expected = _flat(eager(*eager_in))
            got = _flat(compiled(*comp_in))
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, dtype, f"output {i}")
        if train:
            gen = torch.Generator().manual_seed(c.seed + 3)
            cot = [torch.randn(e.shape, generator=gen).to(e.dtype) for e in expected]
            names, leaves_e = _leaves(eager, eager_in)
            _, leaves_c = _leaves(compiled_module, comp_in)
            if leaves_e:
                ge = torch.autograd.grad(expected, leaves_e, cot, allow_unused=True)
                gc = torch.autograd.grad(got, leaves_c, cot, allow_unused=True)
                for name, a, b in zip(names, gc, ge):
                    assert (a is None) == (b is None), f"grad {name}: {a is None} vs {b is None}"
                    if a is not None:
                        assert_close(a, b, dtype, f"grad {name}")
        if c.dynamic != "static":
            # a second batch size runs through the same symbolic graph
            lead2 = (c.lead[0] + 3,) + tuple(c.lead[1:])
            more = make_inputs(c, lead2, seed=2)
            with _grad_mode(c), _autocast(c):  # same grad mode: no recompile
                expected2 = _flat(eager(*more))
                got2 = _flat(compiled(*more))
            for i, (a, b) in enumerate(zip(got2, expected2)):
                assert_close(a, b, dtype, f"second-shape output {i}")
    counts = report.counts()
    assert report.graphs, "the pass never ran"
    unexpected = set(counts) - set(c.families)
    assert not unexpected, f"rewritten into {counts}, expected only {sorted(c.families)}"
    if c.families and not known_missed_rewrite(c):
        assert sum(counts.get(f, 0) for f in c.families) >= 1, f"not rewritten: {counts}"
        for g in report.graphs:
            assert sum(g.counts().get(f, 0) for f in c.families) <= 1, f"one site rewritten twice: {g}"
    return counts
