"""Mixing corpora by weight: how many blocks each corpus gives an epoch, and in which order they come.

Each corpus may set one of `weight` (its share of the mixture's tokens, normalised over the corpora; then
the epoch holds as many blocks as the corpora together, so weights 1 and 3 give 25 % and 75 % of them),
`tokens` (a token budget) or `epochs` (passes over its blocks; 0.5 = half of them). Without any, a corpus
gives each of its blocks once, so the shares are proportional to size. A corpus asked for fewer blocks than
it has gives evenly spaced ones; asked for more, it repeats all of them in order.

The epoch's order interleaves the corpora evenly: the k-th of corpus c's b_c blocks sits at the fraction
(k + ½) / b_c of the epoch, so any window holds each corpus in its share to within a few blocks. `Mixture`
maps an index to (corpus, block) by arithmetic, in O(#corpora) memory and time, whatever the epoch's size.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from moelpr.errors import UserError


def check_weights(names: Sequence[str], mixes: Sequence[dict]) -> None:
    """`UserError` unless weights are given to every corpus or to none (budgets and epochs go without them)."""
    weighted = [n for n, m in zip(names, mixes) if "weight" in m]
    if weighted and len(weighted) != len(names):
        other = next(n for n, m in zip(names, mixes) if "weight" not in m)
        raise UserError(
            f"corpus {other!r} has no weight but {weighted[0]!r} has one; weights are shares of the whole "
            "mixture: give weight: to every corpus or to none (tokens: / epochs: go without weights)"
        )


def block_counts(names: Sequence[str], blocks: Sequence[int], mixes: Sequence[dict], cutoff_len: int) -> list[int]:
    """Blocks each corpus gives one epoch, from the corpora's block counts and mixing settings."""
    check_weights(names, mixes)
    if any("weight" in m for m in mixes):
        counts = apportion(sum(blocks), [m["weight"] for m in mixes])
    else:
        counts = []
        for n, m in zip(blocks, mixes):
            if "tokens" in m:
                counts.append(m["tokens"] // cutoff_len)
            elif "epochs" in m:
                counts.append(round(m["epochs"] * n))
            else:
                counts.append(n)
    for name, count, mix in zip(names, counts, mixes):
        if count < 1:
            raise UserError(
                f"corpus {name!r} gets no block of {cutoff_len} tokens in the mixture ({mix or 'its size'}); "
                "raise its weight, tokens or epochs"
            )
    return counts


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders), summing to `total` exactly."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    """An epoch of `counts[c]` blocks from each corpus c (which has `blocks[c]`), interleaved evenly.

    `locate(i)` → (corpus, block within the corpus) for 0 ≤ i < len(self), a bijection onto the epoch's items.
    """

    def __init__(self, counts: Sequence[int], blocks: Sequence[int]):
        if len(counts) != len(blocks) or not counts or min(counts) < 1 or min(blocks) < 1:
            raise ValueError(f"a mixture needs ≥ 1 block per corpus, got counts {counts} of blocks {blocks}")
        self.counts = list(counts)
        self.blocks = list(blocks)
        self.total = sum(counts)

    def __len__(self) -> int:
        return self.total

    def position(self, c: int, k: int) -> int:
        """Index of corpus c's k-th item: how many items have a smaller key (2k'+1)/(2b') (ties: lower corpus)."""
        before = k
        for other, b in enumerate(self.counts):
            if other == c:
                continue
            a, d = (2 * k + 1) * b, self.counts[c]  # items m = 2k'+1 of `other` come first while m·d < a (≤ if lower)
            t = (a // d) if other < c else (a - 1) // d
            before += min(b, (t + 1) // 2)
        return before

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.total:
            raise IndexError(f"index {i} out of range for a mixture of {self.total} blocks")
        spread = len(self.counts) + 2
        for c, b in enumerate(self.counts):
            guess = i * b // self.total
            lo, hi = max(0, guess - spread), min(b - 1, guess + spread)
            while lo <= hi:  # position(c, ·) is increasing
                mid = (lo + hi) // 2
                pos = self.position(c, mid)
                if pos == i:
                    return c, self._block(c, mid)
                lo, hi = (mid + 1, hi) if pos < i else (lo, mid - 1)
        raise AssertionError(f"mixture index {i} not found")  # unreachable: positions cover 0..total-1

    def _block(self, c: int, k: int) -> int:
        n, b = self.blocks[c], self.counts[c]
        return k * n // b if b <= n else k % n


def weighted_order(weights: Sequence[float]) -> Iterator[int]:
    """Endless corpus indices, each corpus at its share of `weights`: after t picks, corpus c has been picked
    within one of t·w_c/Σw times (smooth weighted round robin). Used by the stream, whose sizes are unknown."""
    norm = sum(weights)
    shares = [w / norm for w in weights]
    credit = [0.0] * len(weights)
    while True:
        for c, share in enumerate(shares):
            credit[c] += share
        c = max(range(len(shares)), key=credit.__getitem__)
        credit[c] -= 1.0
        yield c
