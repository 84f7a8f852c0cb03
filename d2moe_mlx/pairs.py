"""The distinct experts of a call's (token, k) pairs, where a token may repeat an expert.

Most MoE blocks route a token to k distinct experts, but some name one expert several
times in a token's top-k (a block that sends its zero/identity-expert picks to expert 0
with weight 0). The engine computes every pair, but counts an expert once per call for
residency, slots and loads, and once per token for its hotness.
"""

from __future__ import annotations

import numpy as np


def distinct_experts(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts, first, counts) of the pairs ``flat`` [tokens * k]: each distinct expert
    once, the index of the first pair naming it and the number of tokens naming it (a
    token naming it twice counts once). One token: experts in the router's order (the
    common all-distinct case costs a set of k ids, the decode hot path); more: ascending."""
    if flat.size == k:
        if len(set(flat.tolist())) == k:
            return flat, np.arange(k), np.ones(k, dtype=np.int64)
        _, first = np.unique(flat, return_index=True)
        first = np.sort(first)
        return flat[first], first, np.ones(len(first), dtype=np.int64)
    experts, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    return experts, first, _tokens_naming(inverse.reshape(-1, k), len(experts))


def token_counts(ids: np.ndarray) -> np.ndarray:
    """[N, k]: how many of the call's tokens name each pair's expert (once per token)."""
    _, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    return _tokens_naming(inverse, int(inverse.max()) + 1)[inverse]


def _tokens_naming(inverse: np.ndarray, n: int) -> np.ndarray:
    """Per distinct expert (0..n-1, ``inverse`` [N, k] of them): tokens naming it."""
    srt = np.sort(inverse, axis=-1)
    first = np.ones(srt.shape, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return np.bincount(srt[first], minlength=n)
