"""LayerMoE similarity: the O(N) identity, token collection, and end to end on a tiny random Llama."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from layermoe_helpers import make_texts
from torch import nn

from moelpr.errors import UserError
from moelpr.layermoe.similarity import (
    collect_token_ids,
    compute_similarity,
    layer_scores,
    mean_pairwise_cosine,
    unit_vector_sums,
)

ROLES = {"en": "old", "es": "old", "tr": "new", "hu": "new"}


@pytest.mark.parametrize("n, m, h", [(1, 1, 3), (7, 11, 5), (50, 33, 16)])
def test_mean_pairwise_cosine_equals_all_pairs(n, m, h):
    gen = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64) + 0.3  # (N, H)
    y = torch.randn(m, h, generator=gen, dtype=torch.float64) * 2.0  # (M, H)
    direct = (F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T).mean()  # (N, M) -> ()
    assert mean_pairwise_cosine(x, y) == pytest.approx(float(direct), abs=1e-6)


def test_collect_token_ids_budget_truncation_and_skipping(tiny_tokenizer):
    texts = ["the cat " * 20, "", "the dog " * 100, "a mat", "the cat sat"]  # 41, -, 201, 3, 4 tokens
    docs = collect_token_ids(tiny_tokenizer, texts, tokens=100, max_length=30, skip_longer_than=100)
    assert [len(d) for d in docs] == [30, 3, 4]  # truncated to 30; empty and 201-token documents skipped
    docs = collect_token_ids(tiny_tokenizer, texts, tokens=35, max_length=30, skip_longer_than=100)
    assert [len(d) for d in docs] == [30, 3, 2]  # the last document is cut to the budget
    assert docs[0][0] == tiny_tokenizer.bos_token_id  # the tokenizer's default special tokens are kept


def test_collect_token_ids_stops_at_budget(tiny_tokenizer):
    texts = ["the cat sat on a mat"] * 10  # 7 tokens each
    docs = collect_token_ids(tiny_tokenizer, texts, tokens=16)
    assert [len(d) for d in docs] == [7, 7, 2]


def _direct_layer_states(model, tokenizer, texts, layer, tokens):
    """MLP inputs of one layer, one unpadded document at a time, via an independent forward hook."""
    states = []
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda m, args, out: states.append(args[0][0]))
    try:
        with torch.no_grad():
            for ids in collect_token_ids(tokenizer, texts, tokens=tokens):
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat(states).double()  # (N, H)


def test_compute_similarity_end_to_end(tiny_llama, tiny_tokenizer):
    texts = {lang: make_texts(lang, 30) for lang in ROLES}
    result = compute_similarity(tiny_llama, tiny_tokenizer, texts, ROLES, tokens=120, batch_size=4)

    assert result["num_layers"] == 4 and len(result["per_layer"]) == 4
    assert result["languages"] == {"old": ["en", "es"], "new": ["tr", "hu"]}
    assert result["tokens"] == {lang: 120 for lang in ROLES}
    expected_pairs = {"tr-hu", "tr-en", "tr-es", "hu-en", "hu-es"}
    for layer, entry in enumerate(result["per_layer"]):
        assert entry["layer"] == layer and set(entry["pairs"]) == expected_pairs
        assert all(-1.0 <= value <= 1.0 for value in entry["pairs"].values())
        new_old = sum(entry["pairs"][k] for k in expected_pairs - {"tr-hu"}) / 4
        assert entry["score"] == pytest.approx((entry["pairs"]["tr-hu"] + new_old) / 2, abs=1e-12)

    # one pair against the all-pairs definition on independently captured, unpadded states
    h_tr = _direct_layer_states(tiny_llama, tiny_tokenizer, texts["tr"], 2, 120)  # (120, H)
    h_en = _direct_layer_states(tiny_llama, tiny_tokenizer, texts["en"], 2, 120)  # (120, H)
    assert h_tr.shape == (120, 64)
    direct = float((F.normalize(h_tr, dim=-1) @ F.normalize(h_en, dim=-1).T).mean())  # (120, 120) -> ()
    assert result["per_layer"][2]["pairs"]["tr-en"] == pytest.approx(direct, abs=1e-5)


def test_unit_vector_sums_shape_and_padding_invariance(tiny_llama, tiny_tokenizer):
    docs = collect_token_ids(tiny_tokenizer, make_texts("en", 12), tokens=10_000)
    sums_batched, count = unit_vector_sums(tiny_llama, docs, batch_size=5)
    sums_single, count_single = unit_vector_sums(tiny_llama, docs, batch_size=1)
    assert sums_batched.shape == (4, 64) and sums_batched.dtype == torch.float64
    assert count == count_single == sum(len(d) for d in docs)
    torch.testing.assert_close(sums_batched, sums_single, atol=1e-4, rtol=1e-5)
    assert torch.all(sums_batched.norm(dim=-1) <= count + 1e-6)  # a mean of unit vectors has norm ≤ 1
    assert not any(layer.mlp._forward_pre_hooks for layer in tiny_llama.model.layers)  # hooks removed


class _Wrapper(nn.Module):
    """Stands in for MoELPRForCausalLM: the HF LM is held as `.lm`, and the decoder is its decoder."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def get_decoder(self) -> nn.Module:
        return self.lm.get_decoder()


