"""--exact past 256 cells: llama.cpp pads its KV view to 256 cells (llama_kv_cache::get_n_kv),
and from a view of 512 cells ggml's CPU flash attention splits a single query's cells between
its threads (ops.cpp, use_split_kv_path) and reduces the chunks' partial results, so a decode
step's logits depend on llama.cpp's thread count. kernels.flash_attention_split_kv reproduces
that for any thread count, bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kquant.runtime.kernels import (flash_attention_split_kv, flash_attention_vec, kv_view_length,
                                    uses_split_kv)

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data" / "calibration.txt"
HQ, HKV, D = 4, 2, 64
SCALE = np.float32(1) / np.sqrt(np.float32(D))


@pytest.fixture(scope="module")
def ggml_compute():
    from kquant.reference import find_libggml
    from kquant.reference.libggml import GGMLCompute

    if find_libggml() is None:
        pytest.skip("llama.cpp's libggml not found: pip install -e '.[interop]'")
    return GGMLCompute()


def _inputs(rng, pos):
    """One query at position pos and the pos + 1 cells it sees: as ggml takes them (F16 k, v
    (cells, heads, d)) and as kquant's KV cache holds them (kt (heads, d, cells), v)."""
    q = (rng.standard_normal((1, HQ, D)) * 3).astype(np.float32)
    k = rng.standard_normal((pos + 1, HKV, D)).astype(np.float16)
    v = rng.standard_normal((pos + 1, HKV, D)).astype(np.float16)
    kt = np.ascontiguousarray(k.astype(np.float32).transpose(1, 2, 0))
    vv = np.ascontiguousarray(v.astype(np.float32).transpose(1, 0, 2))
    return q, k, v, kt, vv


def _same(a, b):
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_kv_view_length_is_llama_cpps():
    assert [kv_view_length(n) for n in (1, 255, 256, 257, 511, 512, 513, 700)] == \
        [256, 256, 256, 512, 512, 512, 768, 768]
    assert not uses_split_kv(1, 256) and uses_split_kv(1, 512) and not uses_split_kv(2, 512)


