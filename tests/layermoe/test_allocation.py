"""LayerMoE allocation: the Llama-3.2-3B worksheet, monotonicity, float-safe ceilings, validation."""

from __future__ import annotations

import pytest
from layermoe_helpers import LLAMA_N, LLAMA_S, similarity_json

from moelpr.errors import UserError
from moelpr.layermoe.allocation import (
    allocate_experts,
    check_against_model,
    plot_allocation,
    scores_from_similarity,
)


def test_reproduces_the_llama_worksheet():
    experts = allocate_experts(LLAMA_S, 70)
    assert experts == LLAMA_N
    assert sum(experts) == 84 and sum(experts) - len(experts) == 56


@pytest.mark.parametrize("budget, total", [(56, 69), (60, 75), (64, 79), (70, 84)])
def test_worksheet_totals_for_other_budgets(budget, total):
    assert sum(allocate_experts(LLAMA_S, budget)) == total


@pytest.mark.parametrize(
    "scores", [[0.1, 0.2, 0.3, 0.4], [0.05, 0.01, 0.5, 0.02, 0.03], LLAMA_S, [0.3, 0.3, 0.1, 0.9, 0.11]]
)
@pytest.mark.parametrize("budget", [10, 23.5, 40, 100])
def test_higher_similarity_never_gets_more_experts(scores, budget):
    budget = max(budget, 2 * len(scores))
    experts = allocate_experts(scores, budget)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert experts[i] <= experts[j]
            if scores[i] == scores[j]:
                assert experts[i] == experts[j]
    assert min(experts) >= 2


def test_exact_shares_are_not_pushed_up_by_float_error():
    # equal scores: every share is exactly budget / L; float division would give e.g. 3.0000000000000004
    assert allocate_experts([0.1] * 10, 30) == [3] * 10
    assert allocate_experts([0.07] * 7, 21) == [3] * 7
    # 1/0.1 : 1/0.3 = 3 : 1, so δ = 40 splits into exactly 30 and 10
    assert allocate_experts([0.1, 0.3], 40) == [30, 10]


def test_min_experts_floor_and_dense_layers():
    assert allocate_experts([0.01, 1.0], 10) == [10, 2]  # 1/0.01 : 1/1 = 100 : 1 → ⌈9.90⌉, ⌈0.099⌉ → floor 2
    assert allocate_experts([0.01, 1.0], 10, min_experts=1) == [10, 1]


@pytest.mark.parametrize(
    "scores, budget, message",
    [
        (LLAMA_S, 55, r"budget B=55 is smaller than 2 × 28 layers = 56"),
        ([0.1, 0.0, 0.2], 10, r"must be > 0 for N_l ∝ 1/S_l, layer 1 has 0.0; pass --nonpositive least-similar"),
        ([0.1, -0.2], 10, "must be > 0"),
        ([0.1, float("nan")], 10, "must be finite"),
        ([], 10, "no similarity scores"),
    ],
)
def test_bad_allocation_input(scores, budget, message):
    with pytest.raises(UserError, match=message):
        allocate_experts(scores, budget)


def test_nonpositive_least_similar_gives_such_layers_the_most_experts():
    """A layer with S_l ≤ 0 counts as the least similar positive layer: the allocation of the positive scores with
    that layer's score copied in, never fewer experts than any other layer."""
    scores = [-0.066, 0.072, 0.054, 0.054]  # the demo base's layer 0, one run
    experts = allocate_experts(scores, 9, nonpositive="least-similar")
    assert experts == allocate_experts([0.054, 0.072, 0.054, 0.054], 9)
    assert experts[0] == max(experts) and experts[1] == min(experts)
    assert allocate_experts(LLAMA_S, 70, nonpositive="least-similar") == LLAMA_N  # positive scores: unchanged
    with pytest.raises(UserError, match="must be > 0"):  # nothing positive to take the score from
        allocate_experts([0.0, -0.1], 10, nonpositive="least-similar")
    with pytest.raises(UserError, match="nonpositive must be one of error, least-similar"):
        allocate_experts(LLAMA_S, 70, nonpositive="clip")


def test_similarity_file_validation():
    assert scores_from_similarity(similarity_json([0.1, 0.2])) == [0.1, 0.2]
    check_against_model(similarity_json([0.1, 0.2]), 2)
    with pytest.raises(UserError, match="has 2 layers but the model has 4"):
        check_against_model(similarity_json([0.1, 0.2]), 4)
    for bad in ({}, {"per_layer": []}, {"per_layer": [{"layer": 0}]}, {"per_layer": [{"score": "x"}]}, [1, 2]):
        with pytest.raises(UserError):
            scores_from_similarity(bad)
    with pytest.raises(UserError, match="layers must be listed 0..L-1"):
        scores_from_similarity({"per_layer": [{"layer": 1, "score": 0.1}]})


def test_plot_is_a_png():
    png = plot_allocation(LLAMA_S, LLAMA_N)
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
