"""kquant-perplexity: llama-perplexity's perplexity and KL-divergence modes over kquant.validation.perplexity.

    kquant-perplexity -m MODEL -f TEXT [-c 512] [-b 2048] [--chunks N] [--ppl-stride S]
                      [--ppl-output-type 0|1] [--kl-divergence-base F] [-t N] [--device auto|cpu|cuda]
    kquant-perplexity -m QUANTIZED_MODEL --kl-divergence-base F --kl-divergence [-c 512] [-b 2048]

MODEL is a GGUF file (F32/F16/BF16 or quantized) or a Hugging Face folder. The options mean what
llama-perplexity's do. With -f and --kl-divergence-base F the base model's log-probabilities are
saved to F (llama-perplexity's format: either tool reads the other's file); with --kl-divergence
they are read back and the model compared with them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ModelError
from . import add_chunk_args, add_cluster_arg, add_runtime_args, check_chunk_args, run_command, stdout_line_open


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kquant-perplexity", description=(
        "Perplexity of a model over a text, and KL divergence from a base model's logits, "
        "as llama-perplexity computes them."))
    ap.add_argument("-m", "--model", help="GGUF file or Hugging Face model folder")
    ap.add_argument("-f", "--file", help="text file (not needed with --kl-divergence)")
    add_chunk_args(ap)
    ap.add_argument("--ppl-stride", type=int, default=0,
                    help="strided perplexity: a window every S tokens (default 0: chunks)")
    ap.add_argument("--ppl-output-type", type=int, choices=(0, 1), default=0,
                    help="1: one line per chunk instead of [i]ppl, (default 0)")
    ap.add_argument("--kl-divergence-base", "--save-all-logits", dest="logits_file", metavar="F",
                    help="base logits file: written with -f, read with --kl-divergence")
    ap.add_argument("--kl-divergence", action="store_true",
                    help="KL divergence from the logits of --kl-divergence-base")
    ap.add_argument("--exact", action="store_true",
                    help="compute in llama.cpp's CPU float order (its x86 AVX2 build): "
                         "llama-perplexity's figures to the printed digit (CPU only, slower)")
    add_runtime_args(ap)
    add_cluster_arg(ap)
    return ap


class _Stdout:
    """What llama-perplexity prints to stdout, as it comes; held back until the end when a
    progress bar shares the terminal."""

    def __init__(self, hold: bool):
        self.hold = hold
        self.parts: list[str] = []

    def __call__(self, s: str) -> None:
        if self.hold:
            self.parts.append(s)
        else:
            sys.stdout.write(s)
            sys.stdout.flush()
            stdout_line_open(not s.endswith("\n"))

    def flush(self) -> None:
        if self.parts:
            text = "".join(self.parts)
            sys.stdout.write(text)
            stdout_line_open(not text.endswith("\n"))
            self.parts = []
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-perplexity", lambda: _run(ns), "interrupted; no logits file written")


def _run(ns: argparse.Namespace) -> int:
    from ..validation.kld import KLDivergenceResult
    from ..runtime import keep_freed_memory
    from ..validation.perplexity import PerplexityParams, run_perplexity

    check_chunk_args(ns)
    keep_freed_memory()
    if not ns.model:
        raise ModelError("no model: give -m MODEL")
    if not ns.kl_divergence and not ns.file:
        raise ModelError("no text: give -f TEXT (or --kl-divergence with --kl-divergence-base F)")
    params = PerplexityParams(n_ctx=ns.ctx_size, n_batch=ns.batch_size, n_chunks=ns.chunks,
                              ppl_stride=ns.ppl_stride, ppl_output_type=ns.ppl_output_type,
                              logits_file=ns.logits_file or "", kl_divergence=ns.kl_divergence,
                              exact=ns.exact)
    progress = not ns.no_progress and sys.stderr.isatty()
    out = _Stdout(hold=progress and sys.stdout.isatty())
    try:  # lines held back for the progress bar are printed even on an error
        t0 = time.perf_counter()
        result = run_perplexity(ns.model, ns.file, params, device=ns.device, n_threads=ns.threads,
                                progress=progress, emit=out, cluster=ns.cluster)
        out.flush()
        rate = result.n_tokens / max(result.seconds, 1e-9)
        if isinstance(result, KLDivergenceResult):
            print(result.statistics(), end="")
            f = result.summary()
            print(f"kquant-perplexity: KL divergence over {result.n_chunks} chunks x {result.n_ctx} tokens in "
                  f"{result.seconds:.1f} s ({rate:.0f} tokens/s), mean KLD {f['kld']:.6f}, PPL(Q) "
                  f"{f['ppl']:.4f}, PPL(base) {f['ppl_base']:.4f}, {time.perf_counter() - t0:.1f} s in all")
            return 0
        if params.ppl_stride <= 0:
            if result.ppl_error is not None:
                print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
            else:
                print("Unexpected negative standard deviation of log(prob)", file=sys.stderr)
        saved = ""
        if result.logits_file:
            saved = f", logits -> {result.logits_file} ({Path(result.logits_file).stat().st_size / 2**20:.1f} MiB)"
        print(f"kquant-perplexity: {result.n_chunks} chunks x {result.n_ctx} tokens in {result.seconds:.1f} s "
              f"({rate:.0f} tokens/s), PPL {result.ppl:.4f}{saved}, {time.perf_counter() - t0:.1f} s in all")
        return 0
    finally:
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
