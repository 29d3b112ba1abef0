"""Show what LLVM made of the dot-product kernels: `python -m kquant.matmul.asm [TYPE ...]`.

For each weight type it compiles (or loads) kquant's kernel, collects the assembly of the
kernel and of the parallel-loop body Numba outlines into a linked library (which
`dispatcher.inspect_asm()` alone does not show), and counts the AVX2 instructions that
matter: ymm registers, vpmaddubsw / vpmaddwd (int8 / int16 multiply-adds), vpaddd, vpmovsxbw /
vpmovzxbw (widening loads), vcvtdq2ps, vfmadd, vcvtph2ps; and float64 arithmetic
(vcvtss2sd, vaddsd, vmulsd), which should not appear. Counts are over the whole compiled
kernel (unrolled copies, remainder loops, the token loop's variants), not per block.
`--dump DIR` writes each kernel's assembly to DIR/TYPE.s.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INSTRUCTIONS = ("ymm", "vpmaddubsw", "vpmaddwd", "vpsignb", "vpaddd", "vpmulld", "vpmovsxbw",
                "vpmovzxbw", "vpmovsxbd", "vpmovzxbd", "vpsrlvd", "vpshufb", "vcvtdq2ps", "vfmadd",
                "vmulps", "vaddps", "vcvtph2ps", "vpmuldq", "vpaddq", "vcvtss2sd", "vaddsd",
                "vmulsd")


def _options(dispatcher) -> dict:
    """A kernel's compile options, uncached (njit sets nopython itself)."""
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}
    return {**opts, "cache": False}


def kernel_asm(dispatcher, *args) -> str:
    """Assembly of a Numba dispatcher compiled for `args`, parallel bodies included.

    Numba keeps no assembly for kernels loaded from its cache, so the kernel is compiled
    afresh (a copy of it without caching, with the kernels' compile options and SLP on).
    """
    from numba import njit

    from .cpu import vectorizing

    fresh = njit(**_options(dispatcher))(dispatcher.py_func)
    with vectorizing():
        fresh(*args)
    dispatcher = fresh
    out, seen = [], set()

    def walk(lib):
        if id(lib) in seen:
            return
        seen.add(id(lib))
        out.append(lib.get_asm_str())
        for sub in getattr(lib, "_linking_libraries", ()):
            walk(sub)

    for cres in dispatcher.overloads.values():
        walk(cres.library)
    return "\n".join(out)


def count(asm: str) -> dict[str, int]:
    return {ins: len(re.findall(r"\b" + ins, asm)) for ins in INSTRUCTIONS}


def main(argv=None) -> int:
    import numpy as np

    from . import cpu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", default=list(cpu.WEIGHT_TYPES))
    p.add_argument("--dump", type=Path)
    args = p.parse_args(argv)
    for name in args.types:
        qtype = cpu.qtype_of(name)
        kernel = cpu.kernel(qtype)
        asm = kernel_asm(kernel, *cpu.kernel_args(qtype, np.random.default_rng(0)))
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{qtype.name}.s").write_text(asm)
        counts = count(asm)
        print(f"{qtype.name:5s} {kernel.__name__:8s} "
              + " ".join(f"{k}={v}" for k, v in counts.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
