"""kquant's sampler against llama.cpp's own sampler chain (libllama through llama-cpp-python's
ctypes API): the same logits, options, seed and accepted tokens must pick the same token, step
after step, as common/sampling.cpp's default chain (penalties, top-k, top-p, min-p, temperature,
dist)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kquant.validation.sampling import Sampler

N_VOCAB = 3000


class LlamaChain:
    """llama.cpp's common_sampler chain at llama-cli's defaults except the options given."""

    def __init__(self, lc, n_vocab, temp, top_k, top_p, min_p, seed, repeat_penalty=1.0, repeat_last_n=64,
                 frequency_penalty=0.0, presence_penalty=0.0):
        self.lc = lc
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for s in (lc.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty, frequency_penalty,
                                                  presence_penalty),
                  lc.llama_sampler_init_top_k(top_k), lc.llama_sampler_init_top_p(top_p, 0),
                  lc.llama_sampler_init_min_p(min_p, 0), lc.llama_sampler_init_temp_ext(temp, 0.0, 1.0),
                  lc.llama_sampler_init_dist(seed)):
            lc.llama_sampler_chain_add(self.chain, s)

    def __call__(self, logits: np.ndarray) -> int:
        lc = self.lc
        data = (lc.llama_token_data * logits.size)()
        for i, v in enumerate(logits.tolist()):
            data[i].id, data[i].logit, data[i].p = i, v, 0.0
        arr = lc.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(lc.llama_token_data)),
                                        size=logits.size, selected=-1, sorted=False)
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        return int(data[arr.selected].id)

    def accept(self, tok: int) -> None:
        self.lc.llama_sampler_accept(self.chain, tok)

    def reset(self) -> None:
        self.lc.llama_sampler_reset(self.chain)

    def close(self) -> None:
        self.lc.llama_sampler_free(self.chain)


def _logits(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Logits shaped like a language model's: a few strong candidates over a long tail."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(scale)
    x[rng.integers(0, n, 8)] += np.float32(scale * 3)
    return x


CASES = [  # temp, top_k, top_p, min_p, penalties
    (0.8, 40, 0.95, 0.05, {}),                              # llama-cli's defaults
    (1.0, 0, 1.0, 0.0, {}),                                 # pure softmax draw over the whole vocabulary
    (1.5, 0, 0.9, 0.0, {}),                                 # top-p over the unsorted vocabulary
    (0.7, 0, 1.0, 0.1, {}),                                 # min-p over the unsorted vocabulary
    (1.2, 200, 0.99, 0.02, {}),                             # a top-k past 128 (llama.cpp's bucket sort)
    (0.9, 40, 0.95, 0.05, dict(repeat_penalty=1.3, repeat_last_n=16)),
    (1.1, 0, 0.95, 0.0, dict(repeat_penalty=0.8, repeat_last_n=64, frequency_penalty=0.3,
                             presence_penalty=0.5)),
    (0.0, 40, 0.95, 0.05, dict(repeat_penalty=1.5)),        # greedy with a penalty
    (0.5, 1, 0.95, 0.05, {}),                               # top-k 1: one candidate, one draw still
]


@pytest.mark.parametrize("temp,top_k,top_p,min_p,pen", CASES)
@pytest.mark.parametrize("seed", [0, 42, 0xFFFFFFFE])
def test_sampler_picks_llama_cpps_token(llama_cpp, temp, top_k, top_p, min_p, pen, seed):
    rng = np.random.default_rng(seed % 1000 + top_k)
    ours = Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, **pen)
    ref = LlamaChain(llama_cpp, N_VOCAB, temp, top_k, top_p, min_p, seed, **pen)
    try:
        prompt = rng.integers(0, N_VOCAB, 20)
        for t in prompt:  # the prompt's tokens feed the penalties, as llama-completion accepts them
            ours.accept(int(t))
            ref.accept(int(t))
        picks, theirs = [], []
        for step in range(60):
            logits = _logits(rng, N_VOCAB, scale=[0.5, 2.0, 6.0][step % 3])
            if step % 7 == 3:  # a repeated token near the top: the penalties matter
                logits[int(prompt[-1])] = logits.max() + np.float32(0.05)
            a, b = ours(logits), ref(logits)
            picks.append(a)
            theirs.append(b)
            ours.accept(b)
            ref.accept(b)
            if step == 30:  # llama-completion resets its sampler after each user turn
                ours.reset()
                ref.reset()
        assert picks == theirs
        assert len(set(picks)) > (1 if temp > 0 and top_k != 1 else 0)
    finally:
        ref.close()


def test_sampler_draws_as_libstdcxx():
    """std::mt19937(5489)'s 10000th word is 4123659995 (the C++ standard's check), and a
    uniform double is two words, low first."""
    s = Sampler(seed=5489)
    words = s._mt.random_raw(10000)
    assert int(words[-1]) == 4123659995
    s.reset()
    lo, hi = (int(w) for w in s._mt.random_raw(2))
    s.reset()
    assert s.uniform() == (lo + hi * 2.0 ** 32) / 2.0 ** 64


def test_sampler_random_seed_is_reported():
    a, b = Sampler(seed=-1), Sampler(seed=None)
    assert 0 <= a.seed <= 0xFFFFFFFF and a.seed != b.seed
    assert Sampler(seed=0xFFFFFFFF).seed != 0xFFFFFFFF or Sampler(seed=0xFFFFFFFF).seed != 0xFFFFFFFF


def test_sampled_generation_is_llama_cpps(tiny_llama_f32, llama_cpp, capsys):
    """With --exact the logits are llama.cpp's bit for bit, so the same seed and options draw the
    same tokens: kquant-generate prints the text llama.cpp's sampler chain picks over
    llama-cpp-python's logits (prompt tokens in the penalties' history, as llama-completion)."""
    from kquant.cli.generate import main as generate_main
    from kquant.models import open_model
    from kquant.tokenizer import Tokenizer

    prompt_text = "It was a dark and stormy night, and"
    opts = dict(temp=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=1234, repeat_penalty=1.15, repeat_last_n=32)
    tok = Tokenizer.from_source(open_model(tiny_llama_f32, "f32"))
    llm = llama_cpp.Llama(str(tiny_llama_f32), n_ctx=128, n_threads=2, verbose=False, flash_attn=True,
                          logits_all=True)
    prompt = llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
    chain = LlamaChain(llama_cpp, llm.n_vocab(), **opts)
    try:
        for t in prompt:
            chain.accept(t)
        llm.eval(prompt)
        theirs = []
        for _ in range(24):
            t = chain(np.array(llm.scores[llm.n_tokens - 1], np.float32))
            if t in tok.eog_ids:
                break
            chain.accept(t)
            theirs.append(t)
            llm.eval([t])
    finally:
        chain.close()
    greedy = []
    llm.reset()
    llm.eval(prompt)
    for _ in range(len(theirs)):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    assert theirs != greedy  # the draw mattered
    assert generate_main(["-m", str(tiny_llama_f32), "-p", prompt_text, "-n", "24", "--exact", "--device", "cpu",
                          "-t", "2", "--temp", "0.9", "--seed", "1234", "--repeat-penalty", "1.15",
                          "--repeat-last-n", "32"]) == 0
    text = b"".join(tok.token_to_piece(t) for t in theirs).decode()
    assert capsys.readouterr().out == prompt_text + text + "\n"
