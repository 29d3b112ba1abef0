#!/usr/bin/env python3
"""kquant-quantize against llama-quantize on the same input, side by side.

The input is a model where quantization dominates the run: TinyLlama-1.1B's shapes (hidden
2048, FFN 5632, 32 heads, 4 KV heads, vocabulary 32000) cut to 2 layers, written as an F16
GGUF with seeded heavy-tailed random weights, and a random imatrix in llama-imatrix's GGUF
layout. Both tools quantize it with the same type, imatrix and thread count; the script
prints each one's wall time and peak memory (max RSS of the child process), the ratios,
and whether the two output files are byte-identical.

    python tools/bench_quantize.py --llama-quantize /path/to/llama-quantize   # Q4_K_M, 2 threads
    python tools/bench_quantize.py --llama-quantize BIN --types Q4_K_M Q6_K --threads 2 --repeats 3

llama-quantize comes from llama.cpp's source in the llama-cpp-python 0.3.36 sdist:
cmake -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON, target llama-quantize (../shared/README.md).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as T, GGUFValueType  # noqa: E402

from kquant.files.gguf_write import write_gguf  # noqa: E402
from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix_gguf  # noqa: E402
from kquant.files.source import KV, ModelSource, SourceTensor  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def tinyllama_shapes(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml-order shape) of TinyLlama-1.1B's tensors for the first n_layers blocks."""
    kv_dim = HIDDEN // HEADS * KV_HEADS
    out = [("token_embd.weight", (HIDDEN, VOCAB)), ("output_norm.weight", (HIDDEN,)),
           ("output.weight", (HIDDEN, VOCAB))]
    for i in range(n_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (HIDDEN,)), (b + "attn_q.weight", (HIDDEN, HIDDEN)),
                (b + "attn_k.weight", (HIDDEN, kv_dim)), (b + "attn_v.weight", (HIDDEN, kv_dim)),
                (b + "attn_output.weight", (HIDDEN, HIDDEN)), (b + "ffn_norm.weight", (HIDDEN,)),
                (b + "ffn_gate.weight", (HIDDEN, FFN)), (b + "ffn_up.weight", (HIDDEN, FFN)),
                (b + "ffn_down.weight", (FFN, HIDDEN))]
    return out


def make_model(path: Path, n_layers: int, seed: int) -> None:
    def tensor(i: int, name: str, shape: tuple[int, ...]) -> SourceTensor:
        def load() -> np.ndarray:
            rng = np.random.default_rng(seed + i)
            if len(shape) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shape[0])).astype(np.float32)
            # Student-t: real weights have heavier tails than a Gaussian
            w = 0.02 * rng.standard_t(5, size=shape[::-1]).astype(np.float32)
            return w.astype(np.float16)
        return SourceTensor(name, shape, T.F32 if len(shape) == 1 else T.F16, load)

    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kv = [KV("general.architecture", "llama", GGUFValueType.STRING),
          KV("general.name", "TinyLlama-shaped 2-layer benchmark", GGUFValueType.STRING),
          KV("llama.block_count", n_layers, u32), KV("llama.context_length", 2048, u32),
          KV("llama.embedding_length", HIDDEN, u32), KV("llama.feed_forward_length", FFN, u32),
          KV("llama.attention.head_count", HEADS, u32),
          KV("llama.attention.head_count_kv", KV_HEADS, u32),
          KV("llama.rope.freq_base", 10000.0, f32),
          KV("llama.attention.layer_norm_rms_epsilon", 1e-5, f32),
          KV("general.file_type", 1, u32), KV("llama.vocab_size", VOCAB, u32),
          KV("llama.rope.dimension_count", HIDDEN // HEADS, u32)]
    tensors = [tensor(i, n, s) for i, (n, s) in enumerate(tinyllama_shapes(n_layers))]
    write_gguf(ModelSource("llama", kv, tensors), path, progress=False)


def make_imatrix(path: Path, n_layers: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["bench"], chunk_count=10, chunk_size=512, has_metadata=True)
    for name, shape in tinyllama_shapes(n_layers):
        if len(shape) == 2 and name != "token_embd.weight":
            sums = (rng.exponential(1.0, shape[0]) ** 2 * 5120).astype(np.float32)
            im.entries[name] = ImatrixEntry(sums, np.array([5120]))
    save_imatrix_gguf(im, path)


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one command run to completion."""
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty tool cannot block
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-quantize", required=True, help="path of llama.cpp's llama-quantize")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool; best time kept")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "bench"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, imatrix = work / f"tinyllama-{args.layers}l-f16.gguf", work / "imatrix.gguf"
    if not model.exists():
        print(f"writing {model} ...", flush=True)
        make_model(model, args.layers, seed=0)
    make_imatrix(imatrix, args.layers, seed=1)
    size_mib = model.stat().st_size / 2**20
    print(f"# input {model.name} ({size_mib:.0f} MiB), imatrix, {args.threads} threads, "
          f"best of {args.repeats}")
    print("| type | llama-quantize s | kquant s | time ratio | llama MiB | kquant MiB | "
          "memory ratio | output |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    kq = [sys.executable, "-m", "kquant.cli.quantize"]
    all_same = True
    for qtype in args.types:
        ref, out = work / f"ref-{qtype}.gguf", work / f"kq-{qtype}.gguf"
        best = {"llama": (1e9, 0), "kquant": (1e9, 0)}
        for _ in range(args.repeats):  # interleaved: the machine's speed drifts
            for tool, cmd in (("llama", [args.llama_quantize]), ("kquant", kq)):
                target = ref if tool == "llama" else out
                wall, rss = run(cmd + ["--imatrix", str(imatrix), str(model), str(target), qtype,
                                       str(args.threads)])
                best[tool] = (min(best[tool][0], wall), max(best[tool][1], rss))
        same = ref.read_bytes() == out.read_bytes()
        all_same &= same
        (lt, lm), (kt, km) = best["llama"], best["kquant"]
        print(f"| {qtype} | {lt:.2f} | {kt:.2f} | {kt / lt:.2f}x | {lm} | {km} | {km / lm:.2f}x | "
              f"{'identical' if same else 'DIFFERENT'} |", flush=True)
        ref.unlink()
        out.unlink()
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
