"""kquant-convert: a Hugging Face model folder to GGUF, as llama.cpp's convert_hf_to_gguf.py.

    kquant-convert HF_DIR [--outtype f32|f16|bf16|q8_0|auto] [--outfile FILE]

Without --outfile the file goes into HF_DIR under the converter's default name
(NAME[-SIZE]-OUTTYPE.gguf, e.g. Tiny-Llama-1.6M-F16.gguf); an --outfile that is a folder gets
that name inside it, and "{ftype}" in an --outfile name is replaced by the outtype.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ModelError
from . import run_command

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kquant-convert",
        description="Convert a Hugging Face model folder (Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, "
                    "Qwen3-MoE, Phi-3, Phi-4-mini, Gemma 2, Gemma 3; safetensors) to a GGUF file, exactly as "
                    "llama.cpp's convert_hf_to_gguf.py does.")
    ap.add_argument("model", metavar="HF_DIR", help="the model folder (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16",
                    help="f32, f16 (default), bf16, q8_0, or auto (bf16/f16 after the weights' dtype); "
                         "1-D tensors, norms and biases stay f32")
    ap.add_argument("--outfile", metavar="FILE", type=Path, default=None,
                    help="output file or folder (default: the converter's name, in HF_DIR)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("kquant-convert", lambda: _run(args), "interrupted; no output written")


def _run(args: argparse.Namespace) -> int:
    from gguf import LlamaFileType, fill_templated_filename

    from ..files.gguf_write import write_gguf
    from ..files.hf import default_outfile_name, guess_outtype, load_hf_model

    t0 = time.time()
    folder = Path(args.model)
    outtype = args.outtype
    if outtype == "auto":
        if not folder.is_dir():
            raise ModelError(f"{folder} is not a directory")
        outtype = guess_outtype(folder)
    source = load_hf_model(folder, outtype)
    if source.not_runnable:  # the converter's own warning, with its consequence
        print(f"kquant-convert: warning: {source.not_runnable}", file=sys.stderr)
    if args.outfile is None:
        out = folder / default_outfile_name(source)
    elif args.outfile.is_dir():
        out = args.outfile / default_outfile_name(source)
    else:
        ftype_name = LlamaFileType(source.get("general.file_type")).name.partition("_")[2]
        out = args.outfile.parent / fill_templated_filename(args.outfile.name, ftype_name)
    progress = not args.no_progress and sys.stderr.isatty()
    write_gguf(source, out, progress=progress)
    size = sum(t.nbytes for t in source.tensors)
    print(f"{out}: {len(source.tensors)} tensors, {_size(size)} of tensor data ({outtype}), "
          f"{len(source.kv)} metadata keys, {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
