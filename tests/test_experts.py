"""Mixture-of-experts pieces against hand-written references: build_moe_ffn's routing
(kquant.runtime.experts.route), llama-imatrix's per-expert accumulation order, and the model
checks that refuse what the runtime does not compute. (The whole models are compared with
llama.cpp in test_runtime, test_imatrix, test_perplexity and test_quantize_model.)"""
from __future__ import annotations

import numpy as np
import pytest

from kquant.errors import ModelError
from kquant.files.gguf_read import load_gguf
from kquant.files.source import KV, ModelSource
from kquant.runtime.config import read_config
from kquant.runtime.experts import accumulate_expert_sumsq, expert_rows, route, router_softmax


def test_router_softmax_is_a_softmax():
    logits = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32) * 3
    probs = router_softmax(logits)
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=2e-6)


def test_route_orders_normalizes_and_scales():
    probs = np.array([[0.1, 0.4, 0.2, 0.3],
                      [0.25, 0.25, 0.25, 0.25],   # ties: lower ids first, as ggml's argsort (insertion sort)
                      [1e-9, 2e-9, 0.0, 0.0]], np.float32)  # sum below 2^-14: clamped
    ids, w = route(probs, 2, norm=False, scale=0.0)
    assert ids.tolist() == [[1, 3], [0, 1], [1, 0]]
    np.testing.assert_array_equal(w, np.float32([[0.4, 0.3], [0.25, 0.25], [2e-9, 1e-9]]))
    _, w = route(probs, 2, norm=True, scale=0.0)
    # ggml_sum_rows adds in double, then rounds to float
    total = np.float32(np.float64(np.float32(0.4)) + np.float64(np.float32(0.3)))
    np.testing.assert_array_equal(w[0], np.float32([0.4, 0.3]) / total)
    np.testing.assert_array_equal(w[2], np.float32([2e-9, 1e-9]) / np.float32(6.103515625e-5))
    _, w2 = route(probs, 2, norm=True, scale=2.5)
    np.testing.assert_array_equal(w2, w * np.float32(2.5))


def test_expert_rows_in_token_order():
    ids = np.array([[2, 0], [0, 1], [2, 1], [1, 2]])
    rows = expert_rows(ids, 4)
    assert [(t.tolist(), s.tolist()) for t, s in rows] == [
        ([0, 1], [1, 0]), ([1, 2, 3], [1, 1, 0]), ([0, 2, 3], [0, 0, 1]), ([], [])]


@pytest.mark.parametrize("per_slot", [False, True])
def test_imatrix_accumulation_order(per_slot):
    """llama-imatrix: for each slot, for each token, acc[expert] += x^2 in float32 (one row per
    token for gate/up, one per slot for down); counts per expert; an unrouted expert stays 0."""
    rng = np.random.default_rng(1)
    n_tok, k, n_exp, cols = 37, 2, 5, 16
    ids = np.stack([rng.choice(4, k, replace=False) for _ in range(n_tok)])  # expert 4 never chosen
    x = (rng.standard_normal((n_tok, k if per_slot else 1, cols)) * 10).astype(np.float32)
    sums = np.zeros((n_exp, cols), np.float32)
    counts = np.zeros(n_exp, np.int64)
    accumulate_expert_sumsq(sums, counts, x, ids)
    want = np.zeros((n_exp, cols), np.float32)
    for slot in range(k):
        for t in range(n_tok):
            row = x[t, slot if per_slot else 0]
            want[ids[t, slot]] += row * row
    np.testing.assert_array_equal(sums, want)
    assert counts.tolist() == np.bincount(ids.ravel(), minlength=n_exp).tolist()
    assert counts[4] == 0 and not sums[4].any()


def _edited(path, **changes) -> ModelSource:
    src = load_gguf(path)
    kv = [k for k in src.kv if k.key not in changes]
    for key, value in changes.items():
        if value is not None:
            kv.append(KV(key, value, *next(((k.type, k.sub_type) for k in src.kv if k.key.endswith("expert_count")))))
    return ModelSource(src.arch, kv, src.tensors, str(path))


@pytest.mark.parametrize("name, changes, message", [
    ("tiny-qwen3moe", {"qwen3moe.expert_used_count": None}, "needs qwen3moe.expert_count and qwen3moe.expert_used_count"),
    ("tiny-qwen3moe", {"qwen3moe.expert_count": None}, "needs qwen3moe.expert_count"),
    ("tiny-qwen2moe", {"qwen2moe.expert_group_count": 2}, "expert groups .* are not supported"),
    ("tiny-mixtral", {"llama.expert_used_count": 9}, "expert_used_count 9 exceeds llama.expert_count 8"),
    # a llama without experts must have the dense FFN: the expert tensors are then unknown
    ("tiny-mixtral", {"llama.expert_count": None}, "missing tensor 'blk.0.ffn_gate.weight'"),
])
def test_runtime_refuses_inconsistent_expert_metadata(hf_fixture_gguf, name, changes, message):
    with pytest.raises(ModelError, match=message):
        read_config(_edited(hf_fixture_gguf(name), **changes))
