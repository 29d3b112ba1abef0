"""kquant-compare: a quality report of quantized files against their base model, over
kquant.validation.compare.

    kquant-compare BASE QUANT [QUANT ...] -f TEXT [-c 512] [-b 2048] [--chunks N] [-t N]
                   [--device auto|cpu|cuda] [--imatrix F] [--plot F.png] [--tensors] [--no-progress]

BASE runs once over TEXT (kquant-perplexity's chunks, its log-probabilities kept in a temporary
logits file in TMPDIR); each QUANT is then compared with it as `kquant-perplexity
--kl-divergence` would, and its 2-D tensors with BASE's. Prints a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ModelError
from . import add_chunk_args, add_runtime_args, check_chunk_args, run_command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kquant-compare", description=(
        "PPL, KL divergence, same-top-token rate and weight error of quantized files against their base "
        "model, as one Markdown table (the PPL/KLD figures are kquant-perplexity --kl-divergence's)."))
    ap.add_argument("base", nargs="?", metavar="BASE", help="the base model (GGUF file or Hugging Face folder)")
    ap.add_argument("quants", nargs="*", metavar="QUANT", help="quantized GGUF files of the same model")
    ap.add_argument("-f", "--file", help="text file to evaluate on")
    add_chunk_args(ap)
    ap.add_argument("--imatrix", metavar="F", help="weight the tensor errors by this imatrix (GGUF or legacy .dat)")
    ap.add_argument("--plot", metavar="F.png", help="plot mean KLD against bits per weight (needs matplotlib)")
    ap.add_argument("--tensors", action="store_true", help="also print each QUANT's per-tensor errors")
    add_runtime_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-compare", lambda: _run(ns), "interrupted; nothing written")


def _run(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..runtime import keep_freed_memory
    from ..validation.common import PerplexityParams
    from ..validation.compare import check_plot, compare, plot_report

    check_chunk_args(ns)
    keep_freed_memory()
    if not ns.base or not ns.quants:
        raise ModelError("give BASE and at least one QUANT file")
    if not ns.file:
        raise ModelError("no text: give -f TEXT")
    if ns.plot:  # before the long run: no matplotlib or a bad path fails at once
        check_plot(ns.plot, [ns.base, *ns.quants, ns.file, ns.imatrix])
    params = PerplexityParams(n_ctx=ns.ctx_size, n_batch=ns.batch_size, n_chunks=ns.chunks)
    progress = not ns.no_progress and sys.stderr.isatty()
    report = compare(ns.base, ns.quants, ns.file, params, ns.imatrix, ns.device, ns.threads, progress,
                     log=lambda s: tqdm.write(s, file=sys.stderr))  # lines above the progress bars
    print(report.to_markdown(), end="")
    if ns.tensors:
        print(report.tensors_markdown(), end="")
    if ns.plot:
        print(f"kquant-compare: plot written to {plot_report(report, ns.plot)}", file=sys.stderr)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
