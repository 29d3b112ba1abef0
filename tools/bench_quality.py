#!/usr/bin/env python3
"""kquant-quantize --method gptq against llama.cpp's own imatrix quantization, measured by
llama-perplexity on text apart from the calibration text.

    python tools/bench_quality.py --model M-f32.gguf --calibrate pg84.txt --eval wiki.test.raw \\
        --types Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K [--chunks 40] [--calib-chunks 32] [-c 512] \\
        [--bin /path/to/llama.cpp/bin] [--variant 'one-shot=--gptq-one-shot' ...]

Per-tensor allocation at llama.cpp's file size (kquant-quantize --target-size; {size} stands for
the size of llama.cpp's file of the type):

    python tools/bench_quality.py ... --variant 'alloc=--method llama --target-size {size}' \\
        --variant 'alloc+gptq=--target-size {size}'

Steps, all with the same threads:
1. llama-imatrix on the calibration text: the imatrix both files use;
2. llama-perplexity --kl-divergence-base on the evaluation text with the model itself;
3. per type: llama-quantize --imatrix (llama.cpp's file) and kquant-quantize --method gptq
   --imatrix --calibrate (the same imatrix; Hessians from the same text), once per --variant
   (extra kquant-quantize arguments), each timed;
4. llama-perplexity --kl-divergence on each file: its mean KLD and same-top-token rate.
Prints a Markdown table: bytes, mean KLD, same top p, seconds; and kquant's KLD / llama.cpp's.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:2])} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr, seconds


def kld_stats(cmd: list[str], env: dict) -> tuple[float, float]:
    """Mean KLD and same-top-token rate from llama-perplexity --kl-divergence. Its log is
    asynchronous and sometimes loses its last lines at exit: up to 6 runs."""
    for _ in range(6):
        log, _ = run(cmd, env)
        kld = re.search(r"Mean\s+KLD:\s+([0-9.]+)", log)
        top = re.search(r"Same top p:\s+([0-9.]+)", log)
        if kld and top:
            return float(kld[1]), float(top[1])
    sys.exit("error: no KL divergence statistics in llama-perplexity's output (6 runs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="F32/F16 GGUF")
    ap.add_argument("--calibrate", required=True, help="calibration text (imatrix and Hessians)")
    ap.add_argument("--eval", required=True, help="evaluation text (never the calibration text)")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40, help="evaluation chunks")
    ap.add_argument("--calib-chunks", type=int, default=-1, help="calibration chunks (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=os.environ.get("KQUANT_LLAMA_BIN", "/work/cache/llama-build/bin"),
                    help="folder of llama-imatrix, llama-quantize, llama-perplexity")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="a kquant-quantize variant to add (e.g. 'one-shot=--gptq-one-shot'); "
                         "repeatable; default: 'kquant gptq=' (the defaults). {size} in ARGS is "
                         "llama.cpp's file size (e.g. 'alloc=--method llama --target-size {size}')")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "quality"))
    a = ap.parse_args()
    if Path(a.calibrate).resolve() == Path(a.eval).resolve():
        sys.exit("error: calibrate and evaluate on different texts")
    b = Path(a.bin)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{b}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               PYTHONPATH=str(ROOT))
    work = Path(a.workdir) / Path(a.model).stem
    work.mkdir(parents=True, exist_ok=True)
    t, c = str(a.threads), str(a.ctx)
    chunks = ["--chunks", str(a.calib_chunks)] if a.calib_chunks > 0 else []
    im, base = work / "imatrix.gguf", work / "base.kld"
    run([str(b / "llama-imatrix"), "-m", a.model, "-f", a.calibrate, "-o", str(im), "-c", c, "-t", t,
         *chunks], env)
    run([str(b / "llama-perplexity"), "-m", a.model, "-f", a.eval, "-c", c, "--chunks", str(a.chunks),
         "-t", t, "--kl-divergence-base", str(base)], env)
    print(f"{Path(a.model).name}: calibration {Path(a.calibrate).name}"
          f"{' (' + str(a.calib_chunks) + ' chunks)' if chunks else ''}, evaluation {Path(a.eval).name} "
          f"({a.chunks} x {a.ctx} tokens), {a.threads} threads, llama-perplexity --kl-divergence\n")
    print("| type | file | bytes | mean KLD | same top p | seconds | KLD vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|")
    variants = [v.split("=", 1) for v in a.variant] or [["kquant gptq", ""]]
    for qtype in a.types:
        ref = work / f"llama-{qtype}.gguf"
        _, t_ref = run([str(b / "llama-quantize"), "--imatrix", str(im), a.model, str(ref), qtype, t], env)
        files = [("llama.cpp", ref, t_ref)]
        for name, extra in variants:
            ours = work / f"gptq-{re.sub(r'[^A-Za-z0-9]+', '-', name)}-{qtype}.gguf"
            _, secs = run([sys.executable, "-m", "kquant.cli.quantize", "--method", "gptq", "--calibrate",
                           a.calibrate, "-c", c, *chunks, "--imatrix", str(im),
                           *extra.replace("{size}", str(ref.stat().st_size)).split(), a.model,
                           str(ours), qtype, t], env, cwd=ROOT)
            files.append((name, ours, secs))
        stats = {}
        for name, path, _ in files:
            stats[name] = kld_stats([str(b / "llama-perplexity"), "-m", str(path), "--kl-divergence-base",
                                     str(base), "--kl-divergence", "-t", t], env)
        for name, path, secs in files:
            kld, top = stats[name]
            ratio = f"{kld / stats['llama.cpp'][0]:.3f}x" if name != "llama.cpp" else ""
            print(f"| {qtype} | {name} | {path.stat().st_size} | {kld:.6f} | {top:.3f}% | {secs:.1f} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
