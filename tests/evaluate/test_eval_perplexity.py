"""Perplexity / bits per byte against hand computations; windows against lm-eval's; caps; routing."""

import math

import pytest
import torch

from moelpr.errors import UserError
from moelpr.evaluate.perplexity import (
    context_length,
    evaluate_corpora,
    evaluate_texts,
    prefix_token_id,
    rolling_windows,
)
from moelpr.evaluate.routing import RoutingSums


def _hand_nll(model, ids: list[int], prefix: int) -> float:
    """−Σ log p(token | prefix, earlier tokens), log-softmax written out with math on one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([[prefix] + ids[:-1]])).logits[0].double()  # (n, V)
    nll = 0.0
    for pos, target in enumerate(ids):
        row = logits[pos].tolist()
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        nll += log_z - row[target]
    return nll


def test_perplexity_and_bits_per_byte_match_the_definitions(dense_model, tokenizer):
    docs = ["Birds sing.", "Η γάτα."]  # short: one window each; Greek letters are 2 UTF-8 bytes
    out = evaluate_texts(dense_model, tokenizer, {"xx": docs}, {"xx": "new"}, progress=False)
    bos = tokenizer.bos_token_id
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    nll = sum(_hand_nll(dense_model, i, bos) for i in ids)
    tokens = sum(len(i) for i in ids)
    n_bytes = len("Birds sing.".encode()) + len("Η γάτα.".encode())
    assert n_bytes == 11 + 12  # Η γάτα.: 5 Greek letters × 2 + space + dot
    assert out["tokens"]["xx"] == tokens and out["bytes"]["xx"] == n_bytes
    assert out["nll"]["xx"] == pytest.approx(nll, rel=1e-5)
    assert out["ppl"]["xx"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert out["bpb"]["xx"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert out["languages"] == {"old": [], "new": ["xx"]}
    assert out["avg"]["new"]["ppl"] == out["ppl"]["xx"] and out["avg"]["old"] == {"ppl": None, "bpb": None}
    assert "routing" not in out  # dense model


def test_long_documents_roll_over_windows_and_batching_does_not_matter(dense_model, tokenizer, texts, roles):
    assert context_length(dense_model, tokenizer) == 24
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in texts["en"]]
    assert max(lengths) > 2 * 24  # several windows
    texts = {lang: texts[lang] for lang in ("en", "es", "el")}
    one = evaluate_texts(dense_model, tokenizer, texts, roles, batch_size=1, progress=False)
    many = evaluate_texts(dense_model, tokenizer, texts, roles, batch_size=5, progress=False)
    for lang in texts:
        assert one["nll"][lang] == pytest.approx(many["nll"][lang], rel=1e-5)
        assert one["tokens"][lang] == sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in texts[lang])
    assert one["avg"]["old"]["bpb"] == pytest.approx((one["bpb"]["en"] + one["bpb"]["es"]) / 2)
    # with a context longer than every document, each is one window: the hand computation applies
    whole = evaluate_texts(dense_model, tokenizer, {"es": texts["es"]}, {"es": "old"}, context_len=200, progress=False)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in texts["es"]]
    assert whole["nll"]["es"] == pytest.approx(sum(_hand_nll(dense_model, i, 0) for i in ids), rel=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 5, 24, 25, 48, 49, 70])
@pytest.mark.parametrize("max_len", [1, 4, 24])
def test_rolling_windows_equal_lm_evals(n_tokens, max_len):
    lm_utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n_tokens))
    ours = rolling_windows(tokens, 7, max_len)
    theirs = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=7, max_seq_len=max_len, context_len=1
        )
    ]
    assert len(ours) == len(theirs)
    for (seq, n_pred), (context, continuation) in zip(ours, theirs):
        fed = (context + continuation)[-(max_len + 1) :][:-1]  # what HFLM._loglikelihood_tokens feeds the model
        assert seq[:-1] == fed and seq[1:][-n_pred:] == continuation
    assert sum(n for _, n in ours) == n_tokens


def test_caps_per_language(dense_model, tokenizer, texts, roles):
    capped = evaluate_texts(dense_model, tokenizer, texts, roles, max_docs=1, progress=False)
    assert capped["docs"] == {"en": 1, "es": 1, "el": 1, "hu": 1}
    tokens = evaluate_texts(dense_model, tokenizer, texts, roles, max_tokens=30, progress=False)
    assert all(n == 30 for n in tokens["tokens"].values() if n >= 30)
    # the truncated document counts only the bytes its kept tokens cover
    first = texts["es"][0]
    ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert len(ids) > 30 and tokens["bytes"]["es"] == len(tokenizer.decode(ids[:30]).encode())


def test_moe_routing_statistics_match_a_direct_forward(moe_model, tokenizer):
    doc = "The cat sat on the mat."
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    out = evaluate_texts(moe_model, tokenizer, {"en": [doc]}, {"en": "old"}, progress=False)
    with torch.no_grad():
        direct = moe_model(torch.tensor([[0] + ids[:-1]]), output_router_logits=True)
    # each document token is counted once as an input: positions 1..n-1 (position 0 is BOS)
    mask = torch.ones(len(ids), dtype=torch.bool)
    mask[0] = False
    expected = RoutingSums.of(direct.routing, mask).summary([0, 1])
    routing = out["routing"]["en"]
    assert routing["layers"] == [0, 1] and routing["tokens"] == len(ids) - 1
    assert len(routing["mean_prob"]) == 2 and len(routing["mean_prob"][0]) == 3
    for got, want in zip(routing["mean_prob"], expected["mean_prob"]):
        assert got == pytest.approx(want, rel=1e-5)
    assert routing["top_k_has_expert0"] == pytest.approx(expected["top_k_has_expert0"])
    assert out["nll"]["en"] == pytest.approx(_hand_nll(moe_model, ids, 0), rel=1e-5)


def test_prefix_falls_back_to_eos(tokenizer):
    class NoBos:
        bos_token_id, eos_token_id = None, 5

    assert prefix_token_id(tokenizer) == tokenizer.bos_token_id and prefix_token_id(NoBos()) == 5


def test_bad_inputs(dense_model, tokenizer):
    with pytest.raises(UserError, match="no held-out text for language 'el'"):
        evaluate_texts(dense_model, tokenizer, {"el": ["", ""]}, {"el": "new"}, progress=False)
    with pytest.raises(UserError, match="role"):
        evaluate_texts(dense_model, tokenizer, {"el": ["x"]}, {"el": "other"}, progress=False)
    with pytest.raises(UserError, match="max_docs must be at least 1"):
        evaluate_texts(dense_model, tokenizer, {"el": ["x"]}, {"el": "new"}, max_docs=0, progress=False)


def test_evaluate_corpora_pools_languages_from_a_corpora_file(dense_model, tokenizer, corpora_file, texts, roles):
    from moelpr.data.corpus import load_corpora

    from_file = evaluate_corpora(dense_model, tokenizer, load_corpora(corpora_file), progress=False)
    direct = evaluate_texts(dense_model, tokenizer, texts, roles, progress=False)
    assert from_file["languages"] == {"old": ["en", "es"], "new": ["el", "hu"]}
    assert from_file["ppl"] == pytest.approx(direct["ppl"])


@pytest.mark.gpu
def test_cuda_matches_cpu(moe_model, tokenizer, texts, roles):
    import copy

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = evaluate_texts(moe_model, tokenizer, texts, roles, progress=False)
    gpu = evaluate_texts(copy.deepcopy(moe_model).cuda(), tokenizer, texts, roles, progress=False)
    assert gpu["tokens"] == cpu["tokens"]
    for lang in texts:
        assert gpu["bpb"][lang] == pytest.approx(cpu["bpb"][lang], rel=1e-3)
        assert gpu["routing"][lang]["mean_prob"][0] == pytest.approx(cpu["routing"][lang]["mean_prob"][0], abs=1e-3)
