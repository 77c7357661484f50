"""Compile every engine kernel the routes can launch for sm_90, with no GPU (triton 3.6, the
GPU's version), and print each kernel's registers, spills and ptxas warnings.  Exit 1 on a
compile error, shared memory over the limit, or ptxas's injected-wait warning (which serialises
the wgmma pipeline); spills are printed.

    python .ci/compile_engine.py [--filter TEXT] [--spec-module MODULE]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback


def signature(spec, dtype):
    """Triton's signature and constexpr dicts for a Spec, in the kernel's parameter order."""
    import torch
    from glu_fusion.kernels.engine.host import _shared_layout
    fn = spec.kernel
    sig, constexprs = {}, {}
    names = fn.arg_names
    elem = {"bfloat16": "bf16", "float16": "fp16"}[str(dtype).removeprefix("torch.")]
    for i, name in enumerate(names):
        if name in spec.blocks:
            r, c = spec.blocks[name]
            desc_dtype, desc_elem = (torch.float32, "fp32") if name in spec.fp32_descriptors else (dtype, elem)
            sig[name] = f"tensordesc<{desc_elem}[{r}, {c}],{_shared_layout((r, c), desc_dtype)!r}>"
        elif name in spec.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = spec.constexprs[name]
        elif name in dict(spec.pointers):
            kind = dict(spec.pointers)[name]
            if kind is None:  # not given in this launch
                sig[name] = "constexpr"
                constexprs[(i,)] = None
            else:
                sig[name] = {"operand": f"*{elem}", "int32": "*i32", "fp32": "*fp32"}[kind]
        elif name in spec.floats:
            sig[name] = "fp32"
        elif name.endswith("_ptr"):
            if spec.constexprs.get("HAS_BIAS"):
                sig[name] = f"*{elem}"
            else:
                sig[name] = "constexpr"
                constexprs[(i,)] = None
        else:
            sig[name] = "i32"
    return sig, constexprs


def ptxas_report(ptx: str) -> tuple[str, bool]:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    injected = "warpgroup.wait" in text and "inject" in text
    spill_bytes = sum(int(s) + int(l) for s, l in spills)
    summary = f"regs {','.join(regs) or '?'}  spills {spill_bytes} B" + ("  INJECTED WAIT" if injected else "")
    return summary, run.returncode != 0 or injected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="compile only specs whose name contains this")
    args = parser.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from glu_fusion.kernels.engine.host import SHARED_MEMORY_LIMIT, route_specs
    print(f"triton {triton.__version__}: engine kernels for sm_90")
    failed = 0
    for name, spec, dtype in route_specs():
        if args.filter not in name:
            continue
        try:
            sig, constexprs = signature(spec, dtype)
            src = GluonASTSource(spec.kernel, sig, constexprs, attrs={})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            report, bad = ptxas_report(k.asm["ptx"])
            shared = k.metadata.shared
            bad = bad or shared > SHARED_MEMORY_LIMIT
            print(f"{'FAIL' if bad else 'ok  '} {name:44s} shared {shared:6d} B  {report}")
            failed += bad
        except Exception as e:  # a compile error: print it and go on to the next kernel
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[-2000:]}")
            traceback.print_exc(limit=2)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
