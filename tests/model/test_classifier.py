"""LayerMoE classifier-guided routing: limits, targets, confinement, training, generation, save/load."""

import pytest
import torch
from tiny import tiny_ids, tiny_model

import moelpr
from moelpr import UserError
from moelpr.model.classifier import LanguageClassifier, expert_limits, group_labels


def test_expert_limits_per_class():
    assert expert_limits([3], 2) == [1, 4]
    assert expert_limits([2, 3], 3) == [1, 3, 6]  # G0 → expert 0, G1 → + its experts, G2 → all
    assert expert_limits([2, 3], 2) == [1, 6]  # two classes: old vs everything else


def test_group_labels_sequence_majority_and_token_mode():
    groups = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert group_labels(groups, mask, 2, "sequence").tolist() == [0, 1]
    assert group_labels(groups, mask, 2, "token").tolist() == [0, 0, 1, 0, 1, 1, 0, -100]
    assert group_labels(groups, None, 3, "token").tolist()[-1] == 2


def classifier_model(pooling="sequence", layers=(0, 2)):
    moe = moelpr.upcycle(tiny_model(), num_experts=3, top_k=2, cls_loss_coef=1.0)
    moelpr.add_classifiers(moe, list(layers), num_classes=2, pooling=pooling)
    return moe


def test_old_group_tokens_use_only_expert_zero():
    moe = classifier_model()
    block = moe.lm.model.layers[0].mlp
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad(), moelpr.model.capture.capture_routing(moe) as captured:
        block.classifier.forced = torch.tensor([0, 1])  # sequence 0 → class 0 (old), sequence 1 → class 1 (new)
        out = block(hidden)
    (routing,) = captured
    experts, weights = routing.experts.view(2, 5, -1), routing.weights.view(2, 5, -1)
    picked0 = weights[0] > 0
    assert torch.all(experts[0][picked0] == 0) and torch.allclose(weights[0].sum(-1), torch.ones(5))
    assert (experts[1] > 0).any()  # the new-language sequence is routed over all experts
    torch.testing.assert_close(out[0], block.original(hidden[0]), atol=1e-6, rtol=1e-5)
    # what is reported is the routing that happened: the confined tokens take expert 0 alone, at weight 1,
    # although the router's own top-k (the raw logits) would have mixed in new experts
    from moelpr.evaluate.routing import RoutingSums

    confined = torch.tensor([[True] * 5, [False] * 5])
    report = RoutingSums.of(captured, confined).summary()
    assert report["expert0_weight"] == [1.0] and report["top_k_has_expert0"] == [1.0]
    free_weight0 = routing.logits.softmax(-1).topk(2).values[:5]
    assert (free_weight0[:, 0] / free_weight0.sum(-1) < 1).all()


@pytest.mark.parametrize("pooling", ["sequence", "token"])
def test_stage2_training_teaches_the_classifier_to_separate_groups(pooling):
    torch.manual_seed(0)
    moe = classifier_model(pooling)
    moelpr.set_trainable(moe, "stage2")
    moe.config.lpr_loss_coef = 0.1

    def batch(n=16, seq=10):
        # 32 token ids per group: 64 points in 64 dimensions, so even per-token classes are linearly separable
        old = torch.randint(0, 32, (n // 2, seq))
        new = torch.randint(64, 96, (n // 2, seq))
        ids = torch.cat([old, new])
        group = torch.cat([torch.zeros(n // 2, seq), torch.ones(n // 2, seq)]).long()
        return ids, group

    lr = {"sequence": 1e-2, "token": 2e-2}[pooling]  # sum pooling gives large inputs: a smaller step
    optimizer = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=lr)
    moe.train()
    for _ in range(60):
        ids, group = batch()
        out = moe(ids, labels=ids, lang_mask=(group == 0).long(), lang_group=group)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    moe.eval()
    ids, group = batch(64)
    with torch.no_grad(), moelpr.model.capture.capture_routing(moe) as routing:
        moe(ids)
    targets = group_labels(group, None, 2, pooling)
    logits = [r.classifier_logits for r in routing if r.classifier_logits is not None]
    assert len(logits) == 2
    for layer_logits in logits:
        accuracy = (layer_logits.argmax(-1) == targets).float().mean().item()
        assert accuracy >= 0.85  # chance is 0.5; held-out sequences
    assert out.cls_loss is not None and out.cls_loss.item() < 0.5


def test_generation_keeps_the_prompt_decision(monkeypatch):
    moe = classifier_model().eval()
    seen = []
    forward = LanguageClassifier.forward

    def spy(self, hidden_states):
        seen.append((hidden_states.shape[1], None if self.forced is None else self.forced.tolist()))
        return forward(self, hidden_states)

    monkeypatch.setattr(LanguageClassifier, "forward", spy)
    ids = tiny_ids(batch=1, seq=6)
    moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    prompt_calls = [f for s, f in seen if s == 6]
    decode_calls = [f for s, f in seen if s == 1]
    assert prompt_calls == [None, None]  # two classifier layers decide on the prompt
    assert decode_calls and all(f is not None for f in decode_calls)


def test_classifier_round_trip_and_bad_layers(tmp_path):
    moe = classifier_model()
    moelpr.save_model(moe, tmp_path / "full", format="full")
    loaded = moelpr.load_model(tmp_path / "full")
    assert loaded.config.classifier_layers == [0, 2]
    a, b = moe.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="only 3 MoE layers"):
        moelpr.add_classifiers(moelpr.upcycle(tiny_model(), num_experts=2), [0, 1, 2, 2])
    with pytest.raises(UserError, match="not an MoE layer"):
        moelpr.add_classifiers(moelpr.upcycle(tiny_model(), num_experts=[2, 1, 2]), [1])
