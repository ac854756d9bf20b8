"""Losses against hand-computed values on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelpr import UserError
from moelpr.model import losses
from moelpr.model.layer import Routing


def routed(logits, k):
    """The routing a block applies for these router logits: top-k of the softmax, renormalised when k > 1."""
    weights, experts = logits.softmax(-1).topk(k)
    return Routing(logits, experts, weights / weights.sum(-1, keepdim=True) if k > 1 else weights)


def test_load_balancing_mixtral_and_paper_forms():
    # 4 tokens, 3 experts, top-1; hand: f = [2/4, 1/4, 1/4], P = column means of softmax
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.5], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    probs = logits.softmax(-1)
    f = torch.tensor([0.5, 0.25, 0.25])
    expected = 3 * (f * probs.mean(0)).sum()
    assert losses.load_balancing_loss([routed(logits, 1)]).item() == pytest.approx(expected.item(), rel=1e-6)
    # top-2: f sums to 2; paper form divides by k
    chosen = torch.zeros(4, 3).scatter_(1, probs.topk(2).indices, 1.0)
    expected2 = 3 * (chosen.mean(0) * probs.mean(0)).sum()
    assert losses.load_balancing_loss([routed(logits, 2)]).item() == pytest.approx(expected2.item(), rel=1e-6)
    assert losses.load_balancing_loss([routed(logits, 2)], form="paper").item() == pytest.approx(
        expected2.item() / 2, rel=1e-6
    )


def test_load_balancing_is_k_when_uniform_and_excludes_padding():
    uniform = torch.zeros(6, 4)
    assert losses.load_balancing_loss([routed(uniform, 2)]).item() == pytest.approx(2.0)
    assert losses.load_balancing_loss([routed(uniform, 2)], form="paper").item() == pytest.approx(1.0)
    logits = torch.randn(6, 4)
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    expected = losses.load_balancing_loss([routed(logits[mask.bool()], 2)])
    assert losses.load_balancing_loss([routed(logits, 2)], mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_load_balancing_averages_layers_with_their_own_expert_counts():
    a, b = torch.randn(5, 3), torch.randn(5, 6)
    mean = (losses.load_balancing_loss([routed(a, 2)]) + losses.load_balancing_loss([routed(b, 2)])) / 2
    assert losses.load_balancing_loss([routed(a, 2), routed(b, 2)]).item() == pytest.approx(mean.item(), rel=1e-6)


def test_balance_loss_counts_only_the_picks_a_classifier_allowed():
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    free = routed(logits, 2)
    # token 0 confined to expert 0: its second pick is disallowed and does not count as a selection
    confined = Routing(
        logits,
        torch.tensor([[0, 1], [2, 1]]),
        torch.tensor([[1.0, 0.0], [0.6, 0.4]]),
        allowed=torch.tensor([[True, False], [True, True]]),
    )
    probs = logits.softmax(-1).mean(0)
    f = torch.tensor([1.0, 1.0, 1.0]) / 2  # token 0 → {0}, token 1 → {1, 2}: per expert, the share of tokens
    assert losses.load_balancing_loss([confined]).item() == pytest.approx(3 * (f * probs).sum().item(), rel=1e-6)
    assert losses.load_balancing_loss([confined]).item() != pytest.approx(losses.load_balancing_loss([free]).item())


def test_unknown_forms_are_refused_in_one_line():
    logits = torch.randn(3, 3)
    with pytest.raises(UserError, match="unknown balance_loss_form 'switch'; valid: mixtral, paper"):
        losses.load_balancing_loss([routed(logits, 2)], form="switch")
    with pytest.raises(UserError, match="unknown lpr_loss_form 'Paper'"):
        losses.lpr_loss([logits], torch.ones(3), form="Paper")


def test_step_loss_weights_terms_once_and_scales_them_to_the_step():
    class Config:
        aux_loss_coef, lpr_loss_coef, cls_loss_coef = 0.01, 0.5, 0.0

    lm, aux, lpr, cls = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0), torch.tensor(5.0)
    terms = {"lm_loss": lm, "aux_loss": aux, "lpr_loss": lpr, "cls_loss": cls}
    loss, scaled = losses.step_loss(terms, Config())
    assert loss.item() == pytest.approx(2.0 + 0.03 + 2.0) and set(scaled) == {"lm_loss", "aux_loss", "lpr_loss"}
    # 2 processes, 4 micro-batches: globally counted terms ×2 (DDP averages), per-forward ones ÷4
    loss, scaled = losses.step_loss(terms, Config(), global_terms=frozenset({"lm_loss", "lpr_loss"}), split=(2, 4))
    assert scaled == {"lm_loss": lm * 2, "aux_loss": aux / 4, "lpr_loss": lpr * 2}
    assert loss.item() == pytest.approx(4.0 + 0.01 * 0.75 + 0.5 * 8.0)
    assert losses.step_loss({"lm_loss": None, "aux_loss": None}, Config()) == (None, {})


def test_lpr_paper_form_is_mean_minus_log_g0_over_layer_old_token_pairs():
    l1 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]])
    l2 = torch.tensor([[0.5, 0.5], [2.0, -1.0], [0.0, 4.0]])
    old = torch.tensor([1, 0, 1])
    terms = [-math.log(l.softmax(-1)[t, 0].item()) for l in (l1, l2) for t in (0, 2)]
    assert losses.lpr_loss([l1, l2], old).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_lpr_sum_reduction_is_the_papers_sum_over_layers_and_old_tokens_per_target_token():
    # Hand computation: two layers, 3 tokens of which tokens 0 and 2 are old; the LM loss is a mean over 5 targets.
    l1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    l2 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    old = torch.tensor([1, 0, 1])

    def nll(row):  # −log G_0
        return -math.log(math.exp(row[0]) / sum(math.exp(v) for v in row))

    total = nll([2.0, 0.0, 0.0]) + nll([0.5, 0.5, 0.0]) + nll([0.0, 0.0, 0.0]) + nll([1.0, -1.0, 0.0])
    assert losses.lpr_loss([l1, l2], old, reduction="sum", num_tokens=5).item() == pytest.approx(total / 5, rel=1e-6)
    assert losses.lpr_loss([l1, l2], old, reduction="sum", num_tokens=torch.tensor(5)).item() == pytest.approx(
        total / 5
    )
    assert losses.lpr_loss([l1, l2], old, reduction="sum").item() == pytest.approx(total / 3)  # default: all tokens
    assert losses.lpr_loss([l1, l2], old, reduction="mean").item() == pytest.approx(total / 4)  # (layer, old) pairs
    # each router's gradient: the sum form gives every old token weight 1/num_tokens, the mean form 1/(L·n_old)
    g = torch.zeros(3, 3, requires_grad=True)
    losses.lpr_loss([g, l2], old, reduction="sum", num_tokens=5).backward()
    expected = torch.tensor([[-2 / 3, 1 / 3, 1 / 3], [0, 0, 0], [-2 / 3, 1 / 3, 1 / 3]]) / 5
    assert torch.allclose(g.grad, expected, atol=1e-7)


def test_lpr_official_form_is_double_softmax_cross_entropy():
    logits = torch.randn(5, 6)
    old = torch.tensor([1, 1, 0, 1, 0])
    probs = logits.softmax(-1)[old.bool()]
    expected = F.cross_entropy(probs, torch.zeros(3, dtype=torch.long))
    assert losses.lpr_loss([logits], old, form="official").item() == pytest.approx(expected.item(), rel=1e-6)
    # bounded below by log(1 + (E-1)/e), as docs/method.md notes
    confident = torch.tensor([[100.0, 0, 0, 0, 0, 0]])
    bound = math.log(1 + 5 / math.e)
    assert losses.lpr_loss([confident], torch.tensor([1]), form="official").item() == pytest.approx(bound, rel=1e-5)


def test_lpr_without_old_tokens_is_zero_not_nan_and_keeps_graph():
    logits = torch.randn(4, 3, requires_grad=True)
    value = losses.lpr_loss([logits], torch.zeros(4))
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_classifier_loss_ignores_masked_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, -100])
    expected = F.cross_entropy(logits[:2], labels[:2])
    assert losses.classifier_loss([logits], [labels]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_chunked_causal_lm_loss_equals_full_loss_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 3] = -100
    full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    chunked = losses.causal_lm_loss(hidden, labels, head, chunk_size=4)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    g_full = torch.autograd.grad(full, hidden)[0]
    g_chunk = torch.autograd.grad(losses.causal_lm_loss(hidden, labels, head, chunk_size=3), hidden)[0]
    torch.testing.assert_close(g_chunk, g_full, atol=1e-6, rtol=1e-5)
    summed = losses.causal_lm_loss(hidden, labels, head, num_items_in_batch=20)
    assert summed.item() == pytest.approx(full.item() * 11 / 20, rel=1e-6)
