"""Routing statistics against softmax / top-k computed by hand on a small example; they describe the routing
applied, so a classifier-confined token counts as expert 0 alone."""

import math

import pytest
import torch

from moelpr.evaluate.routing import RoutingSums, routing_counts
from moelpr.model.layer import Routing


def routing_sums(router_logits, mask, top_k):
    """The sums of the routing blocks apply for these logits (softmax, top-k, renormalised when k > 1)."""
    routing = []
    for logits in router_logits:
        weights, experts = logits.softmax(-1).topk(min(top_k, logits.shape[-1]))
        routing.append(Routing(logits, experts, weights / weights.sum(-1, keepdim=True)))
    return RoutingSums.of(routing, mask)


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_routing_sums_match_hand_computation():
    # 2 sequences × 3 positions; layer 0 has 3 experts, layer 1 has 4 (LayerMoE-style uneven layers)
    layer0 = torch.tensor(
        [[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.5, 1.0], [-1.0, 2.0, 2.5], [5.0, 5.0, -5.0], [9.0, 9.0, 9.0]]
    )
    layer1 = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0],
            [3.0, 2.0, 1.0, 0.0],
            [1.0, 1.5, 0.0, 0.0],
            [0.0, 0.0, 4.0, 0.0],
            [0.5, 0.0, 0.0, 0.0],
            [7.0, 7.0, 7.0, 7.0],
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token is padding
    sums = routing_sums((layer0, layer1), mask, top_k=2)
    counted = [0, 1, 2, 3, 4]

    rows = sums.per_layer()
    assert [row["tokens"] for row in rows] == [5, 5]
    for row, logits in zip(rows, (layer0, layer1)):
        probs = [_softmax(logits[i].tolist()) for i in counted]
        expected_sum = [sum(p[e] for p in probs) for e in range(logits.shape[1])]
        assert row["prob"] == pytest.approx(expected_sum, rel=1e-6)
    # expert 0 in the top-2 by hand: layer 0 → tokens 0 (2 > 1 > 0) and 4 (5, 5 > −5) → 2 tokens;
    # layer 1 → tokens 1, 2 (1.0 is second), 4 → 3 tokens
    assert [row["expert0_in_topk"] for row in rows] == [2, 3]

    summary = sums.summary(layers=[3, 5])
    assert summary["layers"] == [3, 5] and summary["tokens"] == 5
    assert summary["top_k_has_expert0"] == pytest.approx([2 / 5, 3 / 5])
    assert summary["mean_prob"][1] == pytest.approx([v / 5 for v in rows[1]["prob"]])
    assert all(sum(row) == pytest.approx(1.0) for row in summary["mean_prob"])


def test_sums_add_across_batches_like_one_batch():
    torch.manual_seed(0)
    logits = (torch.randn(10, 4), torch.randn(10, 6))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    whole = routing_sums(logits, mask, top_k=2)
    parts = RoutingSums()
    for lo, hi in ((0, 3), (3, 10)):
        parts = parts + routing_sums(tuple(t[lo:hi] for t in logits), mask[lo:hi], top_k=2)
    assert parts.summary()["tokens"] == whole.summary()["tokens"] == 8
    torch.testing.assert_close(parts.counts, whole.counts)


def test_top_k_is_capped_at_the_layer_expert_count():
    sums = routing_sums((torch.randn(4, 2),), torch.ones(4), top_k=4)
    assert sums.per_layer()[0]["expert0_in_topk"] == 4  # both experts are always in the top-k


def test_mask_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="routing covers 6 tokens"):
        routing_sums((torch.randn(6, 3),), torch.ones(2, 2), top_k=2)


def test_several_token_groups_in_one_pass_equal_each_group_alone():
    torch.manual_seed(1)
    logits = torch.randn(7, 4)
    weights, experts = logits.softmax(-1).topk(2)
    routing = [Routing(logits, experts, weights / weights.sum(-1, keepdim=True))]
    old = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    both = routing_counts(routing, torch.stack([old, ~old]))  # (2, 3 + E)
    torch.testing.assert_close(both[0], RoutingSums.of(routing, old).counts)
    torch.testing.assert_close(both[1], RoutingSums.of(routing, ~old).counts)
