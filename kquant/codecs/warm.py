"""Compile a job's codec kernels before it starts, side by side, and say so.

Numba compiles a kernel on its first call and keeps it in its cache (`cache=True`), so only a
first run waits: 5-10 s for a K-quant on this project's 2-vCPU machine. Left to itself, a
job would compile one type after another as it meets them, silently. `warm_codecs` instead
compiles every kernel the job will call that the cache lacks, up front, spread over the
usable CPUs (one process each: Numba's compiler holds the GIL), and prints one line while
the user waits. The child processes only fill the cache; the job then loads from it.

    python -m kquant.codecs.warm Q4_K Q6_K:imatrix deq:BF16     # what a child process runs
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import get_codec


@dataclass(frozen=True)
class Unit:
    """One codec's kernels: quantizing (with an imatrix where `imatrix`), or dequantizing."""
    name: str
    imatrix: bool = False
    dequantize: bool = False

    def arg(self) -> str:
        return f"deq:{self.name}" if self.dequantize else self.name + (":imatrix" if self.imatrix else "")

    @staticmethod
    def parse(arg: str) -> "Unit":
        if arg.startswith("deq:"):
            return Unit(arg[4:], dequantize=True)
        name, _, flag = arg.partition(":")
        return Unit(name, imatrix=flag == "imatrix")


def compile_unit(unit: Unit) -> None:
    """Run the unit's kernels once on a block of zeros-and-ones: the same argument types as a
    real call, so Numba compiles (or loads) the same specialization."""
    codec = get_codec(unit.name)
    n = 256  # a whole block of every type
    if unit.dequantize:
        codec.dequantize_rows(np.zeros((1, codec.row_bytes(n)), np.uint8), n)
        return
    x = np.linspace(-1.0, 1.0, 2 * n, dtype=np.float32).reshape(2, n)
    weights = np.ones(n, np.float32)
    # with an imatrix first: its kernel then serves rows without one too (BlockCodec._use_ref)
    if unit.imatrix or codec.requires_imatrix:
        codec.quantize_rows(x, weights)
    if not codec.requires_imatrix:
        codec.quantize_rows(x, None)


def _magic() -> tuple:
    from numba.core.registry import cpu_target
    return cpu_target.target_context.codegen().magic_tuple()


def is_cached(kernel) -> bool:
    """Whether Numba's cache holds a compiled `kernel` (a dispatcher) for this machine: its
    index file is fresh and lists this CPU. True where it cannot tell (nothing to announce)."""
    try:
        index = kernel._cache._cache_file._load_index()
        magic = _magic()
    except Exception:  # noqa: BLE001 - Numba's private cache API: if it changed, assume cached
        return True
    return any(key[1] == magic for key in index)


def unit_cached(unit: Unit) -> bool:
    return all(is_cached(k) for k in get_codec(unit.name).kernels(unit.dequantize, unit.imatrix))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: rough first-compile seconds of a unit's kernels on this project's 2-vCPU machine, to
#: balance the processes (the K-quants' searches dominate; a dequantizer takes ~0.3 s)
_COST = {"Q2_K": 6.0, "Q3_K": 6.0, "Q4_K": 9.0, "Q5_K": 9.0, "Q6_K": 4.0, "Q4_1": 4.0, "Q5_1": 4.0}


def _cost(unit: Unit) -> float:
    return 0.3 if unit.dequantize else _COST.get(unit.name, 3.0)


def _shares(units: list[Unit], n: int) -> list[list[Unit]]:
    """The units in n shares of about equal cost: each, dearest first, to the share that
    has the least so far (the first share is this process's)."""
    shares: list[list[Unit]] = [[] for _ in range(max(1, n))]
    load = [0.0] * len(shares)
    for unit in sorted(units, key=_cost, reverse=True):
        i = load.index(min(load))
        shares[i].append(unit)
        load[i] += _cost(unit)
    return [s for s in shares if s] or [[]]


def warm_codecs(units: list[Unit], log: Callable[[str], None] | None = None) -> float:
    """Compile the kernels of `units` that Numba's cache lacks, the first in this process and
    the others in up to (CPUs - 1) child processes at once; returns the seconds it took (0.0
    when everything was cached). A child that fails changes nothing: the job compiles what
    is still missing itself, as it would have."""
    merged: dict[tuple[str, bool], Unit] = {}  # one unit a kernel: with an imatrix if any is
    for u in units:
        old = merged.get((u.name, u.dequantize))
        merged[(u.name, u.dequantize)] = Unit(u.name, u.imatrix or (old is not None and old.imatrix),
                                              u.dequantize)
    todo = [u for u in merged.values() if not unit_cached(u)]
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    if log is not None:
        names = ", ".join(dict.fromkeys(u.name for u in sorted(todo, key=_cost, reverse=True)))
        log(f"compiling kernels for {names}, once (Numba keeps them for later runs)...")
    mine, *shares = _shares(todo, min(len(todo), _cpus()))
    # the children import this kquant, wherever it was imported from
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    children = [subprocess.Popen([sys.executable, "-m", __name__, *(u.arg() for u in share)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for share in shares]
    try:
        for unit in mine:
            compile_unit(unit)
        for child in children:
            child.wait()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    for arg in argv:
        compile_unit(Unit.parse(arg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
