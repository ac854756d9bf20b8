"""Routing statistics against softmax / top-k computed by hand on a small example."""

import math

import pytest
import torch

from moelpr.evaluate.routing import RoutingSums, routing_sums


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

    assert sums.tokens == 5
    for layer, logits in enumerate((layer0, layer1)):
        probs = [_softmax(logits[i].tolist()) for i in counted]
        expected_sum = [sum(p[e] for p in probs) for e in range(logits.shape[1])]
        assert sums.prob_sum[layer].tolist() == pytest.approx(expected_sum, rel=1e-6)
    # expert 0 in the top-2 by hand: layer 0 → tokens 0 (2 > 1 > 0) and 4 (5, 5 > −5) → 2 tokens;
    # layer 1 → tokens 1, 2 (1.0 is second), 4 → 3 tokens
    assert sums.top_k_has_expert0 == [2, 3]

    summary = sums.summary(layers=[3, 5])
    assert summary["layers"] == [3, 5] and summary["tokens"] == 5
    assert summary["top_k_has_expert0"] == pytest.approx([2 / 5, 3 / 5])
    assert summary["mean_prob"][1] == pytest.approx([v / 5 for v in sums.prob_sum[1].tolist()])
    assert all(sum(row) == pytest.approx(1.0) for row in summary["mean_prob"])


def test_sums_add_across_batches_like_one_batch():
    torch.manual_seed(0)
    logits = (torch.randn(10, 4), torch.randn(10, 6))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    whole = routing_sums(logits, mask, top_k=2)
    parts = RoutingSums()
    for lo, hi in ((0, 3), (3, 10)):
        parts = parts + routing_sums(tuple(t[lo:hi] for t in logits), mask[lo:hi], top_k=2)
    assert parts.tokens == whole.tokens == 8
    assert parts.top_k_has_expert0 == whole.top_k_has_expert0
    for a, b in zip(parts.prob_sum, whole.prob_sum):
        assert torch.allclose(a, b)


def test_top_k_is_capped_at_the_layer_expert_count():
    sums = routing_sums((torch.randn(4, 2),), torch.ones(4), top_k=4)
    assert sums.top_k_has_expert0 == [4]  # both experts are always in the top-k


def test_mask_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="router logits cover 6 tokens"):
        routing_sums((torch.randn(6, 3),), torch.ones(2, 2), top_k=2)
