"""kquant-imatrix: llama-imatrix's command line over kquant.calibration.imatrix.

    kquant-imatrix -m MODEL -f TEXT [-o imatrix.gguf] [--output-format gguf|dat] [-c 512] [-b N]
                   [--chunks N] [--chunk|--from-chunk N] [--process-output] [--no-ppl]
                   [--parse-special] [--output-frequency N] [--save-frequency N]
                   [--in-file F ...] [--show-statistics [--plot F.png]] [-t N] [--device cpu|cuda]
                   [--cluster tcp://HOST:PORT | local:N]

MODEL is a GGUF file (F32/F16/BF16 or quantized) or a Hugging Face folder. Without -f, the
--in-file imatrices are combined (or converted) into -o. Options mean what llama-imatrix's do.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ModelError
from . import add_chunk_args, add_cluster_arg, add_runtime_args, check_chunk_args, run_command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kquant-imatrix", description=(
        "Compute an importance matrix as llama-imatrix does: sums of squared activations per "
        "input column of every matrix of the model, over calibration text."))
    ap.add_argument("-m", "--model", help="GGUF file or Hugging Face model folder")
    ap.add_argument("-f", "--file", help="calibration text file")
    ap.add_argument("-o", "--output", "--output-file", dest="output", default="imatrix.gguf",
                    help="output file (default: imatrix.gguf)")
    ap.add_argument("--output-format", choices=("gguf", "dat"),
                    help="gguf (default) or dat, the legacy format")
    add_chunk_args(ap)
    ap.add_argument("--chunk", "--from-chunk", dest="from_chunk", type=int, default=0,
                    help="start from this chunk of the text")
    ap.add_argument("--process-output", action="store_true", help="collect output.weight too")
    ap.add_argument("--no-ppl", dest="ppl", action="store_false", help="do not compute perplexity")
    ap.add_argument("--hessian-out", metavar="FILE",
                    help="also save the layer Hessians, for kquant-quantize --method gptq --hessian FILE")
    ap.add_argument("--ppl", dest="ppl", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parse-special", action="store_true",
                    help="parse special tokens (<|im_start|>, ...) in the text")
    ap.add_argument("-ofreq", "--output-frequency", type=int, default=10,
                    help="save the imatrix every N chunks (default 10)")
    ap.add_argument("--save-frequency", type=int, default=0,
                    help="keep a copy OUTPUT.at_N every N chunks (default 0: none)")
    ap.add_argument("--in-file", action="append", default=[], metavar="F",
                    help="an imatrix to start from / combine (repeatable)")
    ap.add_argument("--show-statistics", action="store_true",
                    help="print statistics of the single --in-file and exit")
    ap.add_argument("--plot", metavar="F.png", help="with --show-statistics: plot them per layer")
    ap.add_argument("-np", "--parallel", type=int, default=1,
                    help="with --show-statistics: the chunk size is -c / -np, as in llama-imatrix")
    ap.add_argument("--exact", action="store_true",
                    help="compute in llama.cpp's CPU float order (its x86 AVX2 build), as "
                         "kquant-perplexity --exact (CPU only, slower)")
    add_runtime_args(ap)
    add_cluster_arg(ap)
    return ap


def _params(ns: argparse.Namespace):
    from ..calibration.imatrix import ImatrixParams

    fmt = ns.output_format
    if fmt is None:
        fmt = "gguf"
        if not ns.output.endswith(".gguf"):
            print("kquant-imatrix: warning: saving the imatrix in GGUF format with a suffix other than "
                  ".gguf; for the previous format use --output-format dat", file=sys.stderr)
    return ImatrixParams(
        n_ctx=ns.ctx_size, n_batch=ns.batch_size, n_chunks=ns.chunks, from_chunk=ns.from_chunk,
        process_output=ns.process_output, compute_ppl=ns.ppl, parse_special=ns.parse_special,
        output_frequency=ns.output_frequency, save_frequency=ns.save_frequency,
        out_file=ns.output, output_format=fmt, prompt_file=ns.file or "", exact=ns.exact)


def _show_statistics(ns: argparse.Namespace) -> None:
    from ..calibration.statistics import format_statistics, plot_statistics, statistics_of_file

    if len(ns.in_file) != 1:
        raise ModelError("a single imatrix file (--in-file) is required to compute tensor statistics")
    if ns.ctx_size <= 0 or ns.parallel <= 0:
        raise ModelError("-c and -np must be positive")
    errors: list[str] = []
    stats = statistics_of_file(ns.in_file[0], ns.ctx_size // ns.parallel, errors)
    if not stats:
        raise ModelError(f"cannot compute statistics for {ns.in_file[0]}")
    # llama-imatrix logs the whole block (LOG_INF) to stderr
    for e in errors:
        print(e, file=sys.stderr)
    print(format_statistics(stats, ns.in_file[0]), end="", file=sys.stderr)
    if ns.plot:
        print(f"kquant-imatrix: plot written to {plot_statistics(stats, ns.plot)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-imatrix", lambda: _run(ns),
                       "interrupted; files saved before this point are intact")


def _run(ns: argparse.Namespace) -> int:
    if ns.show_statistics:
        _show_statistics(ns)
        return 0
    from ..calibration.imatrix import combine_files, run_imatrix
    from ..runtime import keep_freed_memory

    check_chunk_args(ns)
    keep_freed_memory()
    params = _params(ns)
    if not ns.file:
        if not ns.in_file:
            raise ModelError("no text (-f) and no imatrix (--in-file) to combine")
        for f in ns.in_file:
            print(f"kquant-imatrix: loading imatrix from '{f}'", file=sys.stderr)
        what = "combined imatrix" if len(ns.in_file) > 1 else "imatrix"
        print(f"kquant-imatrix: no text; saving {what} to '{params.out_file}'", file=sys.stderr)
        path, n_entries = combine_files(ns.in_file, params)
        print(f"kquant-imatrix: {len(ns.in_file)} imatrix file(s) -> {path} ({n_entries} entries, "
              f"{params.output_format})")
        return 0
    if not ns.model:
        raise ModelError("no model: give -m MODEL")
    t0 = time.perf_counter()
    result = run_imatrix(ns.model, ns.file, params, in_files=ns.in_file, device=ns.device,
                         n_threads=ns.threads, progress=not ns.no_progress and sys.stderr.isatty(),
                         hessian_out=ns.hessian_out, cluster=ns.cluster)
    if result.chunk_ppl:
        print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.chunk_ppl)) + ",")
    if result.ppl is not None and result.ppl_error is not None:
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    size = Path(params.out_file).stat().st_size
    print(f"kquant-imatrix: {result.n_chunks} chunks x {params.n_ctx} tokens in {result.seconds:.1f} s "
          f"({result.n_tokens / max(result.seconds, 1e-9):.0f} tokens/s), "
          f"{len(result.imatrix.entries)} entries -> {params.out_file} ({size / 1024:.1f} KiB, "
          f"{params.output_format}), {time.perf_counter() - t0:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
