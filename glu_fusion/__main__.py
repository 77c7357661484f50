"""``python -m glu_fusion``: compile a model through the pass and show what it did.

``demo`` (the default) builds the Llama-style model of ``glu_fusion.demo``; ``inspect MOD:FACTORY``
loads the user's.  The command-line help is ``_DESCRIPTION`` (plain text, no markup).  Every
usage error is one line on stderr with exit status 2 (:class:`UsageError`), as argparse's own.
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


class UsageError(Exception):
    """A command-line mistake: reported as one line with exit status 2, never a traceback."""


def _cpu_path(dtype: torch.dtype) -> str:
    """What the fused ops run on a CPU graph, as ``ops.dispatch`` decides it."""
    from .ops.dispatch import interpreter_active
    if not interpreter_active():
        return "the fused ops run their plain-torch reference there"
    if dtype == torch.bfloat16:
        return ("the fused ops run Triton's interpreter there, except the GEMM ops, which take the "
                "plain-torch reference in bf16")
    return "the fused ops run Triton's interpreter there"


def _allow_cpu_if_needed(device: str, dtype: torch.dtype) -> None:
    if device not in config.rewrite_devices:
        config.rewrite_devices = tuple(sorted({*config.rewrite_devices, device}))
        print(f"note: rewriting graphs on '{device}' for this run (GLU_FUSION_DEVICES default is 'cuda'); "
              f"{_cpu_path(dtype)}, so expect no speed-up")


def _find_factory(spec: str):
    """The callable that ``MODULE:FACTORY`` names (``FACTORY`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"inspect: expected MODULE:FACTORY, got {spec!r}")
    try:
        found = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # the module exists but fails to import something: its own traceback helps
        raise UsageError(f"inspect: no module named {err.name!r} (from {spec!r}); is it on "
                         f"PYTHONPATH or in the current directory?") from None
    for part in attr.split("."):
        if not hasattr(found, part):
            raise UsageError(f"inspect: {module_name} has no attribute {attr!r} (from {spec!r})")
        found = getattr(found, part)
    if not callable(found):
        raise UsageError(f"inspect: {spec} is a {type(found).__name__}, not a callable factory")
    return found


def _load_factory(spec: str):
    """``(model, inputs)`` from ``MODULE:FACTORY``; the factory returns that pair, or a model
    carrying ``example_inputs`` (a tuple, or a function returning one)."""
    made = _find_factory(spec)()
    if isinstance(made, torch.nn.Module) and hasattr(made, "example_inputs"):
        inputs = made.example_inputs
        made = (made, inputs() if callable(inputs) else inputs)
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise UsageError(f"inspect: {spec}() must return (model, inputs) or a model with an "
                         f"example_inputs attribute, got {type(made).__name__}")
    model, inputs = made
    return model, (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))


def _device_of(model: torch.nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _show_every_site(device: str) -> None:
    """The demo shows our path on every MLP: on CUDA the routing table would otherwise leave a
    training graph to Inductor, where our path measured no faster (patterns/routing.py)."""
    from .patterns import routing
    if device == "cuda" and routing.ROUTE_BY_MEASUREMENT:
        print("note: by default the pass leaves CUDA training graphs to Inductor (measured no faster; "
              "see patterns/routing.py); this run rewrites every site to show and time our path")
        routing.ROUTE_BY_MEASUREMENT = False


def _run(model: torch.nn.Module, inputs: Sequence[Any], timing: bool) -> int:
    device = _device_of(model)
    _allow_cpu_if_needed(device, _dtype_of(model))
    _show_every_site(device)
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


_DESCRIPTION = """\
Compile a model through the glu_fusion pass and show what it did.

commands:
  demo                 (default) the built-in Llama-style demo model
  inspect MOD:FACTORY  your model: FACTORY() returns (model, inputs), inputs a tuple of args,
                       or a model with an example_inputs attribute

Both compile with glu_fusion.backend, print the rewrite report, and check the output and every
parameter gradient against eager (exit status 1 on a mismatch). On a GPU the demo also prints
the training-step time against torch.compile's default. --device, --dtype and --layers are
the demo's; inspect refuses them (your factory decides). Usage errors exit with status 2. Run
"python -m glu_fusion inspect -h" for inspect's own options.
"""


def _add_options(parser: argparse.ArgumentParser, demo_options: bool, default: Any) -> None:
    """The options; ``default`` is ``argparse.SUPPRESS`` in the subcommands, so an option given
    before the subcommand keeps its value."""
    def value(v):
        return v if default is None else default

    if demo_options:  # None: not given (inspect refuses them; the demo fills in its defaults)
        parser.add_argument("--device", choices=["cpu", "cuda"], default=value(None),
                            help="where the demo model runs (default: cuda when available, else cpu)")
        parser.add_argument("--dtype", default=value(None), choices=sorted(_DTYPES),
                            help="demo dtype (default: bfloat16 on CUDA, float32 on CPU)")
        parser.add_argument("--layers", type=int, default=value(None),
                            help=f"transformer blocks in the demo model (default: {demo.DemoConfig.layers})")
    parser.add_argument("--no-timing", action="store_true", default=value(False),
                        help="skip the training-step timing (CUDA only)")
    parser.add_argument("-v", "--verbose", action="store_true", default=value(False),
                        help="log each rewrite as it happens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glu_fusion", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(parser, demo_options=True, default=None)
    commands = parser.add_subparsers(dest="command", metavar="{demo,inspect}")
    demo_parser = commands.add_parser("demo", help="compile the built-in Llama-style demo model",
                                      description="Compile the built-in Llama-style demo model through "
                                                  "the pass, print the report and check it against eager.")
    _add_options(demo_parser, demo_options=True, default=argparse.SUPPRESS)
    inspect_parser = commands.add_parser(
        "inspect", help="compile your own model",
        description="Compile your model through the pass, print the rewrite report and check the "
                    "output and every parameter gradient against eager.")
    inspect_parser.add_argument("factory", metavar="MODULE:FACTORY",
                                help="FACTORY() returns (model, inputs), or a model with an "
                                     "example_inputs attribute (a tuple, or a function returning one)")
    _add_options(inspect_parser, demo_options=False, default=argparse.SUPPRESS)
    return parser


def _fail(message: str) -> int:
    """One-line error on stderr, exit status 2 (as argparse uses for usage errors)."""
    print(f"python -m glu_fusion: error: {message}", file=sys.stderr)
    return 2


def _shadowed() -> Optional[str]:
    """The folder shadowing the package when ``python -m glu_fusion`` ran this file as part of a
    namespace package (a folder named ``glu_fusion`` without ``__init__.py`` earlier on the
    path): our ``__init__`` never ran, and ``import glu_fusion`` in user code would fail."""
    package = sys.modules.get(__package__ or "glu_fusion")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    return next(iter(getattr(package, "__path__", [])), "?")


def main(argv: Optional[Sequence[str]] = None) -> int:
    folder = _shadowed()
    if folder is not None:
        from glu_fusion_entry_points import shadowing_message
        return _fail(shadowing_message(folder).removeprefix("glu_fusion: "))
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _demo(args)
    except UsageError as err:
        return _fail(str(err))


def _inspect(args: argparse.Namespace) -> int:
    given = [f"--{name}" for name in ("device", "dtype", "layers") if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to the demo only; inspect runs your model on the "
                         f"device and in the dtype your factory builds it with")
    model, inputs = _load_factory(args.factory)
    return _run(model, inputs, timing=not args.no_timing)


def _demo(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    layers = demo.DemoConfig.layers if args.layers is None else args.layers
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device; "
                         "use --device cpu")
    if layers < 1:
        raise UsageError(f"--layers must be at least 1, got {layers}")
    default_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = _DTYPES[args.dtype] if args.dtype else default_dtype
    cfg = demo.DemoConfig(layers=layers)
    model, inputs = demo.build(device, dtype, cfg)
    print(f"demo: Llama-style model, {cfg.layers} layers, dim {cfg.dim}, MLP hidden {cfg.hidden}, "
          f"tokens {cfg.batch}x{cfg.seq}, {str(dtype).replace('torch.', '')} on {device}")
    return _run(model, inputs, timing=not args.no_timing)


if __name__ == "__main__":
    sys.exit(main())