class _BlockAroundMLP(nn.Module):
    """Stands in for an MoE block that replaced `layer.mlp` (same input, different module)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.original = mlp

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.original(hidden_states)


def test_wrapper_and_replaced_mlp_give_same_result(tiny_llama, tiny_tokenizer):
    texts = {"en": make_texts("en", 8), "tr": make_texts("tr", 8)}
    roles = {"en": "old", "tr": "new"}
    reference = compute_similarity(tiny_llama, tiny_tokenizer, texts, roles, tokens=60)
    layer = tiny_llama.model.layers[1]
    dense_mlp = layer.mlp
    layer.mlp = _BlockAroundMLP(dense_mlp)
    try:
        wrapped = compute_similarity(_Wrapper(tiny_llama), tiny_tokenizer, texts, roles, tokens=60)
    finally:
        layer.mlp = dense_mlp
    for a, b in zip(reference["per_layer"], wrapped["per_layer"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-9)
    # a single new language: no new–new pair, S_l is the new–old mean
    assert all(entry["score"] == entry["pairs"]["tr-en"] for entry in reference["per_layer"])


def test_layer_scores_by_hand():
    means = {
        "en": torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        "tr": torch.tensor([[0.5, 0.5]], dtype=torch.float64),
        "hu": torch.tensor([[0.0, 1.0]], dtype=torch.float64),
    }
    (entry,) = layer_scores(means, {"en": "old", "tr": "new", "hu": "new"})
    assert entry["pairs"] == {"tr-hu": 0.5, "tr-en": 0.5, "hu-en": 0.0}
    assert entry["score"] == pytest.approx((0.5 + 0.25) / 2)


@pytest.mark.parametrize(
    "texts, roles, message",
    [
        ({"en": ["the cat"]}, {"en": "old"}, "no language with role 'new'"),
        ({"tr": ["bir kedi"]}, {"tr": "new"}, "no language with role 'old'"),
        ({"en": ["the cat"], "tr": [""]}, {"en": "old", "tr": "new"}, "'tr' has no usable text"),
        ({"en": ["the cat"], "tr": ["bir"]}, {"en": "old", "tr": "newest"}, "roles must be"),
    ],
)
def test_compute_similarity_bad_input(tiny_llama, tiny_tokenizer, texts, roles, message):
    with pytest.raises(UserError, match=message):
        compute_similarity(tiny_llama, tiny_tokenizer, texts, roles, tokens=10)


def test_pair_keys_put_the_new_language_first():
    langs = ["en", "tr", "es", "hu"]
    roles = {"en": "old", "tr": "new", "es": "old", "hu": "new"}
    means = {lang: torch.ones(1, 2, dtype=torch.float64) for lang in langs}
    (entry,) = layer_scores(means, roles)
    new = {"tr", "hu"}
    assert all(key.split("-")[0] in new for key in entry["pairs"])
    assert len(entry["pairs"]) == len(list(itertools.combinations(new, 2))) + 2 * 2


def test_upcycled_model_matches_dense(tiny_llama, tiny_tokenizer):
    """MoE blocks replace `layer.mlp`; at init the upcycled model equals the dense one, so must S_l."""
    import copy

    import moelpr

    texts = {"en": make_texts("en", 8), "tr": make_texts("tr", 8), "hu": make_texts("hu", 8)}
    roles = {"en": "old", "tr": "new", "hu": "new"}
    dense = compute_similarity(tiny_llama, tiny_tokenizer, texts, roles, tokens=50)
    moe = moelpr.upcycle(copy.deepcopy(tiny_llama), num_experts=[3, 2, 1, 4], top_k=2).eval()
    upcycled = compute_similarity(moe, tiny_tokenizer, texts, roles, tokens=50)
    assert upcycled["num_layers"] == 4
    for a, b in zip(dense["per_layer"], upcycled["per_layer"]):
        assert a["pairs"] == pytest.approx(b["pairs"], abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu(tiny_llama, tiny_tokenizer):
    import copy

    texts = {"en": make_texts("en", 16), "tr": make_texts("tr", 16), "hu": make_texts("hu", 16)}
    roles = {"en": "old", "tr": "new", "hu": "new"}
    cpu = compute_similarity(tiny_llama, tiny_tokenizer, texts, roles, tokens=150)
    cuda32 = compute_similarity(copy.deepcopy(tiny_llama).cuda(), tiny_tokenizer, texts, roles, tokens=150)
    bf16 = compute_similarity(
        copy.deepcopy(tiny_llama).to("cuda", torch.bfloat16), tiny_tokenizer, texts, roles, tokens=150
    )
    for a, b, c in zip(cpu["per_layer"], cuda32["per_layer"], bf16["per_layer"]):
        assert a["pairs"] == pytest.approx(b["pairs"], abs=1e-4)
        assert a["pairs"] == pytest.approx(c["pairs"], abs=3e-2)
