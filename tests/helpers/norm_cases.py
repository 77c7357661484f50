"""Shared helpers for the gated RMSNorm tests: inputs, a float64 oracle, real eager spellings.

The spellings are the forms real models write; each comes with the op flags that reproduce it.
The modules at the end hold a gated norm inside the model code around it (Mamba-2's mixer, a
packed ``[x | z]`` projection, groups formed by ``einops``), for the pattern tests to compile whole.
"""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from glu_fusion import reference
from glu_fusion.functional import rms_norm_gated as rms_norm_gated_api

# Relative-error bounds (norm of the difference over the norm of the float64 result).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def all_flag_sets() -> list:
    """Every combination of the op's semantic flags (weight given as a mode)."""
    out = []
    for nbg, act, group, wmode, downcast, gate_low in itertools.product(
            (True, False), ("silu", "sigmoid"), (None, 16), ("none", "plain", "offset"),
            ("none", "before_weight", "after_weight"), (False, True)):
        out.append(dict(norm_before_gate=nbg, activation=act, group_size=group, wmode=wmode,
                        downcast=downcast, gate_in_input_dtype=gate_low))
    return out


def flag_id(flags: dict) -> str:
    return "-".join(f"{v}" for v in flags.values())


def make_inputs(lead: tuple, d: int, dtype: torch.dtype, wmode: str = "plain",
                device: str = "cpu", weight_dtype: Optional[torch.dtype] = None):
    """x, z (requiring grad), weight or None, and weight_offset for a weight mode."""
    x = torch.randn(*lead, d, device=device).to(dtype).requires_grad_()
    z = (2 * torch.randn(*lead, d, device=device)).to(dtype).requires_grad_()
    if wmode == "none":
        return x, z, None, 0.0
    base = 0.1 if wmode == "offset" else 1.0
    w = (base * torch.randn(d, device=device) + (0.0 if wmode == "offset" else 1.0))
    return x, z, w.to(weight_dtype or dtype).requires_grad_(), (1.0 if wmode == "offset" else 0.0)


def op_kwargs(flags: dict, offset: float) -> dict:
    kw = {k: v for k, v in flags.items() if k != "wmode"}
    kw["weight_offset"] = offset
    return kw


def float64_oracle(x, z, w, kw: dict, dy: torch.Tensor):
    """The reference on float64 copies, differentiated by autograd: (y, [dx, dz, dw])."""
    leaves = [t.detach().double().requires_grad_() for t in (x, z) + ((w,) if w is not None else ())]
    xs, zs = leaves[0], leaves[1]
    ws = leaves[2] if w is not None else None
    y, _ = reference.rms_norm_gated(xs, zs, ws, EPS, **kw)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y, list(grads)


