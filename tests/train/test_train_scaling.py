"""The loss terms do not depend on how a global batch is split, and resuming equals not stopping."""

import pytest
import torch
from train_helpers import TINY_RECIPES, logged, overrides

import moelpr
from moelpr.train import load_recipe, train


def _run(world, out, name="stage1.yaml", **kw):
    dense, corpora = world
    kw = {"model": str(dense), "corpora": str(corpora), "output_dir": str(out), **kw}
    recipe = load_recipe(TINY_RECIPES / name, overrides(**kw))
    return train(recipe)


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    return _run(world, tmp_path_factory.mktemp("ga") / "s1", max_steps=2)


@pytest.mark.parametrize(
    "name, extra",
    [("stage1.yaml", {}), ("stage2.yaml", {}), ("stage2.yaml", {"lpr_loss_reduction": "sum"})],
    ids=["s1", "s2", "s2-sum"],
)
def test_ga1_equals_ga4(world, stage1, tmp_path, name, extra):
    model = str(stage1) if name == "stage2.yaml" else str(world[0])
    one = logged(
        _run(
            world,
            tmp_path / "ga1",
            name,
            model=model,
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            **extra,
        )
    )[0]
    four = logged(
        _run(
            world,
            tmp_path / "ga4",
            name,
            model=model,
            max_steps=1,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            **extra,
        )
    )[0]
    assert four["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-5)
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-3)
    if name == "stage2.yaml":
        assert four["lpr_loss"] == pytest.approx(one["lpr_loss"], rel=1e-4)
        assert four["router_prob0_old"] == pytest.approx(one["router_prob0_old"], rel=1e-5)
    else:
        assert four["router_prob/expert_1"] == pytest.approx(one["router_prob/expert_1"], rel=1e-5)
        # The balance loss is defined per forward pass (official code), so a step of 4 micro-batches of 1 logs the
        # mean of their 4 losses (the stock Trainer would log their sum): the same 4 sequences as 4 steps of one,
        # with the weights held still (learning rate 0), log the same 4 losses.
        single = logged(
            _run(
                world,
                tmp_path / "ga1x4",
                name,
                model=model,
                max_steps=4,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=1,
                learning_rate=0.0,
                logging_steps=1,
                **extra,
            )
        )
        assert len(single) == 4
        assert four["aux_loss"] == pytest.approx(sum(r["aux_loss"] for r in single) / 4, rel=1e-3)


def test_resume_equals_uninterrupted(world, tmp_path):
    full = _run(world, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    assert (full / "checkpoints" / "checkpoint-2").is_dir()
    resumed = _run(
        world,
        tmp_path / "b",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        resume_from_checkpoint=str(full / "checkpoints" / "checkpoint-2"),
    )
    a = dict(moelpr.load_model(full).named_parameters())
    b = dict(moelpr.load_model(resumed).named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # resume_from_checkpoint: true finds the last checkpoint of the run in output_dir
    again = _run(world, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2, resume_from_checkpoint=True)
    assert again == full
