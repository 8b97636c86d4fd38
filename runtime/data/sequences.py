"""Which tokens the run's sequence number i is: a pure function of (seed, i), in O(1) memory.

A corpus is cut into windows of seq_len+1 tokens at stride seq_len (inputs and shifted
targets). `Windows` visits them epoch after epoch, each epoch in its own pseudo-random order: a
keyed bijection of [0, W) (a Feistel network over the next power of four, cycle-walking back
into range), so no permutation array is ever stored, whatever the corpus size.

`Blend` mixes several `Windows` with weights, in Megatron's meaning: the share of sequences
drawn from each. Sequence i goes to member 1 if ⌈r₁(i+1)⌉ > ⌈r₁ i⌉, with r₁ = w₁ / Σw, and is
then that member's sequence ⌈r₁ i⌉; otherwise it is sequence i − ⌈r₁ i⌉ of the blend of the
remaining members (weights renormalised). After n sequences member k has drawn its share to
within one sequence per level, each member reads its own windows in order, and nothing but i is
needed: resuming at any step restores the exact position of every member.
"""
from __future__ import annotations

import numpy as np

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def key_of(*parts: int) -> np.uint64:
    """One 64-bit key from integers (seed, member, epoch, ...)."""
    k = np.zeros(1, np.uint64)
    for p in parts:
        k = _mix(k ^ np.array([p & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return k[0]


def permute(i: np.ndarray, n: int, key: np.uint64, rounds: int = 4) -> np.ndarray:
    """The images of indices `i` (each in [0, n)) under a bijection of [0, n) chosen by `key`."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, low = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [_mix(np.array([key + np.uint64(r + 1)], np.uint64))[0] for r in range(rounds)]
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, bool)
    with np.errstate(over="ignore"):
        while todo.any():  # cycle-walk: values the network maps beyond n go round again
            y = x[todo]
            left, right = y >> half, y & low
            for k in keys:
                left, right = right, left ^ (_mix(right ^ k) & low)
            x[todo] = (left << half) | right
            todo = x >= np.uint64(n)
    return x.astype(np.int64)


class Windows:
    """The windows of one corpus (`tokens`, 1-D, sliceable), epoch by epoch in keyed order."""

    def __init__(self, tokens, seq_len: int, seed: int, member: int = 0):
        self.tokens, self.seq_len, self.seed, self.member = tokens, seq_len, seed, member
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise ValueError(f"{len(tokens)} tokens hold no window of seq_len+1 = {seq_len + 1}")

    def starts(self, j: np.ndarray) -> np.ndarray:
        """The first token of sequences `j` of this corpus."""
        j = np.asarray(j, dtype=np.int64)
        epoch, k = np.divmod(j, self.count)
        out = np.empty_like(j)
        with np.errstate(over="ignore"):
            for e in np.unique(epoch):
                sel = epoch == e
                out[sel] = permute(k[sel], self.count, key_of(self.seed, self.member, int(e)))
        return out * self.seq_len

    def rows(self, j) -> np.ndarray:
        """Sequences `j` as [len(j), seq_len+1] int64 token ids."""
        return np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in self.starts(j)])


def blend_assign(i: np.ndarray, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(member, index within the member) of blend sequences `i` (see the module docstring)."""
    i = np.asarray(i, dtype=np.int64)
    member, index = np.full(i.shape, len(weights) - 1), i.copy()
    todo = np.ones(i.shape, bool)
    for m, w in enumerate(weights[:-1]):
        rest = sum(weights[m:])
        r = w / rest if rest > 0 else 0.0
        before, after = np.ceil(r * index).astype(np.int64), np.ceil(r * (index + 1)).astype(np.int64)
        mine = todo & (after > before)
        member[mine], index[mine] = m, before[mine]
        index = np.where(todo & ~mine, index - before, index)
        todo &= ~mine
    return member, index


class Blend:
    """Members (`Windows`) mixed by weight; one member is that member's windows."""

    def __init__(self, members: list[Windows], weights: list[float]):
        self.members, self.weights = members, [float(w) for w in weights]
        self.seq_len = members[0].seq_len

    def rows(self, i) -> np.ndarray:
        i = np.asarray(i, dtype=np.int64)
        if len(self.members) == 1:
            return self.members[0].rows(i)
        member, index = blend_assign(i, self.weights)
        out = np.empty((len(i), self.seq_len + 1), np.int64)
        for m in np.unique(member):
            sel = member == m
            out[sel] = self.members[m].rows(index[sel])
        return out
