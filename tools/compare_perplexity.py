#!/usr/bin/env python3
"""How closely kquant-perplexity follows llama-perplexity on one model file, token by token.

A final PPL compares two numbers; on a deep model whose activations are rounded to 8 bits
before every product, the last float32 digit of any sum can flip a rounding and move that
number by tenths of a percent. This script measures the agreement per token instead, and puts
it beside llama.cpp's own agreement with itself:

1. llama-perplexity runs the model and saves its log-probabilities (--kl-divergence-base);
2. kquant-perplexity runs the same file on the same tokens against that file
   (--kl-divergence): its PPL, mean KL divergence from llama's distributions, top-token
   agreement;
3. for each --llama-variant (default "-ub 256", a different physical batch size, and
   "-nr", no weight repacking), llama-perplexity itself does step 2: the size of the
   differences llama.cpp's own kernels make between two of its settings;
4. each --other-llama-perplexity BIN (another build of llama.cpp, say for AVX512 rather than
   AVX2) does step 2 too: the difference a build's kernels make;
5. for each --kquant-variant NAME=VALUE, kquant-perplexity does step 2 again with that
   environment variable set: OPENBLAS_CORETYPE=Haswell (or Sandybridge, Nehalem) makes numpy's
   OpenBLAS use another kernel, which adds the same products in another order.

    python tools/compare_perplexity.py --llama-perplexity BIN --model M.gguf [--chunks 20] \
        [--other-llama-perplexity BIN2] [--kquant-variant OPENBLAS_CORETYPE=Haswell]

It prints one line per run: PPL, its relative difference from llama-perplexity's default,
mean KLD and the share of tokens whose most likely next token is the same.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"


def _stats(log: str) -> dict:
    """Final PPL, mean KLD and same-top share from llama-perplexity's (or kquant's) output."""
    def grab(pattern: str) -> float | None:
        m = re.search(pattern, log)
        return float(m[1]) if m else None
    return {"ppl": grab(r"Final estimate: PPL = ([\d.]+)") or grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
            "kld": grab(r"Mean\s+KLD:\s*([\d.]+)"), "top": grab(r"Same top p:\s*([\d.]+)")}


def run_llama(binary: str, args: list[str]) -> str:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(Path(binary).parent) + ":" + env.get("LD_LIBRARY_PATH", "")
    p = subprocess.run([binary, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"llama-perplexity {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def run_kquant(args: list[str], env: dict[str, str] | None = None) -> str:
    p = subprocess.run([sys.executable, "-m", "kquant.cli.perplexity", *args, "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
    if p.returncode:
        sys.exit(f"kquant-perplexity {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-perplexity", default=os.environ.get("KQUANT_LLAMA_PERPLEXITY")
                    or shutil.which("llama-perplexity"), help="path of llama.cpp's llama-perplexity")
    ap.add_argument("--model", required=True, help="GGUF model file both tools run")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-variant", action="append", default=None,
                    help='extra llama-perplexity arguments for a self-comparison run (repeatable; '
                         'default: "-ub 256" and "-nr")')
    ap.add_argument("--other-llama-perplexity", action="append", default=[], metavar="BIN",
                    help="another llama-perplexity build for a self-comparison run (repeatable)")
    ap.add_argument("--kquant-variant", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for a second kquant-perplexity run (repeatable)")
    a = ap.parse_args()
    if not a.llama_perplexity:
        sys.exit("give --llama-perplexity BIN (or set KQUANT_LLAMA_PERPLEXITY)")
    variants = a.llama_variant if a.llama_variant is not None else ["-ub 256", "-nr"]
    common = ["-m", a.model, "-c", str(a.ctx), "-t", str(a.threads)]
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = str(Path(tmp) / "llama.kld")
        ref = _stats(run_llama(a.llama_perplexity, [*common, "-f", a.text, "--chunks", str(a.chunks),
                                                     "--kl-divergence-base", base]))
        rows.append(("llama-perplexity (default)", ref))
        kld_args = [*common, "--kl-divergence-base", base, "--kl-divergence"]
        rows.append(("kquant-perplexity", _stats(run_kquant(kld_args))))
        for v in a.kquant_variant:
            name, _, value = v.partition("=")
            rows.append((f"kquant-perplexity {v}", _stats(run_kquant(kld_args, {name: value}))))
        for v in variants:
            log = run_llama(a.llama_perplexity, [*common, *v.split(), "--kl-divergence-base", base,
                                                 "--kl-divergence"])
            rows.append((f"llama-perplexity {v}", _stats(log)))
        for other in a.other_llama_perplexity:
            log = run_llama(other, [*common, "--kl-divergence-base", base, "--kl-divergence"])
            rows.append((f"{Path(other).parent.parent.name}/llama-perplexity", _stats(log)))
    print(f"model {Path(a.model).name}, text {Path(a.text).name}, {a.chunks} chunks x {a.ctx} tokens, "
          f"{a.threads} threads; KLD and top-token against llama-perplexity's default run")
    for name, s in rows:
        rel = s["ppl"] / ref["ppl"] - 1 if s["ppl"] and ref["ppl"] else float("nan")
        kld = f"{s['kld']:.6f}" if s["kld"] is not None else "-"
        top = f"{s['top']:.3f} %" if s["top"] is not None else "-"
        print(f"  {name:44s} PPL {s['ppl']:9.4f}  ({rel:+.2e})   mean KLD {kld:>9s}   same top {top:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