@pytest.mark.parametrize("pos", [256, 300, 511, 700])
def test_split_kv_flash_attention_is_ggmls_bit_for_bit(ggml_compute, pos):
    """A single query at pos (n_kv = 512 or 768 cells, the cells past pos masked) on 1-4
    threads: ggml's chunks (some partly, some wholly masked), reduced in chunk order with
    fused multiply-adds; kquant's output equals ggml's to the bit for every thread count, and
    the whole-KV kernel (ggml's path up to 256 cells) would not."""
    rng = np.random.default_rng(pos)
    q, k, v, kt, vv = _inputs(rng, pos)
    n_kv = kv_view_length(pos + 1)
    whole = np.empty_like(q)
    flash_attention_vec(q, kt, vv, pos, SCALE, HQ // HKV, whole)
    results = []
    for nth in (1, 2, 3, 4):
        ref = ggml_compute.flash_attn(q, k, v, float(SCALE), n0=pos, n_threads=nth)
        ours = np.empty_like(q)
        flash_attention_split_kv(q, kt, vv, pos, n_kv, nth, SCALE, HQ // HKV, ours)
        assert _same(ours, ref), (pos, nth)
        results.append(ref)
    # one chunk is the whole-KV computation; more chunks round differently
    assert _same(whole, results[0])
    assert any(not _same(whole, r) for r in results[1:])


def test_split_kv_with_a_wider_view(ggml_compute):
    """n_kv = 1024 for 301 visible cells (llama.cpp's view when another sequence of the cache
    reaches further): on 3 and 4 threads whole chunks are masked and skipped."""
    rng = np.random.default_rng(7)
    pos = 300
    q, k, v, kt, vv = _inputs(rng, pos)
    for nth in (2, 3, 4):
        ref = ggml_compute.flash_attn(q, k, v, float(SCALE), n0=pos, n_kv=1024, n_threads=nth)
        ours = np.empty_like(q)
        flash_attention_split_kv(q, kt, vv, pos, 1024, nth, SCALE, HQ // HKV, ours)
        assert _same(ours, ref), nth


def test_up_to_256_cells_no_thread_count_matters(ggml_compute):
    """Below a 512-cell view ggml takes its one-chunk path on any thread count: the unchanged
    flash_attention_vec."""
    rng = np.random.default_rng(3)
    pos = 255
    q, k, v, kt, vv = _inputs(rng, pos)
    ours = np.empty_like(q)
    flash_attention_vec(q, kt, vv, pos, SCALE, HQ // HKV, ours)
    for nth in (1, 3):
        assert _same(ours, ggml_compute.flash_attn(q, k, v, float(SCALE), n0=pos, n_threads=nth))


def _long_prompt(llm) -> tuple[str, list[int]]:
    """A prompt of ~300 tokens: the decode steps after it see more than 256 cells."""
    text = CALIB.read_text(encoding="utf-8")[:1400]
    text = text[:text.rfind(" ")]
    return text, llm.tokenize(text.encode(), add_bos=True, special=True)


@pytest.mark.parametrize("threads", [2, 3])
def test_exact_generation_past_256_cells_is_llama_cpps(capsys, tiny_llama_f32, llama_cpp, threads):
    """--exact through the KV cache past 256 cells: llama.cpp (llama-cpp-python, flash attention,
    2 or 3 threads) decodes over a 512-cell view with split-KV attention on 2 or 3 chunks;
    kquant's logits with exact_threads = that count equal its own bit for bit at every step
    (with 1 they do not), and kquant-generate --exact -t N prints the same greedy text (-t 3
    too on a 2-CPU machine: kquant runs 2 threads and reproduces llama.cpp's 3)."""
    from kquant.cli.generate import main as generate_main
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.runtime.device import set_threads
    from kquant.runtime.forward import Segment
    from kquant.tokenizer import Tokenizer

    steps = 8
    llm = llama_cpp.Llama(str(tiny_llama_f32), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads,
                          verbose=False, flash_attn=True, logits_all=True)
    prompt_text, prompt = _long_prompt(llm)
    assert 256 < len(prompt) < 512 - steps
    llm.eval(prompt)
    theirs, their_logits = [], []
    for _ in range(steps):
        their_logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
        theirs.append(int(np.argmax(their_logits[-1])))
        llm.eval([theirs[-1]])
    del llm

    model = Transformer(open_model(tiny_llama_f32, "f32"), "cpu", progress=False)
    model.exact = True
    runs = {}
    for nth in (threads, 1):
        model.exact_threads = nth
        cache = model.new_cache(512)
        # every row's logits, as llama.cpp with logits_all computes them (its last block's FFN
        # runs on all rows, with the matrix kernels of that many rows)
        ours = [model.forward([Segment(np.array(prompt), cache)])[-1]]
        for tok in theirs[:-1]:
            ours.append(model.forward([Segment(np.array([tok]), cache)], logit_rows=[0])[0])
        runs[nth] = ours
    assert _same(runs[threads][0], their_logits[0])  # the prompt: the tiled kernel, no split
    for step in range(1, steps):
        assert _same(runs[threads][step], their_logits[step]), step
    assert any(not _same(runs[1][s], their_logits[s]) for s in range(1, steps))

    try:
        assert generate_main(["-m", str(tiny_llama_f32), "-p", prompt_text, "-n", str(steps),
                              "-c", "512", "--exact", "-t", str(threads), "--device", "cpu",
                              "--temp", "0"]) == 0
    finally:
        set_threads(None)
    tok = Tokenizer.from_source(open_model(tiny_llama_f32, "f32"))
    text = b"".join(tok.token_to_piece(t) for t in theirs).decode()
    assert capsys.readouterr().out == prompt_text + text + "\n"
