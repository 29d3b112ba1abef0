"""llama.cpp's default sampler chain, to the token: the same logits, options and seed pick the
same token as llama-cli / llama-completion.

The chain (common/sampling.cpp, src/llama-sampler.cpp of llama.cpp), in its order:

    penalties -> top-k -> top-p -> min-p -> temperature -> dist

(DRY, top-n-sigma, typical-p and XTC sit between them too, and do nothing at their defaults.)
The candidates are the whole vocabulary in id order, unsorted; each step either keeps their
order or sorts them by logit, descending, as llama.cpp's does, because `dist` walks them in that
order. The float arithmetic is llama.cpp's: float32 logits and probabilities, float32 running
sums in top-p, float64 sums in dist. `dist` draws from std::mt19937 seeded with the seed
(numpy's legacy MT19937 seeding is the same generator), one std::uniform_real_distribution
<double> draw per token as libstdc++ makes it: two 32-bit words, (lo + hi * 2^32) / 2^64.

Where llama.cpp leaves an order unspecified (candidates of exactly equal logits sorted by
std::partial_sort), the lower id comes first here.
"""
from __future__ import annotations

import secrets
from collections import Counter, deque

import numpy as np

F32, F64 = np.float32, np.float64
DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed


def _expf(x: np.ndarray) -> np.ndarray:
    """C's expf on float32: exp in float64 rounded to float32 agrees with glibc's expf (error
    < 0.502 ulp) except in cases rarer than any test of ours can meet."""
    return np.exp(x.astype(F64)).astype(F32)


def _seq_sum_f32(x: np.ndarray) -> F32:
    """A float32 sum added left to right, as a C loop adds (numpy's sum is pairwise)."""
    return np.cumsum(x, dtype=F32)[-1] if x.size else F32(0)


class Sampler:
    """llama.cpp's common sampler: call it with one row of logits for the next token's id, and
    `accept` every token the context takes in (the prompt too, as llama-completion does), for
    the repeat penalties. `reset` starts again from the seed with no history, as llama.cpp's
    common_sampler_reset (llama-completion calls it after each user turn)."""

    def __init__(self, temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 seed: int | None = None, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        self.temp, self.top_k, self.top_p, self.min_p = temp, top_k, top_p, min_p
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, max(int(repeat_last_n), 0)
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        if seed is None or seed < 0 or seed == DEFAULT_SEED:
            seed = secrets.randbits(32)  # llama.cpp asks std::random_device
        self.seed = int(seed) & 0xFFFFFFFF
        self.reset()

    @property
    def penalties_on(self) -> bool:
        return self.repeat_last_n > 0 and not (self.repeat_penalty == 1.0 and self.frequency_penalty == 0.0
                                               and self.presence_penalty == 0.0)

    def reset(self) -> None:
        self._mt = np.random.RandomState(self.seed)._bit_generator  # std::mt19937(seed)
        self._prev: deque[int] = deque()
        self._count: Counter[int] = Counter()

    def accept(self, token: int) -> None:
        """The penalties' ring of the last repeat_last_n tokens."""
        if not self.penalties_on:
            return
        token = int(token)
        if len(self._prev) >= self.repeat_last_n:
            old = self._prev.popleft()
            self._count[old] -= 1
            if self._count[old] == 0:
                del self._count[old]
        self._prev.append(token)
        self._count[token] += 1

    def uniform(self) -> float:
        """std::uniform_real_distribution<double>(0, 1) over std::mt19937, as libstdc++ draws it."""
        lo, hi = (float(w) for w in self._mt.random_raw(2))
        r = (lo + hi * 4294967296.0) / 18446744073709551616.0
        return r if r < 1.0 else float(np.nextafter(1.0, 0.0))

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.array(logits, F32, copy=True).ravel()
        if self.penalties_on and self._count:
            self._penalize(logits)
        if self.temp <= 0:
            # llama.cpp still runs the chain and draws; the first highest logit wins whatever the draw
            # (top-k/-p/min-p never drop the best), so only the generator's state needs the draw
            self.uniform()
            return int(np.argmax(logits))
        ids = np.arange(logits.size, dtype=np.int64)
        vals, ordered = logits, False
        if self.top_k > 0:
            ids, vals, ordered = self._top_k(ids, vals, min(self.top_k, vals.size))
        if self.top_p < 1.0:
            ids, vals, ordered = self._top_p(ids, vals, ordered)
        if self.min_p > 0.0:
            ids, vals = self._min_p(ids, vals, ordered)
        vals = vals / F32(self.temp)
        return int(ids[self._dist(vals, ordered)])

    # -- the chain's steps -------------------------------------------------------------------

    def _penalize(self, logits: np.ndarray) -> None:
        toks = np.fromiter(self._count.keys(), np.int64)
        toks = toks[toks < logits.size]
        counts = np.array([self._count[int(t)] for t in toks], F32)
        lv = logits[toks]
        pen = F32(self.repeat_penalty)
        lv = np.where(lv <= 0, lv * pen, lv / pen).astype(F32)
        lv -= counts * F32(self.frequency_penalty) + F32(self.presence_penalty)
        logits[toks] = lv

    @staticmethod
    def _sorted(ids: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k highest, descending (ties: lower id first)."""
        if k < vals.size:
            part = np.argpartition(-vals, k - 1)[:k]
            ids, vals = ids[part], vals[part]
        order = np.lexsort((ids, -vals))
        return ids[order], vals[order]

    def _top_k(self, ids, vals, k):
        ids, vals = self._sorted(ids, vals, k)
        return ids, vals, True

    def _top_p(self, ids, vals, ordered):
        # llama_sampler_softmax_impl without sorting: float32 exp and running sum in the current order
        max_l = vals[0] if ordered else vals.max()
        p = _expf(vals - max_l)
        p = p / _seq_sum_f32(p)
        if not ordered:
            order = np.lexsort((ids, -vals))
            ids, vals, p = ids[order], vals[order], p[order]
        cum = np.cumsum(p, dtype=F32)
        hit = np.flatnonzero(cum >= F32(self.top_p))
        n = int(hit[0]) + 1 if hit.size else ids.size
        return ids[:n], vals[:n], True

    def _min_p(self, ids, vals, ordered):
        top = vals[0] if ordered else vals.max()
        keep = vals >= F32(top + F32(np.log(F32(self.min_p))))
        if ordered:  # llama.cpp stops at the first below the bar (the first always stays)
            keep[0] = True
            n = int(np.argmin(keep)) if not keep.all() else keep.size
            return ids[:n], vals[:n]
        return ids[keep], vals[keep]

    def _dist(self, vals, ordered) -> int:
        if vals.size == 1:
            self.uniform()  # llama.cpp draws once per token even then
            return 0
        max_l = vals[0] if ordered else vals.max()
        p = _expf(vals - max_l).astype(F64)
        run = np.cumsum(p)
        target = run[-1] * self.uniform()
        hit = np.flatnonzero(run >= target)
        return int(hit[0]) if hit.size else vals.size - 1
