"""What the validation modes share: llama-perplexity's settings, its batch layout, its ETA
line, and loading a model with its tokenizer for evaluation."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelError
from ..files.source import ModelSource
from ..runtime import Transformer
from ..tokenizer import Tokenizer

F32 = np.float32

Log = Callable[[str], None]


def log_stderr(s: str) -> None:
    print(s, file=sys.stderr)


def log_nothing(s: str) -> None:
    pass


@dataclass
class PerplexityParams:
    """llama-perplexity's settings for its perplexity and KL-divergence modes, with its defaults."""

    n_ctx: int = 512
    n_batch: int = 2048
    n_chunks: int = -1  # -1: every chunk of the text (ignored by the KL-divergence mode, as in llama.cpp)
    ppl_stride: int = 0  # > 0: strided perplexity (perplexity_v2)
    ppl_output_type: int = 0  # 1: one line per chunk instead of [i]ppl,
    logits_file: str = ""  # --kl-divergence-base: written in perplexity mode, read with kl_divergence
    kl_divergence: bool = False
    # llama.cpp's CPU float order (x86 AVX2 build) for every product, attention and log-softmax
    exact: bool = False


def eta_line(prefix: str, t_total: float, n_chunk: int, n_seq: int = 1) -> str:
    """llama-perplexity's '<prefix>: X seconds per pass - ETA [H hours ]M minutes', the ETA
    int(t_total * n_chunk / n_seq) seconds in float32 as llama.cpp computes it."""
    total_seconds = int(F32(F32(F32(t_total) * F32(n_chunk)) / F32(n_seq)))
    line = f"{prefix}: {t_total:.2f} seconds per pass - ETA "
    if total_seconds >= 60 * 60:
        line += f"{total_seconds // 3600} hours "
        total_seconds %= 3600
    return line + f"{total_seconds / 60.0:.2f} minutes"


def batch_layout(params: PerplexityParams) -> tuple[int, int]:
    """llama-perplexity's main(): n_parallel = max(1, b / c) sequences, n_batch = min(b, n_parallel * c)."""
    if params.n_ctx <= 0:
        raise ModelError("perplexity tool requires '--ctx-size' > 0")
    if params.n_batch <= 0:
        raise ModelError("the batch size -b must be > 0")
    n_par = max(1, params.n_batch // params.n_ctx)
    return n_par, min(params.n_batch, n_par * params.n_ctx)


def check_vocab(model: Transformer, n_vocab: int) -> None:
    rows = model.weights.output.shape[0]
    if rows != n_vocab:
        raise ModelError(f"the model's output has {rows} rows for a vocabulary of {n_vocab} tokens")


def pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def load_for_evaluation(model_path: str | Path, device: str,
                        n_threads: int | None) -> tuple[ModelSource, Tokenizer, str, int]:
    """The model's source and tokenizer, the resolved device and thread count."""
    from ..models import open_model
    from ..runtime import resolve_device, set_threads

    device = resolve_device(device)
    threads = set_threads(n_threads)
    source = open_model(model_path, "f32")
    tokenizer = Tokenizer.from_source(source)
    if tokenizer.add_eos:
        raise ModelError("the model's tokenizer adds EOS to every text, which llama-perplexity does not "
                         "support either")
    return source, tokenizer, device, threads
