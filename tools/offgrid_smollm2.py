"""An "off-grid" F16 copy of SmolLM2-135M: fine-tuned briefly, then exactly rescaled off the Q4_1 grid.

Why: the only SmolLM2-135M we have (~/.cache/kquant/SmolLM2-135M-Instruct.Q4_1.gguf, and its F16
dequantization /work/cache/m/smollm2-f16.gguf made by tests/conftest.py:write_smollm2_f16) has
every 2-D weight exactly on a Q4_1 grid (32-value blocks, 16 levels from the block's min to its
max; token_embd on a Q8_0 grid). Quantizing it finds the grid again and flatters 4- and 5-bit
schemes: re-quantized to Q4_K its ffn_down error is 0.07 Q4_1 step against ~0.26 for weights off
any grid, to Q5_K 0.07 against 0.13. This tool makes an equivalent model whose weights are off
that grid, and which stays as good (wiki.test.raw perplexity within a few %; it improves).

Why not a fine-tune alone: a Q4_1 step on this model is large (~0.05, the weights' RMS is ~3.6
steps), so a 0.3-0.5-step move is a ~10% change of every weight. Fine-tuning on a book with
AdamW at lr 3e-4 moved the weights only 0.045 step RMS in 90 steps (2x256 tokens) and already
cost +35% wiki PPL; Q4_1-sized random noise (uniform +-0.5 step) costs +42%, Gaussian 0.5 step
+240%. The model can't absorb moves that big. So the grid is removed by an exact reparametrization that
the graph cannot see (`reparametrize`: per-channel rescalings moved between the RMSNorm weights
and the matrices after them, between attn_v rows and attn_output columns, and between ffn_up rows
and ffn_down columns; each matrix is rescaled along the dimension its blocks run along), after a
short fine-tune at a small lr that makes it a genuinely retrained model (and moves token_embd,
which no rescaling can touch because the output is tied to it).

What it does:
  1. reads the GGUF with kquant's reader (kquant.files.gguf_read.load_gguf) and tokenizes with
     kquant's own tokenizer, as kquant-perplexity does;
  2. builds a small PyTorch forward pass of llama.cpp's "llama" architecture in GGUF's own tensor
     layout (RMSNorm; rope in llama.cpp's "normal" mode, adjacent pairs x[2i], x[2i+1] rotated,
     which is right because convert_hf_to_gguf permutes the Q/K rows; GQA; SwiGLU; output tied to
     token_embd when the file has no output.weight);
  3. checks that forward: its perplexity of the original weights over the first --check-chunks
     512-token chunks of wiki.test.raw (second half of each chunk scored, as llama-perplexity)
     must agree with `python -m kquant.cli.perplexity -m MODEL -f wiki.test.raw -c 512` to
     --check-tol relative, or it stops;
  4. fine-tunes every 2-D weight (norms too with --train-norms) with AdamW at a fixed seed on
     random --seq-token windows of a Project Gutenberg book that is neither the evaluation text
     (wiki.test.raw) nor the calibration text (pg84.txt): default pg1342 (Pride and Prejudice),
     its Gutenberg header and licence cut off;
  5. applies the exact rescaling (--sym-sigma; 0: none) and checks, in F16, that the perplexity
     did not move (< 1e-3 relative);
  6. measures how far the weights left the grid: per kind of matrix the RMS change in units of
     the grid step of the original file's type (Q4_1: (max-min)/15 per 32-block; token_embd,
     Q8_0: max|x|/127), the fraction of values still within 1% of a step of their original
     value, and the distance to the nearest point of the original block's grid; and what a
     quantizer sees: the Q4_1 / Q4_K / Q5_K re-quantization error of input, output and a
     no-grid reference (see `requant_table`);
  7. writes an F16 GGUF with the input's metadata and tensor names/order (norms F32 as in the
     input) atomically (kquant.files.gguf_write.write_gguf writes a temporary file and renames
     it), then runs kquant-perplexity (--eval-chunks, 20 chunks of 512) on input and output.

What remains of the grid: a rescaling moves a weight in proportion to its value, so weights near
zero hardly move; re-quantization errors come out 93-99% of the no-grid reference's (RMS), where the
input's are 0-60%.

The command that made /work/cache/m/smollm2-offgrid-f16.gguf (7.7 minutes on 2 cores):

    python tools/offgrid_smollm2.py --model /work/cache/m/smollm2-f16.gguf \\
        --out /work/cache/m/smollm2-offgrid-f16.gguf \\
        --text /work/shared/text/calibration/pg1342.txt \\
        --steps 100 --lr 3e-5 --seq 256 --batch 2 --seed 0 --sym-sigma 0.2

Needs PyTorch (CPU build: pip install torch==2.13.0), not transformers.
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVAL_TEXT = "/work/shared/text/eval/wiki.test.raw"
BLOCK = 32


# ---------------------------------------------------------------------------------------------
# model


def load_model(path: str):
    """The GGUF's ModelSource, its config, and its tensors as float32 numpy arrays (numpy order:
    rows last in ggml terms, i.e. (out, in) for a matrix) by name, in file order."""
    import kquant
    from gguf import GGMLQuantizationType as T

    from kquant.files.gguf_read import load_gguf

    src = load_gguf(path)
    if src.arch != "llama":
        raise SystemExit(f"{path}: architecture {src.arch!r}, this tool knows only 'llama'")
    arr = {}
    for t in src.tensors:
        if t.type in (T.F32, T.F16):
            raw = np.ascontiguousarray(t.load())
            if raw.dtype == np.uint8:  # bytes of the storage type
                raw = raw.view(np.float32 if t.type == T.F32 else np.float16)
            x = raw.astype(np.float32)
        else:
            raw = np.ascontiguousarray(t.load()).view(np.uint8)
            x = kquant.dequantize(raw.reshape(t.n_elements // t.shape[0], -1), t.type)
        arr[t.name] = np.ascontiguousarray(x.reshape(tuple(reversed(t.shape))), dtype=np.float32)
    g = src.get
    cfg = dict(n_layer=int(g("llama.block_count")), n_embd=int(g("llama.embedding_length")),
               n_head=int(g("llama.attention.head_count")),
               n_head_kv=int(g("llama.attention.head_count_kv", g("llama.attention.head_count"))),
               eps=float(g("llama.attention.layer_norm_rms_epsilon")),
               freq_base=float(g("llama.rope.freq_base", 10000.0)))
    cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    rot = g("llama.rope.dimension_count")
    if rot is not None and int(rot) != cfg["head_dim"]:
        raise SystemExit(f"partial rope ({rot} of {cfg['head_dim']}) is not supported")
    if g("llama.rope.scaling.type") not in (None, "none"):
        raise SystemExit("rope scaling is not supported")
    return src, cfg, arr


class Llama:
    """llama.cpp's llama graph over a dict of torch tensors in GGUF's numpy layout."""

    def __init__(self, cfg: dict, params: dict):
        import torch

        self.cfg, self.p = cfg, params
        hd = cfg["head_dim"]
        self.inv_freq = cfg["freq_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self._rope: dict[int, tuple] = {}

    def rope_tables(self, n: int):
        import torch

        if n not in self._rope:
            ang = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
            self._rope[n] = (ang.cos().float(), ang.sin().float())  # (n, hd/2)
        return self._rope[n]

    def rms(self, x, w):
        import torch

        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["eps"]) * w

    @staticmethod
    def rope(x, cos, sin):
        """llama.cpp's normal mode: pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/d)."""
        import torch

        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def hidden(self, tokens):
        """tokens (B, T) int64 -> final normed hidden states (B, T, n_embd)."""
        import torch
        import torch.nn.functional as F

        c, p = self.cfg, self.p
        B, n = tokens.shape
        H, Hkv, hd = c["n_head"], c["n_head_kv"], c["head_dim"]
        cos, sin = self.rope_tables(n)
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, hd/2)
        x = F.embedding(tokens, p["token_embd.weight"])
        for i in range(c["n_layer"]):
            b = f"blk.{i}."
            h = self.rms(x, p[b + "attn_norm.weight"])
            q = (h @ p[b + "attn_q.weight"].T).view(B, n, H, hd).transpose(1, 2)
            k = (h @ p[b + "attn_k.weight"].T).view(B, n, Hkv, hd).transpose(1, 2)
            v = (h @ p[b + "attn_v.weight"].T).view(B, n, Hkv, hd).transpose(1, 2)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if Hkv != H:  # query head h reads kv head h // (H / Hkv), as llama.cpp
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(B, n, H * hd) @ p[b + "attn_output.weight"].T
            h = self.rms(x, p[b + "ffn_norm.weight"])
            g = F.silu(h @ p[b + "ffn_gate.weight"].T) * (h @ p[b + "ffn_up.weight"].T)
            x = x + g @ p[b + "ffn_down.weight"].T
        return self.rms(x, p["output_norm.weight"])

    @property
    def w_out(self):
        return self.p.get("output.weight", self.p["token_embd.weight"])

    def nll(self, tokens, lo: int = 0):
        """Per-token negative log-likelihoods of tokens[:, t+1] for t >= lo: (B, T-1-lo)."""
        import torch.nn.functional as F

        h = self.hidden(tokens)[:, lo:-1]
        logits = (h @ self.w_out.T).float()
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, lo + 1:].flatten(),
                               reduction="none").view(h.shape[0], -1)


