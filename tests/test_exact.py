"""Results that move with nothing but the file: kquant-perplexity's chunks and kquant-imatrix's
file are the same for -t 1, 2 and 3 (kquant.runtime.gemm fixes the float order of the
products), and --exact reproduces llama.cpp's CPU backend (x86 AVX2 build) to the bit.

Before, OpenBLAS's own threading split some products by thread count: SmolLM2 Q4_K_M over 3
chunks of wiki.test.raw printed [1]13.1531,[2]22.4292,[3]23.3315 with -t 1 and
[1]13.1321,[2]22.4836,[3]23.3878 with -t 2.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from kquant.runtime import gemm
from kquant.runtime.device import set_threads

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data" / "calibration.txt"
TINY_HF = ROOT / "data" / "tiny-llama"


def test_products_do_not_depend_on_the_thread_count():
    """The shapes OpenBLAS split differently on 1 and 2 threads (attention's probabilities
    times values at 510 keys: 63% of the values moved), and a linear layer's."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 384, 510)).astype(np.float32)
    v = rng.standard_normal((3, 510, 64)).astype(np.float32)
    x = rng.standard_normal((510, 576)).astype(np.float32)
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    results = []
    try:
        for t in (1, 2, 3):
            set_threads(t)
            results.append((gemm.batched_matmul(s, v), gemm.matmul_nt(x, w)))
    finally:
        set_threads(None)
    for a, b in results[1:]:
        assert np.array_equal(a, results[0][0]) and np.array_equal(b, results[0][1])
    np.testing.assert_allclose(results[0][1], x @ w.T, rtol=1e-4, atol=1e-3)


def test_small_batched_products_run_inline_with_the_pool_s_bits(monkeypatch):
    """A decode step's attention products (under INLINE_MACS) run on the calling thread: the
    same per-head BLAS calls as on the pool's threads, so the same bits for every thread count."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 3, 64)).astype(np.float32)
    k = rng.standard_normal((3, 64, 300)).astype(np.float32)[:, :, :230]  # a cache's view
    assert 3 * 3 * 64 * 230 < gemm.INLINE_MACS
    results = []
    try:
        for t, inline in ((1, True), (2, True), (2, False), (3, False)):
            set_threads(t)
            monkeypatch.setattr(gemm, "INLINE_MACS", 1 << 22 if inline else 0)
            s = gemm.batched_matmul(q, k)
            results.append(s)
            results.append(gemm.batched_matmul(s, np.ascontiguousarray(k.transpose(0, 2, 1))))
    finally:
        set_threads(None)
    for i, r in enumerate(results):
        assert np.array_equal(r, results[i % 2])
    np.testing.assert_allclose(results[0], q @ k, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cpus", [2, 5])
def test_cutting_a_product_between_threads_keeps_its_bits(monkeypatch, cpus):
    """matmul_nt cuts every product into tiles that depend on its shape and the machine's CPU
    count only, so 1 to 5 threads make the same single-threaded BLAS calls (OpenBLAS's Haswell
    kernel gives other bits where the columns are cut elsewhere), and the result is the plain
    product's to float noise."""
    monkeypatch.setattr(gemm, "MAX_TILES", cpus)
    rng = np.random.default_rng(3)
    shapes = [(512, 576, 576), (512, 576, 192), (512, 1536, 576), (256, 576, 4160), (300, 1000, 1000),
              (230, 576, 1536), (128, 4096, 704), (170, 576, 1536), (8, 576, 1536), (1, 576, 576)]
    try:
        for M, K, N in shapes:
            x = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((N, K)).astype(np.float32)
            outs = []
            for t in (1, 2, 3, 4, 5):
                gemm.set_pool_threads(t)
                outs.append(gemm.matmul_nt(x, w))
            for t, o in enumerate(outs[1:], 2):
                assert np.array_equal(o, outs[0]), (M, K, N, t)
            np.testing.assert_allclose(outs[0], x @ w.T, rtol=1e-4, atol=1e-3)
    finally:
        set_threads(None)


