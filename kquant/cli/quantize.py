"""kquant-quantize: llama-quantize's command line over kquant.quantization.pipeline.

    kquant-quantize [options] INPUT [OUTPUT] TYPE [nthreads]

INPUT is a GGUF file (F32/F16/BF16, split files too) or a Hugging Face model folder.
Options and their meanings are llama-quantize's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..codecs import CODECS
from ..quantization import mixes
from ..models import open_model
from ..quantization.pipeline import (QuantizeOptions, apply_budget, default_output_name,
                              parse_override_kv, plan_quantization, quantize_model)
from ..errors import ModelError
from ..quantization.gptq import ASYM, DAMP, HOLDOUT, SINK_WEIGHT, GptqSettings
from . import add_cluster_arg, run_command

def _writable(name: str) -> bool:
    try:
        return mixes.default_type(name) in CODECS
    except (KeyError, ValueError):
        return False


# the ftypes whose tensors kquant has codecs for: all of llama-quantize's but the ternary ones
# (of the i-quants: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M and the
# mixes of them, IQ3_XS, IQ3_M and IQ2_M)
TYPES_HELP = ", ".join(sorted(k for k in mixes.FTYPES if _writable(k)))


class _InOrder(argparse.Action):
    """Collect --tensor-type values and --tensor-type-file paths into one ordered list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kquant-quantize",
        usage="kquant-quantize [options] INPUT [OUTPUT] TYPE [nthreads]",
        description="Quantize a GGUF file or a Hugging Face folder as llama-quantize does. "
                    f"TYPE (any case, or its number): {TYPES_HELP}, COPY.")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="allow quantized inputs (dequantized, then quantized again)")
    ap.add_argument("--leave-output-tensor", action="store_true",
                    help="leave output.weight unquantized")
    ap.add_argument("--pure", action="store_true",
                    help="the TYPE's default type for every tensor (no mix rules)")
    ap.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    ap.add_argument("--include-weights", action="append", default=[], metavar="NAME",
                    help="use the imatrix only for tensors whose name contains NAME")
    ap.add_argument("--exclude-weights", action="append", default=[], metavar="NAME",
                    help="do not use the imatrix for tensors whose name contains NAME")
    ap.add_argument("--output-tensor-type", metavar="GGML_TYPE")
    ap.add_argument("--token-embedding-type", metavar="GGML_TYPE")
    # both go to one list in command-line order, as llama-quantize keeps them (first match wins)
    ap.add_argument("--tensor-type", action=_InOrder, dest="tensor_types", default=[],
                    metavar="REGEX=GGML_TYPE",
                    help="type for tensors whose name matches REGEX (repeatable)")
    ap.add_argument("--tensor-type-file", action=_InOrder, dest="tensor_types", metavar="FILE",
                    help="REGEX=GGML_TYPE entries, separated by whitespace")
    ap.add_argument("--keep-split", action="store_true",
                    help="a split input gives split outputs of the same layout")
    ap.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                    help="set metadata: TYPE int, float, bool or str (repeatable)")
    ap.add_argument("--prune-layers", metavar="L0,L1,...", help="drop these blocks")
    ap.add_argument("--hf-outtype", choices=("f32", "f16", "bf16", "auto"), default="f16",
                    help="for a Hugging Face folder: the precision it is converted to first, "
                         "as convert_hf_to_gguf.py --outtype (default f16, its default)")
    ap.add_argument("--method", choices=("llama", "gptq"), default="llama",
                    help="llama: llama-quantize's bytes (default); gptq: the block matrices by GPTQ "
                         "with layer Hessians from --calibrate, same types and size")
    ap.add_argument("--calibrate", metavar="TEXT",
                    help="calibration text for --method gptq, and with --target-bpw/--target-size "
                         "for measuring how much each tensor kind's error costs")
    ap.add_argument("--hessian", metavar="FILE",
                    help="--method gptq with the Hessians kquant-imatrix --hessian-out saved")
    ap.add_argument("--gptq-one-shot", action="store_true",
                    help="--method gptq with Hessians from one pass of the float model, instead of "
                         "block by block on the quantized blocks' outputs (the default)")
    ap.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="--method gptq: round each block's columns by decreasing activity "
                         "(default), or in storage order")
    ap.add_argument("--gptq-damp", type=float, default=DAMP, metavar="F",
                    help=f"--method gptq: dampening, this fraction of the Hessian's mean diagonal "
                         f"added to it (default {DAMP})")
    ap.add_argument("--gptq-sink-weight", type=float, default=SINK_WEIGHT, metavar="W",
                    help=f"--method gptq: how many times each calibration chunk's first token "
                         f"(the attention sink) counts in the Hessians (default {SINK_WEIGHT:g})")
    ap.add_argument("--gptq-asym", type=float, default=ASYM, metavar="A",
                    help=f"--method gptq: how far each sweep aims at the float model's outputs "
                         f"rather than the matrix's own on its error-carrying inputs, 0 to 1 "
                         f"(default {ASYM:g})")
    ap.add_argument("--gptq-holdout", type=int, default=HOLDOUT, metavar="N",
                    help=f"--method gptq: every N-th calibration chunk stays out of the Hessians and "
                         f"chooses, row by row, between GPTQ's and plain quantization's bytes "
                         f"(default {HOLDOUT}; 0: chosen on the Hessians themselves)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where --method gptq runs the model over the calibration text (default "
                         "auto: a GPU when CuPy sees one); the sweeps and --gptq-one-shot run on the CPU")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, metavar="N",
                    help="calibration chunk size in tokens (default 512)")
    ap.add_argument("--chunks", type=int, default=-1, metavar="N",
                    help="calibration chunks (default: all of the text)")
    ap.add_argument("--target-bpw", type=float, metavar="X",
                    help="choose each quantized tensor's type (K-quants and Q8_0; legacy types for "
                         "rows the K-quants do not fit) so that all tensor data is at most X bits "
                         "per weight, minimising the estimated loss; TYPE's rules still say which "
                         "tensors are quantized, --tensor-type and the embedding/output types win")
    ap.add_argument("--target-size", type=int, metavar="BYTES",
                    help="as --target-bpw, for a file of at most BYTES bytes")
    ap.add_argument("--sensitivity", metavar="FILE",
                    help="with a budget: the tensors' measured sensitivities; read FILE when it "
                         "exists (measured for the same weights and imatrix), else measure them on "
                         "--calibrate's text and write FILE, to reuse for other types and budgets")
    add_cluster_arg(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="print each tensor's type and the sizes, write nothing")
    ap.add_argument("args", nargs="+", metavar="INPUT [OUTPUT] TYPE [nthreads]")
    return ap