def check_against_float64(x, z, w, kw: dict, tol: float, run: Callable = rms_norm_gated_api) -> None:
    """Forward and every gradient within ``tol`` of the float64 reference."""
    y = run(x, z, w, EPS, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    leaves = [x, z] + ([w] if w is not None else [])
    grads = torch.autograd.grad(y, leaves, dy)
    y64, g64 = float64_oracle(x, z, w, kw, dy)
    errs = [rel_error(y, y64)] + [rel_error(a, b) for a, b in zip(grads, g64)]
    assert all(e < tol for e in errs), f"errors (y, dx, dz, dw) {errs} above {tol}"
    for g, leaf in zip(grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the last place (spacing) of b's dtype at each element of b."""
    finfo = torch.finfo(b.dtype)
    _, exponent = torch.frexp(b.double().abs().clamp_min(finfo.tiny))
    spacing = torch.ldexp(torch.full_like(b, finfo.eps, dtype=torch.float64), exponent - 1)
    return ((a.double() - b.double()).abs() / spacing).max().item() if b.numel() else 0.0


# --- eager spellings of real models ---------------------------------------------------------------

class Spelling(NamedTuple):
    name: str
    fn: Callable            # fn(x, z, w, eps) -> y
    kwargs: dict            # op flags that reproduce it (weight_offset included)
    group: Optional[int] = None


def hf_qwen3_next(x, z, w, eps):
    """HF Qwen3-Next: fp32 norm, downcast, weight in the input dtype, fp32 silu gate."""
    dt = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    h = w * h.to(dt)
    h = h * F.silu(z.to(torch.float32))
    return h.to(dt)


def fp32_weight_gate(x, z, w, eps):
    """FLA / torchtitan style: everything in fp32, one downcast at the end."""
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps) * w.float()
    return (y * F.silu(z.float())).to(x.dtype)


def rms_norm_fn_then_silu(x, z, w, eps):
    """``F.rms_norm`` followed by the gate product in the input dtype."""
    return F.rms_norm(x, (x.shape[-1],), w, eps) * F.silu(z)


def llama_module_then_silu(x, z, w, eps):
    """A Llama-style RMSNorm module, then ``* F.silu(z)`` in the input dtype."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return (w * h.to(dt)) * F.silu(z)


def llama_module_then_fp32_silu(x, z, w, eps):
    """A Llama-style RMSNorm module, then the gate computed in fp32 and cast back first."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt) * F.silu(z.float()).to(dt)


def gated_before_norm_hf(x, z, w, eps):
    """HF Mamba-2 / Bamba / FalconH1 gated norm: gate first (fp32), weight after the downcast."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * F.silu(z.to(torch.float32))
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dt)


def mamba2_grouped(group):
    def fn(x, z, w, eps):
        """Mamba-2 reference, grouped, gate before norm, all fp32."""
        xf = x.float() * F.silu(z.float())
        xg = xf.view(*xf.shape[:-1], -1, group)
        y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).view(xf.shape) * w.float()
        return y.to(x.dtype)
    return fn


def offset_sigmoid(x, z, w, eps):
    """Gemma-style ``(1 + w)`` in fp32 with a sigmoid output gate."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
    return (y * torch.sigmoid(z.float())).to(x.dtype)


def _kw(**kw):
    base = dict(norm_before_gate=True, activation="silu", group_size=None, weight_offset=0.0,
                downcast="none", gate_in_input_dtype=False)
    base.update(kw)
    return base


SPELLINGS = [
    Spelling("hf_qwen3_next", hf_qwen3_next, _kw(downcast="before_weight")),
    Spelling("fp32_weight_gate", fp32_weight_gate, _kw()),
    Spelling("rms_norm_fn_then_silu", rms_norm_fn_then_silu,
             _kw(downcast="after_weight", gate_in_input_dtype=True)),
    Spelling("llama_module_then_silu", llama_module_then_silu,
             _kw(downcast="before_weight", gate_in_input_dtype=True)),
    Spelling("llama_module_then_fp32_silu", llama_module_then_fp32_silu,
             _kw(downcast="before_weight", gate_in_input_dtype=True)),
    Spelling("gated_before_norm_hf", gated_before_norm_hf,
             _kw(norm_before_gate=False, downcast="before_weight")),
    Spelling("mamba2_grouped", mamba2_grouped(16), _kw(norm_before_gate=False, group_size=16), 16),
    Spelling("offset_sigmoid", offset_sigmoid, _kw(activation="sigmoid", weight_offset=1.0)),
]


# --- gated norms inside model code ----------------------------------------------------------------
#
# Each module computes its norm in ``self.upcast``: fp32, as the models write it.  A float64 copy
# with ``upcast`` set to float64 (see ``set_upcast``) is the module's float64 oracle.

def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.float()`` as the models write it; ``t.to(dtype)`` in a float64 oracle."""
    return t.float() if dtype == torch.float32 else t.to(dtype)


def set_upcast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every submodule with an ``upcast`` compute its norm in ``dtype``."""
    for module in model.modules():
        if hasattr(module, "upcast"):
            module.upcast = dtype
    return model


class GroupedRMSNormGated(nn.Module):
    """HF's grouped ``MambaRMSNormGated`` (Zamba2, Bamba, NemotronH): the gate applied in fp32
    before the norm, groups of ``group_size`` columns by ``view``, then
    ``weight * h.to(input_dtype)``.

    ``gate`` names the look-alikes the tests put in the gate's place: ``"gelu"``;
    ``"silu_rounded"``, ``silu(gate.float())`` rounded back to the gate's dtype; ``"silu_low"``,
    ``silu(gate)`` in the gate's dtype."""

    def __init__(self, hidden_size: int = 64, group_size: int = 16, eps: float = 1e-6, gate: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden_size))
        self.variance_epsilon, self.group_size, self.gate = eps, group_size, gate
        self.upcast = torch.float32

    def _act(self, gate):
        if self.gate == "silu_low":
            return F.silu(gate)
        act = F.gelu if self.gate == "gelu" else F.silu
        out = act(gate.to(self.upcast))
        return out.to(gate.dtype) if self.gate == "silu_rounded" else out

    def forward(self, hidden_states, gate):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.upcast)
        hidden_states = hidden_states * self._act(gate)
        *prefix_dims, last_dim = hidden_states.shape
        group_count = last_dim // self.group_size
        hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)
        variance = hidden_states_group.pow(2).mean(-1, keepdim=True)
        hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)
        return self.weight * hidden_states.to(input_dtype)