def test_products_are_cut_by_the_shape_and_the_machine_not_the_thread_count(monkeypatch):
    """One tile per CPU of the machine (MAX_TILES) on 16-row boundaries, each big enough for
    OpenBLAS's regular kernel, whatever the thread count: on 12 CPUs SmolLM2's 576-row matrices
    on 512 tokens in 12 tiles of 48 rows, its 192-row ones in 6 of 32; on 2 CPUs 288 + 288; a
    small product in fixed 128-row tiles."""
    try:
        for cpus, big_rows, small_rows in ((12, 48, 32), (2, 288, 96)):
            monkeypatch.setattr(gemm, "MAX_TILES", cpus)
            tiles = []
            for t in (1, 2, 64):
                gemm.set_pool_threads(t)
                tiles.append([gemm.column_tiles(512, 576, n) for n in (576, 192, 49152)]
                             + [gemm.column_tiles(1, 576, 576)])
            assert tiles[0] == tiles[1] == tiles[2]
            big, small, vocab, one = tiles[0]
            assert big == [(big_rows * i, big_rows * i + big_rows) for i in range(576 // big_rows)]
            assert small == [(small_rows * i, small_rows * i + small_rows) for i in range(192 // small_rows)]
            assert len(vocab) == cpus
            assert all(512 * 576 * (b - a) >= gemm.SPLIT_MIN_MACS for a, b in big + small + vocab)
            assert one == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    finally:
        set_threads(None)


def test_rounding_the_kv_cache_to_half_is_numpys():
    from kquant.runtime.kernels import round_to_half

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 192)) * np.logspace(-10, 6, 192)).astype(np.float32)
    x[0, :7] = [np.inf, -np.inf, 7e4, -1e-8, 65519.99, 6e-8, 0.0]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    round_to_half(x)
    assert np.array_equal(x, want)


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory, tiny_llama_f32):
    from kquant import QuantizeOptions, quantize_model

    path = tmp_path_factory.mktemp("threads") / "tiny-Q4_K_M.gguf"
    quantize_model(tiny_llama_f32, path, "Q4_K_M", QuantizeOptions(), progress=False)
    return path


def test_perplexity_is_the_same_for_any_thread_count(capsys, tiny_q4_k_m):
    """3 chunks of 512 in one batch: physical batches of 170 tokens per sequence, attention
    over 170, 340 and 510 keys (the old threaded BLAS printed [1]160.4754 with -t 1 and
    [1]160.4629 with -t 2 here)."""
    from kquant.cli.perplexity import main

    outs = []
    for t in ("1", "2", "3"):
        assert main(["-m", str(tiny_q4_k_m), "-f", str(CALIB), "--chunks", "3",
                     "-t", t, "--no-progress"]) == 0
        outs.append(capsys.readouterr().out.splitlines()[:2])  # chunks and final estimate
    assert outs[0] == outs[1] == outs[2]


def test_imatrix_is_the_same_for_any_thread_count(tmp_path, capsys):
    from kquant.cli.imatrix import main

    files = []
    for t in ("1", "2"):
        out = tmp_path / f"t{t}.gguf"
        assert main(["-m", str(TINY_HF), "-f", str(CALIB), "-o", str(out), "-c", "256",
                     "--chunks", "6", "-t", t, "--device", "cpu"]) == 0
        files.append(out.read_bytes())
    capsys.readouterr()
    assert files[0] == files[1]