def _is_ftype(s: str) -> bool:
    try:
        _parse_ftype(s)
        return True
    except ModelError:
        return False


def _parse_ftype(s: str):
    if s.strip().upper() == "COPY":
        return "COPY"  # every tensor as it is
    try:
        return mixes.parse_ftype(s)
    except ValueError as e:
        raise ModelError(str(e)) from None


def parse_positionals(args: list[str], dry_run: bool) -> tuple[Path, Path | None, object, int | None]:
    """INPUT [OUTPUT] TYPE [nthreads], told apart as llama-quantize does: if the second word
    is a type, there is no OUTPUT (it defaults to ggml-model-TYPE.gguf beside the input)."""
    if len(args) < 2:
        raise ModelError("expected INPUT [OUTPUT] TYPE [nthreads]")
    inp = Path(args[0])
    rest = args[1:]
    if _is_ftype(rest[0]):
        ftype = _parse_ftype(rest[0])
        out = None if dry_run else default_output_name(inp, rest[0])
        rest = rest[1:]
    else:
        if len(rest) < 2:
            raise ModelError("missing TYPE")
        out = Path(rest[0])
        ftype = _parse_ftype(rest[1])
        rest = rest[2:]
    threads = None
    if rest:
        try:
            threads = int(rest[0])
        except ValueError:
            raise ModelError(f"invalid nthread {rest[0]!r}") from None
        if len(rest) > 1:
            raise ModelError(f"unexpected arguments: {' '.join(rest[1:])}")
    return inp, out, ftype, (threads if threads and threads > 0 else None)


