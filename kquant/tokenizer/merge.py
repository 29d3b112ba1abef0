"""The symbol-merging loop llama.cpp's BPE and SPM sessions share (llm_tokenizer_bpe_session /
llm_tokenizer_spm_session): adjacent symbols as a linked list, candidate pairs in a heap, the
best (then leftmost) pair merged first, its new neighbours queued, until no candidate is left."""
from __future__ import annotations

from heapq import heapify, heappop, heappush


def merge_symbols(syms: list[str], priority) -> None:
    """Merge the symbols `syms` in place (merged-away ones become ""). `priority(a, b)` ranks
    the pair a, b (lower merges first), or is None where a + b is no candidate."""
    n = len(syms)
    if n < 2:
        return
    heap = []
    for i in range(n - 1):
        p = priority(syms[i], syms[i + 1])
        if p is not None:
            heap.append((p, i, i + 1, syms[i] + syms[i + 1]))
    heapify(heap)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    while heap:
        _, left, right, text = heappop(heap)
        a = syms[left]
        b = syms[right]
        if not a or not b or a + b != text:
            continue  # outdated
        syms[left] = text
        syms[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            p = priority(syms[before], text)
            if p is not None:
                heappush(heap, (p, before, left, syms[before] + text))
        if after >= 0:
            p = priority(text, syms[after])
            if p is not None:
                heappush(heap, (p, left, after, text + syms[after]))


def symbol_ids(syms: list[str], t2id: dict[str, int], fallback) -> tuple[int, ...]:
    """The token ids of the merged symbols (empty ones skipped); `fallback(t2id, s, out)`
    appends those of a symbol s that is no token."""
    out: list[int] = []
    for s in syms:
        if not s:
            continue
        tid = t2id.get(s)
        if tid is not None:
            out.append(tid)
        else:
            fallback(t2id, s, out)
    return tuple(out)