def torch_ppl(model: Llama, tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: int | None) -> float:
    """llama-perplexity's default mode: chunk i is tokens[i*n_ctx:(i+1)*n_ctx] (first token BOS
    when the model adds one), scoring tokens first+1 .. n_ctx-1 with first = n_ctx // 2."""
    import torch

    first = n_ctx // 2
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = torch.from_numpy(tokens[i * n_ctx:(i + 1) * n_ctx].astype(np.int64))[None]
            if bos is not None:
                chunk[0, 0] = bos
            v = model.nll(chunk, lo=first).double()
            total += float(v.sum())
            count += v.numel()
    return math.exp(total / count)


def reparametrize(p: dict, cfg: dict, sigma: float, seed: int) -> dict:
    """An exactly equivalent model (in real arithmetic): random per-channel rescalings that the
    llama graph cannot see:
      - attn_norm channel c * t_c,  attn_q/k/v input column c / t_c   (RMSNorm is linear in w)
      - ffn_norm channel c * u_c,   ffn_gate/up input column c / u_c
      - attn_v output row j * r_j,  attn_output input column of each query head reading kv
        head j // head_dim, dim j % head_dim, / r_j   (attention is linear in V)
      - ffn_up output row j * s_j,  ffn_down input column j / s_j   (silu(g) * u is linear in u)
    Every matrix is rescaled along its input dimension, the one its 32-blocks run along, so
    each block is stretched unevenly and leaves its grid; the norm weights stay F32.
    The factors are exp(sigma * z), z = +-U(0.5, 1.0) for t and u (the norms) and
    z = +-U(1.25, 1.75) for r and s: every channel moves by at least exp(sigma / 2), and
    attn_v and ffn_up, which get a row factor and a column factor, never see the two cancel.
    Returns new float64 arrays for the tensors it changed."""
    rng = np.random.default_rng(seed + 1)
    H, Hkv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]

    def f(n, lo, hi):
        return np.exp(sigma * rng.choice([-1.0, 1.0], n) * rng.uniform(lo, hi, n))

    out = {}
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        w = {k: p[b + k].astype(np.float64) for k in ("attn_norm.weight", "attn_q.weight", "attn_k.weight",
             "attn_v.weight", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
             "ffn_up.weight", "ffn_down.weight")}
        t, u = f(w["attn_norm.weight"].shape[0], 0.5, 1.0), f(w["ffn_norm.weight"].shape[0], 0.5, 1.0)
        r, s = f(Hkv * hd, 1.25, 1.75), f(w["ffn_up.weight"].shape[0], 1.25, 1.75)
        w["attn_norm.weight"] *= t
        for k in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
            w[k] /= t[None, :]
        w["ffn_norm.weight"] *= u
        for k in ("ffn_gate.weight", "ffn_up.weight"):
            w[k] /= u[None, :]
        w["attn_v.weight"] *= r[:, None]
        w["attn_output.weight"] /= np.concatenate([r[(h // (H // Hkv)) * hd:(h // (H // Hkv) + 1) * hd]
                                                   for h in range(H)])[None, :]
        w["ffn_up.weight"] *= s[:, None]
        w["ffn_down.weight"] /= s[None, :]
        out.update({b + k: v for k, v in w.items()})
    return out


# ---------------------------------------------------------------------------------------------
# the grid


def grid_step(x: np.ndarray, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """Per 32-block of each row: the grid's origin and step of the original file's type
    (Q4_1: min + d*q, d = (max-min)/15; Q8_0: d*q, d = max|x|/127), broadcast to x's shape."""
    b = x.reshape(-1, BLOCK).astype(np.float64)
    if grid == "Q8_0":
        d = np.abs(b).max(1, keepdims=True) / 127
        m = np.zeros_like(d)
    else:
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d, m = (hi - lo) / 15, lo
    d = np.where(d > 0, d, np.inf)  # an all-equal block: any move is "infinitely" small
    return np.broadcast_to(m, b.shape).reshape(x.shape), np.broadcast_to(d, b.shape).reshape(x.shape)


def grid_measures(old: np.ndarray, new: np.ndarray, grid: str) -> dict:
    m, d = grid_step(old, grid)
    dx = (new.astype(np.float64) - old) / d
    on_old = np.abs((old - m) / d - np.round((old - m) / d))  # the original's own distance
    f = (new - m) / d
    off = np.abs(f - np.round(f))  # distance to the nearest point of the original block grid
    fin = np.isfinite(dx)
    return dict(n=int(fin.sum()), ss=float((dx[fin] ** 2).sum()), mean_abs=float(np.abs(dx[fin]).sum()),
                within=int((np.abs(dx[fin]) < 0.01).sum()), off_sum=float(off[fin].sum()),
                off_1pct=int((off[fin] < 0.01).sum()), old_off_max=float(on_old[fin].max()),
                old_off_1pct=int((on_old[fin] < 0.01).sum()))


def grid_of(name: str) -> str:
    """The grid the original file (~/.cache/kquant/SmolLM2-135M-Instruct.Q4_1.gguf) put the
    tensor on: token_embd Q8_0, every other matrix Q4_1."""
    return "Q8_0" if name == "token_embd.weight" else "Q4_1"


def kind_of(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


def grid_table(src, old: dict, new: dict) -> dict:
    """Print grid_measures summed per kind of matrix; returns the sums."""
    groups: dict[str, dict] = {}
    for t in src.tensors:
        if len(t.shape) != 2:
            continue
        m = grid_measures(old[t.name], new[t.name].astype(np.float32), grid_of(t.name))
        for key in ([kind_of(t.name), "all Q4_1 matrices"] if grid_of(t.name) == "Q4_1" else [kind_of(t.name)]):
            acc = groups.setdefault(key, {})
            for f, v in m.items():
                acc[f] = max(acc.get(f, 0.0), v) if f == "old_off_max" else acc.get(f, 0) + v
    print(f"  {'tensors':<18} {'RMS move':>9} {'mean|move|':>10} {'within 1%':>10} "
          f"{'dist to grid':>12} {'on grid 1%':>10} {'input on grid 1%':>16}")
    for key, a in groups.items():
        n = a["n"]
        print(f"  {key:<18} {math.sqrt(a['ss'] / n):9.3f} {a['mean_abs'] / n:10.3f} "
              f"{a['within'] / n:10.2%} {a['off_sum'] / n:12.3f} {a['off_1pct'] / n:10.2%} "
              f"{a['old_off_1pct'] / n:16.2%}", flush=True)
    return groups


def requant_table(src, old: dict, new: dict, seed: int) -> dict:
    """What a quantizer sees: the RMS error of re-quantizing the Q4_1 matrices to Q4_1 (every
    matrix), Q4_K and Q5_K (those whose rows are a multiple of 256: ffn_down), in units of each
    32-block's own Q4_1 step (max-min)/15, for the input, the output, and a reference with no
    grid at all: the input plus Gaussian noise of one step (a wrecked model, but its error is
    what weights of this distribution off any grid give). On its own grid the input requantizes
    to Q4_1 almost exactly."""
    import kquant
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(seed + 2)
    out = {}
    for qt in (T.Q4_1, T.Q4_K, T.Q5_K):
        acc = np.zeros((3, 2))
        t0 = time.perf_counter()
        for t in src.tensors:
            if len(t.shape) != 2 or grid_of(t.name) != "Q4_1" or t.shape[0] % (32 if qt == T.Q4_1 else 256):
                continue
            x0 = old[t.name]
            step = grid_step(x0, "Q4_1")[1]
            ref = x0 + rng.standard_normal(x0.shape) * np.where(np.isfinite(step), step, 0)
            for i, x in enumerate((x0, new[t.name].astype(np.float32), ref.astype(np.float32))):
                e = kquant.dequantize(kquant.quantize(x, qt), qt) - x
                r = (e / grid_step(x, "Q4_1")[1]).ravel()
                r = r[np.isfinite(r)].astype(np.float64)
                acc[i] += (np.dot(r, r), r.size)
        if acc[0, 1]:
            out[qt.name] = tuple(math.sqrt(a / n) for a, n in acc)
            print(f"  {qt.name} ({'all Q4_1 matrices' if qt == T.Q4_1 else 'ffn_down'}): input {out[qt.name][0]:.3f}, "
                  f"output {out[qt.name][1]:.3f}, no-grid reference {out[qt.name][2]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# kquant-perplexity


def kquant_ppl(model: str, chunks: int, text: str = EVAL_TEXT) -> tuple[float, list[float], str]:
    cmd = [sys.executable, "-m", "kquant.cli.perplexity", "-m", model, "-f", text, "-c", "512",
           "--chunks", str(chunks)]
    shown = "python -m kquant.cli.perplexity " + " ".join(cmd[3:])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{shown} failed:\n{r.stderr[-2000:]}")
    final = float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout).group(1))
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", r.stdout)]
    print(f"  {shown}\n    -> PPL {final:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return final, running, shown


# ---------------------------------------------------------------------------------------------


def gutenberg_body(text: str) -> str:
    """The book without Project Gutenberg's header and licence."""
    s = re.search(r"\*\*\* ?START OF TH(E|IS) PROJECT GUTENBERG EBOOK[^\n]*\n", text)
    e = re.search(r"\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG EBOOK", text)
    return text[s.end() if s else 0:e.start() if e else len(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/cache/m/smollm2-f16.gguf", help="input GGUF")
    ap.add_argument("--out", default="/work/cache/m/smollm2-offgrid-f16.gguf", help="output F16 GGUF")
    ap.add_argument("--text", default="/work/shared/text/calibration/pg1342.txt",
                    help="fine-tuning text (not wiki.test.raw, not pg84.txt)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=3e-5, help="AdamW peak learning rate")
    ap.add_argument("--seq", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (then cosine to 10%%)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--sym-sigma", type=float, default=0.2,
                    help="log-scale of the exact per-channel rescaling after fine-tuning (0: none)")
    ap.add_argument("--train-norms", action="store_true", help="fine-tune the RMSNorm weights too")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--check-chunks", type=int, default=4,
                    help="512-token chunks for the torch-vs-kquant forward check")
    ap.add_argument("--check-tol", type=float, default=1e-2, help="relative PPL agreement required")
    ap.add_argument("--eval-chunks", type=int, default=20,
                    help="kquant-perplexity chunks on the input and the output (0: skip)")
    ap.add_argument("--measure-only", action="store_true",
                    help="time a few training steps and stop (no output written)")
    ns = ap.parse_args(argv)

    import torch

    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV, ModelSource, SourceTensor
    from kquant.files.text import read_text
    from kquant.tokenizer import Tokenizer
    from gguf import GGMLQuantizationType as T

    if Path(ns.text).name in ("wiki.test.raw", "pg84.txt"):
        raise SystemExit(f"{ns.text}: the evaluation or calibration text; fine-tune on another")
    torch.set_num_threads(ns.threads)
    torch.manual_seed(ns.seed)
    t_start = time.perf_counter()

    src, cfg, arr = load_model(ns.model)
    tok = Tokenizer.from_source(src)
    bos = tok.bos_id if tok.add_bos else None
    print(f"model {ns.model}: {cfg}", flush=True)

    # --- 1. the forward pass checked against kquant-perplexity on the original weights
    print(f"forward check, {ns.check_chunks} chunks of 512 of {EVAL_TEXT}:", flush=True)
    t0 = time.perf_counter()
    wiki = np.asarray(tok.tokenize(read_text(EVAL_TEXT), add_special=True), np.int32)
    print(f"  tokenized: {len(wiki)} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    params = {k: torch.from_numpy(v.copy()) for k, v in arr.items()}  # arr stays the original
    model = Llama(cfg, params)
    t0 = time.perf_counter()
    ppl_torch0 = torch_ppl(model, wiki, 512, ns.check_chunks, bos)
    print(f"  torch forward:     PPL {ppl_torch0:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    eval_chunks = max(ns.eval_chunks, ns.check_chunks)
    ppl_kq0, running0, _ = kquant_ppl(ns.model, eval_chunks if ns.eval_chunks else ns.check_chunks)
    ppl_kq0_check = running0[ns.check_chunks - 1]  # cumulative PPL after check_chunks chunks
    rel = abs(ppl_torch0 - ppl_kq0_check) / ppl_kq0_check
    print(f"  kquant-perplexity: PPL {ppl_kq0_check:.4f} over the first {ns.check_chunks} chunks; "
          f"torch vs kquant relative difference {rel:.2e}", flush=True)
    if rel > ns.check_tol:
        raise SystemExit(f"torch forward disagrees with kquant-perplexity ({rel:.2e} > {ns.check_tol}): "
                         "the forward pass is wrong")

    # --- 2. fine-tune
    text = gutenberg_body(read_text(ns.text))
    train = torch.from_numpy(np.asarray(tok.tokenize(text, add_special=False), np.int64))
    print(f"fine-tuning text {ns.text}: {len(text)} characters, {len(train)} tokens", flush=True)
    trainable = [k for k, v in params.items() if v.ndim == 2 or ns.train_norms]
    for k in trainable:
        params[k].requires_grad_(True)
    opt = torch.optim.AdamW([params[k] for k in trainable], lr=ns.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=ns.weight_decay)

    def lr_at(step: int) -> float:  # step 0-based
        if step < ns.warmup:
            return ns.lr * (step + 1) / ns.warmup
        t = (step - ns.warmup) / max(1, ns.steps - ns.warmup)
        return ns.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(ns.seed)
    steps = 3 if ns.measure_only else ns.steps
    n_params = sum(params[k].numel() for k in trainable)
    print(f"training {len(trainable)} tensors ({n_params / 1e6:.1f} M values): seed {ns.seed}, "
          f"{steps} steps, AdamW lr {ns.lr:g} (warm-up {ns.warmup}, cosine to 10%), "
          f"wd {ns.weight_decay:g}, batch {ns.batch} x {ns.seq} tokens", flush=True)
    t_train = time.perf_counter()
    ema = None
    for step in range(steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, len(train) - ns.seq - 1, (ns.batch,), generator=gen)
        batch = torch.stack([train[s:s + ns.seq + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model.nll(batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if step < 3 or (step + 1) % 10 == 0 or step + 1 == steps:
            print(f"  step {step + 1:4d}/{steps}  loss {lv:.4f}  (ema {ema:.4f})  "
                  f"lr {lr_at(step):.2e}  {time.perf_counter() - t0:.1f} s/step", flush=True)
    t_train = time.perf_counter() - t_train
    print(f"training: {t_train:.0f} s ({t_train / max(1, steps):.1f} s/step)", flush=True)
    if ns.measure_only:
        return 0
    for k in trainable:
        params[k].requires_grad_(False)

    t0 = time.perf_counter()
    ppl_torch1 = torch_ppl(model, wiki, 512, ns.check_chunks, bos)
    print(f"torch forward after fine-tuning: PPL {ppl_torch1:.4f} over {ns.check_chunks} chunks "
          f"(was {ppl_torch0:.4f}; {time.perf_counter() - t0:.0f} s)", flush=True)
    tuned = {k: v.detach().numpy().copy() for k, v in params.items()}

    # --- 3. the exact reparametrization that takes the matrices off their grid
    final = dict(tuned)
    rel_sym = 0.0
    if ns.sym_sigma > 0:
        final.update(reparametrize(tuned, cfg, ns.sym_sigma, ns.seed))
        f16 = {k: torch.from_numpy(v.astype(np.float16).astype(np.float32) if v.ndim == 2
                                   else v.astype(np.float32)) for k, v in final.items()}
        t0 = time.perf_counter()
        ppl_sym = torch_ppl(Llama(cfg, f16), wiki, 512, ns.check_chunks, bos)
        rel_sym = abs(ppl_sym - ppl_torch1) / ppl_torch1
        print(f"after the rescaling (sigma {ns.sym_sigma:g}), as F16: PPL {ppl_sym:.4f} over {ns.check_chunks} "
              f"chunks, relative difference {rel_sym:.1e} from the fine-tuned model "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if rel_sym > 1e-3:
            raise SystemExit("the rescaling changed the model: a bug")
        del f16

    # --- 4. as F16 (norms F32), then how far from the grid
    def as_stored(w: dict) -> dict:
        return {t.name: (w[t.name].astype(np.float32) if t.type == T.F32 else w[t.name].astype(np.float16))
                for t in src.tensors}

    new = as_stored(final)
    stages = [("fine-tuning alone", as_stored(tuned))] if ns.sym_sigma > 0 else []
    stages.append(("written model", new))
    for label, w in stages:
        print(f"distance from the original grid, {label} (in grid steps of the original type: "
              "token_embd Q8_0, the other matrices Q4_1, per 32-block):", flush=True)
        groups = grid_table(src, arr, w)
    print("  (RMS/mean|move|: the change; 'within 1%': |change| < 0.01 step; 'dist to grid': mean distance "
          "to the nearest point of the original block grid, 0.25 when uniform; 'on grid 1%': within 0.01 "
          "step of a grid point, 2% when uniform; last column: the input's own; token_embd's input is off "
          "its Q8_0 grid by F16 rounding, up to 0.06 step)", flush=True)
    print("requantization RMS error, in Q4_1 steps of each block:", flush=True)
    requant = requant_table(src, arr, new, ns.seed)

    # --- 5. write, atomically (write_gguf writes a temporary file and renames it)
    kv = [KV(k.key, 1, k.type) if k.key == "general.file_type" else k for k in src.kv]

    def tensor(t):
        x = new[t.name]
        return SourceTensor(t.name, t.shape, T.F32 if x.dtype == np.float32 else T.F16, lambda: x)

    out = write_gguf(ModelSource(src.arch, kv, [tensor(t) for t in src.tensors]), ns.out, progress=False)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)

    # --- 6. kquant-perplexity before / after
    if ns.eval_chunks:
        print(f"kquant-perplexity, {eval_chunks} chunks of 512 of {EVAL_TEXT}:", flush=True)
        ppl_kq1, _, _ = kquant_ppl(str(out), eval_chunks)
        print(f"  before {ppl_kq0:.4f}  after {ppl_kq1:.4f}  ({(ppl_kq1 / ppl_kq0 - 1):+.2%})")
    a = groups["all Q4_1 matrices"]
    summary = (f"summary: seed {ns.seed}, {steps} steps x {ns.batch}x{ns.seq} tokens of {Path(ns.text).name}, "
               f"lr {ns.lr:g}, rescaling sigma {ns.sym_sigma:g}; Q4_1 matrices moved RMS {math.sqrt(a['ss'] / a['n']):.3f} steps, "
               f"{a['within'] / a['n']:.1%} within 1% of a step, Q4_1 requantization error "
               f"{requant['Q4_1'][0]:.3f} -> {requant['Q4_1'][1]:.3f} step (no grid: {requant['Q4_1'][2]:.3f}); torch-vs-kquant {rel:.1e}; ")
    if ns.eval_chunks:
        summary += f"wiki PPL ({eval_chunks}x512) {ppl_kq0:.4f} -> {ppl_kq1:.4f} ({ppl_kq1 / ppl_kq0 - 1:+.2%}); "
    summary += f"{time.perf_counter() - t_start:.0f} s in all"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