def test_kl_divergence_and_generation_are_the_same_for_any_thread_count(tmp_path, capsys, tiny_q4_k_m,
                                                                        tiny_llama_f32):
    """KL-divergence statistics (against the F32 model's logits) and greedy generation, -t 1 and 2."""
    from kquant.cli.generate import main as generate
    from kquant.cli.perplexity import main as perplexity

    base = tmp_path / "f32.logits"
    assert perplexity(["-m", str(tiny_llama_f32), "-f", str(CALIB), "--chunks", "3", "-c", "256",
                       "--kl-divergence-base", str(base), "--no-progress"]) == 0
    capsys.readouterr()
    kld, text = [], []
    for t in ("1", "2"):
        assert perplexity(["-m", str(tiny_q4_k_m), "--kl-divergence-base", str(base), "--kl-divergence",
                           "-c", "256", "-t", t, "--no-progress"]) == 0
        kld.append([line for line in capsys.readouterr().out.splitlines()
                    if not line.startswith("kquant-perplexity:")])  # the summary has timings
        assert generate(["-m", str(tiny_q4_k_m), "-p", "It was a dark night", "-n", "24", "-t", t,
                         "--temp", "0"]) == 0
        text.append(capsys.readouterr().out)
    assert kld[0] and kld[0] == kld[1]
    assert text[0] == text[1] and len(text[0]) > 40


# every architecture's blocks beyond llama's: fused products and LongRoPE (phi3), the GELU
# table, soft-caps, a sliding window, post-norms (gemma2), two rope bases (gemma3)
ARCH_FIXTURES = ["tiny-phi3", "tiny-gemma2", "tiny-gemma3", "tiny-qwen2moe", "tiny-mixtral"]


@pytest.mark.parametrize("fixture", ARCH_FIXTURES)
def test_every_architecture_is_the_same_for_any_thread_count(tmp_path, capsysbinary, hf_fixture,
                                                             hf_fixture_gguf, fixture):
    """Per-chunk perplexities of the Q4_K_M file, the imatrix file's bytes (from the HF folder)
    and greedy generation (random weights: bytes that are no UTF-8), with -t 1 and 2."""
    from kquant.cli.generate import main as generate
    from kquant.cli.imatrix import main as imatrix
    from kquant.cli.perplexity import main as perplexity

    model = hf_fixture_gguf(fixture, "Q4_K_M")
    outs = []
    for t in ("1", "2"):
        assert perplexity(["-m", str(model), "-f", str(CALIB), "--chunks", "3", "-c", "128", "-t", t,
                           "--no-progress"]) == 0
        ppl = capsysbinary.readouterr().out.splitlines()[:2]
        out = tmp_path / f"t{t}.gguf"
        assert imatrix(["-m", str(hf_fixture(fixture)), "-f", str(CALIB), "-o", str(out), "-c", "128",
                        "--chunks", "3", "-t", t, "--no-progress"]) == 0
        capsysbinary.readouterr()
        assert generate(["-m", str(model), "-p", "It was a dark night", "-n", "16", "-t", t,
                         "--temp", "0"]) == 0
        outs.append((ppl, out.read_bytes(), capsysbinary.readouterr().out))
    assert outs[0] == outs[1]


def test_default_thread_count_leaves_out_busy_cpus(monkeypatch):
    """The default -t: one thread per CPU that other processes do not keep busy, at least one
    (a thread waiting for a busy core holds up every parallel loop's join)."""
    from kquant.runtime import device

    ticks = iter([{0: (0, 100), 1: (0, 100), 2: (0, 100)},      # (busy, total) per CPU
                  {0: (100, 200), 1: (50, 200), 2: (0, 200)}])
    monkeypatch.setattr(device, "_cpu_times", lambda: next(ticks))
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    assert device.busy_cpus({0, 1, 2}) == pytest.approx(1.5)
    monkeypatch.setattr(device, "usable_cpus", lambda: {0, 1, 2})
    for busy, threads in ((0.0, 3), (0.4, 3), (1.5, 1), (2.6, 1), (3.0, 1), (1.2, 2)):
        monkeypatch.setattr(device, "busy_cpus", lambda cpus, b=busy: b)
        assert device.default_threads() == threads


def test_default_thread_count_on_a_busy_machine():
    """With a process spinning on every CPU, the default is one thread (measured: generation
    7x slower on 2 threads than on 1 there, tools/bench_busy.py)."""
    import subprocess
    import sys

    from kquant.runtime import device

    cpus = device.usable_cpus()
    if len(cpus) > 4:
        pytest.skip("spins one process per CPU: only on small machines")
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
    try:
        import time
        time.sleep(0.5)
        assert device.default_threads() == 1
    finally:
        for p in spin:
            p.kill()
            p.wait()


