#!/usr/bin/env python3
"""kquant-perplexity and kquant-imatrix speed on `--device cuda` against `--device cpu`.

    python tools/bench_runtime_devices.py                       # data/tiny-llama, F32 and Q4_K_M
    python tools/bench_runtime_devices.py --model M.gguf --ctx 512 --chunks 20
    python tools/bench_runtime_devices.py --devices cpu         # no GPU: checks the script runs

For each model and device: the perplexity of `--chunks` chunks of `--ctx` tokens of the text
(data/calibration.txt by default), then an importance matrix over the same chunks, each after
a one-chunk warm-up (which compiles the kernels: Numba's, and on the GPU the block kernels and
CuPy's). Tokens/s are chunks x ctx over each tool's own compute time (loading and tokenizing
excluded). By default the model is the project's tiny model (data/tiny-llama: 4 blocks,
n_embd 256, a 4096-token vocabulary) as an F32 GGUF and quantized to Q4_K_M by kquant (on the
GPU its quantized matrices stay blocks, kquant.runtime.gpu_matrices): a model that small keeps
a GPU mostly idle, so its figures show overheads rather than a large model's throughput.

Prints a markdown table; `--tsv FILE` appends one "check<TAB>result<TAB>detail" row per model
and tool (tools/gpu_check.sh gathers those into its summary).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kquant.calibration.imatrix import ImatrixParams, run_imatrix  # noqa: E402
from kquant.validation.common import PerplexityParams  # noqa: E402
from kquant.validation.perplexity import run_perplexity  # noqa: E402

TINY_LLAMA = ROOT / "data" / "tiny-llama"
TEXT = ROOT / "data" / "calibration.txt"


def tiny_llama_models(workdir: Path) -> list[Path]:
    """data/tiny-llama as an F32 GGUF and as Q4_K_M (quantized by kquant), made in workdir."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model
    from kquant.quantization.mixes import parse_ftype

    f32 = workdir / "tiny-llama-F32.gguf"
    write_gguf(load_hf_model(TINY_LLAMA, "f32"), f32, progress=False)
    q4 = workdir / "tiny-llama-Q4_K_M.gguf"
    quantize_model(f32, q4, parse_ftype("Q4_K_M"), QuantizeOptions(), progress=False)
    return [f32, q4]


def _quiet(_: str) -> None:
    pass


def perplexity_speed(model: Path, text: Path, device: str, ctx: int, chunks: int) -> tuple[float, float]:
    """(tokens/s, perplexity) after a one-chunk warm-up."""
    for n in (1, chunks):
        r = run_perplexity(model, text, PerplexityParams(n_ctx=ctx, n_chunks=n), device=device,
                           progress=False, log=_quiet, emit=_quiet)
    return r.n_chunks * r.n_ctx / r.seconds, r.ppl


def imatrix_speed(model: Path, text: Path, device: str, ctx: int, chunks: int, out: Path) -> float:
    """tokens/s of an importance matrix after a one-chunk warm-up."""
    for n in (1, chunks):
        params = ImatrixParams(n_ctx=ctx, n_chunks=n, output_frequency=0, out_file=str(out))
        r = run_imatrix(model, text, params, device=device, progress=False, log=_quiet)
    return r.n_tokens / r.seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, help="GGUF model(s) (default: tiny-llama F32, Q4_K_M)")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--tsv", type=Path, help="append summary rows to this file")
    a = ap.parse_args(argv)

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = a.model or tiny_llama_models(Path(tmp))
        print(f"# {a.chunks} chunks of {a.ctx} tokens of {a.text.name}; tokens/s over each tool's compute time")
        print("| model | device | perplexity tok/s | PPL | imatrix tok/s |")
        print("|---|---|---:|---:|---:|")
        for model in models:
            speed: dict[str, tuple[float, float, float]] = {}
            for device in a.devices:
                ppl_tps, ppl = perplexity_speed(model, a.text, device, a.ctx, a.chunks)
                im_tps = imatrix_speed(model, a.text, device, a.ctx, a.chunks, Path(tmp) / "imatrix.gguf")
                speed[device] = (ppl_tps, ppl, im_tps)
                print(f"| {model.name} | {device} | {ppl_tps:.0f} | {ppl:.4f} | {im_tps:.0f} |", flush=True)
            rows += _summary(model.name, speed)
    if a.tsv:
        with open(a.tsv, "a") as f:
            for row in rows:
                f.write("\t".join(row) + "\n")
    return 0


def _summary(model: str, speed: dict[str, tuple[float, float, float]]) -> list[tuple[str, str, str]]:
    """One row per tool: each device's tokens/s, the GPU's speed-up and its perplexity's
    relative difference from the CPU's where both ran."""
    rows = []
    for tool, i in (("perplexity", 0), ("imatrix", 2)):
        detail = ", ".join(f"{d} {v[i]:.0f} tok/s" for d, v in speed.items())
        if "cpu" in speed and "cuda" in speed:
            detail += f"; cuda/cpu {speed['cuda'][i] / speed['cpu'][i]:.2f}x"
            if tool == "perplexity":
                detail += f"; PPL rel. diff {abs(speed['cuda'][1] / speed['cpu'][1] - 1):.1e}"
        rows.append((f"{tool} {model}", "ok", detail))
    return rows


if __name__ == "__main__":
    sys.exit(main())