def options_from_args(ns: argparse.Namespace, n_threads: int | None) -> QuantizeOptions:
    tensor_types = []
    for option, value in ns.tensor_types:
        if option != "--tensor-type-file":
            tensor_types.append(value)
            continue
        try:
            tensor_types += Path(value).read_text().split()
        except OSError as e:
            raise ModelError(f"--tensor-type-file: {e}") from None
    try:
        pairs = [mixes.parse_tensor_type_option(s) for s in tensor_types]
        out_type = mixes.parse_ggml_type(ns.output_tensor_type) if ns.output_tensor_type else None
        emb_type = mixes.parse_ggml_type(ns.token_embedding_type) if ns.token_embedding_type else None
    except ValueError as e:
        raise ModelError(str(e)) from None
    prune = []
    if ns.prune_layers:
        try:
            prune = sorted({int(x) for x in ns.prune_layers.split(",")})
        except ValueError:
            raise ModelError(f"invalid --prune-layers {ns.prune_layers!r}") from None
    if not 0 <= ns.gptq_damp < float("inf"):
        raise ModelError(f"--gptq-damp must be a number >= 0, not {ns.gptq_damp}")
    if not 0 < ns.gptq_sink_weight < float("inf"):
        raise ModelError(f"--gptq-sink-weight must be a number > 0, not {ns.gptq_sink_weight}")
    if not 0 <= ns.gptq_asym <= 1:
        raise ModelError(f"--gptq-asym must be a number from 0 to 1, not {ns.gptq_asym}")
    if ns.target_bpw is not None and ns.target_size is not None:
        raise ModelError("--target-bpw and --target-size cannot be used together")
    if ns.target_bpw is not None and not 0 < ns.target_bpw <= 32:
        raise ModelError(f"--target-bpw must be a number above 0 and at most 32 (F32), not {ns.target_bpw}")
    if ns.target_size is not None and ns.target_size <= 0:
        raise ModelError(f"--target-size must be a number of bytes above 0, not {ns.target_size}")
    if ns.sensitivity and ns.target_bpw is None and ns.target_size is None:
        raise ModelError("--sensitivity is for a budget: give --target-bpw or --target-size too")
    if not (ns.gptq_holdout == 0 or ns.gptq_holdout >= 2):
        raise ModelError(f"--gptq-holdout must be 0 or at least 2, not {ns.gptq_holdout}")
    if ns.include_weights and ns.exclude_weights:
        raise ModelError("--include-weights and --exclude-weights cannot be used together")
    return QuantizeOptions(
        allow_requantize=ns.allow_requantize, leave_output_tensor=ns.leave_output_tensor,
        pure=ns.pure, imatrix=ns.imatrix, include_weights=ns.include_weights,
        exclude_weights=ns.exclude_weights, output_tensor_type=out_type,
        token_embedding_type=emb_type, tensor_types=pairs,
        override_kv=[parse_override_kv(s) for s in ns.override_kv], prune_layers=prune,
        keep_split=ns.keep_split, n_threads=n_threads, hf_outtype=ns.hf_outtype,
        method=ns.method, calibrate=ns.calibrate, hessian=ns.hessian, calibrate_ctx=ns.ctx_size,
        calibrate_chunks=ns.chunks, sequential=not ns.gptq_one_shot,
        gptq=GptqSettings(damp=ns.gptq_damp, act_order=ns.gptq_act_order,
                          sink_weight=ns.gptq_sink_weight, asym=ns.gptq_asym,
                          holdout=ns.gptq_holdout), device=ns.device,
        target_bpw=ns.target_bpw, target_size=ns.target_size,
        sensitivity=ns.sensitivity, cluster=ns.cluster)


def dry_run(inp: Path, ftype, opts: QuantizeOptions) -> None:
    t0 = time.perf_counter()
    plan = plan_quantization(open_model(inp, opts.hf_outtype), ftype, opts)
    allocation = apply_budget(plan, opts, inp, opts.n_threads, progress=sys.stderr.isatty())
    loss = {} if allocation is None else {name: est for name, _, est, _ in allocation.rows}
    mib = 1024 * 1024
    for i, p in enumerate(plan.tensors, 1):
        shape = ", ".join(str(n) for n in p.source.shape)
        change = (f"{p.source.nbytes / mib:8.2f} MiB -> {p.new_nbytes / mib:8.2f} MiB ({p.target.name})"
                  if p.target != p.source.type else f"{p.new_nbytes / mib:8.3f} MiB")
        est = f", estimated loss = {loss[p.name]:.4g}" if p.name in loss else ""
        print(f"[{i:4d}/{len(plan.tensors):4d}] {p.name:<36s} - [{shape}], type = "
              f"{p.source.type.name:>6s}, size = {change}{est}")
    if allocation is not None:
        if allocation.sensitivity is not None:
            print(allocation.sensitivity.line())
        print(allocation.line())
    n = plan.n_elements
    print(f"model size = {plan.size_in / mib:.2f} MiB ({8 * plan.size_in / n:.2f} BPW), "
          f"quant size = {plan.size_out / mib:.2f} MiB ({8 * plan.size_out / n:.2f} BPW), "
          f"{time.perf_counter() - t0:.1f} s (dry run: nothing written)")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-quantize", lambda: _run(ns), "interrupted; no output written")


def _run(ns: argparse.Namespace) -> int:
    inp, out, ftype, n_threads = parse_positionals(ns.args, ns.dry_run)
    opts = options_from_args(ns, n_threads)
    if ns.dry_run:
        dry_run(inp, ftype, opts)
        return 0
    shown = ftype if isinstance(ftype, str) else ftype.name.replace("MOSTLY_", "")
    print(f"kquant-quantize: quantizing '{inp}' to '{out}' as {shown}", file=sys.stderr)
    summary = quantize_model(inp, out, ftype, opts, progress=sys.stderr.isatty(),
                             log=lambda line: print(line, file=sys.stderr))
    if summary.allocation:
        print(summary.allocation, file=sys.stderr)
    if summary.gptq:
        print(summary.gptq, file=sys.stderr)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