class Mamba2MixerNorm(nn.Module):
    """HF ``Mamba2Mixer.torch_forward`` (the path Dynamo traces) around its gated norm.

    The input projection is split into the gate and the SSM branch; the scan upcasts its inputs,
    so its output is fp32 (here the skip term ``D * x`` stands for the scan); then
    ``self.norm(y, gate)`` and ``out_proj(y.to(dtype))``.  In a bf16 model the norm gets an fp32
    x, a bf16 gate and a bf16 weight, and returns fp32.  Several heads share a norm group, as in
    the models (a group of one head would make the norm blind to that head's ``D``)."""

    def __init__(self, d_model: int = 32, d_inner: int = 64, heads: int = 8, group_size: int = 16,
                 gate: str = "silu"):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.D = nn.Parameter(1 + 0.1 * torch.randn(heads))
        self.norm = GroupedRMSNormGated(d_inner, group_size, gate=gate)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.d_inner, self.heads = d_inner, heads

    def forward(self, hidden_states):
        batch_size, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        projected_states = self.in_proj(hidden_states)
        gate, hidden_states = projected_states.split([self.d_inner, self.d_inner], dim=-1)
        hidden_states = upcast(hidden_states.reshape(batch_size, seq_len, self.heads, -1), self.norm.upcast)
        y = (self.D[..., None] * hidden_states).reshape(batch_size, seq_len, -1)
        scan_output = self.norm(y, gate)
        return self.out_proj(scan_output.to(dtype))


def rearrange_like(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """``einops.rearrange`` for the four patterns of these tests, written as Dynamo records
    einops' torch backend: one ``reshape`` with the sizes as a list, and a ``permute`` where
    axes move (einops is optional; with it installed a test checks the graphs are the same)."""
    if pattern in ("... (g d) -> ... g d", "... (d g) -> ... g d"):
        *lead, width = x.shape
        groups, d = (width // sizes["d"], sizes["d"]) if "d" in sizes else (sizes["g"], width // sizes["g"])
        if pattern.startswith("... (g d)"):
            return x.reshape([*lead, groups, d])
        n = len(lead)
        return x.reshape([*lead, d, groups]).permute([*range(n), n + 1, n])
    *lead, groups, d = x.shape
    n = len(lead)
    if pattern == "... g d -> ... (g d)":
        return x.reshape([*lead, groups * d])
    if pattern == "... g d -> ... (d g)":
        width = d * groups
        return x.permute([*range(n), n + 1, n]).reshape([*lead, width])
    raise ValueError(f"rearrange_like does not spell {pattern!r}")


GROUPS_SPLIT, GROUPS_MERGE = "... (g d) -> ... g d", "... g d -> ... (g d)"


class GroupCountGatedNorm(nn.Module):
    """mamba_ssm's gated norm reference (``rms_norm_ref`` with ``upcast``: gate before the norm,
    ``1 / sqrt``, the fp32 weight after the merge, one downcast) with its groups given by their
    count: ``rearrange(x, "... (g d) -> ... g d", g=G)`` and ``rearrange(y, "... g d -> ...
    (g d)")``.  ``rearrange``: ``einops.rearrange`` or :func:`rearrange_like`; ``split`` and
    ``merge``: the patterns (look-alikes pass interleaved ones)."""

    def __init__(self, d: int = 64, groups: int = 4, eps: float = 1e-5, rearrange=rearrange_like,
                 split: str = GROUPS_SPLIT, merge: str = GROUPS_MERGE):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.groups, self.eps, self.rearrange, self.split, self.merge = groups, eps, rearrange, split, merge
        self.upcast = torch.float32

    def forward(self, x, z):
        dtype = x.dtype
        weight = upcast(self.weight, self.upcast)
        x, z = upcast(x, self.upcast), upcast(z, self.upcast)
        x = x * F.silu(z)
        x_group = self.rearrange(x, self.split, g=self.groups)
        rstd = 1 / torch.sqrt(x_group.square().mean(dim=-1, keepdim=True) + self.eps)
        out = self.rearrange(x_group * rstd, self.merge) * weight
        return out.to(dtype)


class PackedGateProjection(nn.Module):
    """One projection packs ``[x | z]``; the code splits it and gives the halves, non-contiguous
    views of one tensor, to a gated norm module (``norm(x, z)``).

    ``how``: ``"split"`` (``split([d, d], -1)``), ``"chunk"`` (``chunk(2, -1)``), ``"slice"``
    (``[..., :d]`` and ``[..., d:]``), or the look-alike ``"row_gate"``: ``split([d, 1], -1)``,
    one gate value per row broadcast over it.  ``gate_first``: the gate half comes first."""

    def __init__(self, norm: nn.Module, d_model: int = 32, d: int = 64, how: str = "chunk",
                 gate_first: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d + (1 if how == "row_gate" else d), bias=False)
        self.norm, self.d, self.how, self.gate_first = norm, d, how, gate_first

    def _halves(self, xz):
        d = self.d
        if self.how == "row_gate":
            return xz.split([d, 1], dim=-1)
        if self.how == "split":
            return xz.split([d, d], dim=-1)
        if self.how == "slice":
            return xz[..., :d], xz[..., d:]
        return xz.chunk(2, dim=-1)

    def forward(self, u):
        a, b = self._halves(self.in_proj(u))
        x, z = (b, a) if self.gate_first and self.how != "row_gate" else (a, b)
        return self.norm(x, z)
