#!/usr/bin/env python3
"""How long a user waits the first time: the README's main job and each type, from an empty
Numba cache (a fresh install), against the same command once the cache is full.

Every run is a separate process with its own NUMBA_CACHE_DIR, so nothing a run compiled helps
the next cold one:

    python tools/coldstart.py                 # the main job, then every type kquant quantizes
    python tools/coldstart.py --types Q4_K    # just those types
    python tools/coldstart.py --no-types      # just the main job

The main job is the README's quantize line (`kquant-quantize --imatrix I data/tiny-llama
OUT Q4_K_M`, its imatrix made first with a cache of its own), the same line without the
imatrix, and the imatrix line itself. A type's first use is quantizing one 4096 x 256 matrix
with kquant.quantize (with and without an imatrix where the type takes one) in a fresh
process, Python's and Numba's imports included.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "tiny-llama"
TEXT = ROOT / "data" / "calibration.txt"

TYPE_SNIPPET = """
import numpy as np, kquant
from kquant.codecs import get_codec
c = get_codec({name!r})
x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
w = np.random.default_rng(1).random(256).astype(np.float32) + 0.5
if not c.requires_imatrix:
    kquant.quantize(x, c.qtype)
if c.uses_imatrix or c.requires_imatrix:
    kquant.quantize(x, c.qtype, imatrix=w)
"""


def timed(argv: list[str], cache: Path, cwd: Path) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"error: {' '.join(argv)} failed:\n{r.stdout}")
    return dt


def cold_and_warm(argv: list[str], work: Path, label: str) -> tuple[float, float]:
    cache = Path(tempfile.mkdtemp(prefix="numba-", dir=work))
    cold = timed(argv, cache, work)
    warm = timed(argv, cache, work)
    print(f"{label:<44s} first run {cold:6.1f} s   cached {warm:5.2f} s", flush=True)
    return cold, warm


def command(name: str) -> list[str]:
    """The console script, or the same entry point through this Python where it is not on PATH."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    entry = name.replace("kquant-", "") + "_entry"
    return [sys.executable, "-c", f"import sys; from kquant.cli import {entry}; sys.argv[0] = {name!r}; {entry}()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", help="types to time (default: every type kquant quantizes)")
    ap.add_argument("--no-types", action="store_true", help="only the main job")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from kquant.codecs import CODECS

    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        work = Path(tmp)
        imatrix = work / "tiny-llama.imatrix.gguf"
        cold_and_warm(command("kquant-imatrix") + ["-m", str(MODEL), "-f", str(TEXT), "-o", str(imatrix)],
                      work, "kquant-imatrix (README line 1, first half)")
        cold_and_warm(command("kquant-quantize") + ["--imatrix", str(imatrix), str(MODEL),
                                                    str(work / "q.gguf"), "Q4_K_M"],
                      work, "kquant-quantize --imatrix ... Q4_K_M (README)")
        cold_and_warm(command("kquant-quantize") + [str(MODEL), str(work / "q.gguf"), "Q4_K_M"],
                      work, "kquant-quantize ... Q4_K_M, no imatrix")
        if args.no_types:
            return
        names = args.types or [c.name for c in CODECS.values() if c.name not in ("F32",)]
        total = 0.0
        for name in names:
            cold, _ = cold_and_warm([sys.executable, "-c", TYPE_SNIPPET.format(name=name)], work,
                                    f"first quantization to {name}")
            total += cold
        print(f"{len(names)} types, {total:.1f} s of first runs in all")


if __name__ == "__main__":
    main()
