"""``python -m glu_fusion``: compile a model through the pass and show what it did.

    python -m glu_fusion                       the built-in Llama-style demo model
    python -m glu_fusion inspect PKG.MOD:FN    FN() returns (model, inputs), inputs a tuple of
                                               args, or a model with an example_inputs attribute

Both compile with ``glu_fusion.backend``, print the rewrite report, and check the output and every
parameter gradient against eager (exit status 1 on a mismatch).  On a GPU the demo also prints the
training-step time against ``torch.compile``'s default.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Optional, Sequence

import torch

from . import config, demo
from .compile.backend import backend
from .compile.report import REPORT

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _allow_cpu_if_needed(device: str) -> None:
    if device not in config.rewrite_devices:
        config.rewrite_devices = tuple(sorted({*config.rewrite_devices, device}))
        print(f"note: rewriting graphs on '{device}' for this run (GLU_FUSION_DEVICES default is 'cuda'); "
              "the fused ops run their plain-torch reference there, so expect no speed-up")


def _load_factory(spec: str):
    """``(model, inputs)`` from ``MODULE:FACTORY``; the factory returns that pair, or a model
    carrying ``example_inputs`` (a tuple, or a function returning one)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"inspect: expected MODULE:FACTORY, got {spec!r}")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    made = factory()
    if isinstance(made, torch.nn.Module) and hasattr(made, "example_inputs"):
        inputs = made.example_inputs
        made = (made, inputs() if callable(inputs) else inputs)
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise SystemExit(f"inspect: {spec}() must return (model, inputs) or a model with an "
                         f"example_inputs attribute, got {type(made).__name__}")
    model, inputs = made
    return model, (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))


def _device_of(model: torch.nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _run(model: torch.nn.Module, inputs: Sequence[Any], timing: bool) -> int:
    device = _device_of(model)
    _allow_cpu_if_needed(device)
    REPORT.reset()
    result = demo.check(model, inputs, backend)
    print(REPORT)
    status = "OK" if result.ok else "MISMATCH"
    print(f"compiled vs eager: output {result.output_error:.2e}, gradients {result.grad_error:.2e} "
          f"(worst: {result.worst_param}), tolerance {result.tolerance:.0e} -> {status}")
    share = 100 * REPORT.seconds / result.compile_seconds if result.compile_seconds else 0.0
    print(f"first forward+backward (compile + run): {result.compile_seconds:.2f} s, of which the pass "
          f"{1e3 * REPORT.seconds:.1f} ms ({share:.1f}%)")
    if timing and device == "cuda":
        ours = demo.time_train_step(model, inputs, backend)
        default = demo.time_train_step(model, inputs, "inductor")
        print(f"train step: glu_fusion {ours:.3f} ms, torch.compile default {default:.3f} ms "
              f"({default / ours:.2f}x)")
    elif timing:
        print("train step timing: needs a CUDA device (skipped)")
    return 0 if result.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glu_fusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="demo", choices=["demo", "inspect"])
    parser.add_argument("factory", nargs="?", help="MODULE:FACTORY for inspect")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="demo dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--layers", type=int, default=demo.DemoConfig.layers)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each rewrite as it happens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if args.command == "inspect":
        if not args.factory:
            parser.error("inspect needs MODULE:FACTORY")
        model, inputs = _load_factory(args.factory)
        return _run(model, inputs, timing=not args.no_timing)
    default_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    dtype = _DTYPES[args.dtype] if args.dtype else default_dtype
    cfg = demo.DemoConfig(layers=args.layers)
    model, inputs = demo.build(args.device, dtype, cfg)
    print(f"demo: Llama-style model, {cfg.layers} layers, dim {cfg.dim}, MLP hidden {cfg.hidden}, "
          f"tokens {cfg.batch}x{cfg.seq}, {str(dtype).replace('torch.', '')} on {args.device}")
    return _run(model, inputs, timing=not args.no_timing)


if __name__ == "__main__":
    sys.exit(main())
