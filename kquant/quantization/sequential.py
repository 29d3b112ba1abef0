"""Sequential GPTQ: the blocks quantized in order, each calibrated on the outputs of the blocks
already quantized (GPTQ's own schedule, Frantar et al., 2022, section 4).

A one-shot calibration (kquant.calibration.hessian) sees every block's inputs as the float model
makes them; at inference a block's inputs carry the errors of every quantized block before it.
Here all calibration chunks run together, one block at a time, the way the errors will compound:

    X = token_embd[chunks]                                     (N tokens, n_embd)
    for each block:
        h  = rms_norm(X) * attn_norm;  H = h^T h   -> Wq, Wk, Wv quantized (GPTQ)
        a  = attention(h) with the quantized Q, K, V;  H = a^T a  -> Wo quantized
        X1 = X + a @ Wo_q^T
        h2 = rms_norm(X1) * ffn_norm;  H = h2^T h2 -> Wgate, Wup quantized
        g  = silu(h2 @ Wgate_q^T) * (h2 @ Wup_q^T);  H = g^T g  -> Wdown quantized
        X  = X1 + g @ Wdown_q^T

as the runtime's block computes it (pass_block): Q/K/V or gate/up fused in one matrix (phi3)
are swept as one, embeddings scaled and outputs post-normed where the model does (gemma2), the
attention windowed and soft-capped where it is.
Each matrix's Hessian is the float64 sum over all N tokens of its (already quantized-upstream)
input, the first token of every chunk counted `GptqSettings.sink_weight` times (see there); each quantized matrix replaces the float one in the model at once, as its file bytes
decode, so what follows it sees what llama.cpp will compute. The block scale searches keep the
plan's imatrix (--imatrix, or the float calibration's): their fit stays llama.cpp's.
With GptqSettings.asym (the default) the float model's stream runs beside the quantized one
(`float_inputs`, before each block's matrices are replaced), and each matrix's sweep aims at a
target pulled towards the float model's outputs (gptq.corrected_target): the errors upstream
are partly made up for downstream instead of being carried on.
Every `GptqSettings.holdout`-th chunk stays out of the Hessians: on its tokens, each counted
once, each row of a sweep's result is judged against plain quantization's (gptq.Heldout).
Activations for all N tokens are held at once (twice with the float stream): N x n_ff float32 (100 MB for 16k tokens of a
1536-wide FFN; 720 MB at 11008).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..calibration.hessian import calibration_tokens
from ..codecs.api import dequantize, numba_threads
from ..errors import ModelError
from ..runtime.chunks import chunk_sequences
from ..runtime.device import to_host
from ..runtime.gpu_matrices import GpuMatrix
from ..runtime.forward import Segment, Transformer
from .calibrated import GptqReport, gptq_types, quantize_matrix
from .gptq import Heldout, corrected_target

F32 = np.float32


def gram(x: Any) -> np.ndarray:
    """sum over rows of x x^T, in float64 (the layer Hessian of the input rows x), on the host."""
    x64 = x.astype(np.float64)
    return to_host(x64.T @ x64)


def _check_finite(name: str, x: Any, xp: Any = np) -> None:
    if not bool(xp.isfinite(x).all()):
        raise ModelError(f"non-finite values in the input of {name} during calibration "
                         f"(the model overflows float32 on this text)")


class SequentialGptq:
    """Quantize a model's block matrices block by block; `data[name]` gets each one's bytes.

    `planned` maps a source tensor name to its PlannedTensor (target type, imatrix). Matrices
    whose target GPTQ cannot sweep are quantized plainly (kquant's llama.cpp bytes), and those
    also replace the float weights, so later blocks see them as they will be."""

    def __init__(self, model: Transformer, planned: dict[str, Any], convert: Callable[[Any], np.ndarray],
                 report: GptqReport, n_threads: int | None = None):
        self.model = model
        self.planned = planned
        self.convert = convert  # PlannedTensor -> bytes, plain quantization (pipeline.convert_tensor)
        self.report = report
        self.n_threads = n_threads
        self.data: dict[str, np.ndarray] = {}
        self.n_ctx = 0  # tokens per chunk: row r of the activations is position r % n_ctx

    def run(self, chunks: list[np.ndarray], progress: bool = True) -> dict[str, np.ndarray]:
        m = self.model
        n_ctx = len(chunks[0])
        self.n_ctx = n_ctx
        x = m.xp.asarray(np.ascontiguousarray(m.weights.token_embd[np.concatenate(chunks)], F32))
        if m.config.scale_embd:  # as the runtime's forward: ggml_scale(inpL, sqrtf(n_embd))
            x *= np.sqrt(F32(m.config.n_embd))
        # the float model's own stream, when the sweeps aim at its outputs (GptqSettings.asym)
        x_fp = x.copy() if self.asym else None
        layers = m.weights.layers
        bar = tqdm(total=len(layers), desc="gptq", unit="block", disable=not progress, file=sys.stderr)
        with np.errstate(over="ignore", invalid="ignore"):
            for il, layer in enumerate(layers):
                fp = None
                if x_fp is not None:
                    fp, x_fp = self.float_inputs(il, layer, x_fp, n_ctx)
                x = self.block(il, layer, x, n_ctx, fp)
                bar.update(1)
        bar.close()
        return self.data

    @property
    def asym(self) -> bool:
        return any(p.gptq.asym for p in self.planned.values())

    def float_inputs(self, il: int, L: Any, x: np.ndarray, n_ctx: int
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The float block's matrix inputs (by the first matrix that reads each) for its float
        inputs x, and its float outputs; run before the block's matrices are replaced."""
        inputs: dict[str, np.ndarray] = {}

        def record(attrs: tuple[str, ...], h: np.ndarray) -> None:
            inputs[attrs[0]] = h

        return inputs, self.pass_block(il, L, x, n_ctx, record)

    def block(self, il: int, L: Any, x: np.ndarray, n_ctx: int,
              fp: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One block's matrices quantized on its inputs x (N, n_embd); returns the block's
        outputs from the quantized matrices. `fp` holds the float model's inputs of the
        matrices (float_inputs) when the sweeps aim at its outputs."""
        fp = fp or {}

        def quantize_readers(attrs: tuple[str, ...], h: np.ndarray) -> None:
            # the matrices that read one input share its Hessian
            stats = self.hessian_of(L.names[attrs[0]], h, fp.get(attrs[0]))
            for attr in attrs:
                self.quantize(L, attr, stats)

        return self.pass_block(il, L, x, n_ctx, quantize_readers)

    def pass_block(self, il: int, L: Any, x: np.ndarray, n_ctx: int,
                   before: Callable[[tuple[str, ...], np.ndarray], None]) -> np.ndarray:
        """Block il on inputs x (N, n_embd), as the runtime's block computes it, calling
        before(matrices, h) with each input h before the matrices that read it are used
        (Q/K/V or the fused attn_qkv; the output; gate and up, or the fused ffn_up; down)."""
        m, n = self.model, L.names
        h = m._rms_norm(x, L.attn_norm)
        before(("wqkv",) if L.wqkv is not None else ("wq", "wk", "wv"), h)
        attn = self.attention(il, L, h, n_ctx)
        before(("wo",), attn)
        out = m._linear(attn, L.wo, L.bo, n["wo"], None)
        if L.attn_post_norm is not None:
            out = m._rms_norm(out, L.attn_post_norm)
        x = x + out
        h2 = m._rms_norm(x, L.ffn_norm)
        before(("w_gate", "w_up") if L.w_gate is not None else ("w_up",), h2)
        g = m.ffn_hidden(L, h2)
        before(("w_down",), g)
        y = m._linear(g, L.w_down, None, n["w_down"], None)
        if L.ffn_post_norm is not None:
            y = m._rms_norm(y, L.ffn_post_norm)
        x += y
        return x

    def attention(self, il: int, L: Any, h: np.ndarray, n_ctx: int) -> np.ndarray:
        """The attention heads' output for every chunk, each a sequence from position 0."""
        m = self.model
        cache = m.new_cache(n_ctx)
        pos = m.xp.asarray(np.arange(n_ctx))
        out = []
        for c0 in range(0, len(h), n_ctx):
            cache.clear()
            seg = Segment(np.zeros(n_ctx, np.int64), cache)
            out.append(m.self_attention(il, L, h[c0:c0 + n_ctx], [seg], pos))
        return m.xp.concatenate(out)

    def hessian_of(self, name: str, x: np.ndarray, x_fp: np.ndarray | None = None) -> Stats | None:
        """What the sweep of a matrix with input x needs (Stats); None when GPTQ does not
        quantize it. `x_fp` is the float model's input of the matrix, when the sweep aims at
        its outputs."""
        p = self.planned.get(name)
        if p is None or p.target not in gptq_types() or p.target == p.source.type:
            return None
        xp = self.model.xp
        _check_finite(name, x, xp)
        use_fp = x_fp is not None and p.gptq.asym != 0
        if use_fp:
            _check_finite(name, x_fp, xp)
        else:
            x_fp = None
        fit, held = self.split(len(x), p.gptq.holdout)
        heldout = None
        if held is not None:
            # the judge counts every token once: the sink weight steers the sweep, but whether a
            # row's outputs came closer is asked token by token (on SmolLM2 as published, Q5_K_M,
            # judging with the weight too left the file worse than llama.cpp's; README)
            heldout = _heldout(self.rows(x, held), None if x_fp is None else self.rows(x_fp, held),
                               p.gptq.asym)
            x = self.rows(x, fit)
            x_fp = None if x_fp is None else self.rows(x_fp, fit)
        weight = p.gptq.sink_weight
        if weight != 1:  # both streams' first tokens scaled alike: the cross term gets the weight too
            x = x.copy()
            x[::self.n_ctx] *= np.float32(np.sqrt(weight))
            if use_fp:
                x_fp = x_fp.copy()
                x_fp[::self.n_ctx] *= np.float32(np.sqrt(weight))
        x64 = x.astype(np.float64)
        cross = None if x_fp is None else to_host((x_fp - x).astype(np.float64).T @ x64)
        return Stats(to_host(x64.T @ x64), cross, heldout)

    def split(self, n_rows: int, every: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The chunks the sweep fits (all but every `every`-th) and those that judge it; both
        None when there are fewer than `every` chunks (then the sweep's own Hessian judges)."""
        n_chunks = n_rows // self.n_ctx
        if every < 2 or n_chunks < every:
            return None, None
        index = np.arange(n_chunks)
        held = index % every == every - 1
        return index[~held], index[held]

    def rows(self, x: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """The activation rows of these chunks."""
        x3 = x.reshape(-1, self.n_ctx, x.shape[1])
        return x3[self.model.xp.asarray(chunks)].reshape(-1, x.shape[1])

    def quantize(self, L: Any, attr: str, stats: Stats | None) -> None:
        """Quantize the layer's matrix `attr` (GPTQ with a Hessian, and a cross term to aim
        at the float model's outputs, else plainly) and put what its bytes decode to in its
        place."""
        name = L.names[attr]
        p = self.planned.get(name)
        if p is None or p.target == p.source.type:
            return
        w = np.ascontiguousarray(_host_matrix(getattr(L, attr)), F32)
        if stats is not None:
            aim = None
            if stats.cross is not None:
                aim = corrected_target(w, stats.hessian, stats.cross, p.gptq.asym, p.gptq.damp)
            with numba_threads(self.n_threads):
                data = quantize_matrix(w, p.target, p.imatrix, stats.hessian, p.name, self.report,
                                       p.gptq, aim, stats.heldout)
        else:
            data = self.convert(p).reshape(w.shape[0], -1)
        self.data[name] = data.reshape(-1)
        q = dequantize(data.reshape(w.shape[0], -1), p.target).reshape(w.shape)
        setattr(L, attr, self.model.xp.asarray(q))


def _host_matrix(w: Any) -> np.ndarray:
    """A layer matrix as float32 on the host: on --device cuda a quantized source's matrices
    are their blocks on the GPU (GpuMatrix), dequantized here."""
    return w.dequantized() if isinstance(w, GpuMatrix) else to_host(w)


@dataclass
class Stats:
    """A matrix input's statistics for the sweep: its Hessian H = X_q^T X_q over the chunks it
    fits, the cross term (X_f - X_q)^T X_q with the float model's inputs X_f (or None), and
    the held-out chunks' Gram matrices that choose its rows (or None)."""

    hessian: np.ndarray
    cross: np.ndarray | None
    heldout: Heldout | None


def _heldout(x: Any, x_fp: Any | None, asym: float) -> Heldout:
    """Held-out Gram matrices (gptq.Heldout) of inputs x: the outputs aimed at are those of
    x + asym (x_fp - x), as the sweep's corrected target aims."""
    x64 = x.astype(np.float64)
    qq = to_host(x64.T @ x64)
    if x_fp is None:
        return Heldout(qq, qq, qq)
    m64 = x64 + asym * (x_fp.astype(np.float64) - x64)
    return Heldout(qq, to_host(m64.T @ x64), to_host(m64.T @ m64))


def sequential_gptq(model_path: str | Path, text_path: str | Path, planned: dict[str, Any],
                    convert: Callable[[Any], np.ndarray], report: GptqReport, n_ctx: int = 512,
                    n_chunks: int = -1, n_threads: int | None = None, progress: bool = True,
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """The bytes of every block matrix of `planned` (source name -> PlannedTensor), by GPTQ
    block after block over the calibration text's chunks (llama-imatrix's chunks: n_ctx tokens,
    the first replaced by BOS). On `device` cuda the forward passes and Hessian sums run in
    CuPy, the sweeps on the CPU."""
    from ..models import open_model

    if not Path(text_path).is_file():
        raise ModelError(f"{text_path}: no such calibration text")
    source = open_model(model_path, "f32")
    tokens, bos = calibration_tokens(source, text_path, n_ctx)
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks < 0 else min(n_chunks, n_max)
    if n < 1:
        raise ModelError("--chunks must be at least 1 for calibration")
    chunks = chunk_sequences(tokens, 0, n, n_ctx, bos)
    model = Transformer(source, device, progress)
    if model.config.n_expert:
        raise ModelError(f"{model_path}: sequential GPTQ does not support mixture-of-experts models "
                         f"({model.config.arch}, {model.config.n_expert} experts) yet")
    return SequentialGptq(model, planned, convert, report, n_threads).run(chunks, progress)
