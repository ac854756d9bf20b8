"""Trainable sets of each stage, the parameter summary and training under gradient checkpointing."""

import torch
from tiny import tiny_ids, tiny_model

import moelpr
from moelpr.upcycling.expand import add_expert_group


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_sets():
    moe = moelpr.upcycle(tiny_model(), num_experts=3)
    names = {n for n, _ in moe.named_parameters()}
    stage1 = trainable(moe)
    assert stage1 == {n for n in names if ".mlp.experts." in n or ".mlp.routers." in n}
    moelpr.set_trainable(moe, "stage2")
    assert trainable(moe) == {n for n in names if ".mlp.routers." in n}
    moelpr.set_trainable(moe, "all")
    assert trainable(moe) == names
    moelpr.set_trainable(moe, "none")
    assert trainable(moe) == set()


def test_stage1_of_a_later_group_trains_only_that_group():
    moe = moelpr.upcycle(tiny_model(), num_experts=2)
    add_expert_group(moe.lm, [1, 2, 0])
    moelpr.set_trainable(moe, "stage1", groups=[1])
    assert trainable(moe) and all(".experts.1." in n or ".routers.1." in n for n in trainable(moe))


def test_parameter_summary_counts():
    moe = moelpr.upcycle(tiny_model(), num_experts=4, top_k=2)
    counts = moelpr.parameter_counts(moe)
    expert = 3 * 64 * 128
    assert counts["total"] - counts["active"] == 3 * 2 * expert  # 3 layers, 2 idle experts each
    assert counts["trainable"] == 3 * (3 * expert + 4 * 64)
    assert "trainable params: " in moelpr.parameter_summary(moe)


def test_gradients_reach_only_stage_parameters_with_checkpointing():
    moe = moelpr.upcycle(tiny_model(), num_experts=3)
    moe.train()
    moe.gradient_checkpointing_enable()
    ids = tiny_ids()
    out = moe(ids, labels=ids, lang_mask=torch.ones_like(ids), compute_logits=False)
    out.loss.backward()
    with_grad = {n for n, p in moe.named_parameters() if p.grad is not None}
    assert with_grad == trainable(moe)
    assert all(moe.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "routers" in n)


def test_checkpointed_and_plain_gradients_agree():
    def grads(checkpointing):
        moe = moelpr.upcycle(tiny_model(), num_experts=3)
        moe.train()
        if checkpointing:
            moe.gradient_checkpointing_enable()
        ids = tiny_ids()
        moe(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_forward_reports_each_loss_term():
    moe = moelpr.upcycle(tiny_model(), num_experts=3, lpr_loss_coef=0.1, aux_loss_coef=0.01)
    ids = tiny_ids()
    out = moe(ids, labels=ids, lang_mask=torch.ones_like(ids))
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.1 * out.lpr_loss
    torch.testing.assert_close(out.loss, expected)
    chunked = moe(ids, labels=ids, lang_mask=torch.ones_like(ids), compute_logits=False)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, out.loss)