def test_one_chunk_flash_attention_is_ggmls_bit_for_bit():
    """Under 64 queries a sequence ggml runs flash_attn_ext_f16_one_chunk (Q in F16, V summed in
    F16), which the tiled kernel does not reproduce; flash_attention_vec does, bit for bit."""
    from kquant.reference import find_libggml
    from kquant.reference.libggml import GGMLCompute
    from kquant.runtime.kernels import flash_attention, flash_attention_vec

    if find_libggml() is None:
        pytest.skip("llama.cpp's libggml not found: pip install -e '.[interop]'")
    g = GGMLCompute()
    rng = np.random.default_rng(1)
    hq, hkv, d = 4, 2, 64
    tiled_differs = False
    for T in (1, 5, 40, 63):
        q = rng.standard_normal((T, hq, d)).astype(np.float32)
        k = rng.standard_normal((T, hkv, d)).astype(np.float16)
        v = rng.standard_normal((T, hkv, d)).astype(np.float16)
        scale = np.float32(1) / np.sqrt(np.float32(d))
        kt = np.ascontiguousarray(k.astype(np.float32).transpose(1, 2, 0))
        vv = np.ascontiguousarray(v.astype(np.float32).transpose(1, 0, 2))
        ours, tiled = np.empty_like(q), np.empty_like(q)
        flash_attention_vec(q, kt, vv, 0, scale, hq // hkv, ours)
        flash_attention(q, kt, vv, 0, scale, hq // hkv, tiled)
        ref = g.flash_attn(q, k, v, float(scale))
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), T
        tiled_differs |= not np.array_equal(tiled, ref)
    assert tiled_differs


def test_exact_float_model_prints_llama_perplexitys_digits(capsys, tiny_llama_f32):
    """--exact on the F32 tiny model: every chunk and the final estimate as llama-perplexity
    (AVX2 build) printed them (tests/data/perplexity_ref/tiny-llama-f32.c128.out), -t 1 and 2."""
    from kquant.cli.perplexity import main

    wiki = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip("wiki.test.raw not available")
    ref = (Path(__file__).parent / "data" / "perplexity_ref" / "tiny-llama-f32.c128.out").read_text()
    want = [line for line in ref.splitlines() if line.startswith(("[1]", "Final estimate"))]
    for t in ("1", "2"):
        assert main(["-m", str(tiny_llama_f32), "-f", str(wiki), "-c", "128", "--chunks", "8",
                     "--exact", "-t", t, "--no-progress"]) == 0
        assert capsys.readouterr().out.splitlines()[:2] == [want[0].rstrip(), want[1]]


def test_exact_imatrix_is_llama_imatrixs(tmp_path, capsys):
    """kquant-imatrix --exact on the tiny model (F32): every value equals llama-imatrix's
    (tests/data/imatrix_ref/tiny-llama.c128.gguf, made by llama-imatrix), and the chunk
    perplexities print the same digits."""
    import re

    from kquant.calibration.imatrix_file import load_imatrix
    from kquant.cli.imatrix import main

    text = ROOT.parent / "shared" / "text" / "calibration" / "pg84.txt"
    if not text.is_file():
        pytest.skip("calibration texts not available")
    ref_dir = Path(__file__).parent / "data" / "imatrix_ref"
    out = tmp_path / "im.gguf"
    assert main(["-m", str(TINY_HF), "-f", str(text), "-o", str(out), "-t", "2", "--device", "cpu",
                 "-c", "128", "--chunks", "6", "--process-output", "--exact", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ours, ref = load_imatrix(out), load_imatrix(ref_dir / "tiny-llama.c128.gguf")
    assert sorted(ours.entries) == sorted(ref.entries)
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].sums, e.sums, err_msg=name)
    want = re.findall(r"\[\d+\][\d.]+,", (ref_dir / "tiny-llama.c128.out").read_text())
    assert re.findall(r"\[\d+\][\d.]+,", printed) == want


# (type, reference in tests/data/perplexity_ref made by llama-perplexity, arguments)
EXACT_CASES = [
    ("Q8_0", "c128", ["-f", "WIKI", "-c", "128", "--chunks", "8"]),
    ("Q6_K", "c128", ["-f", "WIKI", "-c", "128", "--chunks", "8"]),
    ("Q4_K_M", "c128", ["-f", "WIKI", "-c", "128", "--chunks", "8"]),
    ("Q2_K", "c128", ["-f", "WIKI", "-c", "128", "--chunks", "8"]),
    ("Q3_K_M", "calib", ["-f", "CALIB"]),
    ("Q5_K_M", "calib", ["-f", "CALIB"]),
]


@pytest.mark.parametrize("ftype", ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ3_M"])
def test_exact_i_quants_print_llama_perplexitys_digits(capsys, tiny_llama_quant, ftype):
    """--exact on the tiny model quantized (byte-identical to llama-quantize) to IQ4_NL (every
    matrix repacked: ggml's iq4_nl 8x8 GEMM / GEMV), IQ4_XS and the IQ3 mixes (IQ3_XXS with
    IQ3_S and Q5_K tensors, IQ3_S, IQ3_M with Q4_K ones: the tiled kernel over 8+ tokens,
    vec_dot below): every chunk and the final estimate to the printed digit."""
    import re

    from kquant.cli.perplexity import main

    wiki = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip("wiki.test.raw not available")
    model = tiny_llama_quant(ftype)
    assert main(["-m", str(model), "-f", str(wiki), "-c", "128", "--chunks", "8", "--exact",
                 "-t", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    text = (Path(__file__).parent / "data" / "perplexity_ref" / f"tiny-llama-{ftype}.c128.out").read_text()
    pattern = r"\[\d+\][\d.]+,|Final estimate: PPL = [\d.]+ \+/- [\d.]+"
    assert re.findall(pattern, out) == re.findall(pattern, text)


@pytest.mark.parametrize("ftype", ["IQ2_M", "IQ2_M-plain", "IQ1_S", "IQ1_M"])
def test_exact_grid_i_quants_print_llama_perplexitys_digits(capsys, tiny_llama_cpp_grid_quant,
                                                            ftype):
    """--exact on the tiny model's llama-quantize IQ2_M (IQ2_S, IQ2_XS, IQ2_XXS), IQ1_S and
    IQ1_M files (with IQ2_XXS, Q2_K, Q5_K, Q4_K matrices: ggml's tiled kernel over 8+ tokens,
    vec_dot below): every chunk and the final estimate to the printed digit."""
    import re

    from kquant.cli.perplexity import main

    wiki = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip("wiki.test.raw not available")
    assert main(["-m", str(tiny_llama_cpp_grid_quant(ftype)), "-f", str(wiki), "-c", "128", "--chunks", "8", "--exact",
                 "-t", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    text = (Path(__file__).parent / "data" / "perplexity_ref" / f"tiny-llama-{ftype}.c128.out").read_text()
    pattern = r"\[\d+\][\d.]+,|Final estimate: PPL = [\d.]+ \+/- [\d.]+"
    assert re.findall(pattern, out) == re.findall(pattern, text) and len(re.findall(pattern, out)) == 9


@pytest.mark.parametrize("ftype, ref, args", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_exact_quantized_prints_llama_perplexitys_digits(capsys, tiny_llama_f32, tmp_path, ftype, ref, args):
    """--exact on the tiny model quantized by kquant-quantize (llama-quantize's bytes) to every
    K-quant family: every chunk and the final estimate to the printed digit (repacked Q4_K,
    the tiled K-quant kernel, tinyBLAS Q8_0, vec_dot, both flash-attention kernels)."""
    import re

    from kquant import QuantizeOptions, quantize_model
    from kquant.cli.perplexity import main

    wiki = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip("wiki.test.raw not available")
    model = tmp_path / f"tiny-{ftype}.gguf"
    quantize_model(tiny_llama_f32, model, ftype, QuantizeOptions(), progress=False)
    args = [str(wiki) if a == "WIKI" else str(CALIB) if a == "CALIB" else a for a in args]
    assert main(["-m", str(model), *args, "--exact", "-t", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    text = (Path(__file__).parent / "data" / "perplexity_ref" / f"tiny-llama-{ftype}.{ref}.out").read_text()
    pattern = r"\[\d+\][\d.]+,|Final estimate: PPL = [\d.]+ \+/- [\d.]+"
    assert re.findall(pattern, out) == re.findall(pattern, text)


def test_exact_generation_logits_are_llama_cpps(tmp_path, capsys, tiny_llama_f32, llama_cpp):
    """--exact through the KV cache, token by token (the one-chunk attention, vec_dot and the
    repacked GEMV on one token): every step's logits equal llama.cpp's bit for bit
    (llama-cpp-python with flash attention, as llama.cpp's tools default to), F32 and Q4_K_M;
    kquant-generate --exact prints the same greedy text."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.cli.generate import main as generate_main
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.runtime.forward import Segment
    from kquant.tokenizer import Tokenizer

    prompt_text = "It was a dark and stormy night, and"
    q4 = tmp_path / "tiny-Q4_K_M.gguf"
    quantize_model(tiny_llama_f32, q4, "Q4_K_M", QuantizeOptions(), progress=False)
    for path in (tiny_llama_f32, q4):
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False, flash_attn=True,
                              logits_all=True)
        prompt = llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
        llm.eval(prompt)
        theirs, their_logits = [], []
        for _ in range(12):
            their_logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
            theirs.append(int(np.argmax(their_logits[-1])))
            llm.eval([theirs[-1]])
        model = Transformer(open_model(path, "f32"), "cpu", progress=False)
        model.exact = True
        cache = model.new_cache(128)
        ours = [model.forward([Segment(np.array(prompt), cache)])[-1]]
        for tok in theirs[:-1]:
            ours.append(model.forward([Segment(np.array([tok]), cache)], logit_rows=[0])[0])
        for step, (a, b) in enumerate(zip(ours, their_logits)):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), (path.name, step)
        assert generate_main(["-m", str(path), "-p", prompt_text, "-n", "12", "--exact",
                              "--device", "cpu", "--temp", "0"]) == 0
        tok = Tokenizer.from_source(open_model(path, "f32"))
        text = b"".join(tok.token_to_piece(t) for t in theirs).decode()
        assert capsys.readouterr().out == prompt_text + text + "\n"


_RSS_AFTER_FREE = """
import sys, numpy as np
from kquant.runtime.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
a = np.ones(64 << 18, np.float32)  # 64 MiB
del a
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or platform.libc_ver()[0] != "glibc",
                    reason="needs Linux's /proc and glibc's malloc")
def test_freed_memory_stays_with_the_commands():
    """kquant-perplexity / -imatrix / -generate keep what the forward pass frees (fresh pages cost
    ~3 us each on a VM that returns freed memory to its host): a freed 64 MiB array stays
    resident with keep_freed_memory, and goes back to the system without it."""
    import subprocess
    import sys

    def grown(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent)
        return int(out.stdout.strip())

    if grown("keep") < 60:
        pytest.fail("keep_freed_memory did not keep a freed 64 MiB array")
    assert grown("plain") < 8


# fixture, the files with llama-perplexity references (tests/data/perplexity_ref, -c 128 x 8)
WINDOWED = [("tiny-gemma2", ("F32", "Q4_K_M")), ("tiny-gemma3", ("Q4_K_M",)), ("tiny-gemma3-vl", ("Q4_K_M",))]


@pytest.mark.parametrize("fixture, ftypes", WINDOWED, ids=[w[0] for w in WINDOWED])
def test_exact_windowed_models_are_llama_cpps(capsys, hf_fixture, hf_fixture_gguf, tmp_path, fixture, ftypes):
    """--exact on the sliding-window fixtures (gemma2: a 32-key window on even layers,
    attention and final soft-capping; gemma3: 5 windowed layers of 6 with their own rope base,
    Q/K norms; -vl: linear rope scaling, final soft-capping; all: the GELU table, post-norms):
    llama-perplexity's digits (tests/data/perplexity_ref) and llama-imatrix's values bit for
    bit (tests/data/imatrix_ref/FIXTURE.c128.gguf)."""
    import re

    from kquant.calibration.imatrix_file import load_imatrix
    from kquant.cli.imatrix import main as imatrix
    from kquant.cli.perplexity import main as perplexity

    wiki = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
    text = ROOT.parent / "shared" / "text" / "calibration" / "pg84.txt"
    if not wiki.is_file() or not text.is_file():
        pytest.skip("shared texts not available")
    pattern = r"\[\d+\][\d.]+,|Final estimate: PPL = [\d.]+ \+/- [\d.]+"
    for ftype in ftypes:
        assert perplexity(["-m", str(hf_fixture_gguf(fixture, ftype)), "-f", str(wiki), "-c", "128",
                           "--chunks", "8", "--exact", "-t", "2", "--no-progress"]) == 0
        ref = "f32" if ftype == "F32" else ftype
        want = (Path(__file__).parent / "data" / "perplexity_ref" / f"{fixture}-{ref}.c128.out").read_text()
        assert re.findall(pattern, capsys.readouterr().out) == re.findall(pattern, want), ftype
    out = tmp_path / "im.gguf"
    assert imatrix(["-m", str(hf_fixture(fixture)), "-f", str(text), "-o", str(out), "-c", "128",
                    "--chunks", "4", "--process-output", "--exact", "-t", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ref_dir = Path(__file__).parent / "data" / "imatrix_ref"
    want = re.findall(r"\[\d+\][\d.]+,", (ref_dir / f"{fixture}.c128.out").read_text())
    assert re.findall(r"\[\d+\][\d.]+,", printed) == want
    ours, theirs = load_imatrix(out), load_imatrix(ref_dir / f"{fixture}.c128.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].sums, e.sums, err_msg=name)


@pytest.mark.parametrize("fixture, n_ctx, steps", [("tiny-gemma2", 128, 40), ("tiny-gemma2", 768, 280),
                                                   ("tiny-gemma3", 128, 40)])
def test_exact_windowed_generation_is_llama_cpps(hf_fixture_gguf, llama_cpp, fixture, n_ctx, steps):
    """Token by token through the sliding window (a window of 32 after the prompt) and, at
    -c 768, past 256 cells, where ggml splits the cells between its 2 threads: every step's
    logits equal llama-cpp-python's (flash attention) bit for bit."""
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.runtime.forward import Segment

    path = hf_fixture_gguf(fixture, "F32")
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, verbose=False, flash_attn=True, logits_all=True)
    try:
        prompt = llm.tokenize(b"It was a dark and stormy night, and", add_bos=True, special=True)
        llm.eval(prompt)
        theirs, their_logits = [], []
        for _ in range(steps):
            their_logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
            theirs.append(int(np.argmax(their_logits[-1])))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    model = Transformer(open_model(path, "f32"), "cpu", progress=False)
    model.exact, model.exact_threads = True, 2
    cache = model.new_cache(n_ctx)
    ours = [model.forward([Segment(np.array(prompt), cache)])[-1]]
    for tok in theirs[:-1]:
        ours.append(model.forward([Segment(np.array([tok]), cache)], logit_rows=[0])[0])
    for step, (a, b) in enumerate(zip(ours, their_logits)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), step


def test_exact_refuses_a_context_beyond_the_sliding_window_cache(hf_fixture_gguf, capsys):
    """llama.cpp's SWA cache (window 32 + 512 cells, padded: 768) reuses cells past its size, so
    the keys' order, and the sums, change: --exact refuses -c 1024 and says what fits."""
    from kquant.cli.perplexity import main

    assert main(["-m", str(hf_fixture_gguf("tiny-gemma2", "F32")), "-f", str(CALIB), "-c", "1024",
                 "--exact", "--no-progress"]) == 1
    assert "use -c 768 or less" in capsys.readouterr().err
